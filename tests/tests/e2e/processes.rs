//! The real binary end to end: two `cellhost run` processes serving a parent
//! and a child cell on RabbitMQ, `cellhost send` casting into the parent, and
//! a graceful stop on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cellhost::config::Config;
use cellhost::sched::Class;
use cellhost::transport::Broker;
use cellhost_tests::{cellhost_bin, create_vhosts, delete_vhosts, PATIENCE};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn url(vhost: &str) -> String {
    format!("rabbit://guest:guest@127.0.0.1:5672/{vhost}")
}

/// Linux's number for the batch scheduling policy, as /proc shows it.
const SCHED_BATCH: u32 = 3;

/// The scheduling policy of each thread of process `pid` (name, policy),
/// read from /proc (field 41 of `stat`).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the host's /proc entry");
    tasks
        .map(|task| {
            let stat = std::fs::read_to_string(task.expect("task entry").path().join("stat"))
                .expect("a thread's stat");
            policy_of(&stat)
        })
        .collect()
}

/// A thread's name and policy from its `stat` line: the name is in
/// parentheses (and may hold spaces), the policy is the 39th field after them.
fn policy_of(stat: &str) -> (String, u32) {
    let (open, close) = (
        stat.find('(').expect("stat has the name"),
        stat.rfind(')').expect("stat has the name"),
    );
    let policy = stat[close + 1..]
        .split_whitespace()
        .nth(38)
        .and_then(|field| field.parse().ok())
        .expect("stat has the policy");
    (stat[open + 1..close].to_string(), policy)
}

/// This test process's own scheduling policy.
fn own_policy() -> u32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("own stat");
    policy_of(&stat).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_send_route_a_message_between_two_processes() {
    let prefix = format!("chp-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let (top, leaf) = (format!("{prefix}-top"), format!("{prefix}-leaf"));
    create_vhosts(&[top.clone(), leaf.clone()]).expect("vhosts");
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let top_toml = dir.join("top.toml");
    let leaf_toml = dir.join("leaf.toml");
    std::fs::write(
        &top_toml,
        format!(
            "[cell]\nname = \"top\"\ntransport_url = \"{}\"\n\n[[neighbours]]\nname = \"leaf\"\ntransport_url = \"{}\"\n",
            url(&top),
            url(&leaf)
        ),
    )
    .expect("config");
    std::fs::write(
        &leaf_toml,
        format!(
            "[cell]\nname = \"leaf\"\ntransport_url = \"{}\"\n\n[[neighbours]]\nname = \"top\"\nis_parent = true\ntransport_url = \"{}\"\n",
            url(&leaf),
            url(&top)
        ),
    )
    .expect("config");

    // The application behind the leaf cell.
    let leaf_config = Config::load(&leaf_toml).expect("the config the host reads is valid");
    let broker = Broker::connect(
        &leaf_config.cell.transport_url,
        &leaf_config.oslo_messaging_rabbit,
        "leaf-app",
    )
    .await
    .expect("connect");
    let mut worker = cellhost::demo::start_local_worker(&broker, &leaf_config)
        .await
        .expect("worker");

    let spawn = |config: &std::path::Path| {
        Running(
            Command::new(cellhost_bin())
                .args(["run", "--config"])
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cellhost run starts"),
        )
    };
    let mut top_host = spawn(&top_toml);
    let mut leaf_host = spawn(&leaf_toml);

    // The message is cast before the hosts may be ready: the queues the
    // sender and the hosts declare keep it until they are.
    let out = Command::new(cellhost_bin())
        .args([
            "send",
            "--url",
            &url(&top),
            "--type",
            "targeted",
            "--target",
            "top!leaf",
        ])
        .args([
            "--method",
            "resize",
            "--kwargs",
            r#"{"flavor": "m1.large"}"#,
        ])
        .args(["--ctxt", r#"{"request_id": "req-cli"}"#])
        .output()
        .expect("cellhost send runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uuid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(uuid.len(), 36, "send prints the message uuid: {uuid:?}");

    let got = tokio::time::timeout(PATIENCE, worker.processed.recv())
        .await
        .expect("the leaf's application got the message in time")
        .expect("worker alive");
    assert_eq!(got.message_uuid, uuid);
    assert_eq!(got.routing_path, "top!leaf");
    assert_eq!(got.method, "resize");
    assert_eq!(
        got.kwargs.get("flavor"),
        Some(&serde_json::json!("m1.large"))
    );
    assert_eq!(
        got.context.get("request_id"),
        Some(&serde_json::json!("req-cli"))
    );

    // A call: `send --wait` prints the response the leaf's application gave.
    let out = Command::new(cellhost_bin())
        .args([
            "send",
            "--url",
            &url(&top),
            "--type",
            "targeted",
            "--target",
            "top!leaf",
        ])
        .args(["--method", "get_host_uptime", "--wait", "--timeout", "15"])
        .output()
        .expect("cellhost send --wait runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("send --wait prints JSON");
    assert_eq!(
        printed,
        serde_json::json!({"cell_name": "top!leaf", "value": "leaf", "failure": false})
    );

    // Started from a process of the normal class, every thread of a host
    // (workers, lapin's I/O threads, the epoch ticker) runs in the batch
    // class, as `chrt -p` would show; started in another class, it keeps it.
    let expected = match cellhost::sched::current() {
        Some(Class::Normal) => SCHED_BATCH,
        _ => own_policy(),
    };
    for host in [&top_host, &leaf_host] {
        let policies = thread_policies(host.0.id());
        assert!(
            policies.len() > 2,
            "a host runs several threads: {policies:?}"
        );
        assert!(
            policies.iter().all(|(_, policy)| *policy == expected),
            "every thread in scheduling policy {expected}: {policies:?}"
        );
    }

    // SIGTERM: stop consuming, finish in flight, exit 0.
    for host in [&mut top_host, &mut leaf_host] {
        let pid = host.0.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }
    for host in [&mut top_host, &mut leaf_host] {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = host.0.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "host did not stop on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "graceful stop exits 0, got {status}");
    }
    broker.close().await;
    let _ = delete_vhosts(&[top, leaf]);
    let _ = std::fs::remove_dir_all(&dir);
}
