//! A cell's neighbour set while it serves: changes to the neighbours file
//! (or a SIGHUP) apply without a restart.
//!
//! A new version is checked first, with the same checks as at start; a bad
//! one is refused with its reason, kept as the last error, and the current
//! set keeps serving. A good one is applied in this order, so no relay is
//! ever sent to a link that does not exist yet:
//!
//! 1. new neighbours (and those whose URL or RabbitMQ options changed) get
//!    their park queue and a link, connecting in the background;
//! 2. the router and the links swap to the new set at once: new messages
//!    route with it;
//! 3. removed neighbours' drainers stop, and each removed broker is closed
//!    once no relay to it is in flight (bounded by [`CLOSE_GRACE`]).
//!
//! Relays already parked for a removed neighbour stay in its park queue and
//! go to the dead-letter queue when they reach `cell.park_max_age_s`, unless
//! the neighbour comes back first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{load_cells_config, Config, NeighbourConfig};
use crate::file_watch::{watch_file, FileWatch};
use crate::links::{park_queue, Links};
use crate::router::Router;
use crate::transport::Broker;

/// The longest a removed neighbour's link stays open for relays to it that
/// were in flight when it was removed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The longest a cell waits for new neighbour links to come up before it
/// routes to them: a neighbour that says nothing (a stalled host) does not
/// hold the cell for longer; its relays are parked meanwhile.
pub const FIRST_ATTEMPT_GRACE: Duration = Duration::from_secs(3);

/// A burst of file events (write, chmod, rename) is read as one change.
const SETTLE: Duration = Duration::from_millis(50);

/// What applying a neighbour set changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeighboursChanged {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Neighbours whose URL or RabbitMQ options changed: their link was replaced.
    pub reconnected: Vec<String>,
}

struct Running {
    config: NeighbourConfig,
    stop: watch::Sender<bool>,
    drainer: JoinHandle<()>,
}

/// Owns the neighbour links of one cell and swaps them.
pub struct NeighbourLinks {
    router: Arc<Router>,
    links: Arc<Links>,
    /// Held for the whole of an apply: two changes never interleave.
    running: tokio::sync::Mutex<HashMap<String, Running>>,
}

impl NeighbourLinks {
    /// Takes over the links `CellHost::start` opened: follows their state
    /// and starts a drainer for each.
    pub fn start(router: Arc<Router>, links: Arc<Links>) -> Arc<NeighbourLinks> {
        let mut running = HashMap::new();
        let brokers = links.neighbours();
        for n in &router.config().neighbours {
            if let Some(broker) = brokers.get(&n.name) {
                running.insert(n.name.clone(), run(&router, &links, n, broker.clone()));
            }
        }
        Arc::new(NeighbourLinks {
            router,
            links,
            running: tokio::sync::Mutex::new(running),
        })
    }

    /// The neighbours file this cell reads, if it has one.
    pub fn path(&self) -> Option<&Path> {
        self.router.config().cell.neighbours_file.as_deref()
    }

    /// Why the last version of the neighbours file was refused, until one is applied.
    pub fn last_error(&self) -> Option<String> {
        self.router.neighbours_error()
    }

    /// Re-reads the neighbours file and applies it.
    pub async fn reload(&self) -> Result<NeighboursChanged> {
        let cell = self.router.cell_name().to_string();
        let Some(path) = self.path().map(Path::to_path_buf) else {
            anyhow::bail!(
                "cell {cell} lists its neighbours in its config file; set `cell.neighbours_file` to change them without a restart"
            );
        };
        let result = match load_cells_config(&path, &cell) {
            Ok(set) => self
                .apply(set)
                .await
                .with_context(|| format!("neighbours file {} for cell {cell}", path.display())),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.router.set_neighbours_error(Some(format!("{e:#}")));
            tracing::error!(cell = %cell, file = %path.display(), error = %format!("{e:#}"), "neighbours file refused; the current neighbours keep serving");
        }
        result
    }

    /// Makes `set` the cell's neighbours. A set that fails the config's
    /// checks is refused and changes nothing.
    pub async fn apply(&self, set: Vec<NeighbourConfig>) -> Result<NeighboursChanged> {
        let result = self.apply_checked(set).await;
        match &result {
            Ok(changed) => {
                self.router.set_neighbours_error(None);
                if *changed != NeighboursChanged::default() {
                    tracing::info!(cell = %self.router.cell_name(), added = ?changed.added, removed = ?changed.removed, reconnected = ?changed.reconnected, "neighbours changed");
                }
            }
            Err(e) => self.router.set_neighbours_error(Some(format!("{e:#}"))),
        }
        result
    }

    async fn apply_checked(&self, set: Vec<NeighbourConfig>) -> Result<NeighboursChanged> {
        let config = self.router.config();
        config.validate_neighbours(&set)?;
        let mut running = self.running.lock().await;
        let mut changed = NeighboursChanged::default();
        let mut starting = Vec::new();
        for n in &set {
            match running.get(&n.name) {
                None => changed.added.push(n.name.clone()),
                Some(r) if !same_link(config, &r.config, n) => {
                    changed.reconnected.push(n.name.clone())
                }
                Some(_) => continue,
            }
            starting.push(n);
        }
        changed.removed = running
            .keys()
            .filter(|name| !set.iter().any(|n| &n.name == *name))
            .cloned()
            .collect();
        changed.removed.sort();

        // 1. The new links, before any message may route to them. A failure
        // here leaves the current set as it was.
        let mut brokers: HashMap<String, Arc<Broker>> = (*self.links.neighbours()).clone();
        let mut opened = Vec::new();
        for n in starting {
            declare_park_queue(&self.links.own, config, &n.name).await?;
            let broker = connect_neighbour(config, n).await.with_context(|| {
                format!(
                    "cell {}: neighbour {} at {}",
                    config.cell.name, n.name, n.transport_url
                )
            })?;
            opened.push((n.clone(), Arc::new(broker)));
        }
        first_attempts(opened.iter().map(|(_, broker)| &**broker)).await;
        // 2. The swap.
        let mut closing = Vec::new();
        for name in changed.removed.iter().chain(&changed.reconnected) {
            if let Some(old) = running.remove(name) {
                closing.push((name.clone(), old, brokers.remove(name)));
            }
        }
        for (n, broker) in &opened {
            brokers.insert(n.name.clone(), broker.clone());
        }
        self.links.set_neighbours(brokers);
        self.router.set_neighbours(&set);
        for name in &changed.removed {
            self.router.forget_link(name);
        }
        // A drainer of the old link must stop before the new one consumes
        // the same park queue.
        let mut old_brokers = Vec::new();
        for (name, old, broker) in closing {
            let _ = old.stop.send(true);
            let _ = old.drainer.await;
            tracing::debug!(cell = %config.cell.name, neighbour = %name, "neighbour's drainer stopped");
            old_brokers.extend(broker);
        }
        for (n, broker) in opened {
            let r = run(&self.router, &self.links, &n, broker);
            running.insert(n.name.clone(), r);
        }
        // Metadata (is_parent, weights, capabilities) of kept neighbours.
        for n in &set {
            if let Some(r) = running.get_mut(&n.name) {
                r.config = n.clone();
            }
        }
        drop(running);
        // 3. Removed links close once their in-flight relays are settled.
        let cell = config.cell.name.clone();
        tokio::spawn(async move {
            for broker in old_brokers {
                close_when_idle(&cell, broker).await;
            }
        });
        Ok(changed)
    }

    /// Stops every drainer and closes every neighbour link.
    pub async fn shutdown(&self) {
        let mut running = self.running.lock().await;
        for (_, r) in running.drain() {
            let _ = r.stop.send(true);
            let _ = r.drainer.await;
        }
        for broker in self.links.neighbours().values() {
            broker.close().await;
        }
    }

    /// Re-reads the neighbours file whenever it changes. The watch stops
    /// when the returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<FileWatch> {
        let Some(path) = self.path().map(Path::to_path_buf) else {
            anyhow::bail!("no neighbours file to watch: set `cell.neighbours_file`");
        };
        let me = Arc::downgrade(self);
        let watch = watch_file(&path, "neighbours file", SETTLE, move || {
            let me = me.upgrade();
            async move {
                let Some(me) = me else { return false };
                // The outcome is logged; a refused file leaves the set serving.
                let _ = me.reload().await;
                true
            }
        })?;
        tracing::info!(cell = %self.router.cell_name(), file = %path.display(), "watching the neighbours file");
        Ok(watch)
    }
}

/// Whether the link to `old` can serve `new`: same broker, same options.
fn same_link(config: &Config, old: &NeighbourConfig, new: &NeighbourConfig) -> bool {
    old.transport_url == new.transport_url
        && config.rabbit_options_of(old) == config.rabbit_options_of(new)
}

/// Follows a neighbour's link and starts its drainer.
fn run(
    router: &Arc<Router>,
    links: &Arc<Links>,
    n: &NeighbourConfig,
    broker: Arc<Broker>,
) -> Running {
    router.watch_link(&n.name, broker.state());
    let (stop, stopped) = watch::channel(false);
    let drainer = tokio::spawn(links.clone().drain_parked(n.name.clone(), broker, stopped));
    Running {
        config: n.clone(),
        stop,
        drainer,
    }
}

/// Declares the queue on the own broker where relays for `neighbour` wait.
pub async fn declare_park_queue(own: &Broker, config: &Config, neighbour: &str) -> Result<()> {
    let oslo = own.oslo();
    let dead = oslo.dead_letter_queue(&format!("{}.dead", config.cell.queue_base));
    let parked = oslo.park_queue(
        &park_queue(&config.cell.queue_base, neighbour),
        &dead.name,
        config.cell.park_max_age_s.saturating_mul(1000),
        config.cell.park_max_length,
    );
    own.declare_queue(&parked, "", "").await?;
    Ok(())
}

/// Opens the link to a neighbour (in the background: it may be down) and
/// makes sure what this cell publishes to exists there once it is up.
pub async fn connect_neighbour(config: &Config, n: &NeighbourConfig) -> Result<Broker> {
    let label = format!("{}->{}", config.cell.name, n.name);
    let broker =
        Broker::connect_in_background(&n.transport_url, config.rabbit_options_of(n), &label)?;
    crate::client::declare_intercell(
        &broker,
        &config.cell.control_exchange,
        &config.cell.queue_base,
    )
    .await?;
    Ok(broker)
}

/// Waits, for at most [`FIRST_ATTEMPT_GRACE`], until each link just opened
/// in the background is up or has failed once. A healthy neighbour's link
/// opens in milliseconds; without this wait, the relays of the first
/// messages would find it still down and be parked for nothing.
pub async fn first_attempts<'a>(brokers: impl Iterator<Item = &'a Broker>) {
    let attempts = futures::future::join_all(brokers.map(Broker::first_attempt));
    let _ = tokio::time::timeout(FIRST_ATTEMPT_GRACE, attempts).await;
}

/// Closes a removed neighbour's link once no publication holds it, or after
/// [`CLOSE_GRACE`]: a relay still unconfirmed then fails and is parked
/// (see the module doc for what becomes of it).
async fn close_when_idle(cell: &str, broker: Arc<Broker>) {
    let give_up = Instant::now() + CLOSE_GRACE;
    while Arc::strong_count(&broker) > 1 && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if Arc::strong_count(&broker) > 1 {
        tracing::warn!(%cell, "closing a removed neighbour's link with relays still in flight; their messages go back to their queues");
    }
    broker.close().await;
}
