//! cellhost joining an oslo.messaging deployment whose `[oslo_messaging_rabbit]`
//! options change what is declared (durable exchange, quorum topic queues,
//! expiring reply and fanout queues): the real oslo.messaging 18.3.1 from
//! target/oslo-venv declares first on every cell's broker, then the hosts
//! start with the same options, and messages cross three cells.
//!
//! Each exchange and queue a host declares is compared, property by
//! property as `rabbitmqctl` reports them, with what oslo declared for the
//! same role on the same broker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cellhost::client::Outgoing;
use cellhost::config::RabbitOptions;
use cellhost::wire::MessageType;
use cellhost::CellHost;
use cellhost_tests::oslo::{oslo_client_with, oslo_url as url, OsloProcess};
use cellhost_tests::{plugin, Direction, Topology, Transport};
use serde_json::{json, Value};

/// top, with children a and b.
const TREE: [(&str, Option<&str>); 3] = [("top", None), ("a", Some("top")), ("b", Some("top"))];

/// Casts or calls with an oslo client configured by `conf`; a call's result.
fn oslo_client(url: &str, conf: &Path, mode: &str, message: &Value) -> Value {
    let extra = ["--config-file".to_string(), conf.display().to_string()];
    let (text, _) = oslo_client_with(url, mode, message, &extra);
    if mode == "call" {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    } else {
        Value::Null
    }
}

fn entering(outgoing: Outgoing, need_response: bool) -> Value {
    let mut m = outgoing.to_message();
    m.need_response = need_response;
    m.ctxt.insert("request_id".into(), json!("req-deployed"));
    serde_json::from_str(&m.to_json()).expect("our JSON parses")
}

/// An exchange or queue as `rabbitmqctl` lists it: the properties a second
/// declaration must match. Argument values only: RabbitMQ compares integers
/// by value, whatever their width.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Declared {
    /// Exchanges only: topic, fanout.
    kind: Option<String>,
    durable: bool,
    auto_delete: bool,
    arguments: BTreeMap<String, Value>,
}

impl std::fmt::Display for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(kind) = &self.kind {
            write!(f, "{kind} ")?;
        }
        write!(
            f,
            "durable={} auto_delete={}",
            self.durable, self.auto_delete
        )?;
        for (k, v) in &self.arguments {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// Every exchange and queue of one vhost, by name.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    exchanges: BTreeMap<String, Declared>,
    queues: BTreeMap<String, Declared>,
}

impl Snapshot {
    fn queue(&self, name: &str) -> &Declared {
        self.queues
            .get(name)
            .unwrap_or_else(|| panic!("no queue {name:?}; queues: {:?}", self.queues.keys()))
    }

    fn exchange(&self, name: &str) -> &Declared {
        self.exchanges
            .get(name)
            .unwrap_or_else(|| panic!("no exchange {name:?}"))
    }

    /// The one queue whose name starts with `prefix`, among `names`.
    fn only(&self, names: &BTreeSet<&String>, prefix: &str) -> (String, Declared) {
        let found: Vec<_> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "one queue {prefix}*: {found:?}");
        (found[0].to_string(), self.queue(found[0]).clone())
    }
}

/// Lists the exchanges and queues of every vhost, all rabbitmqctl runs at once.
fn snapshot(vhosts: &[String]) -> Vec<Snapshot> {
    let list = |vhost: &str, what: &str, columns: &[&str]| {
        Command::new("rabbitmqctl")
            .args(["-q", "--formatter", "json", what, "-p", vhost])
            .args(columns)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rabbitmqctl runs")
    };
    let children: Vec<_> = vhosts
        .iter()
        .map(|v| {
            (
                list(
                    v,
                    "list_exchanges",
                    &["name", "type", "durable", "auto_delete", "arguments"],
                ),
                list(
                    v,
                    "list_queues",
                    &["name", "durable", "auto_delete", "arguments"],
                ),
            )
        })
        .collect();
    let read = |child: Child| -> BTreeMap<String, Declared> {
        let out = child.wait_with_output().expect("rabbitmqctl finishes");
        assert!(
            out.status.success(),
            "rabbitmqctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("rabbitmqctl JSON");
        rows.iter()
            .map(|row| {
                // [[key, type, value], ...]
                let arguments = row["arguments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| Some((a[0].as_str()?.to_string(), a[2].clone())))
                    .collect();
                let declared = Declared {
                    kind: row["type"].as_str().map(str::to_string),
                    durable: row["durable"] == json!(true),
                    auto_delete: row["auto_delete"] == json!(true),
                    arguments,
                };
                (
                    row["name"].as_str().unwrap_or_default().to_string(),
                    declared,
                )
            })
            .collect()
    };
    children
        .into_iter()
        .map(|(exchanges, queues)| Snapshot {
            exchanges: read(exchanges),
            queues: read(queues),
        })
        .collect()
}

/// Asserts that cellhost's declarations on one cell's broker (`after`, less
/// what was there `before`, plus the shared names both declare) equal what
/// oslo declared for the same role; returns the table rows.
fn compare_roles(
    cell: &str,
    host_id: &str,
    before: &Snapshot,
    after: &Snapshot,
    options: &RabbitOptions,
) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    let mut same = |role: &str, ours: &str, theirs: &str, o: &Declared, t: &Declared| {
        assert_eq!(
            o, t,
            "cell {cell}, role {role}: cellhost's {ours} differs from oslo's {theirs}"
        );
        if cell == "top" && !rows.iter().any(|(r, _, _): &(String, _, _)| r == role) {
            rows.push((role.to_string(), t.to_string(), o.to_string()));
        }
    };
    // Shared names, declared by oslo first: still exactly as oslo left them.
    same(
        "exchange nova",
        "nova",
        "nova",
        after.exchange("nova"),
        before.exchange("nova"),
    );
    let oslo_topic = before.queue("cells.local");
    same(
        "T (cells.local)",
        "cells.local",
        "cells.local",
        after.queue("cells.local"),
        oslo_topic,
    );
    let new: BTreeSet<&String> = after
        .queues
        .keys()
        .filter(|n| !before.queues.contains_key(*n))
        .collect();
    let oslo_server = format!("cells.local.w-{cell}");
    let (oslo_fanout, oslo_fanout_q) =
        before.only(&before.queues.keys().collect(), "cells.local_fanout_");
    let (oslo_reply, oslo_reply_q) = before.only(&before.queues.keys().collect(), "reply_");
    let mut accounted = BTreeSet::new();
    for kind in MessageType::all() {
        let topic = format!("cells.intercell.{}", kind.as_str());
        same(
            "T (intercell)",
            &topic,
            "cells.local",
            after.queue(&topic),
            oslo_topic,
        );
        // nova-cells' leftover declaration was accepted unchanged.
        assert_eq!(after.queue(&topic), before.queue(&topic), "{topic}");
        let per_host = format!("{topic}.{host_id}");
        same(
            "T.S",
            &per_host,
            &oslo_server,
            after.queue(&per_host),
            before.queue(&oslo_server),
        );
        let fanout = format!("{topic}_fanout");
        same(
            "T_fanout",
            &fanout,
            "cells.local_fanout",
            after.exchange(&fanout),
            before.exchange("cells.local_fanout"),
        );
        let (ours, q) = after.only(&new, &format!("{fanout}_"));
        same("T_fanout_<hex>", &ours, &oslo_fanout, &q, &oslo_fanout_q);
        accounted.extend([per_host, ours]);
    }
    let (ours, q) = after.only(&new, "reply_");
    same("reply_<hex>", &ours, &oslo_reply, &q, &oslo_reply_q);
    accounted.insert(ours);
    // cellhost's own: durable always, quorum with quorum topic queues.
    let dead = after.queue("cells.intercell.dead");
    let mut expected = BTreeMap::new();
    if options.rabbit_quorum_queue {
        expected.insert("x-queue-type".to_string(), json!("quorum"));
    }
    assert_eq!(
        dead,
        &Declared {
            kind: None,
            durable: true,
            auto_delete: false,
            arguments: expected.clone()
        },
        "cell {cell}: the dead-letter queue"
    );
    accounted.insert("cells.intercell.dead".to_string());
    // cellhost's own park queues, one per neighbour: as the dead-letter
    // queue, bounded by age and length, expiring into it.
    let parks: Vec<String> = new
        .iter()
        .filter(|n| n.starts_with("cells.intercell.park."))
        .map(|n| n.to_string())
        .collect();
    assert!(!parks.is_empty(), "cell {cell}: a park queue per neighbour");
    for park in parks {
        let mut expected = expected.clone();
        expected.insert("x-message-ttl".to_string(), json!(86_400_000));
        expected.insert("x-max-length".to_string(), json!(1_000_000));
        expected.insert("x-overflow".to_string(), json!("reject-publish"));
        expected.insert("x-dead-letter-exchange".to_string(), json!(""));
        expected.insert(
            "x-dead-letter-routing-key".to_string(),
            json!("cells.intercell.dead"),
        );
        assert_eq!(
            after.queue(&park),
            &Declared {
                kind: None,
                durable: true,
                auto_delete: false,
                arguments: expected
            },
            "cell {cell}: the park queue {park}"
        );
        accounted.insert(park);
    }
    if cell == "top" {
        rows.push((
            "cells.intercell.dead (cellhost's own)".into(),
            "-".into(),
            dead.to_string(),
        ));
    }
    let unexplained: Vec<_> = new
        .iter()
        .filter(|n| !accounted.contains(n.as_str()))
        .collect();
    assert!(
        unexplained.is_empty(),
        "cell {cell}: queues not compared: {unexplained:?}"
    );
    rows
}

/// The oslo deployment declares first, cellhost with the same options
/// joins it, and a cast, a call and a broadcast call cross three cells.
async fn deployment_with(options_section: &str, options: RabbitOptions) {
    let policy = plugin("nova_cells", "").expect("policy");
    let mut topo = Topology::prepare(Transport::Rabbit, &TREE, |c| {
        c.oslo_messaging_rabbit = options.clone()
    })
    .expect("vhosts");
    let conf = std::env::temp_dir().join(format!("{}-oslo.conf", topo.prefix()));
    std::fs::write(
        &conf,
        format!("[oslo_messaging_rabbit]\n{options_section}\n"),
    )
    .expect("oslo config written");
    let conf_arg = conf.to_string_lossy().into_owned();
    let cells: Vec<&str> = TREE.iter().map(|(c, _)| *c).collect();
    let vhosts: Vec<String> = cells.iter().map(|c| topo.vhost(c)).collect();

    // The oslo services of every cell, first: the worker behind the cell, then
    // nova-cells' leftover queues and a caller's reply queue.
    let workers: BTreeMap<&str, OsloProcess> = cells
        .iter()
        .map(|c| {
            let u = url(&topo, c);
            (
                *c,
                OsloProcess::spawn("worker.py", &[&u, c, "--config-file", &conf_arg]),
            )
        })
        .collect();
    for worker in workers.values() {
        assert_eq!(worker.next_line(), "ready");
    }
    let declarers: Vec<OsloProcess> = cells
        .iter()
        .map(|c| {
            OsloProcess::spawn(
                "declare.py",
                &[&url(&topo, c), c, "--config-file", &conf_arg],
            )
        })
        .collect();
    for (cell, declarer) in cells.iter().zip(&declarers) {
        assert_eq!(declarer.next_line(), "ready");
        let uptime: Value =
            serde_json::from_str(&workers[cell].next_line()).expect("the worker prints JSON");
        assert_eq!(uptime["method"], json!("get_host_uptime"));
    }
    drop(declarers);
    let before = snapshot(&vhosts);

    if options.amqp_durable_queues || options.rabbit_quorum_queue {
        // A host whose options differ from the deployment's is refused at
        // start, with an error that says what to change.
        let mut mismatched = topo.config("top").clone();
        mismatched.oslo_messaging_rabbit = RabbitOptions::default();
        let err = match CellHost::start(mismatched, policy.clone()).await {
            Ok(_) => panic!("a host declaring nova non-durable started on a durable deployment"),
            Err(e) => format!("{e:#}"),
        };
        for needle in [
            "\"nova\"",
            "durable",
            "amqp_durable_queues or rabbit_quorum_queue",
            "[oslo_messaging_rabbit]",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    topo.start_hosts(policy, false)
        .await
        .expect("the hosts start on the oslo deployment's brokers");
    let after = snapshot(&vhosts);
    let mut table = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        let host_id = topo.config(cell).host_id();
        table.extend(compare_roles(
            cell, &host_id, &before[i], &after[i], &options,
        ));
    }
    eprintln!("declarations under [oslo_messaging_rabbit] {options_section:?}:");
    for (role, oslo, ours) in &table {
        eprintln!("  {role:<38} oslo: {oslo:<60} cellhost: {ours}");
    }

    let top = url(&topo, "top");
    // A targeted cast from a Python client in top reaches the Python worker of a.
    let cast = entering(
        Outgoing::targeted("top!a", Direction::Down, "reboot_instance"),
        false,
    );
    oslo_client(&top, &conf, "cast", &cast);
    let processed: Value = serde_json::from_str(&workers["a"].next_line()).expect("JSON line");
    assert_eq!(processed["method"], json!("reboot_instance"));
    assert_eq!(processed["ctxt"]["cell_routing_path"], json!("top!a"));

    // A targeted call answered by b's worker.
    let call = entering(
        Outgoing::targeted("top!b", Direction::Down, "get_host_uptime"),
        true,
    );
    let result = oslo_client(&top, &conf, "call", &call);
    assert_eq!(
        result,
        json!({"cell_name": "top!b", "value": "uptime of b", "failure": false})
    );
    let _ = workers["b"].next_line();

    // A broadcast call down from top: every cell's worker answers.
    let broadcast = entering(
        Outgoing::broadcast(Direction::Down, "get_host_uptime"),
        true,
    );
    let result = oslo_client(&top, &conf, "call", &broadcast);
    let mut responses: Vec<Value> = result.as_array().cloned().unwrap_or_default();
    responses.sort_by_key(|r| r["cell_name"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        responses,
        vec![
            json!({"cell_name": "top", "value": "uptime of top", "failure": false}),
            json!({"cell_name": "top!a", "value": "uptime of a", "failure": false}),
            json!({"cell_name": "top!b", "value": "uptime of b", "failure": false}),
        ],
        "{result}"
    );

    drop(workers);
    topo.stop().await;
    let _ = std::fs::remove_file(&conf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_deployment_works_through_cellhost() {
    deployment_with(
        "rabbit_quorum_queue = true",
        RabbitOptions {
            rabbit_quorum_queue: true,
            ..RabbitOptions::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queue_deployment_works_through_cellhost() {
    deployment_with(
        "amqp_durable_queues = true",
        RabbitOptions {
            amqp_durable_queues: true,
            ..RabbitOptions::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deployment_matches_oslo_declarations() {
    deployment_with("", RabbitOptions::default()).await;
}
