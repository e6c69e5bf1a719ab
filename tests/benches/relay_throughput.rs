//! One-hop relay throughput: how fast one cellhost moves a backlog of cells
//! messages from its cell's broker to a neighbour's, against a bare relay
//! written with lapin alone and against RabbitMQ's own Shovel moving the same
//! bodies between two vhosts in `on-confirm` mode. All three give the same
//! guarantee: a source message is acked only after the destination broker
//! confirmed its copy.
//!
//! Every run starts from fresh vhosts and a source queue pre-filled with
//! `MESSAGES` (default 50 000) oslo casts of `process_message` carrying a
//! cells message targeted from `top` to `top!leaf`, nothing consuming yet.
//! The bodies are padded to each size in `BODY_BYTES` (default `1024,4096`;
//! see `cellhost_tests::bench`), and every size gets its own rounds and table.
//! - cellhost: one host for `top` (pair topology `top` ← `leaf`, nova-cells
//!   policy). No host serves `leaf`, so what `top` relays piles up in leaf's
//!   `cells.intercell.targeted`.
//! - bare lapin (`bare_lapin.rs`): in this process, from the same queue to
//!   the exchange and routing key cellhost's router picks, with cellhost's
//!   prefetch and publish properties, bodies forwarded unchanged: what a
//!   relay costs with no policy, no decoding and no re-encoding; as is, and
//!   publishing mandatory and stamped as cellhost does.
//! - bare lapin + cellhost's plan: the mandatory bare relay asking cellhost's
//!   router for each message's plan (decoding, policy, duplicate claim,
//!   relay body) and publishing the body it plans: cellhost's work per
//!   message in the bare relay's loop, so that the two differences between
//!   cellhost and the bare relay, the plan and the way plans are carried
//!   out, are measured apart.
//! - bare lapin + the policy's call: the mandatory bare relay asking the
//!   nova-cells policy's `route` about one message (decoded once, before
//!   the run) for each delivery and forwarding the body unchanged: the part
//!   of the plan that the policy interface itself costs, whatever the host
//!   does around it.
//! - bare amqprs (`bare_amqprs.rs`): the mandatory bare relay written with
//!   amqprs, another maintained Rust client, instead of lapin: whether the
//!   client is what bounds the bare relay; and the same with cellhost's
//!   plan, as the bare lapin relay with it.
//! - Shovel: a dynamic shovel from `q` in one vhost to `q` in another, with
//!   `src-prefetch-count` 1000 (Shovel's own default, and cellhost's
//!   prefetch) and 256 (cellhost's prefetch until 2026-12).
//!
//! The sides alternate for `ROUNDS` rounds (default 3) per body size. A run
//! ends when the destination holds every message and the source has none left
//! (passive declares every 10 ms); the source's unacked count is then checked
//! to be 0 with `rabbitmqctl` (too slow to poll inside the timing). Two
//! durations are reported: from just before the relay is started
//! (`CellHost::start`, the bare relay's connecting, `rabbitmqctl
//! set_parameter`), which charges Shovel the CLI's start-up, and from the
//! first sight of the relay's consumer on the source queue, which compares
//! the relaying alone. Each run also reports the CPU time per message of this
//! process (the host or the bare relay; only the probes in a Shovel run) and
//! of the broker's `beam.smp` (where Shovel runs): when the relay and the
//! broker share a few cores, throughput follows their sum, and CPU per
//! message stays readable when other work on the machine makes throughput
//! noisy. The router's planning alone (no broker) is timed first, as the
//! ceiling of one consumer.
//!
//! Each size ends with a markdown table of medians, cellhost's medians
//! divided by each other side's, and cellhost's throughput divided by each
//! other side's within each round (the sides of a round run one after the
//! other, under much the same conditions): the median, the mean with its
//! 95 % interval, and the range of those ratios, which show how far a
//! difference between medians can be trusted on a busy machine. All tables
//! are printed again together at the end when there are several sizes.
//!
//!     cargo bench -p cellhost-tests --bench relay_throughput
//!     MESSAGES=100000 ROUNDS=5 BODY_BYTES=2048 cargo bench -p cellhost-tests --bench relay_throughput

#[path = "relay_throughput/bare_amqprs.rs"]
mod bare_amqprs;
#[path = "relay_throughput/bare_lapin.rs"]
mod bare_lapin;

use std::fmt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bare_amqprs::BareAmqprsRelay;
use bare_lapin::{BareRelay, Destination, PolicyCall, Relayed, Work};
use cellhost::client::declare_intercell;
use cellhost::config::{Config, TransportUrl};
use cellhost::policy::view::{cell_view, message_view};
use cellhost::policy::{LoadedPolicy, PolicyEngine};
use cellhost::router::{RouteWorker, Stats, Target};
use cellhost::sched::CpuScheduling;
use cellhost::topology::tree_configs;
use cellhost::transport::Broker;
use cellhost::wire::decode_request;
use cellhost::CellHost;
use cellhost_tests::bench::{
    bodies, body_sizes_from_env, top_config, top_route_worker, PAIR, TARGET,
};
use cellhost_tests::{local_amqp_uri, queue_state, QueueState, Vhosts};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::json;

/// cellhost's default `prefetch`; the bare relays use the same.
const CELLHOST_PREFETCH: u16 = 1000;
/// Shovel's default `src-prefetch-count`.
const SHOVEL_DEFAULT_PREFETCH: u16 = 1000;
/// A smaller `src-prefetch-count` Shovel also runs with: cellhost's former
/// default.
const SHOVEL_SMALL_PREFETCH: u16 = 256;
/// Publishes whose confirms are awaited together when filling a queue.
const FILL_BATCH: usize = 1000;

/// The windows cellhost runs with (the bare relays take its prefetch).
struct Windows {
    prefetch: u16,
    confirm_window: usize,
}

/// The relays compared, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Cellhost,
    /// `mandatory`: publishes as cellhost does, mandatory and stamped, so
    /// that an unroutable message comes back instead of being dropped.
    BareLapin {
        mandatory: bool,
    },
    /// The mandatory bare relay publishing what cellhost's router plans
    /// for each message (`bare_lapin.rs`): cellhost's work per message in
    /// the bare relay's loop.
    BarePlanned,
    /// The mandatory bare relay asking the nova-cells policy about one
    /// fixed message for each delivery, forwarding the body unchanged: what
    /// the policy interface costs (lowering, the decision, lifting) with no
    /// decoding and no encoding.
    BareAsked,
    /// The mandatory bare relay written with amqprs instead of lapin
    /// (`bare_amqprs.rs`): whether another client moves the same messages
    /// for less.
    BareAmqprs,
    /// The amqprs relay publishing what cellhost's router plans: what
    /// cellhost's work per message costs carried by that client.
    AmqprsPlanned,
    Shovel {
        prefetch: u16,
    },
}

impl Side {
    const ALL: [Side; 9] = [
        Side::Cellhost,
        Side::BareLapin { mandatory: false },
        Side::BareLapin { mandatory: true },
        Side::BarePlanned,
        Side::BareAsked,
        Side::BareAmqprs,
        Side::AmqprsPlanned,
        Side::Shovel {
            prefetch: SHOVEL_SMALL_PREFETCH,
        },
        Side::Shovel {
            prefetch: SHOVEL_DEFAULT_PREFETCH,
        },
    ];

    fn short_name(self) -> String {
        match self {
            Side::Cellhost => "cellhost".into(),
            Side::BareLapin { mandatory: false } => "bare".into(),
            Side::BareLapin { mandatory: true } => "bare-mandatory".into(),
            Side::BarePlanned => "bare-planned".into(),
            Side::BareAsked => "bare-asked".into(),
            Side::BareAmqprs => "bare-amqprs".into(),
            Side::AmqprsPlanned => "amqprs-planned".into(),
            Side::Shovel { prefetch } => format!("shovel{prefetch}"),
        }
    }

    fn label(self) -> String {
        match self {
            Side::Cellhost => "cellhost".into(),
            Side::BareLapin { mandatory: false } => "bare lapin".into(),
            Side::BareLapin { mandatory: true } => "bare lapin (mandatory)".into(),
            Side::BarePlanned => "bare lapin + cellhost's plan".into(),
            Side::BareAsked => "bare lapin + the policy's call".into(),
            Side::BareAmqprs => "bare amqprs (mandatory)".into(),
            Side::AmqprsPlanned => "bare amqprs + cellhost's plan".into(),
            Side::Shovel { prefetch } => format!("shovel (prefetch {prefetch})"),
        }
    }
}

/// The two durations of one run, and the CPU it took.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// From just before the relay was started.
    total: Duration,
    /// From the first sight of its consumer on the source queue.
    relaying: Duration,
    /// CPU seconds over `total`: this process's and the broker's.
    cpu: Cpu,
    /// This process's, by kind of thread.
    split: Split,
}

impl Timing {
    fn new(started: Instant, before: Reading, finish: Finish, after: Reading) -> Timing {
        let (before, after, threads_before, threads_after) =
            (before.cpu, after.cpu, before.threads, after.threads);
        Timing {
            total: finish.done - started,
            relaying: finish.done - finish.attached,
            split: Split::between(&threads_before, &threads_after),
            cpu: Cpu {
                own: after.own - before.own,
                broker: after.broker.zip(before.broker).map(|(a, b)| a - b),
                own_switches: after.own_switches.saturating_sub(before.own_switches),
                broker_switches: after.broker_switches.saturating_sub(before.broker_switches),
                tcp_segments: after.tcp_segments.saturating_sub(before.tcp_segments),
            },
        }
    }
}

/// Where this process's CPU seconds of a run went, by kind of thread: the
/// tokio workers (the host's consumer loops and tasks, or the bare relay's
/// task) and lapin's I/O threads (one per connection: frames read, parsed,
/// written). The rest of `Cpu::own` is the main thread, the policy's epoch
/// ticker and threads that ended before the run did.
#[derive(Debug, Clone, Copy, Default)]
struct Split {
    workers: f64,
    lapin_io: f64,
}

impl Split {
    fn between(before: &[ThreadCpu], after: &[ThreadCpu]) -> Split {
        let mut split = Split::default();
        for thread in after {
            let earlier = before
                .iter()
                .find(|b| b.tid == thread.tid)
                .map_or(0.0, |b| b.seconds);
            let used = (thread.seconds - earlier).max(0.0);
            if thread.name.starts_with("tokio-rt-worker") {
                split.workers += used;
            } else if thread.name.starts_with("lapin") {
                split.lapin_io += used;
            }
        }
        split
    }
}

/// One thread of this process and the CPU seconds it has used.
#[derive(Debug, Clone)]
struct ThreadCpu {
    tid: u32,
    name: String,
    seconds: f64,
}

/// When a run's relay was first seen consuming, and when it was done.
struct Finish {
    attached: Instant,
    done: Instant,
}

/// CPU seconds used so far by this process (the host in a cellhost run, only
/// the probes in a Shovel run) and by the broker's Erlang VM (where Shovel
/// runs). Unlike throughput, CPU per message barely moves when other work
/// shares the machine.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    own: f64,
    broker: Option<f64>,
    /// Context switches of this process's threads and of the broker's:
    /// each is a thread put to sleep and woken again, which costs both.
    own_switches: u64,
    broker_switches: u64,
    /// TCP segments sent on this machine (`/proc/net/snmp`): on loopback,
    /// each is one write some peer made, read by the other end. How chatty
    /// a relay is with the broker; the bench runs alone, so the count is
    /// the relay's and the broker's (and the probes').
    tcp_segments: u64,
}

/// What [`CpuMeter::read`] reads at one instant.
struct Reading {
    cpu: Cpu,
    /// Each live thread of this process.
    threads: Vec<ThreadCpu>,
}

/// Reads [`Cpu`] from /proc; the broker's share is unknown when no local
/// `beam.smp` is found.
struct CpuMeter {
    ticks_per_second: f64,
    broker_pid: Option<String>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        let ticks_per_second = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let mut meter = CpuMeter {
            ticks_per_second,
            broker_pid: None,
        };
        // rabbitmqctl runs in a beam.smp too, briefly: the broker is the one
        // that has used by far the most CPU.
        let beams: Vec<String> = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| {
                        std::fs::read_to_string(entry.path().join("comm"))
                            .is_ok_and(|comm| comm.trim() == "beam.smp")
                    })
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        meter.broker_pid = beams
            .into_iter()
            .filter_map(|pid| Some((meter.seconds(&pid)?, pid)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, pid)| pid);
        meter
    }

    fn read(&self) -> Reading {
        Reading {
            cpu: Cpu {
                own: self.seconds("self").unwrap_or(0.0),
                broker: self.broker_pid.as_deref().and_then(|pid| self.seconds(pid)),
                own_switches: context_switches("self"),
                broker_switches: self.broker_pid.as_deref().map_or(0, context_switches),
                tcp_segments: tcp_segments_sent(),
            },
            threads: self.threads(),
        }
    }

    /// This process's live threads, each with its name and CPU seconds.
    fn threads(&self) -> Vec<ThreadCpu> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|task| {
                let name = task.file_name();
                let tid: u32 = name.to_str()?.parse().ok()?;
                let path = format!("self/task/{tid}");
                Some(ThreadCpu {
                    tid,
                    name: std::fs::read_to_string(task.path().join("comm"))
                        .ok()?
                        .trim()
                        .to_string(),
                    seconds: self.seconds(&path)?,
                })
            })
            .collect()
    }

    /// User plus system time of `pid`.
    fn seconds(&self, pid: &str) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces; the fields after it start with
        // the state (field 3), so utime (14) and stime (15) are 11 and 12.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / self.ticks_per_second)
    }
}

/// The threads this process has now.
fn thread_count() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// TCP segments this machine has sent (`OutSegs` of `/proc/net/snmp`).
fn tcp_segments_sent() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutSegs")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Context switches, voluntary and not, summed over the live threads of
/// `pid` (threads that ended are not counted).
fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The queues a run watches: the source, its relay's destination.
struct Ends {
    src: Probe,
    dst: Probe,
}

/// A connection to one vhost that reads one queue's state.
struct Probe {
    connection: Connection,
    channel: Channel,
    queue: String,
}

impl Probe {
    async fn open(vhost: &str, queue: &str) -> Result<Probe> {
        let connection =
            Connection::connect(&local_amqp_uri(vhost), ConnectionProperties::default())
                .await
                .with_context(|| format!("connecting to vhost {vhost}"))?;
        let channel = connection.create_channel().await?;
        Ok(Probe {
            connection,
            channel,
            queue: queue.to_string(),
        })
    }

    async fn state(&self) -> Result<QueueState> {
        queue_state(&self.channel, &self.queue).await
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[global_allocator]
static ALLOCATOR: cellhost::Allocator = cellhost::Allocator;

fn main() -> Result<()> {
    // Two workers by default, as many as this machine has cores; WORKERS=1
    // measures a relay kept to one thread.
    let workers: usize = env_or("WORKERS", 2)?;
    // The class the `cellhost` binary puts its threads in (batch unless
    // told otherwise); CPU_SCHEDULING=keep measures without it. It holds
    // for every side run in this process: cellhost and the bare relays.
    let class: CpuScheduling = env_or("CPU_SCHEDULING", CpuScheduling::Batch)?;
    cellhost::sched::apply(class).with_context(|| format!("CPU scheduling class {class}"))?;
    println!(
        "CPU scheduling: {class}; this process's threads are in the {:?} class",
        cellhost::sched::current()
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> Result<()> {
    let messages: u32 = env_or("MESSAGES", 50_000)?;
    let rounds: usize = env_or("ROUNDS", 3)?;
    let sizes = body_sizes_from_env()?;
    // SIDES=cellhost,bare (any of cellhost, bare, bare-mandatory, bare-planned,
    // bare-asked, bare-amqprs, amqprs-planned, shovel256, shovel1000)
    // runs only those, for a quick comparison.
    let sides: Vec<Side> = match std::env::var("SIDES") {
        Ok(list) => Side::ALL
            .into_iter()
            .filter(|side| list.split(',').any(|name| name.trim() == side.short_name()))
            .collect(),
        Err(_) => Side::ALL.to_vec(),
    };
    ensure!(
        !sides.is_empty(),
        "SIDES names none of cellhost, bare, bare-mandatory, bare-planned, bare-asked, bare-amqprs, \
         amqprs-planned, shovel256, shovel1000"
    );
    ensure!(
        messages > 0 && rounds > 0,
        "MESSAGES and ROUNDS must be positive"
    );
    ensure_shovel_plugin()?;
    let meter = CpuMeter::new();
    if meter.broker_pid.is_none() {
        println!("no local beam.smp found: the broker's CPU is not reported");
    }
    let config = Config::for_cell("top", TransportUrl::Memory { name: "top".into() });
    ensure!(
        config.cell.prefetch == CELLHOST_PREFETCH,
        "cellhost's default prefetch is now {}: update CELLHOST_PREFETCH ({CELLHOST_PREFETCH}) \
         so the bare relays keep its window",
        config.cell.prefetch
    );
    // PREFETCH tries cellhost and the bare relays with another prefetch,
    // CONFIRM_WINDOW cellhost with another window, than their defaults.
    let windows = Windows {
        prefetch: env_or("PREFETCH", config.cell.prefetch)?,
        confirm_window: env_or("CONFIRM_WINDOW", config.cell.confirm_window)?,
    };
    println!(
        "{messages} messages per run, {rounds} rounds per body size, body sizes {sizes:?}; \
         cellhost prefetch {}, confirm_window {}",
        windows.prefetch, windows.confirm_window,
    );

    let mut reports = Vec::new();
    for &body_bytes in &sizes {
        let bodies = bodies(messages as usize, body_bytes)?;
        let mean = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len();
        println!(
            "\n## BODY_BYTES={body_bytes}: bodies of {mean} bytes on average \
             ({} bytes of cells message)",
            cells_message_len(&bodies[0])?,
        );
        let planned = plan_alone(&bodies, &nova_cells()?)?;
        println!(
            "router plan alone (decode, policy, encode; no broker): {:.1} µs/message, \
             so one consumer tops out near {:.0} msg/s",
            planned.per_message.as_secs_f64() * 1e6,
            1.0 / planned.per_message.as_secs_f64(),
        );
        let mut report = SizeReport {
            body_bytes,
            mean_bytes: mean,
            planning: planned.per_message,
            messages,
            runs: sides.iter().map(|s| (*s, vec![])).collect(),
        };
        for round in 1..=rounds {
            for (side, timings) in &mut report.runs {
                let timing = match *side {
                    Side::Cellhost => {
                        let policy = nova_cells()?;
                        run_cellhost(&bodies, &windows, &policy, &meter).await
                    }
                    Side::BareLapin { mandatory } => {
                        let to = &planned.destination;
                        run_bare_lapin(&bodies, &windows, to, mandatory, Work::Forward, &meter)
                            .await
                    }
                    Side::BarePlanned => {
                        let to = &planned.destination;
                        let work = Work::Plan(top_route_worker(&nova_cells()?));
                        run_bare_lapin(&bodies, &windows, to, true, work, &meter).await
                    }
                    Side::BareAsked => {
                        let to = &planned.destination;
                        let work = Work::Ask(policy_call(&bodies[0], &nova_cells()?)?);
                        run_bare_lapin(&bodies, &windows, to, true, work, &meter).await
                    }
                    Side::BareAmqprs => {
                        let to = &planned.destination;
                        run_bare_amqprs(&bodies, &windows, to, None, &meter).await
                    }
                    Side::AmqprsPlanned => {
                        let to = &planned.destination;
                        let planner = Some(top_route_worker(&nova_cells()?));
                        run_bare_amqprs(&bodies, &windows, to, planner, &meter).await
                    }
                    Side::Shovel { prefetch } => run_shovel(&bodies, prefetch, &meter).await,
                }
                .with_context(|| {
                    format!("BODY_BYTES={body_bytes}, round {round}, {}", side.label())
                })?;
                println!(
                    "round {round} {:<26} total {:>7.3} s {:>7.0} msg/s | from consumer {:>7.3} s {:>7.0} msg/s \
                     | CPU µs/msg: process {:>5.1} (workers {:>4.1}, lapin I/O {:>4.1}), broker {} \
                     | switches/msg: process {:.2}, broker {:.2} | TCP segments/msg {:.2}",
                    side.label(),
                    timing.total.as_secs_f64(),
                    rate(messages, timing.total),
                    timing.relaying.as_secs_f64(),
                    rate(messages, timing.relaying),
                    per_message_us(messages, timing.cpu.own),
                    per_message_us(messages, timing.split.workers),
                    per_message_us(messages, timing.split.lapin_io),
                    timing
                        .cpu
                        .broker
                        .map(|b| format!("{:>5.1}", per_message_us(messages, b)))
                        .unwrap_or_else(|| "n/a".into()),
                    timing.cpu.own_switches as f64 / f64::from(messages),
                    timing.cpu.broker_switches as f64 / f64::from(messages),
                    timing.cpu.tcp_segments as f64 / f64::from(messages),
                );
                // What a side leaves behind shows up as CPU in later rounds.
                println!(
                    "  after the run: {} tokio tasks alive, {} threads in this process",
                    tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks(),
                    thread_count().map_or_else(|| "?".into(), |n| n.to_string()),
                );
                timings.push(timing);
            }
        }
        println!("\n{report}");
        reports.push(report);
    }
    if reports.len() > 1 {
        println!("\n# All body sizes\n");
        for report in &reports {
            println!("{report}");
        }
    }
    Ok(())
}

/// Every run of one body size, printed as a markdown table of medians.
struct SizeReport {
    body_bytes: usize,
    mean_bytes: usize,
    planning: Duration,
    messages: u32,
    runs: Vec<(Side, Vec<Timing>)>,
}

/// The medians of one side's runs.
struct Medians {
    total_rate: f64,
    relaying_rate: f64,
    process_us: f64,
    workers_us: f64,
    lapin_io_us: f64,
    broker_us: Option<f64>,
}

impl Medians {
    fn cpu_us(&self) -> f64 {
        self.process_us + self.broker_us.unwrap_or(0.0)
    }
}

impl SizeReport {
    fn medians(&self, timings: &[Timing]) -> Medians {
        let messages = self.messages;
        let of = |value: fn(&Timing, u32) -> f64| {
            median(timings.iter().map(|t| value(t, messages)).collect())
        };
        Medians {
            total_rate: of(|t, n| rate(n, t.total)),
            relaying_rate: of(|t, n| rate(n, t.relaying)),
            process_us: of(|t, n| per_message_us(n, t.cpu.own)),
            workers_us: of(|t, n| per_message_us(n, t.split.workers)),
            lapin_io_us: of(|t, n| per_message_us(n, t.split.lapin_io)),
            broker_us: timings
                .iter()
                .all(|t| t.cpu.broker.is_some())
                .then(|| of(|t, n| per_message_us(n, t.cpu.broker.unwrap_or(0.0)))),
        }
    }
}

impl fmt::Display for SizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounds = self.runs.first().map_or(0, |(_, t)| t.len());
        writeln!(
            f,
            "### BODY_BYTES={}: {} messages of {} bytes, medians of {rounds} round(s)",
            self.body_bytes, self.messages, self.mean_bytes,
        )?;
        writeln!(
            f,
            "router plan alone: {:.1} µs/msg\n",
            self.planning.as_secs_f64() * 1e6
        )?;
        writeln!(
            f,
            "| side | msg/s total | msg/s from consumer | process CPU µs/msg \
             | of it, workers | of it, lapin I/O | broker CPU µs/msg | CPU µs/msg, both |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        let medians: Vec<(Side, Medians)> = self
            .runs
            .iter()
            .map(|(side, timings)| (*side, self.medians(timings)))
            .collect();
        for (side, m) in &medians {
            writeln!(
                f,
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
                side.label(),
                m.total_rate,
                m.relaying_rate,
                m.process_us,
                m.workers_us,
                m.lapin_io_us,
                m.broker_us.map_or("n/a".into(), |b| format!("{b:.1}")),
                m.cpu_us(),
            )?;
        }
        let Some((_, host)) = medians.iter().find(|(side, _)| *side == Side::Cellhost) else {
            return Ok(());
        };
        writeln!(
            f,
            "\n| cellhost / | msg/s total | msg/s from consumer | CPU µs/msg, both |"
        )?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for (side, m) in medians.iter().filter(|(side, _)| *side != Side::Cellhost) {
            writeln!(
                f,
                "| {} | {:.2} | {:.2} | {:.2} |",
                side.label(),
                host.total_rate / m.total_rate,
                host.relaying_rate / m.relaying_rate,
                host.cpu_us() / m.cpu_us(),
            )?;
        }
        // Medians of different rounds can each be lucky or unlucky; a round
        // runs the sides one after the other, so a ratio within a round
        // compares them under the same conditions.
        let Some((_, host_runs)) = self.runs.iter().find(|(side, _)| *side == Side::Cellhost)
        else {
            return Ok(());
        };
        writeln!(
            f,
            "\n| cellhost / (msg/s total, round by round) | median | mean | 95 % interval of the mean | lowest | highest |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for (side, runs) in self.runs.iter().filter(|(side, _)| *side != Side::Cellhost) {
            let ratios: Vec<f64> = host_runs
                .iter()
                .zip(runs)
                .map(|(host, other)| {
                    rate(self.messages, host.total) / rate(self.messages, other.total)
                })
                .collect();
            let spread = Spread::of(&ratios);
            writeln!(
                f,
                "| {} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                side.label(),
                median(ratios.clone()),
                spread.mean,
                spread.half_width.map_or("n/a".into(), |h| format!(
                    "{:.2} to {:.2}",
                    spread.mean - h,
                    spread.mean + h
                )),
                spread.lowest,
                spread.highest,
            )?;
        }
        Ok(())
    }
}

/// The mean of some ratios, how far from it the true mean may lie, and
/// their range.
struct Spread {
    mean: f64,
    /// Half the 95 % confidence interval of the mean (Student's t), for two
    /// values or more.
    half_width: Option<f64>,
    lowest: f64,
    highest: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let half_width = (n >= 2).then(|| {
            let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t_975(n - 1) * (variance / n as f64).sqrt()
        });
        Spread {
            mean,
            half_width,
            lowest: values.iter().copied().fold(f64::INFINITY, f64::min),
            highest: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Student's t for a two-sided 95 % interval with `df` degrees of freedom.
fn t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => 1.96,
    }
}

/// What [`plan_alone`] learns.
struct Planned {
    /// The time the router takes to plan one relay.
    per_message: Duration,
    /// Where the router sends these messages on leaf's broker.
    destination: Destination,
}

/// The nova-cells policy on an engine of its own, compiled outside every
/// timing. The engine's epoch ticker (a thread that wakes every
/// millisecond) lives as long as the policy does: only while cellhost runs,
/// so the other sides are not charged for it.
fn nova_cells() -> Result<Arc<LoadedPolicy>> {
    let section = cellhost::config::PolicySection {
        path: Some(cellhost::plugins::built_path("nova_cells")),
        ..Default::default()
    };
    cellhost::plugins::load(&PolicyEngine::new()?, &section)
}

/// The nova-cells policy's `route` for `body` as `top` sees it on arrival
/// (its hop recorded), on a fresh instance, with top's cell.
fn policy_call(body: &[u8], policy: &Arc<LoadedPolicy>) -> Result<PolicyCall> {
    let request = decode_request(body, usize::MAX).context("decoding a bench body")?;
    let mut message = request
        .cells_message()
        .context("reading a bench body's cells message")?;
    message.append_hop("top");
    Ok(PolicyCall {
        instance: policy.instantiate()?,
        message: message_view(&message, false),
        cell: cell_view(&top_config()),
    })
}

/// The time the router takes to plan one relay, measured in process on up
/// to 20 000 of the bodies: the serial part of a consumer's work, done by
/// its one task whatever the window. Also where it sends them, for the bare
/// relay to publish to the same place.
fn plan_alone(bodies: &[Vec<u8>], policy: &Arc<LoadedPolicy>) -> Result<Planned> {
    let mut worker = top_route_worker(policy);
    let sample = &bodies[..bodies.len().min(20_000)];
    // The first plans instantiate the policy and warm the caches.
    for body in sample.iter().take(500) {
        worker.plan(body, None);
    }
    let destination = {
        let plan = worker.plan(&sample[0], None);
        match plan.sends.as_slice() {
            [(Target::Neighbour(cell), publication)] if cell == "leaf" => Destination {
                exchange: publication.exchange.clone(),
                routing_key: publication.routing_key.clone(),
            },
            sends => bail!(
                "the router did not plan one relay to leaf: {:?} ({:?})",
                sends.iter().map(|(target, _)| target).collect::<Vec<_>>(),
                plan.disposition
            ),
        }
    };
    let started = Instant::now();
    for body in sample {
        let plan = worker.plan(body, None);
        ensure!(
            plan.sends.len() == 1,
            "the router planned {} publications for one relay: {:?}",
            plan.sends.len(),
            plan.disposition
        );
    }
    Ok(Planned {
        per_message: started.elapsed() / sample.len() as u32,
        destination,
    })
}

/// What a cellhost run and a bare lapin run start from: fresh vhosts for
/// `top` and `leaf` with their intercell queues declared, top's targeted
/// queue holding the backlog, and probes on it and on leaf's.
struct CellPair {
    vhosts: Vhosts,
    top: Config,
    /// The targeted queue's name, the same on both brokers.
    queue: String,
    ends: Ends,
}

impl CellPair {
    async fn prepare(bodies: &[Vec<u8>], windows: &Windows) -> Result<CellPair> {
        let prefix = fresh_prefix();
        let vhosts = Vhosts::create(PAIR.iter().map(|(c, _)| format!("{prefix}-{c}")).collect())?;
        let configs = tree_configs(&PAIR, |cell| {
            format!("rabbit://guest:guest@127.0.0.1:5672/{prefix}-{cell}")
                .parse()
                .expect("a well-formed bench URL")
        });
        let mut top = configs
            .iter()
            .find(|c| c.cell.name == "top")
            .expect("top is in PAIR")
            .clone();
        top.cell.prefetch = windows.prefetch;
        top.cell.confirm_window = windows.confirm_window;
        let (exchange, queue_base) = (&top.cell.control_exchange, &top.cell.queue_base);
        // The queues exist before any relay: the backlog waits in top's, and
        // leaf's can be watched from the start (a host declares it again,
        // unchanged).
        for config in &configs {
            let broker = Broker::connect(
                &config.cell.transport_url,
                &config.oslo_messaging_rabbit,
                "bench-setup",
            )
            .await?;
            declare_intercell(&broker, exchange, queue_base).await?;
            broker.close().await;
        }
        let queue = format!("{queue_base}.targeted");
        let (top_vhost, leaf_vhost) = (&vhosts.names()[0], &vhosts.names()[1]);
        fill(top_vhost, exchange, &queue, bodies).await?;
        let ends = Ends {
            src: Probe::open(top_vhost, &queue).await?,
            dst: Probe::open(leaf_vhost, &queue).await?,
        };
        ensure!(
            ends.src.state().await?.ready == bodies.len() as u32,
            "top's backlog is incomplete"
        );
        Ok(CellPair {
            vhosts,
            top,
            queue,
            ends,
        })
    }

    fn top_vhost(&self) -> &str {
        &self.vhosts.names()[0]
    }

    fn leaf_vhost(&self) -> &str {
        &self.vhosts.names()[1]
    }

    async fn remove(self) -> Result<()> {
        self.ends.src.close().await;
        self.ends.dst.close().await;
        self.vhosts.remove()
    }
}

/// One cellhost for `top` relays the backlog of top's targeted queue to leaf.
async fn run_cellhost(
    bodies: &[Vec<u8>],
    windows: &Windows,
    policy: &Arc<LoadedPolicy>,
    meter: &CpuMeter,
) -> Result<Timing> {
    let pair = CellPair::prepare(bodies, windows).await?;
    let count = bodies.len() as u32;
    let before = meter.read();
    let started = Instant::now();
    let (host, finish) = tokio::try_join!(
        CellHost::start(pair.top.clone(), policy.clone()),
        watch(&pair.ends, count, started)
    )?;
    let timing = Timing::new(started, before, finish, meter.read());
    // A message the policy refused or the host failed to relay would also
    // have stopped the run short; check nothing of the kind happened.
    let stats = &host.router().stats;
    ensure!(
        Stats::get(&stats.relayed) == u64::from(count)
            && Stats::get(&stats.dead_lettered) == 0
            && Stats::get(&stats.publish_failures) == 0,
        "top relayed {}, dead-lettered {}, failed {} publications",
        Stats::get(&stats.relayed),
        Stats::get(&stats.dead_lettered),
        Stats::get(&stats.publish_failures),
    );
    let parked = Stats::get(&stats.parked);
    if parked > 0 {
        println!(
            "  (cellhost parked {parked} relays, moved on {} of them)",
            Stats::get(&stats.unparked)
        );
    }
    await_no_unacked(pair.top_vhost(), &pair.queue).await?;
    check_relayed(&pair.ends.dst, "top", 1).await?;
    host.shutdown().await;
    pair.remove().await?;
    Ok(timing)
}

/// The bare lapin relay moves the same backlog to where cellhost would.
async fn run_bare_lapin(
    bodies: &[Vec<u8>],
    windows: &Windows,
    destination: &Destination,
    mandatory: bool,
    work: Work,
    meter: &CpuMeter,
) -> Result<Timing> {
    let rewritten = work.rewrites();
    let timed = !matches!(work, Work::Forward);
    let pair = CellPair::prepare(bodies, windows).await?;
    let count = bodies.len() as u32;
    let (source_uri, destination_uri) = (
        local_amqp_uri(pair.top_vhost()),
        local_amqp_uri(pair.leaf_vhost()),
    );
    let before = meter.read();
    let started = Instant::now();
    let (relay, finish) = tokio::try_join!(
        BareRelay::start(
            &source_uri,
            &pair.queue,
            &destination_uri,
            destination.clone(),
            pair.top.cell.prefetch,
            mandatory,
            work,
        ),
        watch(&pair.ends, count, started)
    )?;
    let timing = Timing::new(started, before, finish, meter.read());
    // Still running, so the last acks can go out.
    await_no_unacked(pair.top_vhost(), &pair.queue).await?;
    let relayed = relay.stop().await?;
    conclude_bare_run("lapin", pair, relayed, count, timed, rewritten).await?;
    Ok(timing)
}

/// The bare amqprs relay moves the same backlog to where cellhost would.
async fn run_bare_amqprs(
    bodies: &[Vec<u8>],
    windows: &Windows,
    destination: &Destination,
    planner: Option<RouteWorker>,
    meter: &CpuMeter,
) -> Result<Timing> {
    let planned = planner.is_some();
    let pair = CellPair::prepare(bodies, windows).await?;
    let count = bodies.len() as u32;
    let before = meter.read();
    let started = Instant::now();
    let (relay, finish) = tokio::try_join!(
        BareAmqprsRelay::start(
            pair.top_vhost(),
            &pair.queue,
            pair.leaf_vhost(),
            destination.clone(),
            pair.top.cell.prefetch,
            planner,
        ),
        watch(&pair.ends, count, started)
    )?;
    let timing = Timing::new(started, before, finish, meter.read());
    // Still running, so the last acks can go out.
    await_no_unacked(pair.top_vhost(), &pair.queue).await?;
    let relayed = relay.stop().await?;
    conclude_bare_run("amqprs", pair, relayed, count, planned, planned).await?;
    Ok(timing)
}

/// After a bare relay (on `client`) stopped: checks it acked every message
/// and that the destination holds them as relayed (hop 1 through `top` when
/// `planned`, unchanged otherwise), says how it acked, and removes the vhosts.
async fn conclude_bare_run(
    client: &str,
    pair: CellPair,
    relayed: Relayed,
    count: u32,
    timed: bool,
    rewritten: bool,
) -> Result<()> {
    ensure!(
        relayed.messages == u64::from(count),
        "the bare {client} relay acked {} messages, sent {count}",
        relayed.messages
    );
    println!(
        "  (bare {client} acked its {} messages with {} multiple acks)",
        relayed.messages, relayed.acks
    );
    if timed {
        println!(
            "  (the work in the relay's loop: {:.2} µs/message, wall)",
            relayed.planning.as_secs_f64() * 1e6 / f64::from(count)
        );
    }
    if rewritten {
        // Relayed as cellhost relays it: one hop more.
        check_relayed(&pair.ends.dst, "top", 1).await?;
    } else {
        // Forwarded unchanged: the message carries no hop.
        check_relayed(&pair.ends.dst, "", 0).await?;
    }
    pair.remove().await
}

async fn run_shovel(bodies: &[Vec<u8>], prefetch: u16, meter: &CpuMeter) -> Result<Timing> {
    let prefix = fresh_prefix();
    let vhosts = Vhosts::create(vec![format!("{prefix}-src"), format!("{prefix}-dst")])?;
    let (src_vhost, dst_vhost) = (&vhosts.names()[0], &vhosts.names()[1]);
    let queue = "q";
    // Declared as oslo declares cellhost's queues (transient), so both brokers
    // do the same work per message; the shovel finds them and declares nothing.
    for vhost in vhosts.names() {
        declare_transient_queue(vhost, queue).await?;
    }
    fill(src_vhost, "", queue, bodies).await?;
    let ends = Ends {
        src: Probe::open(src_vhost, queue).await?,
        dst: Probe::open(dst_vhost, queue).await?,
    };
    let count = bodies.len() as u32;
    ensure!(
        ends.src.state().await?.ready == count,
        "src's backlog is incomplete"
    );

    let name = format!("{prefix}-shovel");
    let definition = json!({
        "src-protocol": "amqp091",
        "src-uri": local_amqp_uri(src_vhost),
        "src-queue": queue,
        "src-prefetch-count": prefetch,
        "dest-protocol": "amqp091",
        "dest-uri": local_amqp_uri(dst_vhost),
        "dest-queue": queue,
        "ack-mode": "on-confirm",
    })
    .to_string();
    let before = meter.read();
    let started = Instant::now();
    let set_args = [
        "set_parameter",
        "-p",
        src_vhost,
        "shovel",
        &name,
        &definition,
    ];
    let set = rabbitmqctl_async(&set_args);
    let ((), finish) = tokio::try_join!(set, watch(&ends, count, started))?;
    let timing = Timing::new(started, before, finish, meter.read());
    await_no_unacked(src_vhost, queue).await?;
    check_relayed(&ends.dst, "", 0).await?;
    rabbitmqctl_async(&["clear_parameter", "-p", src_vhost, "shovel", &name]).await?;
    ends.src.close().await;
    ends.dst.close().await;
    vhosts.remove()?;
    Ok(timing)
}

/// Waits until the destination holds `count` messages and the source none.
async fn watch(ends: &Ends, count: u32, started: Instant) -> Result<Finish> {
    // Generous: a relay slower than 200 msg/s is broken, not slow.
    let deadline = started + Duration::from_secs(60).max(Duration::from_millis(5 * count as u64));
    // Polled finely until the relay shows up, so its start is sharp.
    let attached = loop {
        let src = ends.src.state().await?;
        if src.consumers > 0 || src.ready < count {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("no consumer came to the source queue");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    loop {
        let dst = ends.dst.state().await?;
        ensure!(
            dst.ready <= count,
            "{} messages reached the destination, sent {count}",
            dst.ready
        );
        if dst.ready == count && ends.src.state().await?.ready == 0 {
            return Ok(Finish {
                attached,
                done: Instant::now(),
            });
        }
        if Instant::now() > deadline {
            let src = ends.src.state().await?;
            bail!(
                "timed out: destination holds {} of {count}, source {} ready",
                dst.ready,
                src.ready
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The length of the cells message inside an oslo body, for the report.
fn cells_message_len(body: &[u8]) -> Result<usize> {
    let request = cellhost::wire::decode_request(body, usize::MAX)?;
    Ok(request.cells_message()?.to_json().len())
}

/// Publishes `bodies` with confirms, as oslo.messaging sets the properties,
/// keeping up to `FILL_BATCH` confirms in flight.
async fn fill(vhost: &str, exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) -> Result<()> {
    let connection =
        Connection::connect(&local_amqp_uri(vhost), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // What cellhost's own publisher sets, so relayed and shovelled copies
    // carry the same properties.
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default());
    for batch in bodies.chunks(FILL_BATCH) {
        let sends = batch.iter().map(|body| {
            channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
        });
        let confirms = futures::future::try_join_all(sends).await?;
        for confirmation in futures::future::try_join_all(confirms).await? {
            ensure!(
                matches!(confirmation, Confirmation::Ack(_)),
                "the broker did not take a message for {routing_key} on {vhost}: {confirmation:?}"
            );
        }
    }
    let _ = connection.close(200, "filled".into()).await;
    Ok(())
}

async fn declare_transient_queue(vhost: &str, queue: &str) -> Result<()> {
    let connection =
        Connection::connect(&local_amqp_uri(vhost), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

/// Takes one message off the destination and checks it is a cells message
/// for `top!leaf` that went through `routing_path` (`hop_count` hops).
async fn check_relayed(dst: &Probe, routing_path: &str, hop_count: u32) -> Result<()> {
    let got = dst
        .channel
        .basic_get(dst.queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("the destination queue is empty")?;
    let request = cellhost::wire::decode_request(&got.delivery.data, usize::MAX)?;
    let message = request.cells_message()?;
    ensure!(
        message.target_cell.as_deref() == Some(TARGET)
            && message.routing_path == routing_path
            && message.hop_count == hop_count,
        "unexpected message at the destination: target {:?}, path {:?}, hops {}",
        message.target_cell,
        message.routing_path,
        message.hop_count
    );
    Ok(())
}

/// Checks, with `rabbitmqctl` (AMQP cannot tell), that the source queue has
/// no unacknowledged message left, waiting a little for a last ack in flight.
async fn await_no_unacked(vhost: &str, queue: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listing = rabbitmqctl_output(&[
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .await?;
        let unacked = listing
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .with_context(|| format!("no queue {queue} in list_queues of {vhost}: {listing}"))?
            .1
            .trim()
            .parse::<u64>()
            .with_context(|| format!("list_queues of {vhost}: {listing}"))?;
        if unacked == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{unacked} messages of {queue} on {vhost} stay unacknowledged");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Enables the shovel plugin if this broker does not run it yet.
fn ensure_shovel_plugin() -> Result<()> {
    let listed = Command::new("rabbitmq-plugins")
        .args(["list", "-e", "-m"])
        .output()
        .context("running rabbitmq-plugins")?;
    ensure!(
        listed.status.success(),
        "rabbitmq-plugins list failed: {}",
        String::from_utf8_lossy(&listed.stderr).trim()
    );
    let enabled = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim() == "rabbitmq_shovel");
    if enabled {
        return Ok(());
    }
    println!("rabbitmq_shovel is not enabled: running `rabbitmq-plugins enable rabbitmq_shovel`");
    let out = Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_shovel"])
        .output()
        .context("running rabbitmq-plugins")?;
    ensure!(
        out.status.success(),
        "rabbitmq-plugins enable rabbitmq_shovel failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `rabbitmqctl` without blocking the runtime, so a run can be watched
/// while the command is still starting up.
async fn rabbitmqctl_async(args: &[&str]) -> Result<()> {
    rabbitmqctl_output(args).await.map(|_| ())
}

async fn rabbitmqctl_output(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .context("running rabbitmqctl")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl {} failed: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fresh_prefix() -> String {
    // Not `cht-`, which the test harness uses.
    format!("chr-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn rate(messages: u32, took: Duration) -> f64 {
    f64::from(messages) / took.as_secs_f64()
}

fn per_message_us(messages: u32, cpu_seconds: f64) -> f64 {
    cpu_seconds * 1e6 / f64::from(messages)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
