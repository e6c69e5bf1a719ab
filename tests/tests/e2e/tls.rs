//! TLS to the brokers (issue 8): cells whose brokers are reached over
//! `amqps://` and oslo's `rabbit://...?ssl=1`, verified against
//! `ssl_ca_file`; a broker whose certificate does not verify is refused with
//! an error that says so, promptly.
//!
//! One extra RabbitMQ node per test binary, listening only on TLS (no plain
//! AMQP port at all, so every connection that works went through TLS), with
//! a certificate for `localhost` and 127.0.0.1 signed by a test CA.

use std::sync::OnceLock;
use std::time::Duration;

use cellhost::client::Outgoing;
use cellhost::config::{Config, RabbitOptions, TransportUrl};
use cellhost::transport::Broker;
use cellhost::wire::{CellResponse, ReplyOutcome};
use cellhost::CellHost;
use cellhost_tests::rabbit_node::{NodeSpec, RabbitNode, TestCerts};
use cellhost_tests::{plugin, Direction, Topology, PATIENCE};
use serde_json::json;

struct TlsNode {
    certs: TestCerts,
    node: RabbitNode,
    /// The node's AMQPS port.
    port: u16,
}

/// The TLS node all tests of this binary share; booted by the first test
/// that needs it, stopped when the test process ends.
fn tls_node() -> &'static TlsNode {
    static NODE: OnceLock<Result<TlsNode, String>> = OnceLock::new();
    let started = NODE.get_or_init(|| {
        let certs = TestCerts::generate("tls").map_err(|e| format!("{e:#}"))?;
        let node = RabbitNode::start(&NodeSpec {
            label: "tls".into(),
            tcp: false,
            tls: Some(certs.server_tls(false)),
        })
        .map_err(|e| format!("{e:#}"))?;
        let port = node.tls_port.ok_or("the node has no TLS port")?;
        Ok(TlsNode { certs, node, port })
    });
    match started {
        Ok(node) => node,
        Err(e) => panic!("the TLS RabbitMQ node did not start: {e}"),
    }
}

/// Fresh vhosts on the TLS node, removed when dropped.
struct TlsVhosts(Vec<String>);

impl TlsVhosts {
    fn create(names: &[String]) -> TlsVhosts {
        let node = &tls_node().node;
        let vhosts = TlsVhosts(names.to_vec());
        for v in names {
            node.add_vhost(v).expect("vhost on the TLS node");
        }
        vhosts
    }
}

impl Drop for TlsVhosts {
    fn drop(&mut self) {
        for v in &self.0 {
            let _ = tls_node().node.delete_vhost(v);
        }
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn options_trusting(ca: &std::path::Path) -> RabbitOptions {
    RabbitOptions {
        ssl_ca_file: ca.to_string_lossy().into_owned(),
        ..RabbitOptions::default()
    }
}

/// A client connection as the TLS node lists it.
#[derive(Debug)]
struct Listed {
    /// The `connection_name` the client gave.
    name: String,
    vhost: String,
    ssl: bool,
    /// The negotiated heartbeat, in seconds.
    timeout: u64,
}

/// The connections the TLS node has open, read from `rabbitmqctl`'s JSON.
fn connections() -> Vec<Listed> {
    let out = tls_node()
        .node
        .ctl(&[
            "list_connections",
            "client_properties",
            "vhost",
            "ssl",
            "timeout",
            "--formatter",
            "json",
        ])
        .expect("list_connections");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON: {out}"));
    rows.iter()
        .map(|row| {
            // client_properties: [["connection_name", "longstr", "cellhost x"], ...]
            let name = row["client_properties"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p[0] == "connection_name")
                .and_then(|p| p[2].as_str())
                .unwrap_or_default()
                .to_string();
            Listed {
                name,
                vhost: row["vhost"].as_str().unwrap_or_default().to_string(),
                ssl: row["ssl"].as_bool().unwrap_or(false),
                timeout: row["timeout"].as_u64().unwrap_or(0),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_call_each_other_over_tls_in_both_url_forms() {
    let tls = tls_node();
    let parent_vhost = unique("tls-parent");
    let child_vhost = unique("tls-child");
    let _vhosts = TlsVhosts::create(&[parent_vhost.clone(), child_vhost.clone()]);
    let port = tls.port;
    let url_of = |cell: &str| -> TransportUrl {
        let url = match cell {
            // Both forms oslo deployments write.
            "parent" => format!("amqps://guest:guest@localhost:{port}/{parent_vhost}"),
            _ => format!("rabbit://guest:guest@127.0.0.1:{port}/{child_vhost}?ssl=1"),
        };
        url.parse().expect("a well-formed TLS URL")
    };
    let ca = tls.certs.ca.clone();
    let topo = Topology::start_on(
        &[("parent", None), ("child", Some("parent"))],
        plugin("nova_cells", "").expect("policy"),
        url_of,
        |config: &mut Config| config.oslo_messaging_rabbit = options_trusting(&ca),
    )
    .await
    .expect("both cells start over TLS");

    let reply = topo
        .call(
            "parent",
            Outgoing::targeted("parent!child", Direction::Down, "get_host_uptime"),
            Duration::from_secs(10),
        )
        .await
        .expect("the call across the two cells is answered");
    let ReplyOutcome::Result(value) = reply.outcome else {
        panic!("expected a response, got {:?}", reply.outcome)
    };
    let response = CellResponse::from_value(&value).expect("a cell response");
    assert_eq!(response.cell_name, "parent!child");
    assert_eq!(response.value, json!("child"));
    assert!(!response.failure);

    // Each host's own link and its link to the neighbour are TLS
    // connections to the right vhost (the node has no plain listener at
    // all, and says so per connection).
    let open = connections();
    for (name, vhost) in [
        ("cellhost parent", &parent_vhost),
        ("cellhost child", &child_vhost),
        ("cellhost parent->child", &child_vhost),
        ("cellhost child->parent", &parent_vhost),
    ] {
        let found: Vec<_> = open
            .iter()
            .filter(|c| c.name == name && &c.vhost == vhost)
            .collect();
        assert!(
            !found.is_empty(),
            "no connection {name:?} on vhost {vhost}: {open:?}"
        );
        assert!(found.iter().all(|c| c.ssl), "{name} is not TLS: {open:?}");
    }
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let tls = tls_node();
    let vhost = unique("tls-wrong-ca");
    let _vhosts = TlsVhosts::create(std::slice::from_ref(&vhost));
    let url: TransportUrl = format!("amqps://guest:guest@localhost:{}/{vhost}", tls.port)
        .parse()
        .expect("valid URL");
    let wrong = options_trusting(&tls.certs.other_ca);

    let connect = Broker::connect(&url, &wrong, "wrong-ca");
    let err = match tokio::time::timeout(PATIENCE, connect).await {
        Ok(Ok(_)) => panic!("a broker whose certificate does not verify was accepted"),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => panic!("connecting with the wrong CA hung for {PATIENCE:?}"),
    };
    eprintln!("refused as it should be: {err}");
    assert!(err.contains("did not verify"), "{err}");
    assert!(
        err.contains(&tls.certs.other_ca.display().to_string()),
        "the error names the CA file: {err}"
    );
    assert!(
        err.contains("wrong-ca"),
        "the error names the broker: {err}"
    );

    // The same through a whole host: it does not start.
    let mut config = Config::for_cell("lonely", url.clone());
    config.oslo_messaging_rabbit = wrong;
    let start = CellHost::start(config, plugin("nova_cells", "").expect("policy"));
    match tokio::time::timeout(PATIENCE, start).await {
        Ok(Ok(_)) => panic!("a host started against a broker it cannot verify"),
        Ok(Err(e)) => {
            let err = format!("{e:#}");
            assert!(err.contains("did not verify"), "{err}");
        }
        Err(_) => panic!("CellHost::start with the wrong CA hung for {PATIENCE:?}"),
    }

    // No `ssl_ca_file`: the system's CAs, which do not know the test CA.
    let system = RabbitOptions::default();
    match tokio::time::timeout(PATIENCE, Broker::connect(&url, &system, "system-roots")).await {
        Ok(Ok(_)) => panic!("the system's CAs accepted a certificate of the test CA"),
        Ok(Err(e)) => {
            let err = format!("{e:#}");
            assert!(err.contains("did not verify"), "{err}");
            assert!(err.contains("system's trusted CAs"), "{err}");
        }
        Err(_) => panic!("connecting with the system's CAs hung for {PATIENCE:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssl_option_turns_tls_on_and_the_heartbeat_threshold_is_negotiated() {
    let tls = tls_node();
    let vhost = unique("tls-option");
    let _vhosts = TlsVhosts::create(std::slice::from_ref(&vhost));
    // Nothing in the URL says TLS: `[oslo_messaging_rabbit] ssl = true` does.
    let url: TransportUrl = format!("rabbit://guest:guest@localhost:{}/{vhost}", tls.port)
        .parse()
        .expect("valid URL");
    let options = RabbitOptions {
        ssl: true,
        // Not the broker's 60 s: the lower proposal wins the negotiation.
        heartbeat_timeout_threshold: 17,
        ..options_trusting(&tls.certs.ca)
    };
    let broker = tokio::time::timeout(PATIENCE, Broker::connect(&url, &options, "ssl-option"))
        .await
        .expect("connect does not hang")
        .expect("ssl = true connects over TLS");
    // The broker's view: RabbitMQ's `timeout` is the negotiated heartbeat.
    let open = connections();
    let ours: Vec<_> = open
        .iter()
        .filter(|c| c.name == "cellhost ssl-option")
        .collect();
    assert_eq!(ours.len(), 1, "{open:?}");
    assert!(ours[0].ssl && ours[0].vhost == vhost, "{open:?}");
    assert_eq!(ours[0].timeout, 17, "{open:?}");
    broker.close().await;
}

/// A second node of this binary, which requires client certificates signed
/// by the test CA (`verify_peer`, `fail_if_no_peer_cert`).
fn mutual_tls_node() -> &'static (RabbitNode, u16) {
    static NODE: OnceLock<Result<(RabbitNode, u16), String>> = OnceLock::new();
    let started = NODE.get_or_init(|| {
        let node = RabbitNode::start(&NodeSpec {
            label: "mtls".into(),
            tcp: false,
            tls: Some(tls_node().certs.server_tls(true)),
        })
        .map_err(|e| format!("{e:#}"))?;
        let port = node.tls_port.ok_or("the node has no TLS port")?;
        Ok((node, port))
    });
    match started {
        Ok(node) => node,
        Err(e) => panic!("the mutual-TLS RabbitMQ node did not start: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_from_ssl_cert_file_and_ssl_key_file() {
    let certs = &tls_node().certs;
    let (node, port) = mutual_tls_node();
    let vhost = unique("mtls");
    node.add_vhost(&vhost)
        .expect("vhost on the mutual-TLS node");
    let url: TransportUrl = format!("amqps://guest:guest@localhost:{port}/{vhost}")
        .parse()
        .expect("valid URL");

    let with_cert = RabbitOptions {
        ssl_cert_file: certs.client_cert.to_string_lossy().into_owned(),
        ssl_key_file: certs.client_key.to_string_lossy().into_owned(),
        ..options_trusting(&certs.ca)
    };
    let broker = tokio::time::timeout(PATIENCE, Broker::connect(&url, &with_cert, "mtls"))
        .await
        .expect("connect does not hang")
        .expect("the broker accepts our client certificate");
    // The broker saw the certificate we were given.
    let listed = node
        .ctl(&["list_connections", "vhost", "peer_cert_subject"])
        .expect("list_connections");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&vhost) && l.contains("cellhost test client")),
        "{listed}"
    );
    broker.close().await;

    // Without one, the broker hangs up during the handshake.
    let without = options_trusting(&certs.ca);
    match tokio::time::timeout(PATIENCE, Broker::connect(&url, &without, "no-cert")).await {
        Ok(Ok(_)) => panic!("a broker that requires client certificates let us in without one"),
        Ok(Err(e)) => {
            let err = format!("{e:#}");
            eprintln!("refused as it should be: {err}");
            assert!(err.contains("client certificate"), "{err}");
            assert!(err.contains("ssl_cert_file"), "{err}");
        }
        Err(_) => panic!("connecting without a client certificate hung for {PATIENCE:?}"),
    }
    let _ = node.delete_vhost(&vhost);
}
