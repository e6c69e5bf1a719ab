//! The router: cells semantics between the codec and the policy.
//!
//! For one received body it decodes the oslo envelope and the cells message,
//! drops duplicates ([`dedupe`]), records this cell's hop, asks the policy, checks the
//! answer against the invariants no policy may break, and returns a [`Plan`]:
//! the publications to make (relays to neighbours, delivery to the local
//! application, the dead-letter queue) before the source may be acknowledged.
//! It publishes nothing itself; the host's consumer loop carries the plan out.
//!
//! For a message that wants a response, the plan also says how this cell
//! answers ([`Respond`]): what to wait for (the local application's reply,
//! the response lists of the neighbours it relayed to), for how long, and
//! where the answer goes (the application's reply queue at the origin, a
//! response message otherwise). Routing and policy errors become failure
//! responses instead of dead letters when someone waits for an answer.
//!
//! This file holds what the consumers of one cell share ([`Router`]: the
//! config, the active and shadow policy, the neighbour set, link states);
//! `worker` is the road a message takes, `plan` what it decides, `stats`
//! the counters, `dedupe` the window of uuids carried out.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::Config;
use crate::lock;
use crate::policy::{self, view, LoadedPolicy, PolicyError};
use crate::transport::LinkState;
use crate::wire::MessageType;
use tokio::sync::watch;

pub mod dedupe;
mod plan;
mod stats;
mod worker;

pub use dedupe::{Claim, Dedupe, Seen};
pub use plan::{Disposition, Plan, Respond, Target, BUDGET_KEY, IN_FLIGHT_RETRY};
pub use stats::Stats;
pub use worker::RouteWorker;

/// The name the cell's link to its own broker goes by in [`Router::link_states`].
pub const OWN_LINK: &str = "own";

/// Headers carried by dead-lettered messages.
pub const REASON_HEADER: &str = "x-cellhost-reason";
pub const REASON_CODE_HEADER: &str = "x-cellhost-reason-code";
pub const CELL_HEADER: &str = "x-cellhost-cell";

/// What every consumer of one cell shares.
pub struct Router {
    cell_name: String,
    /// `<queue_base>.<type>` for each message type, at its
    /// [`MessageType::index`]: every relay publishes to one.
    topics: [String; 3],
    config: Config,
    /// The neighbours new messages route with; swapped whole when the
    /// neighbours file changes, so a message sees one set or the other.
    neighbours: ArcSwap<NeighbourSet>,
    /// Why the last version of the neighbours file was refused, until one applies.
    neighbours_error: Mutex<Option<String>>,
    active: ArcSwap<LoadedPolicy>,
    dedupe: Arc<Dedupe>,
    /// Where this host's calls to the local application are answered.
    reply_queue: String,
    /// The version the active one replaced, to fall back on.
    previous: ArcSwapOption<LoadedPolicy>,
    /// A candidate run beside the active policy, compared, never acted on.
    shadow: ArcSwapOption<LoadedPolicy>,
    /// Consumers running, one per message type when all is well.
    consumers: std::sync::atomic::AtomicUsize,
    consecutive_failures: AtomicU64,
    /// Each link of the cell (`own`, and each neighbour) as its broker last
    /// reported it, for health and metrics.
    /// The number is the watch that owns the entry: a link replaced (its
    /// URL changed) must not be overwritten by its old broker's watch.
    links: Mutex<BTreeMap<String, (u64, LinkState)>>,
    link_watches: AtomicU64,
    pub stats: Stats,
}

/// The neighbours a cell routes with: their names, for checking relays, and
/// the policy's view of the cell.
#[derive(Debug)]
pub struct NeighbourSet {
    pub names: HashSet<String>,
    pub wit_cell: policy::Cell,
}

impl NeighbourSet {
    fn new(config: &Config, neighbours: &[crate::config::NeighbourConfig]) -> NeighbourSet {
        NeighbourSet {
            names: neighbours.iter().map(|n| n.name.clone()).collect(),
            wit_cell: view::cell_view_of(&config.cell.name, neighbours),
        }
    }
}

impl Router {
    pub fn new(config: Config, policy: Arc<LoadedPolicy>, reply_queue: String) -> Arc<Router> {
        Arc::new(Router {
            cell_name: config.cell.name.clone(),
            topics: MessageType::all()
                .map(|kind| format!("{}.{}", config.cell.queue_base, kind.as_str())),
            neighbours: ArcSwap::from_pointee(NeighbourSet::new(&config, &config.neighbours)),
            neighbours_error: Mutex::new(None),
            dedupe: Dedupe::new(
                config.cell.dedupe_window,
                Some(Duration::from_secs(config.cell.dedupe_max_age_s)),
            ),
            config,
            active: ArcSwap::new(policy),
            reply_queue,
            previous: ArcSwapOption::empty(),
            shadow: ArcSwapOption::empty(),
            consumers: std::sync::atomic::AtomicUsize::new(0),
            consecutive_failures: AtomicU64::new(0),
            links: Mutex::new(BTreeMap::new()),
            link_watches: AtomicU64::new(0),
            stats: Stats::default(),
        })
    }

    pub fn cell_name(&self) -> &str {
        &self.cell_name
    }

    /// The config the cell started with. Its `neighbours` are the first
    /// set; [`Router::neighbours`] is the one in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The neighbours new messages route with.
    pub fn neighbours(&self) -> Arc<NeighbourSet> {
        self.neighbours.load_full()
    }

    /// Makes `neighbours` the set new messages route with.
    pub fn set_neighbours(&self, neighbours: &[crate::config::NeighbourConfig]) {
        self.neighbours
            .store(Arc::new(NeighbourSet::new(&self.config, neighbours)));
    }

    /// Why the last neighbours file was refused, if it was.
    pub fn neighbours_error(&self) -> Option<String> {
        lock(&self.neighbours_error).clone()
    }

    /// Records (or, with `None`, clears) why a neighbours file was refused.
    pub fn set_neighbours_error(&self, error: Option<String>) {
        *lock(&self.neighbours_error) = error;
    }

    /// Stops reporting link `name` (its neighbour was removed).
    pub fn forget_link(&self, name: &str) {
        lock(&self.links).remove(name);
    }

    /// The policy version new messages are routed by.
    pub fn active_policy(&self) -> Arc<LoadedPolicy> {
        self.active.load_full()
    }

    /// The shadow policy, if one runs.
    pub fn shadow_policy(&self) -> Option<Arc<LoadedPolicy>> {
        self.shadow.load_full()
    }

    /// Follows the state of link `name` for health and metrics.
    pub fn watch_link(self: &Arc<Self>, name: &str, mut state: watch::Receiver<LinkState>) {
        let name = name.to_string();
        let id = self.link_watches.fetch_add(1, Ordering::Relaxed);
        lock(&self.links).insert(name.clone(), (id, state.borrow().clone()));
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let Some(router) = router.upgrade() else {
                    return;
                };
                let now = state.borrow().clone();
                let mut links = lock(&router.links);
                match links.get_mut(&name) {
                    Some(entry) if entry.0 == id => entry.1 = now,
                    // The link was removed or replaced: this watch is done.
                    _ => return,
                }
            }
        });
    }

    /// Each link's state: `own`, then the neighbours by name.
    pub fn link_states(&self) -> Vec<(String, LinkState)> {
        lock(&self.links)
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether a consumer runs for every message type.
    pub fn consuming(&self) -> bool {
        self.consumers.load(Ordering::Relaxed) == MessageType::all().len()
    }

    /// A consumer started (`true`) or stopped (`false`).
    pub fn consumer_running(&self, running: bool) {
        if running {
            self.consumers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.consumers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `candidate` beside the active policy on live traffic (or stops it).
    pub fn set_shadow(&self, candidate: Option<Arc<LoadedPolicy>>) {
        self.shadow.store(candidate);
    }

    /// Makes `policy` the version new messages are routed by; returns the old
    /// one, which is kept to fall back on.
    pub fn swap_policy(&self, policy: Arc<LoadedPolicy>) -> Arc<LoadedPolicy> {
        let old = self.active.swap(policy);
        self.previous.store(Some(old.clone()));
        self.consecutive_failures.store(0, Ordering::Relaxed);
        old
    }

    /// Counts a policy trap; past `policy.failures_before_fallback` in a row,
    /// the active version is unloaded for the one it replaced.
    fn policy_failed(&self, error: &PolicyError) {
        // A policy that returns an error on purpose is not broken.
        if !error.poisons_instance() {
            return;
        }
        let limit = self.config.policy.failures_before_fallback;
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if limit == 0 || failures < limit {
            return;
        }
        let Some(previous) = self.previous.swap(None) else {
            return;
        };
        let failing = self.active.swap(previous.clone());
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            cell = %self.cell_name,
            failing = failing.version(),
            restored = previous.version(),
            failures,
            last_error = %error,
            "policy unloaded after failing {failures} times in a row; the previous version serves again"
        );
    }

    /// The uuids this host carries out or carried out recently.
    pub fn dedupe(&self) -> &Arc<Dedupe> {
        &self.dedupe
    }

    /// The topic neighbours publish messages of `kind` to.
    pub fn intercell_topic(&self, kind: MessageType) -> &str {
        &self.topics[kind.index()]
    }

    /// The dead-letter queue on this cell's broker.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.config.cell.queue_base)
    }
}
