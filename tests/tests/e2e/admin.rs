//! The admin listener over HTTP on loopback: health, the active policy and
//! the last reload error, reload requests, and Prometheus metrics.

use std::net::SocketAddr;

use cellhost::admin::{serve, AdminCell};
use cellhost::client::Outgoing;
use cellhost::plugins::built_path;
use cellhost::policy::content_hash;
use cellhost_tests::{deploy, plugin, Direction, Topology, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

/// One HTTP/1.1 exchange: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_reports_and_reloads() {
    let nova = std::fs::read(built_path("nova_cells")).expect("built");
    let dir =
        std::env::temp_dir().join(format!("cellhost-admin-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);
    let policy_file = file.clone();
    let mut topo = Topology::start_configured(
        Transport::Memory,
        &PAIR,
        plugin("nova_cells", "").expect("policy"),
        true,
        |c| {
            if c.cell.name == "top" {
                c.policy.path = Some(policy_file.clone());
            }
        },
    )
    .await
    .expect("topology starts");
    let reloader = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), false)
        .expect("reload enabled");
    let cells = vec![AdminCell {
        router: topo.host_mut("top").router().clone(),
        reloader: Some(reloader),
    }];
    let addr = serve("127.0.0.1:0".parse().expect("addr"), cells)
        .await
        .expect("admin up");

    assert_eq!(http(addr, "GET", "/health").await, (200, "ok\n".into()));
    let (status, body) = http(addr, "GET", "/policy").await;
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report[0]["cell"], "top");
    assert_eq!(report[0]["active"]["hash"], content_hash(&nova));
    assert_eq!(report[0]["last_reload_error"], Value::Null);

    let keep = std::fs::read(built_path("keep_local")).expect("built");
    deploy(&file, &keep);
    let (status, body) = http(addr, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&content_hash(&keep)), "{body}");

    deploy(&file, b"not a policy");
    let (status, body) = http(addr, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    let (_, body) = http(addr, "GET", "/policy").await;
    let report: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        report[0]["active"]["hash"],
        content_hash(&keep),
        "the good version still serves"
    );
    assert!(
        report[0]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("not WebAssembly")),
        "{body}"
    );

    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "counted"),
        )
        .await
        .expect("sent");
    topo.processed(&uuid, 1).await.expect("delivered");
    let (status, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE cellhost_received_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cellhost_received_total{cell=\"top\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cellhost_policy_reload_errors{cell=\"top\"} 1"),
        "{metrics}"
    );

    topo.stop().await;
    let (status, body) = http(addr, "GET", "/health").await;
    assert_eq!(status, 503, "a stopped cell is not healthy: {body}");
    let _ = std::fs::remove_dir_all(&dir);
}
