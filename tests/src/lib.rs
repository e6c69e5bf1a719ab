//! The end-to-end harness: real cellhosts, one per cell, on a real RabbitMQ
//! (one fresh vhost per cell, removed afterwards) or on `memory://`, each cell
//! with a local worker consuming its `cells.local` topic.
//!
//! Tests send messages into a cell as an application would and check what the
//! applications behind the cells received, what the hosts counted, and what
//! reached the dead-letter queues (read with lapin directly, not through the
//! host's own transport).

pub mod bench;
pub mod fault_proxy;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cellhost::client::{call_into, entry_cast, Caller, Outgoing};
use cellhost::config::{Config, TransportUrl};
use cellhost::demo::{LocalWorker, Processed};
use cellhost::policy::{LoadedPolicy, PolicyEngine};
use cellhost::router::{Stats, CELL_HEADER, REASON_CODE_HEADER, REASON_HEADER};
use cellhost::topology::{tree_configs, NOVA_TOPOLOGY};
use cellhost::transport::{Broker, Publication};
use cellhost::wire::Reply;
use cellhost::CellHost;

pub mod oslo;
pub mod rabbit_node;
pub mod stream;

pub use cellhost::demo::Behaviour;
pub use cellhost::topology::NOVA_TOPOLOGY as NOVA;
pub use cellhost::wire::Direction;

/// How long a test waits for something that should happen in milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Which transport a topology runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Rabbit,
    Memory,
}

/// A running tree of cells.
pub struct Topology {
    pub transport: Transport,
    prefix: String,
    pub configs: Vec<Config>,
    hosts: Vec<CellHost>,
    workers: BTreeMap<String, LocalWorker>,
    /// Deliveries received while waiting for other messages, kept for later.
    stash: Vec<Processed>,
    vhosts: Vec<String>,
}

/// A snapshot of every host's counters, to compare before and after a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub received: u64,
    pub delivered_local: u64,
    pub relayed: u64,
    pub dead_lettered: u64,
}

/// A dead-lettered message as found in a cell's `<queue_base>.dead` queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub cell: String,
    pub reason: String,
    pub code: String,
    pub body: Vec<u8>,
}

/// The process's policy engine. With `PERF_MAP=1` in the environment it
/// writes wasmtime's perf map (`/tmp/perf-<pid>.map`), so that a profile of
/// a bench names the policy's functions (`scripts/plan-instructions` with
/// `GUEST=1`).
pub fn engine() -> Arc<PolicyEngine> {
    use std::sync::OnceLock;
    static ENGINE: OnceLock<Arc<PolicyEngine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            PolicyEngine::with_options(cellhost::policy::EngineOptions {
                perf_map: std::env::var_os("PERF_MAP").is_some_and(|v| v == "1"),
                ..Default::default()
            })
            .expect("wasmtime engine")
        })
        .clone()
}

/// The policy built from `plugins/<name>`, loaded with `config`.
pub fn plugin(name: &str, config: &str) -> Result<Arc<LoadedPolicy>> {
    plugin_with(name, config, |_| {})
}

/// Like [`plugin`], with the `[policy]` section adjusted first (limits, say).
pub fn plugin_with(
    name: &str,
    config: &str,
    adjust: impl FnOnce(&mut cellhost::config::PolicySection),
) -> Result<Arc<LoadedPolicy>> {
    let mut section = cellhost::config::PolicySection {
        path: Some(cellhost::plugins::built_path(name)),
        config: config.to_string(),
        ..Default::default()
    };
    adjust(&mut section);
    cellhost::plugins::load(&engine(), &section)
}

impl Topology {
    /// Nova's eight-cell tree with the embedded nova-cells policy.
    pub async fn nova(transport: Transport) -> Result<Topology> {
        Topology::start(transport, &NOVA_TOPOLOGY, plugin("nova_cells", "")?).await
    }

    /// Any tree, any policy. `topology` lists each cell and its parent.
    pub async fn start(
        transport: Transport,
        topology: &[(&str, Option<&str>)],
        policy: Arc<LoadedPolicy>,
    ) -> Result<Topology> {
        Topology::start_with(transport, topology, policy, true).await
    }

    /// Like [`Topology::start`]; without the built-in local workers when
    /// `workers` is false, for tests that bring their own application.
    pub async fn start_with(
        transport: Transport,
        topology: &[(&str, Option<&str>)],
        policy: Arc<LoadedPolicy>,
        workers: bool,
    ) -> Result<Topology> {
        Topology::start_configured(transport, topology, policy, workers, |_| {}).await
    }

    /// Like [`Topology::start_with`], with each cell's config adjusted first.
    pub async fn start_configured(
        transport: Transport,
        topology: &[(&str, Option<&str>)],
        policy: Arc<LoadedPolicy>,
        workers: bool,
        adjust: impl Fn(&mut Config),
    ) -> Result<Topology> {
        let mut topo = Topology::prepare(transport, topology, adjust)?;
        topo.start_hosts(policy, workers).await?;
        Ok(topo)
    }

    /// The cells' vhosts and configs, with no host running yet: for tests
    /// where something else uses the brokers first (oslo services, say).
    /// [`Topology::start_hosts`] starts the hosts.
    pub fn prepare(
        transport: Transport,
        topology: &[(&str, Option<&str>)],
        adjust: impl Fn(&mut Config),
    ) -> Result<Topology> {
        let prefix = format!("cht-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let vhosts: Vec<String> = match transport {
            Transport::Rabbit => topology
                .iter()
                .map(|(c, _)| format!("{prefix}-{c}"))
                .collect(),
            Transport::Memory => Vec::new(),
        };
        create_vhosts(&vhosts)?;
        let configs = tree_configs(topology, |cell| match transport {
            Transport::Rabbit => format!("rabbit://guest:guest@127.0.0.1:5672/{prefix}-{cell}")
                .parse()
                .expect("a well-formed test URL"),
            Transport::Memory => TransportUrl::Memory {
                name: format!("{prefix}-{cell}"),
            },
        });
        let mut configs = configs;
        configs.iter_mut().for_each(adjust);
        Ok(Topology {
            transport,
            prefix,
            configs,
            hosts: Vec::new(),
            workers: BTreeMap::new(),
            stash: Vec::new(),
            vhosts,
        })
    }

    /// Starts a host per cell, and with `workers` the built-in local workers.
    pub async fn start_hosts(&mut self, policy: Arc<LoadedPolicy>, workers: bool) -> Result<()> {
        if workers {
            let (hosts, workers) = cellhost::demo::start_cells(&self.configs, &policy).await?;
            self.hosts = hosts;
            self.workers = workers;
        } else {
            for config in &self.configs {
                self.hosts
                    .push(CellHost::start(config.clone(), policy.clone()).await?);
            }
        }
        Ok(())
    }

    /// A tree whose cells' brokers are wherever `url_of` says (another
    /// RabbitMQ node, TLS, ...), each config adjusted by `adjust`. The vhosts
    /// belong to the caller, who made them and removes them.
    pub async fn start_on(
        topology: &[(&str, Option<&str>)],
        policy: Arc<LoadedPolicy>,
        url_of: impl Fn(&str) -> TransportUrl,
        adjust: impl Fn(&mut Config),
    ) -> Result<Topology> {
        let prefix = format!("cht-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut configs = tree_configs(topology, url_of);
        configs.iter_mut().for_each(adjust);
        let mut topo = Topology {
            transport: Transport::Rabbit,
            prefix,
            configs,
            hosts: Vec::new(),
            workers: BTreeMap::new(),
            stash: Vec::new(),
            vhosts: Vec::new(),
        };
        topo.start_hosts(policy, true).await?;
        Ok(topo)
    }

    /// The vhost of `cell` on RabbitMQ.
    pub fn vhost(&self, cell: &str) -> String {
        format!("{}-{cell}", self.prefix)
    }

    pub fn config(&self, cell: &str) -> &Config {
        self.configs
            .iter()
            .find(|c| c.cell.name == cell)
            .unwrap_or_else(|| panic!("no cell {cell} in this topology"))
    }

    /// Casts `outgoing` into `origin` as an application there would; returns the uuid.
    pub async fn send(&self, origin: &str, outgoing: Outgoing) -> Result<String> {
        let message = outgoing.to_message();
        let config = self.config(origin);
        self.publish_raw(
            origin,
            entry_cast(
                &config.cell.control_exchange,
                &config.cell.queue_base,
                &message,
            ),
        )
        .await?;
        Ok(message.uuid)
    }

    /// The host serving `cell`.
    pub fn host_mut(&mut self, cell: &str) -> &mut CellHost {
        self.hosts
            .iter_mut()
            .find(|h| h.router().cell_name() == cell)
            .unwrap_or_else(|| panic!("no host for {cell}"))
    }

    /// Every local delivery so far, waiting until there are at least `count`.
    pub async fn drain_processed(
        &mut self,
        count: usize,
        patience: Duration,
    ) -> Result<Vec<Processed>> {
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + patience;
        while found.len() < count {
            let before = found.len();
            for worker in self.workers.values_mut() {
                while let Ok(p) = worker.processed.try_recv() {
                    found.push(p);
                }
            }
            if found.len() == before {
                if tokio::time::Instant::now() > deadline {
                    bail!("{} of {count} local deliveries arrived", found.len());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(found)
    }

    /// The counters of one cell's host.
    pub fn counts_of(&self, cell: &str) -> Counts {
        let host = self
            .hosts
            .iter()
            .find(|h| h.router().cell_name() == cell)
            .unwrap_or_else(|| panic!("no host for {cell}"));
        let s = &host.router().stats;
        Counts {
            received: Stats::get(&s.received),
            delivered_local: Stats::get(&s.delivered_local),
            relayed: Stats::get(&s.relayed),
            dead_lettered: Stats::get(&s.dead_lettered),
        }
    }

    /// How `cell`'s application answers calls from now on.
    pub fn set_behaviour(&self, cell: &str, behaviour: Behaviour) {
        self.workers
            .get(cell)
            .unwrap_or_else(|| panic!("no worker for {cell}"))
            .set_behaviour(behaviour);
    }

    /// An oslo caller on `cell`'s broker, as an application there has.
    pub async fn caller(&self, cell: &str) -> Result<Caller> {
        let config = self.config(cell);
        let broker = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            "test-caller",
        )
        .await?;
        Caller::start(broker).await
    }

    /// Calls into `origin` and waits up to `timeout` for the reply.
    pub async fn call(&self, origin: &str, outgoing: Outgoing, timeout: Duration) -> Result<Reply> {
        let caller = self.caller(origin).await?;
        self.call_with(&caller, origin, outgoing, timeout).await
    }

    /// Like [`Topology::call`], with a caller shared by many calls.
    pub async fn call_with(
        &self,
        caller: &Caller,
        origin: &str,
        outgoing: Outgoing,
        timeout: Duration,
    ) -> Result<Reply> {
        let config = self.config(origin);
        let message = outgoing.to_message();
        call_into(
            caller,
            &config.cell.control_exchange,
            &config.cell.queue_base,
            &message,
            timeout,
        )
        .await
    }

    /// Publishes any body onto `cell`'s broker, e.g. malformed input.
    pub async fn publish_raw(&self, cell: &str, publication: Publication) -> Result<()> {
        let config = self.config(cell);
        let broker = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            "test-client",
        )
        .await?;
        broker.publish(&publication).await?;
        broker.close().await;
        Ok(())
    }

    /// Waits until `count` local deliveries of message `uuid` arrived, and
    /// returns them sorted by cell name.
    pub async fn processed(&mut self, uuid: &str, count: usize) -> Result<Vec<Processed>> {
        let (mut found, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|p| p.message_uuid == uuid);
        self.stash = others;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while found.len() < count {
            let mut progressed = false;
            for worker in self.workers.values_mut() {
                while let Ok(p) = worker.processed.try_recv() {
                    if p.message_uuid == uuid {
                        found.push(p);
                        progressed = true;
                    } else {
                        self.stash.push(p);
                    }
                }
            }
            if !progressed {
                if tokio::time::Instant::now() > deadline {
                    let cells: Vec<_> = found.iter().map(|p| p.cell.clone()).collect();
                    bail!(
                        "message {uuid}: {} of {count} local deliveries arrived ({cells:?})",
                        found.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        found.sort_by(|a, b| a.cell.cmp(&b.cell));
        Ok(found)
    }

    /// The sum of every host's counters.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for host in &self.hosts {
            let s = &host.router().stats;
            c.received += Stats::get(&s.received);
            c.delivered_local += Stats::get(&s.delivered_local);
            c.relayed += Stats::get(&s.relayed);
            c.dead_lettered += Stats::get(&s.dead_lettered);
        }
        c
    }

    /// Waits for the first dead letter in `cell`'s dead-letter queue.
    pub async fn dead_letter(&self, cell: &str) -> Result<DeadLetter> {
        match self.transport {
            Transport::Rabbit => self.dead_letter_amqp(cell).await,
            Transport::Memory => bail!("dead letters are read over AMQP only"),
        }
    }

    async fn dead_letter_amqp(&self, cell: &str) -> Result<DeadLetter> {
        let config = self.config(cell);
        let uri = config.cell.transport_url.amqp_uris().remove(0);
        let queue = format!("{}.dead", config.cell.queue_base);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(dead) = take_dead_letters(&uri, &queue, 1).await?.pop() {
                return Ok(dead);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no dead letter reached {queue} on {cell}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every host and removes the vhosts.
    pub async fn stop(mut self) {
        for host in std::mem::take(&mut self.hosts) {
            host.shutdown().await;
        }
        let _ = delete_vhosts(&std::mem::take(&mut self.vhosts));
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // A failed test still leaves no vhost behind.
        let _ = delete_vhosts(&self.vhosts);
    }
}

/// Creates the vhosts and gives guest all rights on them, all at once.
pub fn create_vhosts(vhosts: &[String]) -> Result<()> {
    run_all(vhosts, |v| vec![vec!["add_vhost", v]])?;
    run_all(vhosts, |v| {
        vec![vec!["set_permissions", "-p", v, "guest", ".*", ".*", ".*"]]
    })
}

pub fn delete_vhosts(vhosts: &[String]) -> Result<()> {
    run_all(vhosts, |v| vec![vec!["delete_vhost", v]])
}

fn run_all(vhosts: &[String], args: impl Fn(&str) -> Vec<Vec<&str>>) -> Result<()> {
    let mut children = Vec::new();
    for v in vhosts {
        for a in args(v) {
            let child = Command::new("rabbitmqctl")
                .args(["-q"])
                .args(&a)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("running rabbitmqctl (is RabbitMQ installed? .ci/run sets it up)")?;
            children.push((a.join(" "), child));
        }
    }
    for (what, child) in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The string header `name` of `delivery`, or `""` when it has none.
pub fn string_header(delivery: &lapin::message::Delivery, name: &str) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .and_then(|v| v.as_long_string())
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Takes up to `most` dead letters from `queue` at `uri` (those there now).
pub async fn take_dead_letters(uri: &str, queue: &str, most: usize) -> Result<Vec<DeadLetter>> {
    use lapin::options::BasicGetOptions;
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let mut taken = Vec::new();
    while taken.len() < most {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await?;
        let Some(message) = got else {
            break;
        };
        let delivery = message.delivery;
        let header = |name: &str| string_header(&delivery, name);
        taken.push(DeadLetter {
            cell: header(CELL_HEADER),
            reason: header(REASON_HEADER),
            code: header(REASON_CODE_HEADER),
            body: delivery.data.clone(),
        });
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(taken)
}

/// Reads the queue's messages with lapin, for tests that look at raw bytes.
pub async fn drain_queue(uri: &str, queue: &str) -> Result<Vec<Vec<u8>>> {
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?
    {
        out.push(m.delivery.data.clone());
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// The `cellhost` binary cargo built beside this test (host/tests/cli.rs
/// makes `cargo test` build it).
pub fn cellhost_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/cellhost
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("cellhost"))
        .expect("test binary sits in target/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p cellhost`",
        bin.display()
    );
    bin
}

/// Fresh vhosts owned by one run of a bench or test: deleted by
/// [`Vhosts::remove`], or when dropped, so a run that fails half-way leaves
/// none behind.
pub struct Vhosts {
    names: Vec<String>,
}

impl Vhosts {
    /// Creates the vhosts and gives guest all rights on them.
    pub fn create(names: Vec<String>) -> Result<Vhosts> {
        // Owned before they exist: a failed creation still removes the ones made.
        let vhosts = Vhosts { names };
        create_vhosts(&vhosts.names)?;
        Ok(vhosts)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Deletes the vhosts now, reporting a failure that `Drop` would swallow.
    pub fn remove(mut self) -> Result<()> {
        delete_vhosts(&std::mem::take(&mut self.names))
    }
}

impl Drop for Vhosts {
    fn drop(&mut self) {
        if !self.names.is_empty() {
            let _ = delete_vhosts(&self.names);
        }
    }
}

/// The AMQP URI of `vhost` on the local RabbitMQ as guest, for lapin or a
/// shovel definition (the vhost is percent-encoded, as the URI spec wants).
pub fn local_amqp_uri(vhost: &str) -> String {
    let mut encoded = String::with_capacity(vhost.len());
    for byte in vhost.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("amqp://guest:guest@127.0.0.1:5672/{encoded}")
}

/// What a passive `queue.declare` tells of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages ready for delivery; delivered but unacknowledged ones are not counted.
    pub ready: u32,
    pub consumers: u32,
}

/// Reads `queue`'s depth and consumer count without declaring it. A missing
/// queue is an error, and the broker then closes `channel`.
pub async fn queue_state(channel: &lapin::Channel, queue: &str) -> Result<QueueState> {
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .with_context(|| format!("passive declare of queue {queue:?}"))?;
    Ok(QueueState {
        ready: declared.message_count(),
        consumers: declared.consumer_count(),
    })
}

/// Deploys `wasm` as an operator should: written beside `file`, then
/// renamed over it, so a watcher never sees it half-written.
pub fn deploy(file: &std::path::Path, wasm: &[u8]) {
    let staging = file.with_extension("wasm.new");
    std::fs::write(&staging, wasm).expect("staging file written");
    std::fs::rename(&staging, file).expect("renamed into place");
}

/// Runs each named `async fn(Transport)` scenario as two tests, in modules
/// `rabbit` and `memory`.
#[macro_export]
macro_rules! on_both_transports {
    ($($scenario:ident),* $(,)?) => {
        mod rabbit {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::Transport::Rabbit).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::Transport::Memory).await;
                }
            )*
        }
    };
}

/// Builds the Python nova-cells component with `scripts/build-python-policy`
/// if its inputs changed (the script skips the build otherwise; it also makes
/// the componentize-py venv in target/componentize-venv) and returns the
/// component's fixed path under target/.
pub fn python_policy_wasm() -> &'static std::path::Path {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ sits in the repository");
        let script = root.join("scripts/build-python-policy");
        let out = std::process::Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed; run it by hand to see why:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let wasm = root.join("target/plugins-py/nova_cells_py.wasm");
        assert!(
            wasm.is_file(),
            "{} is missing after scripts/build-python-policy",
            wasm.display()
        );
        wasm
    })
}
