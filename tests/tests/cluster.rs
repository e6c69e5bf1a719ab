//! A cell whose broker is a three-node RabbitMQ cluster, with quorum
//! queues: the node its host is connected to is stopped mid-stream, and the
//! host fails over to another node through its multi-host `transport_url`
//! without losing a message (issue 9).
//!
//! The test starts three extra RabbitMQ nodes on this machine (own names,
//! ports and folders, see `cellhost_tests::rabbit_node`) and clusters them;
//! the node on 127.0.0.1:5672 that serves every other test stays out of it.
//! Both cells of a one-hop relay live on the cluster: child `a` sends
//! targeted messages up to its parent `b`. Every cellhost URL lists the
//! three nodes, and `rabbit_quorum_queue = true`, so each queue has a member
//! on each node and stays available while a majority is up.
//!
//! 20,000 messages are cast into `a` through a node that stays up; an
//! application on `b` (a plain lapin consumer on `cells.local`, also on a
//! surviving node) records the `cell_message_uuid` of every local delivery.
//! Once a quarter have arrived, the node holding the connection of `a`'s
//! host gets `rabbitmqctl stop_app`. The test waits (bounded, on the
//! consumer's own count) until every uuid arrived at least once and `a`'s
//! queues are empty, then prints sent, delivered, duplicated, lost, how long
//! after the stop the host was on another node, the longest pause in
//! deliveries after the stop, and when the last message arrived.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cellhost::client::Outgoing;
use cellhost::config::{Config, TransportUrl};
use cellhost::router::Stats;
use cellhost::topology::tree_configs;
use cellhost::CellHost;
use cellhost_tests::rabbit_node::{NodeSpec, RabbitNode};
use cellhost_tests::stream::{messages, publish_all, App, Tally, QUEUE_BASE};
use cellhost_tests::{plugin, Direction};

/// Messages the test streams.
const MESSAGES: usize = 20_000;
/// The node is stopped once this many were delivered: mid-stream.
const STRIKE_AT: usize = 5_000;
/// The longest the test waits for every message to be delivered.
const FLOW_PATIENCE: Duration = Duration::from_secs(240);
/// The longest the test waits for the queues to be empty once all arrived.
const QUIET_PATIENCE: Duration = Duration::from_secs(60);
/// How long three nodes may take to report one cluster once joined.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(90);

const PAIR: [(&str, Option<&str>); 2] = [("b", None), ("a", Some("b"))];
/// A message from `a` to its parent `b`.
const UP_TO_B: &str = "a!b";

/// Three extra RabbitMQ nodes clustered together; each is stopped and its
/// folder removed when this is dropped.
struct Cluster {
    nodes: Vec<RabbitNode>,
}

impl Cluster {
    /// Boots three nodes at once (a boot takes 5 to 15 s each), then joins
    /// the second and third to the first, and waits until all three report
    /// one running cluster.
    fn start() -> Result<Cluster> {
        let booted: Vec<Result<RabbitNode>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ["q1", "q2", "q3"]
                .iter()
                .map(|label| {
                    scope.spawn(move || {
                        RabbitNode::start(&NodeSpec {
                            label: label.to_string(),
                            tcp: true,
                            tls: None,
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a node start panicked")))
                })
                .collect()
        });
        // Booted nodes are kept (and so stopped on drop) even if one failed.
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        for node in booted {
            match node {
                Ok(node) => nodes.push(node),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let cluster = Cluster { nodes };
        ensure!(
            failures.is_empty(),
            "extra RabbitMQ nodes failed to boot: {}",
            failures.join("; ")
        );
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"])?;
            node.ctl(&["join_cluster", &first])
                .with_context(|| format!("{} joining the cluster of {first}", node.name))?;
            node.ctl(&["start_app"])?;
            node.ctl(&["await_startup", "--timeout", "60"])?;
        }
        cluster.wait_running(3)?;
        Ok(cluster)
    }

    /// Waits until the first node counts `count` running members.
    fn wait_running(&self, count: usize) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let status = self.nodes[0].ctl(&["cluster_status", "--formatter", "json"])?;
            let running = serde_json::from_str::<serde_json::Value>(&status)
                .ok()
                .and_then(|s| s["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            if running >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the test cluster has {running} of {count} nodes running after {CLUSTER_PATIENCE:?}: {status}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// oslo's multi-host URL: every node of the cluster, in order.
    fn url(&self, vhost: &str) -> TransportUrl {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("guest:guest@127.0.0.1:{}", self.port(n)))
            .collect();
        format!("rabbit://{}/{vhost}", hosts.join(","))
            .parse()
            .expect("a well-formed test URL")
    }

    fn port(&self, node: &RabbitNode) -> u16 {
        node.amqp_port
            .expect("cluster nodes have a plain AMQP port")
    }

    /// The AMQP URI of `vhost` on `node` alone, for the test's own clients.
    fn uri(&self, node: usize, vhost: &str) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{vhost}",
            self.port(&self.nodes[node])
        )
    }

    /// The node (index) holding the connection named `name`, if any.
    fn node_of_connection(&self, name: &str, ask: usize) -> Result<Option<usize>> {
        let listing = self.nodes[ask].ctl(&[
            "list_connections",
            "--formatter",
            "json",
            "port",
            "client_properties",
        ])?;
        let connections: Vec<serde_json::Value> = serde_json::from_str(&listing)
            .with_context(|| format!("reading rabbitmqctl list_connections: {listing}"))?;
        // The name a client gives is its `connection_name` client property
        // (the `name` column is the addresses); `port` is the server's side
        // of the connection: the listener of the node that holds it.
        let quoted = serde_json::Value::String(name.to_string()).to_string();
        Ok(connections.iter().find_map(|c| {
            let port = u16::try_from(c["port"].as_u64()?).ok()?;
            c["client_properties"]
                .to_string()
                .contains(&quoted)
                .then(|| self.nodes.iter().position(|n| n.amqp_port == Some(port)))
                .flatten()
        }))
    }

    /// Waits until a connection named `name` exists, and returns its node.
    async fn wait_connection(&self, name: &str, ask: usize) -> Result<usize> {
        let deadline = Instant::now() + QUIET_PATIENCE;
        loop {
            if let Some(node) = self.node_of_connection(name, ask)? {
                return Ok(node);
            }
            if Instant::now() > deadline {
                bail!("no connection named {name:?} on the test cluster after {QUIET_PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the connection named `name` is on another node than
    /// `left`, and returns that node.
    async fn wait_moved(&self, name: &str, left: usize, ask: usize) -> Result<usize> {
        let deadline = Instant::now() + QUIET_PATIENCE;
        loop {
            match self.node_of_connection(name, ask)? {
                Some(node) if node != left => return Ok(node),
                _ if Instant::now() > deadline => {
                    bail!("{name:?} did not reconnect to another node within {QUIET_PATIENCE:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Messages (ready and unacknowledged) of each queue of `vhost`, as
    /// `node` sees them.
    fn queue_depths(&self, node: usize, vhost: &str) -> Result<HashMap<String, u64>> {
        let listing = self.nodes[node].ctl(&[
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages",
        ])?;
        Ok(listing
            .lines()
            .filter_map(|line| {
                let (name, count) = line.split_once('\t')?;
                Some((name.trim().to_string(), count.trim().parse().ok()?))
            })
            .collect())
    }

    /// Waits until every queue of `vhost` named in `queues` holds nothing.
    async fn wait_empty(&self, node: usize, vhost: &str, queues: &[String]) -> Result<()> {
        let deadline = Instant::now() + QUIET_PATIENCE;
        loop {
            let depths = self.queue_depths(node, vhost)?;
            let busy: Vec<String> = queues
                .iter()
                .filter(|q| depths.get(*q).copied().unwrap_or(0) > 0)
                .map(|q| format!("{q}: {}", depths[q]))
                .collect();
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("queues of {vhost} still hold messages after {QUIET_PATIENCE:?}: {busy:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The `x-queue-type` of each queue of `vhost`.
    fn queue_types(&self, node: usize, vhost: &str) -> Result<HashMap<String, String>> {
        let listing = self.nodes[node].ctl(&[
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "type",
        ])?;
        Ok(listing
            .lines()
            .filter_map(|line| {
                let (name, kind) = line.split_once('\t')?;
                Some((name.trim().to_string(), kind.trim().to_string()))
            })
            .collect())
    }
}

/// The longest time between consecutive instants of `times`.
fn longest_pause(mut times: Vec<Instant>) -> Duration {
    times.sort();
    times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fails_over_to_another_cluster_node_and_loses_nothing() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster start task")
        .expect("three clustered RabbitMQ nodes");
    let clustered_in = started.elapsed();

    let prefix = format!("chc-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let vhost = |cell: &str| format!("{prefix}-{cell}");
    for cell in ["a", "b"] {
        cluster.nodes[0].add_vhost(&vhost(cell)).expect("vhost");
    }
    let mut configs: Vec<Config> = tree_configs(&PAIR, |cell| cluster.url(&vhost(cell)));
    for config in &mut configs {
        config.oslo_messaging_rabbit.rabbit_quorum_queue = true;
    }
    let config = |cell: &str| {
        configs
            .iter()
            .find(|c| c.cell.name == cell)
            .cloned()
            .expect("a config per cell")
    };
    let policy = plugin("nova_cells", "").expect("nova_cells policy");
    let host_b = CellHost::start(config("b"), policy.clone())
        .await
        .expect("b's host starts on the cluster");
    let host_a = CellHost::start(config("a"), policy)
        .await
        .expect("a's host starts on the cluster");

    // Every queue of a cell is quorum, as `rabbit_quorum_queue` asks.
    let types = cluster.queue_types(0, &vhost("a")).expect("a's queues");
    assert_eq!(
        types
            .get(&format!("{QUEUE_BASE}.targeted"))
            .map(String::as_str),
        Some("quorum"),
        "a's queues: {types:?}"
    );

    // The node to stop is the one `a`'s host is on; the test's own clients
    // go through another one.
    let victim = cluster
        .wait_connection("cellhost a", 0)
        .await
        .expect("a's host is connected");
    let survivor = (victim + 1) % cluster.nodes.len();
    let app = App::start(&cluster.uri(survivor, &vhost("b")))
        .await
        .expect("b's application");

    let (sent, bodies) = messages(MESSAGES, "cluster", |_| {
        Outgoing::targeted(UP_TO_B, Direction::Up, "cluster_test")
    });
    let stream_started = Instant::now();
    let sender = tokio::spawn(publish_all(
        cluster.uri(survivor, &vhost("a")),
        "targeted",
        bodies,
    ));
    app.wait_distinct(STRIKE_AT, FLOW_PATIENCE)
        .await
        .expect("the stream flows before the node stops");

    let victim_name = cluster.nodes[victim].name.clone();
    let stop_at = Instant::now();
    let delivered_at_stop = app.delivered_now();
    cluster.nodes[victim]
        .ctl(&["stop_app"])
        .expect("stopping the node a's host is on");
    let stop_took = stop_at.elapsed();
    // rabbitmqctl itself takes about half a second: the time is that coarse.
    let moved = cluster.wait_moved("cellhost a", victim, survivor).await;
    let moved_after = stop_at.elapsed();

    sender
        .await
        .expect("sender task")
        .expect("every message cast into a");
    let all_in = app.wait_distinct(sent.len(), FLOW_PATIENCE).await;

    // What the hosts counted.
    let get = Stats::get;
    for (cell, host) in [("a", &host_a), ("b", &host_b)] {
        let s = &host.router().stats;
        println!(
            "  {cell}: received {}, relayed {}, delivered locally {}, duplicates dropped {}, \
             publish failures {}, dead-lettered {}, parked {}, unparked {}, unroutable {}",
            get(&s.received),
            get(&s.relayed),
            get(&s.delivered_local),
            get(&s.duplicates),
            get(&s.publish_failures),
            get(&s.dead_lettered),
            get(&s.parked),
            get(&s.unparked),
            get(&s.unroutable),
        );
    }
    let Tally {
        delivered,
        duplicated,
        lost,
        strangers,
        wrong,
        firsts,
    } = app.tally(&sent);
    let last = firsts.iter().max().copied();
    let after_stop: Vec<Instant> = std::iter::once(stop_at)
        .chain(firsts.into_iter().filter(|at| *at >= stop_at))
        .collect();
    let pause = longest_pause(after_stop);
    let since_stop = |t: Option<Instant>| {
        t.map(|t| {
            format!(
                "{:.2} s",
                t.saturating_duration_since(stop_at).as_secs_f64()
            )
        })
        .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "CLUSTER failover: cluster of 3 up in {:.1} s; stopped {victim_name} (node {}) after {delivered_at_stop} \
         deliveries (stop_app took {:.1} s); a's host on node {} {:.1} s after the stop; sent {}, \
         delivered {delivered}, duplicated {duplicated}, lost {lost}; longest pause in deliveries after the \
         stop {:.2} s, all delivered {} after the stop; stream {:.1} s, wall {:.1} s",
        clustered_in.as_secs_f64(),
        victim + 1,
        stop_took.as_secs_f64(),
        moved
            .as_ref()
            .map(|n| (n + 1).to_string())
            .unwrap_or_else(|e| format!("unknown ({e:#})")),
        moved_after.as_secs_f64(),
        sent.len(),
        pause.as_secs_f64(),
        since_stop(last),
        stream_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    if let Err(e) = all_in {
        let queue = format!("{QUEUE_BASE}.dead");
        let dead =
            cellhost_tests::take_dead_letters(&cluster.uri(survivor, &vhost("a")), &queue, 5)
                .await
                .map(|letters| {
                    letters
                        .iter()
                        .map(|d| format!("{} ({}): {}", d.code, d.cell, d.reason))
                        .collect::<Vec<_>>()
                });
        panic!("not every message delivered after the failover: {e:#}; a's dead letters: {dead:?}");
    }
    assert_eq!(lost, 0, "messages lost");
    assert_eq!(strangers, 0, "deliveries of uuids never sent");
    assert!(wrong.is_empty(), "malformed local deliveries: {wrong:?}");
    moved.expect("a's host reconnected to another node");

    let quiet_a = [
        format!("{QUEUE_BASE}.targeted"),
        format!("{QUEUE_BASE}.dead"),
        cellhost::links::park_queue(QUEUE_BASE, "b"),
    ];
    cluster
        .wait_empty(survivor, &vhost("a"), &quiet_a)
        .await
        .expect("a's queues drained: nothing dead-lettered, nothing left parked");
    cluster
        .wait_empty(
            survivor,
            &vhost("b"),
            &[
                format!("{QUEUE_BASE}.targeted"),
                format!("{QUEUE_BASE}.dead"),
            ],
        )
        .await
        .expect("b's queues drained");

    app.stop().await;
    host_a.shutdown().await;
    host_b.shutdown().await;
    // The nodes (and with them the vhosts) go when `cluster` is dropped.
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("cluster stopped");
}
