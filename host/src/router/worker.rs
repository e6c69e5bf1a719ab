//! One consumer's road for a message: decode (the skim for plain casts, the
//! full codec otherwise), claim its uuid, record this cell's hop, ask the
//! policy, check its answer against the invariants no policy may break, and
//! return the [`Plan`]. Each consumer owns one [`RouteWorker`] and with it
//! its own policy instance.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::plan::MAX_BUDGET_MS;
use super::{
    Claim, Disposition, Plan, Respond, Router, Seen, Target, BUDGET_KEY, CELL_HEADER,
    IN_FLIGHT_RETRY, REASON_CODE_HEADER, REASON_HEADER,
};
use crate::config::OnFailure;
use crate::new_unique_id;
use crate::policy::view::{self, MessageView};
use crate::policy::{self, PolicyError, PolicyInstance};
use crate::transport::Publication;
use crate::wire::{
    self, nova_failure, CallInfo, CellResponse, CellsMessage, Context, Hop, MessageType,
    RemoteFailure, Request, Skim,
};

/// A policy's answer that breaks no invariant, sorted.
#[derive(Default)]
struct Checked<'a> {
    local: bool,
    /// Each neighbour once, in the policy's order.
    relays: Vec<String>,
    refusals: Vec<&'a policy::Failure>,
    drops: Vec<&'a str>,
}

/// A policy's answer that breaks an invariant: the reason code the message
/// is dead-lettered with, and the Nova exception class and reason its caller
/// hears.
struct Broken {
    code: &'static str,
    class: &'static str,
    reason: String,
}

impl Broken {
    fn new(code: &'static str, class: &'static str, reason: String) -> Broken {
        Broken {
            code,
            class,
            reason,
        }
    }
}

/// One consumer's view of the router: it owns a policy instance, reused from
/// message to message and replaced when it traps or a new version is active.
pub struct RouteWorker {
    router: Arc<Router>,
    instance: Option<PolicyInstance>,
    /// An instance of the shadow policy, when one runs beside the active.
    shadow: Option<PolicyInstance>,
}

impl RouteWorker {
    pub fn new(router: Arc<Router>) -> RouteWorker {
        RouteWorker {
            router,
            instance: None,
            shadow: None,
        }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Decides what to do with one received body; `expiration_ms` is the
    /// AMQP `expiration` it came with (an oslo call's timeout).
    pub fn plan(&mut self, body: &[u8], expiration_ms: Option<u64>) -> Plan {
        let received = Instant::now();
        self.router.stats.received.fetch_add(1, Ordering::Relaxed);
        let limit = self.router.config.cell.max_body_bytes;
        // Most traffic is casts that want no answer: those are read without
        // building their JSON trees and relayed by splicing.
        if let Some(skim) = Skim::read(body, limit) {
            return self.plan_skimmed(body, skim, received, expiration_ms);
        }
        let request = match wire::decode_request(body, limit) {
            Ok(r) => r,
            Err(e) => return self.dead_letter(body, None, e.reason_code(), e.to_string()),
        };
        let mut message = match request.cells_message() {
            Ok(m) => m,
            Err(e) => return self.dead_letter(body, None, e.reason_code(), e.to_string()),
        };
        let is_origin = message.routing_path.is_empty();
        // An application that calls waits for an answer, whatever the flag says.
        let reply_to = if is_origin {
            request.call.clone()
        } else {
            None
        };
        if reply_to.is_some() {
            message.need_response = true;
        }
        let wants_answer = message.need_response && message.message_type != MessageType::Response;
        let mut claim = match self.claim(&message.uuid, wants_answer) {
            Ok(claim) => claim,
            Err(seen) => return self.seen(&message.uuid, seen),
        };
        let mut plan = self.route(body, message, is_origin, reply_to, received, expiration_ms);
        if let Some(claim) = claim.as_mut() {
            // A message someone waits an answer for is carried out again when
            // it comes again: the copy is a retried call, whose caller would
            // otherwise never hear back.
            claim.remember(plan.disposition.carries_out() && !wants_answer);
        }
        plan.claim = claim;
        plan
    }

    /// Claims `uuid` for this delivery before anything is decided, in one
    /// step with the check, so two deliveries of one uuid are never both
    /// carried out. A message without a uuid cannot be told from another and
    /// is not claimed.
    fn claim(&self, uuid: &str, wants_answer: bool) -> Result<Option<Claim>, Seen> {
        if uuid.is_empty() {
            return Ok(None);
        }
        self.router.dedupe.claim(uuid, wants_answer)
    }

    /// The plan for a delivery of a uuid already carried out or in flight.
    fn seen(&self, uuid: &str, seen: Seen) -> Plan {
        match seen {
            Seen::Remembered => {
                self.router.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(uuid, "duplicate message dropped");
                Plan::nothing(None, Disposition::Duplicate)
            }
            Seen::InFlight => {
                tracing::debug!(
                    uuid,
                    "another delivery of this message is in flight; this one comes back later"
                );
                let mut plan = Plan::nothing(Some(uuid.to_string()), Disposition::InFlight);
                plan.requeue_after = Some(IN_FLIGHT_RETRY);
                plan
            }
        }
    }

    /// The fast path of a cast that wants no answer. When the policy only
    /// relays it and delivers it here, the bodies are spliced from the
    /// received text; any other decision is carried out by the full path,
    /// on the fully decoded message, without asking the policy again.
    fn plan_skimmed(
        &mut self,
        body: &[u8],
        skim: Skim,
        received: Instant,
        expiration_ms: Option<u64>,
    ) -> Plan {
        let mut claim = match self.claim(&skim.uuid, false) {
            Ok(claim) => claim,
            Err(seen) => return self.seen(&skim.uuid, seen),
        };
        let router = self.router.clone();
        let is_origin = skim.path.is_empty();
        let routing_path = if is_origin {
            router.cell_name.clone()
        } else {
            format!("{}!{}", skim.path, router.cell_name)
        };
        let hop = Hop {
            routing_path,
            hop_count: skim.hop_count.saturating_add(1),
            max_hop_count: skim.max_hop_count.min(router.config.cell.max_hop_count),
        };
        let span = tracing::debug_span!(
            "route",
            uuid = %skim.uuid,
            kind = skim.message_type.as_str(),
            method = %skim.method_name,
            path = %hop.routing_path,
            policy = tracing::field::Empty,
        );
        let _entered = span.enter();
        let view = view::skim_view(&skim, &hop, is_origin);
        let outcome = self.decide(view, &span);
        let plain = match &outcome {
            Ok(actions) => self.plain_route(actions, &hop),
            Err(_) => None,
        };
        let mut plan = match plain {
            Some((local, relays)) => self.splice(body, &skim, hop, local, relays),
            None => self.conclude_decoded(body, received, expiration_ms, is_origin, outcome),
        };
        if let Some(claim) = claim.as_mut() {
            claim.remember(plan.disposition.carries_out());
        }
        plan.claim = claim;
        plan
    }

    /// The local delivery and the relays of `actions`, when they are only
    /// that and break no invariant; `None` sends the decision to
    /// [`RouteWorker::apply`], which refuses or drops as it must.
    fn plain_route(&self, actions: &[policy::Action], hop: &Hop) -> Option<(bool, Vec<String>)> {
        match self.check(actions, hop.hop_count, hop.max_hop_count) {
            Ok(Checked {
                local,
                relays,
                refusals,
                drops,
            }) if refusals.is_empty() && drops.is_empty() && (local || !relays.is_empty()) => {
                Some((local, relays))
            }
            _ => None,
        }
    }

    /// Checks a policy's answer against the invariants no policy may break
    /// (how many actions, how many bytes, relays only to neighbours and
    /// within the hop limit), in that order, and sorts it. Both the fast
    /// path and [`RouteWorker::apply`] go through here, so the fast path
    /// can never carry out what `apply` would refuse.
    fn check<'a>(
        &self,
        actions: &'a [policy::Action],
        hop_count: u32,
        max_hop_count: u32,
    ) -> Result<Checked<'a>, Broken> {
        let router = &self.router;
        let limits = &router.config.policy;
        if actions.len() > limits.max_actions {
            let reason = format!(
                "policy returned {} actions, more than the limit of {}",
                actions.len(),
                limits.max_actions
            );
            return Err(Broken::new(
                "policy-too-many-actions",
                "CellPolicyFailure",
                reason,
            ));
        }
        let bytes: usize = actions
            .iter()
            .map(|a| match a {
                policy::Action::ProcessHere => 0,
                policy::Action::Relay(s) | policy::Action::Drop(s) => s.len(),
                policy::Action::ReplyError(f) => f.class.len() + f.message.len(),
            })
            .sum();
        if bytes > limits.max_action_bytes {
            let reason = format!(
                "policy returned {bytes} bytes of actions, more than the limit of {}",
                limits.max_action_bytes
            );
            return Err(Broken::new(
                "policy-actions-too-large",
                "CellPolicyFailure",
                reason,
            ));
        }
        // A relay the policy chose with the set swapped out since is
        // refused as to an unknown neighbour, never sent to a removed cell.
        let neighbours = router.neighbours.load();
        let mut checked = Checked::default();
        for action in actions {
            match action {
                policy::Action::ProcessHere => checked.local = true,
                policy::Action::Relay(to) => {
                    if !neighbours.names.contains(to) {
                        let reason = format!(
                            "policy relayed to {to:?}, which is not a neighbour of {}",
                            router.cell_name
                        );
                        return Err(Broken::new(
                            "policy-unknown-neighbour",
                            "CellRoutingInconsistency",
                            reason,
                        ));
                    }
                    if hop_count >= max_hop_count {
                        let reason =
                            format!("Cell message has reached maximum hop count: {hop_count}");
                        return Err(Broken::new("hop-limit", "CellMaxHopCountReached", reason));
                    }
                    if !checked.relays.contains(to) {
                        checked.relays.push(to.clone());
                    }
                }
                policy::Action::ReplyError(f) => checked.refusals.push(f),
                policy::Action::Drop(reason) => checked.drops.push(reason.as_str()),
            }
        }
        Ok(checked)
    }

    /// Counts a routed message and says so in the debug log.
    fn count_routed(&self, uuid: &str, local: bool, relays: &[String]) {
        let stats = &self.router.stats;
        stats
            .relayed
            .fetch_add(relays.len() as u64, Ordering::Relaxed);
        stats
            .delivered_local
            .fetch_add(u64::from(local), Ordering::Relaxed);
        tracing::debug!(uuid, local, ?relays, "routed");
    }

    /// The publication of one relay to neighbour `to`, on `topic` through
    /// the control exchange, or its fanout exchange when `fanout`.
    fn relay_to(
        &self,
        to: &str,
        topic: &str,
        fanout: bool,
        body: Vec<u8>,
    ) -> (Target, Publication) {
        let exchange = if fanout {
            format!("{topic}_fanout")
        } else {
            self.router.config.cell.control_exchange.clone()
        };
        (
            Target::Neighbour(to.to_string()),
            Publication::new(exchange, topic, body).mandatory(),
        )
    }

    /// The plan of a plain route, its bodies spliced from the skimmed text.
    fn splice(&self, body: &[u8], skim: &Skim, hop: Hop, local: bool, relays: Vec<String>) -> Plan {
        let router = &self.router;
        let cfg = &router.config;
        let mut sends = Vec::with_capacity(relays.len() + usize::from(local));
        if !relays.is_empty() {
            let topic = router.intercell_topic(skim.message_type);
            // One encoding serves every neighbour: the body does not depend on it.
            let relay = skim.relay_body(body, &hop, &new_unique_id());
            if let Some((last, others)) = relays.split_last() {
                for to in others {
                    sends.push(self.relay_to(to, topic, skim.fanout, relay.clone()));
                }
                sends.push(self.relay_to(last, topic, skim.fanout, relay));
            }
        }
        if local {
            let publication = Publication::new(
                cfg.cell.control_exchange.clone(),
                cfg.local.topic.clone(),
                skim.local_body(&hop, &new_unique_id()),
            )
            .mandatory();
            sends.push((Target::Own, publication));
        }
        self.count_routed(&skim.uuid, local, &relays);
        let mut plan = Plan::nothing(
            Some(skim.uuid.clone()),
            Disposition::Routed {
                routing_path: hop.routing_path,
                local,
                relays,
            },
        );
        plan.sends = sends;
        plan
    }

    /// Carries out a decision taken on a skimmed message the full way.
    fn conclude_decoded(
        &mut self,
        body: &[u8],
        received: Instant,
        expiration_ms: Option<u64>,
        is_origin: bool,
        outcome: Result<Vec<policy::Action>, PolicyError>,
    ) -> Plan {
        let limit = self.router.config.cell.max_body_bytes;
        let decoded = wire::decode_request(body, limit).and_then(|r| r.cells_message());
        let mut message = match decoded {
            Ok(message) => message,
            // The skim accepted what the decoder refuses: a fault of ours,
            // so the message is kept with the decoder's reason.
            Err(e) => return self.dead_letter(body, None, e.reason_code(), e.to_string()),
        };
        message.append_hop(&self.router.cell_name);
        message.max_hop_count = message
            .max_hop_count
            .min(self.router.config.cell.max_hop_count);
        let situation = Situation {
            is_origin,
            reply_to: None,
            received,
            budget: self.budget(&message, None, expiration_ms),
        };
        self.conclude(body, message, situation, outcome)
    }

    /// Plans a message this delivery has claimed: records this cell's hop,
    /// asks the policy and applies its answer.
    fn route(
        &mut self,
        body: &[u8],
        mut message: CellsMessage,
        is_origin: bool,
        reply_to: Option<CallInfo>,
        received: Instant,
        expiration_ms: Option<u64>,
    ) -> Plan {
        let router = self.router.clone();
        message.append_hop(&router.cell_name);
        message.max_hop_count = message.max_hop_count.min(router.config.cell.max_hop_count);
        let budget = self.budget(&message, reply_to.as_ref(), expiration_ms);

        let span = tracing::debug_span!(
            "route",
            uuid = %message.uuid,
            kind = message.message_type.as_str(),
            method = %message.method_name,
            path = %message.routing_path,
            policy = tracing::field::Empty,
        );
        let _entered = span.enter();

        let situation = Situation {
            is_origin,
            reply_to,
            received,
            budget,
        };
        let view = view::message_view(&message, is_origin);
        let outcome = self.decide(MessageView::from(&view), &span);
        self.conclude(body, message, situation, outcome)
    }

    /// Asks the policy (and the shadow policy, if one runs) and keeps count
    /// of its failures.
    fn decide(
        &mut self,
        view: MessageView<'_>,
        span: &tracing::Span,
    ) -> Result<Vec<policy::Action>, PolicyError> {
        let router = self.router.clone();
        let outcome = self.ask_policy(view);
        if router.shadow.load().is_some() {
            self.shadow_compare(view, &outcome);
        }
        match &outcome {
            Ok(_) => {
                // Read before writing: the counter is shared by every
                // consumer, and a write per message would bounce its line.
                if router.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    router.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if let Some(instance) = &self.instance {
                    span.record("policy", instance.policy().version());
                }
            }
            Err(e) => {
                router.stats.policy_failures.fetch_add(1, Ordering::Relaxed);
                router.policy_failed(e);
            }
        }
        outcome
    }

    /// Applies the policy's answer, or what its failure means for the message.
    fn conclude(
        &self,
        body: &[u8],
        message: CellsMessage,
        situation: Situation,
        outcome: Result<Vec<policy::Action>, PolicyError>,
    ) -> Plan {
        let actions = match outcome {
            Ok(actions) => actions,
            Err(e) => {
                let wants_answer =
                    message.need_response && message.message_type != MessageType::Response;
                if self.router.config.policy.on_failure == OnFailure::Reject && !wants_answer {
                    tracing::warn!(uuid = %message.uuid, error = %e, "policy failed; message rejected back to the broker");
                    let mut plan = Plan::nothing(
                        Some(message.uuid),
                        Disposition::Rejected {
                            reason: e.to_string(),
                        },
                    );
                    plan.reject = true;
                    return plan;
                }
                let failure = RemoteFailure {
                    module: "cellhost.policy".into(),
                    ..nova_failure("CellPolicyFailure", e.to_string())
                };
                return self.refuse(body, message, situation, e.reason_code(), failure);
            }
        };
        self.apply(body, message, situation, actions)
    }

    /// The time this cell has to answer: what the sender left, else the
    /// application's own call timeout, else the configured `call_timeout_s`.
    ///
    /// An oslo client carries its call's timeout in the AMQP `expiration`
    /// (milliseconds). The `_timeout` key is something else, the call
    /// *monitor* timeout, and says nothing of how long the caller waits.
    fn budget(
        &self,
        message: &CellsMessage,
        reply_to: Option<&CallInfo>,
        expiration_ms: Option<u64>,
    ) -> Duration {
        if let Some(ms) = message.extra.get(BUDGET_KEY).and_then(|v| v.as_u64()) {
            return Duration::from_millis(ms);
        }
        if let Some(ms) = expiration_ms.filter(|ms| *ms > 0 && reply_to.is_some()) {
            return Duration::from_millis(ms.min(MAX_BUDGET_MS));
        }
        Duration::from_secs(self.router.config.cell.call_timeout_s)
    }

    fn ask_policy(&mut self, view: MessageView<'_>) -> Result<Vec<policy::Action>, PolicyError> {
        match self.call_policy(view) {
            // The deadline counts the CPU time of the call, so a thread merely
            // descheduled does not miss it; a fresh instance's first call can
            // still pay for faulting in its memory. One more try on a fresh
            // instance tells that from a policy that really spins, which then
            // costs two deadlines instead of one.
            Err(PolicyError::Deadline(d)) => {
                tracing::warn!(uuid = %view.uuid, deadline = ?d, "policy call missed its deadline; retrying once on a fresh instance");
                self.call_policy(view)
            }
            other => other,
        }
    }

    /// Asks the shadow policy too and compares; its answer is never acted on.
    fn shadow_compare(
        &mut self,
        view: MessageView<'_>,
        active: &Result<Vec<policy::Action>, PolicyError>,
    ) {
        let Some(shadow) = self.router.shadow.load_full() else {
            return;
        };
        if self
            .shadow
            .as_ref()
            .is_none_or(|i| !Arc::ptr_eq(i.policy(), &shadow))
        {
            self.shadow = shadow.instantiate().ok();
        }
        let candidate = match self.shadow.as_mut() {
            Some(instance) => instance.route(view, &self.router.neighbours.load().wit_cell),
            None => Err(PolicyError::Trap(
                "the shadow policy cannot be instantiated".into(),
            )),
        };
        let worn_out = self.shadow.as_ref().is_some_and(|i| i.worn_out());
        if worn_out || candidate.as_ref().is_err_and(PolicyError::poisons_instance) {
            self.shadow = None;
        }
        let stats = &self.router.stats;
        stats.shadow_compared.fetch_add(1, Ordering::Relaxed);
        let (active, candidate) = (view::decision_text(active), view::decision_text(&candidate));
        if active != candidate {
            let n = stats.shadow_differences.fetch_add(1, Ordering::Relaxed) + 1;
            // The first differences in full; after that, a sample.
            if n <= 20 || n.is_power_of_two() {
                tracing::warn!(
                    uuid = %view.uuid,
                    method = %view.method_name,
                    %active,
                    shadow = %candidate,
                    differences = n,
                    "shadow policy decided differently"
                );
            }
        }
    }

    fn call_policy(&mut self, view: MessageView<'_>) -> Result<Vec<policy::Action>, PolicyError> {
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
        let result = instance.route(view, &self.router.neighbours.load().wit_cell);
        let worn_out = instance.worn_out();
        if result.as_ref().is_err_and(PolicyError::poisons_instance) {
            // A trapped instance is unusable; the next call gets a fresh one.
            self.instance = None;
        } else if worn_out {
            // Renewed before its memory runs out, while nothing is lost.
            self.instance = None;
            self.router
                .stats
                .instances_renewed
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Checks the policy's actions against the host's invariants and turns
    /// them into publications. Any breach refuses the whole message: half of
    /// a decision is never carried out.
    fn apply(
        &self,
        body: &[u8],
        mut message: CellsMessage,
        situation: Situation,
        actions: Vec<policy::Action>,
    ) -> Plan {
        let router = &self.router;
        let Checked {
            local,
            relays,
            refusals,
            drops,
        } = match self.check(&actions, message.hop_count, message.max_hop_count) {
            Ok(checked) => checked,
            Err(Broken {
                code,
                class,
                reason,
            }) => {
                let failure = nova_failure(class, reason);
                return self.refuse(body, message, situation, code, failure);
            }
        };
        // A refusal refuses the whole message, whatever else the policy said.
        if let Some(first) = refusals.first() {
            let failure = nova_failure(&first.class, first.message.clone());
            return self.refuse(body, message, situation, "routing-error", failure);
        }

        let wants_response = message.need_response && message.message_type != MessageType::Response;
        let uuid = message.uuid.clone();

        // A response at its destination completes a waiting request here.
        if local && message.message_type == MessageType::Response {
            return self.responses_arrived(message, relays);
        }

        let mut sends = Vec::with_capacity(relays.len() + 1);
        if !relays.is_empty() {
            if wants_response {
                // Each hop answers before its own share runs out, so the next
                // one gets a smaller share of what is left.
                let left = situation
                    .budget
                    .saturating_sub(situation.received.elapsed());
                let share = left.mul_f64(0.8).as_millis().max(1) as u64;
                message.extra.insert(BUDGET_KEY.into(), Value::from(share));
            }
            let topic = router.intercell_topic(message.message_type);
            // One encoding serves every neighbour: the body does not depend on it.
            let body = wire::relay_cast(&message, &new_unique_id());
            for to in &relays {
                let fanout = message.fanout || self.last_hop_of_response(&message, to);
                sends.push(self.relay_to(to, topic, fanout, body.clone()));
            }
        }
        let mut local_call = None;
        if local {
            let (publication, msg_id) = self.local_delivery(&message, wants_response, &situation);
            local_call = msg_id;
            sends.push((Target::Own, publication));
        }
        let respond = wants_response.then(|| {
            // Broadcasts gather at every hop; a targeted message is waited
            // for only by its origin, its target answers the origin directly.
            let awaiting = match message.message_type {
                MessageType::Broadcast => relays.clone(),
                _ if situation.is_origin => relays.clone(),
                _ => Vec::new(),
            };
            (local_call.is_some() || !awaiting.is_empty() || situation.is_origin).then(|| {
                Box::new(Respond {
                    message: message.clone(),
                    is_origin: situation.is_origin,
                    reply_to: situation.reply_to.clone(),
                    local_call: local_call.clone(),
                    awaiting,
                    failure: None,
                    received: situation.received,
                    budget: situation.budget,
                })
            })
        });
        let respond = respond.flatten();

        if sends.is_empty() && respond.is_none() {
            let reason = if drops.is_empty() {
                "policy chose no action".to_string()
            } else {
                drops.join("; ")
            };
            router.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(uuid = %uuid, %reason, "message dropped by policy");
            return Plan::nothing(Some(uuid), Disposition::Dropped { reason });
        }
        self.count_routed(&uuid, local, &relays);
        Plan {
            uuid: Some(uuid),
            sends,
            disposition: Disposition::Routed {
                routing_path: message.routing_path,
                local,
                relays,
            },
            respond,
            arrived: None,
            reject: false,
            claim: None,
            requeue_after: None,
        }
    }

    /// Nova fans a response out on its last hop, so that every host of the
    /// destination cell sees it and the one whose request waits takes it.
    fn last_hop_of_response(&self, message: &CellsMessage, next: &str) -> bool {
        message.message_type == MessageType::Response
            && message.target_cell.as_deref()
                == Some(&format!("{}!{next}", message.routing_path) as &str)
    }

    /// A `parse_responses` message reached its destination: its responses go
    /// to the request waiting for them, not to the application.
    fn responses_arrived(&self, message: CellsMessage, relays: Vec<String>) -> Plan {
        let uuid = message.uuid.clone();
        if !relays.is_empty() {
            tracing::warn!(uuid = %uuid, ?relays, "policy relayed a response that had arrived; ignored");
        }
        let Some(response_uuid) = message.response_uuid.clone() else {
            return self.dead_letter(
                &[],
                Some(&message),
                "bad-response",
                "response without response_uuid".into(),
            );
        };
        let list = match message.method_kwargs.get("responses") {
            Some(Value::Array(items)) => items
                .iter()
                .map(CellResponse::from_value)
                .collect::<Result<Vec<_>, _>>(),
            _ => Ok(Vec::new()),
        };
        let responses = match list {
            Ok(r) => r,
            Err(e) => {
                return self.dead_letter(&[], Some(&message), e.reason_code(), e.to_string());
            }
        };
        let from = message
            .routing_path
            .split('!')
            .next()
            .unwrap_or_default()
            .to_string();
        Plan {
            uuid: Some(uuid),
            sends: Vec::new(),
            disposition: Disposition::Routed {
                routing_path: message.routing_path,
                local: true,
                relays: Vec::new(),
            },
            respond: None,
            arrived: Some((response_uuid, from, responses)),
            reject: false,
            claim: None,
            requeue_after: None,
        }
    }

    /// Deliver to the local application: an oslo cast of
    /// `method_name(**method_kwargs)` to the local topic, or a call when an
    /// answer is wanted, with the message's context plus where it came from.
    fn local_delivery(
        &self,
        message: &CellsMessage,
        call: bool,
        situation: &Situation,
    ) -> (Publication, Option<String>) {
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
        let mut request = Request::cast(
            &message.method_name,
            message.method_kwargs.clone(),
            Context(context),
            new_unique_id(),
        );
        let mut msg_id = None;
        let mut expiration_ms = None;
        if call {
            let timeout = Respond::local_timeout_of(situation.budget);
            let id = new_unique_id();
            request.call = Some(CallInfo {
                msg_id: id.clone(),
                reply_q: self.router.reply_queue.clone(),
                // No call monitoring: the worker's deadline is the
                // expiration below, and a worker asked to monitor would send
                // heartbeats instead of silence.
                timeout: None,
            });
            msg_id = Some(id);
            expiration_ms = Some(timeout.as_millis().max(1) as u64);
        }
        let mut publication = Publication::new(
            cfg.cell.control_exchange.clone(),
            cfg.local.topic.clone(),
            request.encode(),
        )
        .mandatory();
        publication.expiration_ms = expiration_ms;
        (publication, msg_id)
    }

    /// A message that cannot be routed: a failure response when someone
    /// waits for an answer, the dead-letter queue otherwise.
    fn refuse(
        &self,
        body: &[u8],
        message: CellsMessage,
        situation: Situation,
        code: &'static str,
        failure: RemoteFailure,
    ) -> Plan {
        let reason = format!("{}: {}", failure.class, failure.message);
        if !message.need_response || message.message_type == MessageType::Response {
            return self.dead_letter(body, Some(&message), code, reason);
        }
        tracing::warn!(
            cell = %self.router.cell_name,
            uuid = %message.uuid,
            code,
            %reason,
            "message refused; the sender gets a failure response"
        );
        let response = CellResponse::failed(message.routing_path.clone(), &failure);
        Plan {
            uuid: Some(message.uuid.clone()),
            sends: Vec::new(),
            disposition: Disposition::Refused { code, reason },
            respond: Some(Box::new(Respond {
                is_origin: situation.is_origin,
                reply_to: situation.reply_to,
                local_call: None,
                awaiting: Vec::new(),
                failure: Some(response),
                received: situation.received,
                budget: situation.budget,
                message,
            })),
            arrived: None,
            reject: false,
            claim: None,
            requeue_after: None,
        }
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
        let body = match (body.is_empty(), message) {
            (true, Some(m)) => wire::relay_cast(m, &new_unique_id()),
            _ => body.to_vec(),
        };
        let publication = Publication::new("", router.dead_letter_queue(), body)
            .mandatory()
            .with_header(REASON_HEADER, truncate(&reason, 1000))
            .with_header(REASON_CODE_HEADER, code)
            .with_header(CELL_HEADER, router.cell_name.clone());
        let mut plan = Plan::nothing(
            message.map(|m| m.uuid.clone()),
            Disposition::DeadLettered { code, reason },
        );
        plan.sends.push((Target::Own, publication));
        plan
    }
}

/// What the router knows of a message besides its content.
#[derive(Debug, Clone)]
struct Situation {
    is_origin: bool,
    reply_to: Option<CallInfo>,
    received: Instant,
    budget: Duration,
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
