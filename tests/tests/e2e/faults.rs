//! Faults injected for real while 20,000 messages stream through a relay:
//! nothing is lost, whatever breaks (issue 9).
//!
//! The relay is one hop: cell `a` (a child) sends targeted messages up to
//! its parent `b`. The test casts them into `a`'s broker directly, as an
//! application there would, many publishes in flight with confirms; an
//! application on `b`'s broker (a plain lapin consumer on `cells.local`)
//! records the `cell_message_uuid` of every local delivery. `a`'s host
//! reaches its own broker and `b`'s through [`FaultProxy`] instances, so a
//! test can cut, refuse or stall either link; `b`'s host and the test's
//! own connections go straight to RabbitMQ on 127.0.0.1:5672.
//!
//! Each test waits (bounded) until every uuid was delivered at least once,
//! then until `a`'s queues are quiet, and asserts: none lost, the
//! dead-letter queue empty and the park queue drained. It prints one line
//! per fault: sent, delivered, duplicated, lost, how long after the end of
//! the fault deliveries resumed and all were in, and the test's wall time.
//! The fault tests run one at a time (the machine has few cores and each
//! one streams at full speed): they share a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cellhost::client::Outgoing;
use cellhost::config::RabbitOptions;
use cellhost::config::{Config, TransportUrl};
use cellhost::router::{REASON_CODE_HEADER, REASON_HEADER};
use cellhost::topology::tree_configs;
use cellhost::transport::amqp::AmqpBroker;
use cellhost::transport::{Broker, Publication, PublishError, Verdict};
use cellhost::CellHost;
use cellhost_tests::fault_proxy::FaultProxy;
use cellhost_tests::stream::{self, messages, App, Tally, EXCHANGE, QUEUE_BASE};
use cellhost_tests::{cellhost_bin, drain_queue, local_amqp_uri, plugin, Direction, Vhosts};
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};

/// Messages each test streams.
const MESSAGES: usize = 20_000;
/// The fault strikes once this many were delivered: mid-stream.
const STRIKE_AT: usize = 5_000;
/// How long an outage or a stall lasts.
const OUTAGE: Duration = Duration::from_secs(10);
/// The longest a test waits for every message to be delivered.
const FLOW_PATIENCE: Duration = Duration::from_secs(120);
/// The longest a test waits for the queues to be empty once all arrived.
const QUIET_PATIENCE: Duration = Duration::from_secs(30);

const RABBIT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5672);
const PAIR: [(&str, Option<&str>); 2] = [("b", None), ("a", Some("b"))];
/// A message from `a` to its parent `b`.
const UP_TO_B: &str = "a!b";

/// One fault test at a time across the test threads (tests of other modules
/// of the binary may still run beside one).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn url(port: u16, vhost: &str) -> TransportUrl {
    format!("rabbit://guest:guest@127.0.0.1:{port}/{vhost}")
        .parse()
        .expect("a well-formed test URL")
}

fn fresh_prefix() -> String {
    // Not `cht-` (the shared harness) nor `chr-` (the bench).
    format!("chf-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// The cells, their vhosts and the configs of a tree, nothing started.
struct Cells {
    prefix: String,
    vhosts: Vhosts,
    configs: Vec<Config>,
}

impl Cells {
    fn create(topology: &[(&str, Option<&str>)]) -> Result<Cells> {
        let prefix = fresh_prefix();
        let vhosts = Vhosts::create(
            topology
                .iter()
                .map(|(c, _)| format!("{prefix}-{c}"))
                .collect(),
        )?;
        let configs = tree_configs(topology, |cell| url(5672, &format!("{prefix}-{cell}")));
        Ok(Cells {
            prefix,
            vhosts,
            configs,
        })
    }

    fn vhost(&self, cell: &str) -> String {
        format!("{}-{cell}", self.prefix)
    }

    fn config_mut(&mut self, cell: &str) -> &mut Config {
        self.configs
            .iter_mut()
            .find(|c| c.cell.name == cell)
            .unwrap_or_else(|| panic!("no cell {cell}"))
    }

    fn config(&self, cell: &str) -> Config {
        self.configs
            .iter()
            .find(|c| c.cell.name == cell)
            .unwrap_or_else(|| panic!("no cell {cell}"))
            .clone()
    }

    /// Points `cell`'s own link at `proxy` (same vhost, the proxy's port).
    fn own_through(&mut self, cell: &str, proxy: &FaultProxy) {
        let vhost = self.vhost(cell);
        self.config_mut(cell).cell.transport_url = url(proxy.port(), &vhost);
    }

    /// Points `cell`'s link to `neighbour` at `proxy`.
    fn neighbour_through(&mut self, cell: &str, neighbour: &str, proxy: &FaultProxy) {
        let vhost = self.vhost(neighbour);
        let entry = self
            .config_mut(cell)
            .neighbours
            .iter_mut()
            .find(|n| n.name == neighbour)
            .unwrap_or_else(|| panic!("{cell} has no neighbour {neighbour}"));
        entry.transport_url = url(proxy.port(), &vhost);
    }

    async fn start_host(&self, cell: &str) -> Result<CellHost> {
        CellHost::start(self.config(cell), plugin("nova_cells", "")?).await
    }
}

fn up_to_b(count: usize) -> (Vec<String>, Vec<Vec<u8>>) {
    messages(count, "fault", |_| {
        Outgoing::targeted(UP_TO_B, Direction::Up, "fault_test")
    })
}

/// Casts `bodies` into `vhost`'s `cells.intercell.<kind>` directly on
/// RabbitMQ (not through a proxy).
async fn publish_all(vhost: String, kind: &'static str, bodies: Vec<Vec<u8>>) -> Result<()> {
    stream::publish_all(local_amqp_uri(&vhost), kind, bodies).await
}

/// Messages (ready and unacknowledged) of each queue of `vhost`.
fn queue_depths(vhost: &str) -> Result<HashMap<String, u64>> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .context("running rabbitmqctl list_queues")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl list_queues -p {vhost} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (name, count) = line.split_once('\t')?;
            Some((name.trim().to_string(), count.trim().parse().ok()?))
        })
        .collect())
}

/// Waits until every queue of `vhost` named in `queues` holds no message.
async fn wait_empty(vhost: &str, queues: &[String]) -> Result<()> {
    let deadline = Instant::now() + QUIET_PATIENCE;
    loop {
        let depths = queue_depths(vhost)?;
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

/// The queues of cell `a` that must end empty: its intercell queue, its
/// dead-letter queue and its park queue for `b`.
fn quiet_queues_of_a() -> Vec<String> {
    vec![
        format!("{QUEUE_BASE}.targeted"),
        format!("{QUEUE_BASE}.dead"),
        cellhost::links::park_queue(QUEUE_BASE, "b"),
    ]
}

/// What the hosts counted: received (redeliveries included), parked and
/// unparked relays, duplicates the parent's host dropped.
fn print_host_figures(hosts: &[(&str, &CellHost)]) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for (cell, host) in hosts {
        let stats = &host.router().stats;
        println!(
            "  {cell}: received {}, relayed {}, delivered locally {}, duplicates dropped {}, \
             publish failures {}, dead-lettered {}, unroutable {}, parked {}, unparked {}",
            get(&stats.received),
            get(&stats.relayed),
            get(&stats.delivered_local),
            get(&stats.duplicates),
            get(&stats.publish_failures),
            get(&stats.dead_lettered),
            get(&stats.unroutable),
            get(&stats.parked),
            get(&stats.unparked),
        );
    }
}

/// Prints the figures of one fault test and asserts nothing was lost.
fn report(
    fault: &str,
    sent: &[String],
    tally: &Tally,
    fault_end: Option<Instant>,
    started: Instant,
) {
    let after = |t: Option<Instant>| match (t, fault_end) {
        (Some(t), Some(end)) => format!("{:.2} s", t.saturating_duration_since(end).as_secs_f64()),
        _ => "n/a".to_string(),
    };
    let resumed =
        fault_end.and_then(|end| tally.firsts.iter().filter(|t| **t >= end).min().copied());
    let all_in = tally.firsts.iter().max().copied();
    println!(
        "FAULT {fault}: sent {}, delivered {}, duplicated {}, lost {}, \
         flow resumed {} after the fault, all delivered {} after, wall {:.1} s",
        sent.len(),
        tally.delivered,
        tally.duplicated,
        tally.lost,
        after(resumed),
        after(all_in),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{fault}: messages lost");
    assert_eq!(
        tally.strangers, 0,
        "{fault}: deliveries of uuids never sent"
    );
}

/// Which link of `a` a fault strikes.
#[derive(Clone, Copy)]
enum Link {
    Own,
    Neighbour,
}

/// What is done to the link.
#[derive(Clone, Copy)]
enum Fault {
    Cut,
    Down,
    Stall,
}

/// The one-hop relay `a` → `b`: `a`'s links go through proxies, `b`'s
/// host and application straight to RabbitMQ.
struct Relay {
    started: Instant,
    own: FaultProxy,
    neighbour: FaultProxy,
    cells: Cells,
    host_a: CellHost,
    host_b: CellHost,
    app: App,
}

impl Relay {
    /// Starts both hosts; with `neighbour_refusing`, `a` starts while `b`'s
    /// broker refuses it.
    async fn start(neighbour_refusing: bool) -> Relay {
        let started = Instant::now();
        let own = FaultProxy::start(RABBIT).await.expect("own proxy");
        let neighbour = FaultProxy::start(RABBIT).await.expect("neighbour proxy");
        neighbour.refuse(neighbour_refusing);
        let mut cells = Cells::create(&PAIR).expect("vhosts");
        cells.own_through("a", &own);
        cells.neighbour_through("a", "b", &neighbour);
        let host_b = cells.start_host("b").await.expect("b's host starts");
        let host_a = cells.start_host("a").await.expect("a's host starts");
        let app = App::start(&local_amqp_uri(&cells.vhost("b")))
            .await
            .expect("b's application");
        Relay {
            started,
            own,
            neighbour,
            cells,
            host_a,
            host_b,
            app,
        }
    }

    /// Waits for every message, then for `a`'s queues to be quiet; reports
    /// and checks that nothing was lost, dead-lettered or left parked.
    async fn finish(
        self,
        name: &str,
        sent: &[String],
        sender: tokio::task::JoinHandle<Result<()>>,
        fault_end: Instant,
    ) {
        sender
            .await
            .expect("sender task")
            .expect("every message cast into a");
        let delivered = self.app.wait_distinct(sent.len(), FLOW_PATIENCE).await;
        if let Err(e) = delivered {
            report(
                name,
                sent,
                &self.app.tally(sent),
                Some(fault_end),
                self.started,
            );
            panic!("{name}: {e:#}");
        }
        wait_empty(&self.cells.vhost("a"), &quiet_queues_of_a())
            .await
            .expect("a's queues drained: nothing dead-lettered, nothing left parked");
        wait_empty(&self.cells.vhost("b"), &[format!("{QUEUE_BASE}.targeted")])
            .await
            .expect("b's queue drained");
        // Counted once every queue is quiet: late duplicates included.
        print_host_figures(&[("a", &self.host_a), ("b", &self.host_b)]);
        report(
            name,
            sent,
            &self.app.tally(sent),
            Some(fault_end),
            self.started,
        );
        self.app.stop().await;
        self.host_a.shutdown().await;
        self.host_b.shutdown().await;
        drop((self.own, self.neighbour));
        self.cells.vhosts.remove().expect("vhosts removed");
    }
}

/// 20,000 messages streamed through the relay, `fault` struck at `link`
/// once a quarter of them were delivered.
async fn relay_through_fault(name: &str, link: Link, fault: Fault) {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(false).await;
    let (sent, bodies) = up_to_b(MESSAGES);
    let sender = tokio::spawn(publish_all(relay.cells.vhost("a"), "targeted", bodies));
    relay
        .app
        .wait_distinct(STRIKE_AT, FLOW_PATIENCE)
        .await
        .expect("the stream flows before the fault");
    let proxy = match link {
        Link::Own => &relay.own,
        Link::Neighbour => &relay.neighbour,
    };
    match fault {
        Fault::Cut => {
            proxy.cut().await.expect("cut");
        }
        Fault::Down => proxy.down_for(OUTAGE).await.expect("outage"),
        Fault::Stall => {
            proxy.stall(true);
            // The stall itself is the fault being simulated.
            tokio::time::sleep(OUTAGE).await;
            proxy.stall(false);
        }
    }
    let fault_end = Instant::now();
    relay.finish(name, &sent, sender, fault_end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_connection_cut_mid_stream_loses_nothing() {
    relay_through_fault("own connection cut", Link::Own, Fault::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_unreachable_for_10_s_loses_nothing() {
    relay_through_fault("own broker down 10 s", Link::Own, Fault::Down).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_connection_cut_mid_stream_loses_nothing() {
    relay_through_fault("neighbour connection cut", Link::Neighbour, Fault::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_unreachable_for_10_s_loses_nothing() {
    relay_through_fault("neighbour down 10 s", Link::Neighbour, Fault::Down).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_stalled_for_10_s_loses_nothing() {
    relay_through_fault("neighbour stalled 10 s", Link::Neighbour, Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_down_at_start_up_then_up_10_s_later_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let name = "neighbour down at start-up";
    // The host starts and serves although its parent refuses it.
    let relay = Relay::start(true).await;
    let (sent, bodies) = up_to_b(MESSAGES);
    let sender = tokio::spawn(publish_all(relay.cells.vhost("a"), "targeted", bodies));
    // The outage itself is the fault being simulated.
    tokio::time::sleep(OUTAGE).await;
    assert_eq!(
        relay.app.delivered_now(),
        0,
        "nothing reaches b while its broker refuses a's host"
    );
    relay.neighbour.refuse(false);
    let fault_end = Instant::now();
    relay.finish(name, &sent, sender, fault_end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_while_a_child_is_down_reaches_everyone_once() {
    let _serial = SERIAL.lock().await;
    let name = "broadcast, one child down";
    let started = Instant::now();
    const FAMILY: [(&str, Option<&str>); 3] = [("p", None), ("c1", Some("p")), ("c2", Some("p"))];
    let down = FaultProxy::start(RABBIT).await.expect("proxy to c2");
    down.refuse(true);
    let mut cells = Cells::create(&FAMILY).expect("vhosts");
    cells.neighbour_through("p", "c2", &down);
    let mut hosts = Vec::new();
    for cell in ["c1", "c2", "p"] {
        hosts.push((cell, cells.start_host(cell).await.expect("host starts")));
    }
    let mut apps = HashMap::new();
    for cell in ["p", "c1", "c2"] {
        apps.insert(
            cell,
            App::start(&local_amqp_uri(&cells.vhost(cell)))
                .await
                .expect("application"),
        );
    }
    let (sent, bodies) = messages(MESSAGES, "fault", |_| {
        Outgoing::broadcast(Direction::Down, "fault_broadcast")
    });
    publish_all(cells.vhost("p"), "broadcast", bodies)
        .await
        .expect("every broadcast cast into p");
    for cell in ["p", "c1"] {
        apps[cell]
            .wait_distinct(sent.len(), FLOW_PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{cell} while c2 is down: {e:#}"));
    }
    assert_eq!(apps["c2"].delivered_now(), 0, "c2 is down");
    let parked = cellhost::links::park_queue(QUEUE_BASE, "c2");
    // The last relays may still be on their way to the park queue.
    let deadline = Instant::now() + QUIET_PATIENCE;
    let mut waiting = 0;
    while Instant::now() < deadline {
        waiting = queue_depths(&cells.vhost("p"))
            .expect("p's queues")
            .get(&parked)
            .copied()
            .unwrap_or(0);
        if waiting as usize == sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        waiting as usize,
        sent.len(),
        "every relay to c2 parked on p"
    );
    down.refuse(false);
    let fault_end = Instant::now();
    apps["c2"]
        .wait_distinct(sent.len(), FLOW_PATIENCE)
        .await
        .expect("c2 gets every broadcast once it is back");
    wait_empty(
        &cells.vhost("p"),
        &[
            format!("{QUEUE_BASE}.broadcast"),
            format!("{QUEUE_BASE}.dead"),
            parked,
            cellhost::links::park_queue(QUEUE_BASE, "c1"),
        ],
    )
    .await
    .expect("p's queues drained");
    for cell in ["c1", "c2"] {
        wait_empty(&cells.vhost(cell), &[format!("{QUEUE_BASE}.broadcast")])
            .await
            .expect("the children's queues drained");
    }
    let figures: Vec<(&str, &CellHost)> = hosts.iter().map(|(c, h)| (*c, h)).collect();
    print_host_figures(&figures);
    for cell in ["p", "c1", "c2"] {
        let tally = apps[cell].tally(&sent);
        report(
            &format!("{name}: {cell}"),
            &sent,
            &tally,
            (cell == "c2").then_some(fault_end),
            started,
        );
        if cell != "c2" {
            assert_eq!(tally.duplicated, 0, "{cell} got a broadcast twice");
        }
    }
    for (_, app) in apps {
        app.stop().await;
    }
    for (_, host) in hosts {
        host.shutdown().await;
    }
    cells.vhosts.remove().expect("vhosts removed");
}

/// A dead letter of `a`: the relay for `b`'s intercell queue, with the reason.
fn unroutable_relay_uuid(
    delivery: &lapin::message::Delivery,
) -> std::result::Result<String, String> {
    let header = |name: &str| cellhost_tests::string_header(delivery, name);
    let (reason, code) = (header(REASON_HEADER), header(REASON_CODE_HEADER));
    let expected = format!("has no queue for \"{QUEUE_BASE}.targeted\"");
    if code != "unroutable" || !reason.contains(&expected) {
        return Err(format!("dead letter with code {code:?}, reason {reason:?}"));
    }
    let request = cellhost::wire::decode_request(&delivery.data, usize::MAX)
        .map_err(|e| format!("undecodable dead letter: {e}"))?;
    let message = request
        .cells_message()
        .map_err(|e| format!("a dead letter without a cells message: {e}"))?;
    Ok(message.uuid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_to_a_broker_where_nothing_is_bound_is_dead_lettered_with_the_reason() {
    let _serial = SERIAL.lock().await;
    let name = "relay with nothing bound";
    let started = Instant::now();
    let cells = Cells::create(&PAIR).expect("vhosts");
    // No host serves b: its intercell queue, which a's host declares there,
    // is deleted once declared, so nothing is bound for a's relays.
    let host_a = cells.start_host("a").await.expect("a's host starts");
    let link = host_a
        .links()
        .neighbours()
        .get("b")
        .cloned()
        .expect("a link to b");
    tokio::time::timeout(FLOW_PATIENCE, link.until_up())
        .await
        .expect("a's link to b comes up");
    let b = Connection::connect(
        &local_amqp_uri(&cells.vhost("b")),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect to b");
    b.create_channel()
        .await
        .expect("channel")
        .queue_delete(
            format!("{QUEUE_BASE}.targeted").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("b's intercell queue deleted");
    let _ = b.close(200, "deleted".into()).await;

    let dead = App::consume(
        &local_amqp_uri(&cells.vhost("a")),
        &format!("{QUEUE_BASE}.dead"),
        unroutable_relay_uuid,
    )
    .await
    .expect("reading a's dead letters");
    let (sent, bodies) = up_to_b(MESSAGES);
    publish_all(cells.vhost("a"), "targeted", bodies)
        .await
        .expect("every message cast into a");
    let arrived = dead.wait_distinct(sent.len(), FLOW_PATIENCE).await;
    let tally = dead.tally(&sent);
    print_host_figures(&[("a", &host_a)]);
    // Here "delivered" counts dead letters: each message must be one.
    report(name, &sent, &tally, None, started);
    arrived.expect("every relay dead-lettered");
    wait_empty(&cells.vhost("a"), &quiet_queues_of_a())
        .await
        .expect("a's queues drained");
    dead.stop().await;
    host_a.shutdown().await;
    cells.vhosts.remove().expect("vhosts removed");
}

/// Many tasks publish on one link at once, mandatory, a message for a queue
/// and a message for no queue in turn: each must hear its own outcome, or a
/// message no queue took counts as delivered while a delivered one is
/// dead-lettered.
///
/// lapin 4.12 by itself hands each returned message to whichever confirm it
/// resolves next, not to the message's own (342 of these 3,200 publishes
/// heard another's outcome before the transport paired them itself, by a
/// stamp on each publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_hear_their_own_confirm_or_return() {
    let _serial = SERIAL.lock().await;
    const TASKS: usize = 8;
    const EACH: usize = 400;
    let vhosts = Vhosts::create(vec![format!("{}-order", fresh_prefix())]).expect("vhost");
    let vhost = vhosts.names()[0].clone();
    let broker = Broker::connect(&url(5672, &vhost), &RabbitOptions::default(), "order")
        .await
        .expect("connected");
    let queue = "taken";
    broker
        .declare_queue(&broker.oslo().topic_queue(queue), "", "")
        .await
        .expect("queue declared");
    // Bodies of a few KiB widen the moment between numbering and queueing.
    let body = vec![b'x'; 4096];
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (broker, body) = (broker.clone(), body.clone());
            tokio::spawn(async move {
                let publishes = (0..EACH).map(|i| {
                    let routable = (task + i) % 2 == 0;
                    let key = if routable {
                        queue.to_string()
                    } else {
                        format!("nowhere-{task}-{i}")
                    };
                    let publication = Publication::new("", key, body.clone()).mandatory();
                    let broker = broker.clone();
                    async move { (routable, broker.publish(&publication).await) }
                });
                futures::future::join_all(publishes).await
            })
        })
        .collect();
    let (mut taken, mut wrong) = (0, Vec::new());
    for task in tasks {
        for (routable, outcome) in task.await.expect("publishing task") {
            match (routable, outcome) {
                (true, Ok(())) => taken += 1,
                (false, Err(PublishError::Unroutable { .. })) => {}
                (routable, outcome) => wrong.push(format!("routable {routable}: {outcome:?}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} publishes heard another's outcome, e.g. {:?}",
        wrong.len(),
        TASKS * EACH,
        &wrong[..wrong.len().min(3)]
    );
    let ready = drain_queue(&local_amqp_uri(&vhost), queue)
        .await
        .expect("queue drained")
        .len();
    assert_eq!(ready, taken, "every confirmed message is in its queue");
    broker.close().await;
    vhosts.remove().expect("vhost removed");
}

/// A consumer's own lane pairs each publish with its own confirm or return
/// too, and gives the verdicts in publication order: 3,200 mandatory
/// publishes in flight at once on one lane, every other one to a queue that
/// does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_gives_each_publish_its_own_verdict_in_order() {
    let _serial = SERIAL.lock().await;
    const PUBLISHES: usize = 3_200;
    let vhosts = Vhosts::create(vec![format!("{}-lane", fresh_prefix())]).expect("vhost");
    let vhost = vhosts.names()[0].clone();
    let broker = Broker::connect(&url(5672, &vhost), &RabbitOptions::default(), "lane")
        .await
        .expect("connected");
    let queue = "taken";
    broker
        .declare_queue(&broker.oslo().topic_queue(queue), "", "")
        .await
        .expect("queue declared");
    let Broker::Amqp(amqp) = &broker else {
        panic!("an amqp:// URL gives an AMQP broker");
    };
    let mut lane = amqp
        .open_lane::<(usize, bool)>()
        .await
        .expect("lane opened");
    let body = vec![b'x'; 4096];
    for i in 0..PUBLISHES {
        let routable = i % 2 == 0;
        let key = if routable {
            queue.to_string()
        } else {
            format!("nowhere-{i}")
        };
        let publication = Publication::new("", key, body.clone()).mandatory();
        lane.publish(AmqpBroker::outgoing(&publication), (i, routable));
    }
    let mut verdicts = Vec::new();
    let waiting = std::future::poll_fn(|cx| {
        let _ = lane.poll_decided(cx, &mut verdicts);
        if verdicts.len() == PUBLISHES {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("every publish decided within a minute");
    let (mut taken, mut wrong) = (0, Vec::new());
    for (at, ((i, routable), verdict)) in verdicts.into_iter().enumerate() {
        match (routable, &verdict) {
            _ if at != i => wrong.push(format!("publish {i} decided in place {at}")),
            (true, Verdict::Delivered) => taken += 1,
            (false, Verdict::Returned(_)) => {}
            _ => wrong.push(format!("publish {i}, routable {routable}: {verdict:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {PUBLISHES} publishes heard the wrong verdict, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    let ready = drain_queue(&local_amqp_uri(&vhost), queue)
        .await
        .expect("queue drained")
        .len();
    assert_eq!(ready, taken, "every confirmed message is in its queue");
    assert_eq!(taken, PUBLISHES / 2);
    drop(lane);
    broker.close().await;
    vhosts.remove().expect("vhost removed");
}

/// A `cellhost run` process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Kills it the hard way (SIGKILL), as a crash or an OOM kill would.
    fn kill_9(&mut self) {
        self.0.kill().expect("SIGKILL sent");
        self.0.wait().expect("the killed host reaped");
    }
}

/// Runs cell `a` of `cells` as a real `cellhost run` process with `host_id`
/// (its log goes to a file beside its config).
fn run_a(cells: &Cells, host_id: &str) -> Running {
    let dir = std::env::temp_dir().join(&cells.prefix);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join(format!("{host_id}.toml"));
    std::fs::write(
        &config,
        format!(
            "[cell]\nname = \"a\"\ntransport_url = \"rabbit://guest:guest@127.0.0.1:5672/{}\"\n\
             host_id = \"{host_id}\"\n\n[[neighbours]]\nname = \"b\"\nis_parent = true\n\
             transport_url = \"rabbit://guest:guest@127.0.0.1:5672/{}\"\n",
            cells.vhost("a"),
            cells.vhost("b")
        ),
    )
    .expect("config written");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{host_id}.log")))
        .expect("log file");
    Running(
        Command::new(cellhost_bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cellhost run starts"),
    )
}

/// `a` served by `processes` real hosts, `b` by one in this process; the
/// intercell queues of `a` exist before any host, so the stream can start
/// at once.
async fn processes_relay(host_ids: &[&str]) -> (Cells, Vec<Running>, CellHost, App) {
    let cells = Cells::create(&PAIR).expect("vhosts");
    let config_a = cells.config("a");
    let broker = cellhost::transport::Broker::connect(
        &config_a.cell.transport_url,
        &config_a.oslo_messaging_rabbit,
        "fault-test-setup",
    )
    .await
    .expect("connect to a");
    cellhost::client::declare_intercell(&broker, EXCHANGE, QUEUE_BASE)
        .await
        .expect("a's intercell queues");
    broker.close().await;
    let host_b = cells.start_host("b").await.expect("b's host starts");
    let app = App::start(&local_amqp_uri(&cells.vhost("b")))
        .await
        .expect("b's application");
    let running = host_ids.iter().map(|id| run_a(&cells, id)).collect();
    (cells, running, host_b, app)
}

/// The end of a process test: every message delivered, `a`'s queues quiet.
async fn finish_processes(
    name: &str,
    started: Instant,
    cells: Cells,
    host_b: CellHost,
    app: App,
    sent: &[String],
    fault_end: Instant,
) {
    let delivered = app.wait_distinct(sent.len(), FLOW_PATIENCE).await;
    if let Err(e) = delivered {
        report(name, sent, &app.tally(sent), Some(fault_end), started);
        panic!(
            "{name}: {e:#} (host logs in {})",
            std::env::temp_dir().join(&cells.prefix).display()
        );
    }
    wait_empty(&cells.vhost("a"), &quiet_queues_of_a())
        .await
        .expect("a's queues drained");
    wait_empty(&cells.vhost("b"), &[format!("{QUEUE_BASE}.targeted")])
        .await
        .expect("b's queue drained");
    print_host_figures(&[("b", &host_b)]);
    report(name, sent, &app.tally(sent), Some(fault_end), started);
    app.stop().await;
    host_b.shutdown().await;
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&cells.prefix));
    cells.vhosts.remove().expect("vhosts removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_killed_mid_stream_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let name = "host kill -9, restarted";
    let started = Instant::now();
    let (cells, mut running, host_b, app) = processes_relay(&["a-one"]).await;
    let (sent, bodies) = up_to_b(MESSAGES);
    publish_all(cells.vhost("a"), "targeted", bodies)
        .await
        .expect("every message cast into a");
    app.wait_distinct(STRIKE_AT, FLOW_PATIENCE)
        .await
        .expect("the stream flows before the kill");
    running[0].kill_9();
    running[0] = run_a(&cells, "a-one");
    let fault_end = Instant::now();
    finish_processes(name, started, cells, host_b, app, &sent, fault_end).await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_cell_one_killed_mid_stream_the_other_carries_on() {
    let _serial = SERIAL.lock().await;
    let name = "two hosts, one kill -9";
    let started = Instant::now();
    let (cells, mut running, host_b, app) = processes_relay(&["a-one", "a-two"]).await;
    let (sent, bodies) = up_to_b(MESSAGES);
    publish_all(cells.vhost("a"), "targeted", bodies)
        .await
        .expect("every message cast into a");
    app.wait_distinct(STRIKE_AT, FLOW_PATIENCE)
        .await
        .expect("the stream flows before the kill");
    running[0].kill_9();
    let fault_end = Instant::now();
    finish_processes(name, started, cells, host_b, app, &sent, fault_end).await;
    assert!(
        running[1].0.try_wait().expect("status").is_none(),
        "the other host still runs"
    );
    drop(running);
}
