//! The router: cells semantics between the codec and the policy.
//!
//! For one received body it decodes the oslo envelope and the cells message,
//! drops duplicates, records this cell's hop, asks the policy, checks the
//! answer against the invariants no policy may break, and returns a [`Plan`]:
//! the publications to make (relays to neighbours, delivery to the local
//! application, the dead-letter queue) before the source may be acknowledged.
//! It publishes nothing itself; the host's consumer loop carries the plan out.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::config::Config;
use crate::policy::{self, LoadedPolicy, PolicyError, PolicyInstance};
use crate::transport::Publication;
use crate::wire::{self, CellsMessage, Context, Direction, MessageType, Request};

/// Headers carried by dead-lettered messages.
pub const REASON_HEADER: &str = "x-cellhost-reason";
pub const REASON_CODE_HEADER: &str = "x-cellhost-reason-code";
pub const CELL_HEADER: &str = "x-cellhost-cell";

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This cell's own broker (local delivery, dead letters).
    Own,
    /// The broker of the named neighbour.
    Neighbour(String),
}

/// What to do with one received message.
#[derive(Debug)]
pub struct Plan {
    /// The message's uuid, remembered once the plan is carried out.
    pub uuid: Option<String>,
    pub sends: Vec<(Target, Publication)>,
    pub disposition: Disposition,
}

/// How a message was dealt with, for logs, metrics and the demo.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Routed {
        routing_path: String,
        local: bool,
        relays: Vec<String>,
    },
    DeadLettered {
        code: &'static str,
        reason: String,
    },
    Dropped {
        reason: String,
    },
    Duplicate,
}

/// Counters a host exposes.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub delivered_local: AtomicU64,
    pub relayed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicates: AtomicU64,
    pub policy_failures: AtomicU64,
    pub publish_failures: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What every consumer of one cell shares.
pub struct Router {
    cell_name: String,
    config: Config,
    wit_cell: policy::Cell,
    neighbours: HashSet<String>,
    active: ArcSwap<LoadedPolicy>,
    dedupe: Dedupe,
    pub stats: Stats,
}

impl Router {
    pub fn new(config: Config, policy: Arc<LoadedPolicy>) -> Arc<Router> {
        let wit_cell = wit_cell(&config);
        Arc::new(Router {
            cell_name: config.cell.name.clone(),
            neighbours: config.neighbours.iter().map(|n| n.name.clone()).collect(),
            dedupe: Dedupe::new(config.cell.dedupe_window),
            wit_cell,
            config,
            active: ArcSwap::new(policy),
            stats: Stats::default(),
        })
    }

    pub fn cell_name(&self) -> &str {
        &self.cell_name
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The policy version new messages are routed by.
    pub fn active_policy(&self) -> Arc<LoadedPolicy> {
        self.active.load_full()
    }

    /// Remembers that the message with `uuid` was fully handled.
    pub fn handled(&self, uuid: &str) {
        self.dedupe.insert(uuid);
    }

    /// The topic neighbours publish messages of `kind` to.
    pub fn intercell_topic(&self, kind: MessageType) -> String {
        format!("{}.{}", self.config.cell.queue_base, kind.as_str())
    }

    /// The dead-letter queue on this cell's broker.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.config.cell.queue_base)
    }
}

/// One consumer's view of the router: it owns a policy instance, reused from
/// message to message and replaced when it traps or a new version is active.
pub struct RouteWorker {
    router: Arc<Router>,
    instance: Option<PolicyInstance>,
}

impl RouteWorker {
    pub fn new(router: Arc<Router>) -> RouteWorker {
        RouteWorker {
            router,
            instance: None,
        }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Decides what to do with one received body.
    pub fn plan(&mut self, body: &[u8]) -> Plan {
        let router = self.router.clone();
        router.stats.received.fetch_add(1, Ordering::Relaxed);
        let limit = router.config.cell.max_body_bytes;
        let request = match wire::decode_request(body, limit) {
            Ok(r) => r,
            Err(e) => return self.dead_letter(body, None, e.reason_code(), e.to_string()),
        };
        let mut message = match request.cells_message() {
            Ok(m) => m,
            Err(e) => return self.dead_letter(body, None, e.reason_code(), e.to_string()),
        };
        if router.dedupe.contains(&message.uuid) {
            router.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::info!(uuid = %message.uuid, "duplicate message dropped");
            return Plan {
                uuid: None,
                sends: Vec::new(),
                disposition: Disposition::Duplicate,
            };
        }
        let is_origin = message.routing_path.is_empty();
        message.append_hop(&router.cell_name);
        message.max_hop_count = message.max_hop_count.min(router.config.cell.max_hop_count);

        let span = tracing::debug_span!(
            "route",
            uuid = %message.uuid,
            kind = message.message_type.as_str(),
            method = %message.method_name,
            path = %message.routing_path,
            policy = tracing::field::Empty,
        );
        let _entered = span.enter();

        let actions = match self.ask_policy(&message, is_origin) {
            Ok(actions) => actions,
            Err(e) => {
                router.stats.policy_failures.fetch_add(1, Ordering::Relaxed);
                return self.dead_letter(body, Some(&message), e.reason_code(), e.to_string());
            }
        };
        if let Some(instance) = &self.instance {
            span.record("policy", instance.policy().version());
        }
        self.apply(body, message, actions)
    }

    fn ask_policy(
        &mut self,
        message: &CellsMessage,
        is_origin: bool,
    ) -> Result<Vec<policy::Action>, PolicyError> {
        let active = self.router.active.load();
        let stale = match &self.instance {
            Some(i) => !Arc::ptr_eq(i.policy(), &active),
            None => true,
        };
        if stale {
            self.instance = None;
            let fresh = active
                .instantiate()
                .map_err(|e| PolicyError::Trap(format!("cannot instantiate: {e:#}")))?;
            self.instance = Some(fresh);
        }
        let Some(instance) = self.instance.as_mut() else {
            return Err(PolicyError::Trap("no policy instance".into()));
        };
        let view = wit_message(message, is_origin);
        let result = instance.route(&view, &self.router.wit_cell);
        if let Err(e) = &result {
            if e.poisons_instance() {
                // A trapped instance is unusable; the next message gets a fresh one.
                self.instance = None;
            }
        }
        result
    }

    /// Checks the policy's actions against the host's invariants and turns
    /// them into publications. Any breach dead-letters the whole message:
    /// half of a decision is never carried out.
    fn apply(&self, body: &[u8], message: CellsMessage, actions: Vec<policy::Action>) -> Plan {
        let router = &self.router;
        let cfg = &router.config;
        if actions.len() > cfg.policy.max_actions {
            return self.dead_letter(
                body,
                Some(&message),
                "policy-too-many-actions",
                format!(
                    "policy returned {} actions, more than the limit of {}",
                    actions.len(),
                    cfg.policy.max_actions
                ),
            );
        }
        let mut local = false;
        let mut relays: Vec<String> = Vec::new();
        let mut refusals = Vec::new();
        let mut drops = Vec::new();
        for action in actions {
            match action {
                policy::Action::ProcessHere => local = true,
                policy::Action::Relay(to) => {
                    if !router.neighbours.contains(&to) {
                        return self.dead_letter(
                            body,
                            Some(&message),
                            "policy-unknown-neighbour",
                            format!(
                                "policy relayed to {to:?}, which is not a neighbour of {}",
                                router.cell_name
                            ),
                        );
                    }
                    if message.hop_count >= message.max_hop_count {
                        return self.dead_letter(
                            body,
                            Some(&message),
                            "hop-limit",
                            format!(
                                "policy relayed to {to:?} at hop {} of at most {}",
                                message.hop_count, message.max_hop_count
                            ),
                        );
                    }
                    if !relays.contains(&to) {
                        relays.push(to);
                    }
                }
                policy::Action::ReplyError(f) => {
                    refusals.push(format!("{}: {}", f.class, f.message))
                }
                policy::Action::Drop(reason) => drops.push(reason),
            }
        }

        let mut sends = Vec::with_capacity(relays.len() + 1);
        if !relays.is_empty() {
            let body = relay_body(&message);
            let topic = router.intercell_topic(message.message_type);
            let exchange = if message.fanout {
                format!("{topic}_fanout")
            } else {
                cfg.cell.control_exchange.clone()
            };
            for to in &relays {
                sends.push((
                    Target::Neighbour(to.clone()),
                    Publication::new(exchange.clone(), topic.clone(), body.clone()),
                ));
            }
        }
        if local {
            sends.push((Target::Own, self.local_delivery(&message)));
        }
        router
            .stats
            .relayed
            .fetch_add(relays.len() as u64, Ordering::Relaxed);
        router
            .stats
            .delivered_local
            .fetch_add(local as u64, Ordering::Relaxed);

        if !refusals.is_empty() {
            let reason = refusals.join("; ");
            let mut plan = self.dead_letter(body, Some(&message), "routing-error", reason);
            plan.sends.extend(sends);
            return plan;
        }
        if sends.is_empty() {
            let reason = if drops.is_empty() {
                "policy chose no action".to_string()
            } else {
                drops.join("; ")
            };
            router.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(uuid = %message.uuid, %reason, "message dropped by policy");
            return Plan {
                uuid: Some(message.uuid),
                sends,
                disposition: Disposition::Dropped { reason },
            };
        }
        tracing::debug!(uuid = %message.uuid, local, ?relays, "routed");
        Plan {
            uuid: Some(message.uuid.clone()),
            sends,
            disposition: Disposition::Routed {
                routing_path: message.routing_path,
                local,
                relays,
            },
        }
    }

    /// An oslo cast of `method_name(**method_kwargs)` to the local topic, with
    /// the message's context plus where it came from.
    fn local_delivery(&self, message: &CellsMessage) -> Publication {
        let cfg = &self.router.config;
        let mut context = message.ctxt.clone();
        context.insert(
            "cell_routing_path".into(),
            Value::String(message.routing_path.clone()),
        );
        context.insert(
            "cell_message_uuid".into(),
            Value::String(message.uuid.clone()),
        );
        let request = Request::cast(
            &message.method_name,
            message.method_kwargs.clone(),
            Context(context),
            new_unique_id(),
        );
        Publication::new(
            cfg.cell.control_exchange.clone(),
            cfg.local.topic.clone(),
            request.encode(),
        )
    }

    fn dead_letter(
        &self,
        body: &[u8],
        message: Option<&CellsMessage>,
        code: &'static str,
        reason: String,
    ) -> Plan {
        let router = &self.router;
        router.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            cell = %router.cell_name,
            uuid = message.map(|m| m.uuid.as_str()).unwrap_or("-"),
            code,
            %reason,
            "message dead-lettered"
        );
        let publication = Publication::new("", router.dead_letter_queue(), body.to_vec())
            .with_header(REASON_HEADER, truncate(&reason, 1000))
            .with_header(REASON_CODE_HEADER, code)
            .with_header(CELL_HEADER, router.cell_name.clone());
        Plan {
            uuid: message.map(|m| m.uuid.clone()),
            sends: vec![(Target::Own, publication)],
            disposition: Disposition::DeadLettered { code, reason },
        }
    }
}

/// The oslo cast that carries `message` to a neighbour's intercell topic.
pub fn relay_body(message: &CellsMessage) -> Vec<u8> {
    let mut args = serde_json::Map::new();
    args.insert("message".into(), Value::String(message.to_json()));
    Request::cast(
        "process_message",
        args,
        Context(message.ctxt.clone()),
        new_unique_id(),
    )
    .encode()
}

/// A fresh oslo `_unique_id`: a uuid4 in hex, as oslo.messaging makes them.
pub fn new_unique_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn wit_message(m: &CellsMessage, is_origin: bool) -> policy::Message {
    policy::Message {
        uuid: m.uuid.clone(),
        message_type: match m.message_type {
            MessageType::Targeted => policy::MessageType::Targeted,
            MessageType::Broadcast => policy::MessageType::Broadcast,
            MessageType::Response => policy::MessageType::Response,
        },
        direction: match m.direction {
            Direction::Up => policy::Direction::Up,
            Direction::Down => policy::Direction::Down,
        },
        method_name: m.method_name.clone(),
        routing_path: m.routing_path.clone(),
        hop_count: m.hop_count,
        max_hop_count: m.max_hop_count,
        target_cell: m.target_cell.clone(),
        need_response: m.need_response,
        fanout: m.fanout,
        is_origin,
        run_locally: m.run_locally(),
        ctxt: Value::Object(m.ctxt.clone()).to_string(),
        method_kwargs: Value::Object(m.method_kwargs.clone()).to_string(),
    }
}

fn wit_cell(config: &Config) -> policy::Cell {
    let neighbour = |n: &crate::config::NeighbourConfig| policy::Neighbour {
        name: n.name.clone(),
        is_parent: n.is_parent,
        weight_offset: n.weight_offset,
        weight_scale: n.weight_scale,
        capabilities: n
            .capabilities
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    policy::Cell {
        name: config.cell.name.clone(),
        parents: config
            .neighbours
            .iter()
            .filter(|n| n.is_parent)
            .map(neighbour)
            .collect(),
        children: config
            .neighbours
            .iter()
            .filter(|n| !n.is_parent)
            .map(neighbour)
            .collect(),
    }
}

/// The uuids of recently handled messages, oldest forgotten first.
struct Dedupe {
    capacity: usize,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Dedupe {
    fn new(capacity: usize) -> Dedupe {
        Dedupe {
            capacity,
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    fn contains(&self, uuid: &str) -> bool {
        self.capacity > 0 && lock(&self.seen).0.contains(uuid)
    }

    fn insert(&self, uuid: &str) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = lock(&self.seen);
        let (set, order) = &mut *guard;
        if set.insert(uuid.to_string()) {
            order.push_back(uuid.to_string());
            while order.len() > self.capacity {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
