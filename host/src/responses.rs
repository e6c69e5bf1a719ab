//! Answers to messages that want a response: waiting for them, and sending
//! them on.
//!
//! A cell that relayed a message wanting an answer registers here, before it
//! publishes, for the response lists its neighbours will send back; the
//! response consumer hands arriving lists to it. Once everything expected
//! arrived, or the cell's share of the deadline is spent, the cell answers:
//! at the origin with an oslo reply to the application's call, elsewhere
//! with a `parse_responses` message back along the path (Nova's wire
//! format). A neighbour that did not answer in time is named in a failure
//! entry instead of failing the whole answer, and responses that arrive
//! after their waiter gave up are counted and logged, never delivered.

use crate::lock;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::client::{entry_cast, Caller};
use crate::router::{Respond, Router};
use crate::transport::{Broker, Publication, PublishError};
use crate::wire::{
    nova_failure, CallInfo, CellResponse, CellsMessage, MessageType, Reply, ReplyOutcome,
};

/// How many finished waits are remembered, to tell a late response from
/// one meant for another host of the same cell.
const FINISHED_MEMORY: usize = 4096;

type Arrival = (String, Vec<CellResponse>);

/// The requests of this host that wait for neighbours' responses.
#[derive(Default)]
pub struct Waiters {
    state: Mutex<WaitState>,
}

#[derive(Default)]
struct WaitState {
    waiting: HashMap<String, mpsc::UnboundedSender<Arrival>>,
    finished: HashSet<String>,
    finished_order: VecDeque<String>,
}

/// What became of responses that reached this host.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrived {
    Delivered,
    /// Their request gave up waiting already.
    Late,
    /// No request of this host waits for them (another host's, behind a fanout).
    NotOurs,
}

impl Waiters {
    /// Starts waiting for the responses to message `uuid`.
    pub fn wait_for(&self, uuid: &str) -> mpsc::UnboundedReceiver<Arrival> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.state).waiting.insert(uuid.to_string(), tx);
        rx
    }

    /// Stops waiting for `uuid`; what comes later is late.
    pub fn done(&self, uuid: &str) {
        let mut state = lock(&self.state);
        if state.waiting.remove(uuid).is_some() && state.finished.insert(uuid.to_string()) {
            state.finished_order.push_back(uuid.to_string());
            while state.finished_order.len() > FINISHED_MEMORY {
                if let Some(old) = state.finished_order.pop_front() {
                    state.finished.remove(&old);
                }
            }
        }
    }

    /// Hands responses from neighbour `from` to the request `uuid`.
    pub fn deliver(&self, uuid: &str, from: String, responses: Vec<CellResponse>) -> Arrived {
        let state = lock(&self.state);
        match state.waiting.get(uuid) {
            Some(tx) if tx.send((from, responses)).is_ok() => Arrived::Delivered,
            _ if state.finished.contains(uuid) => Arrived::Late,
            _ => Arrived::NotOurs,
        }
    }
}

/// What answering needs of the host.
pub struct Answering {
    pub router: Arc<Router>,
    pub caller: Caller,
    pub waiters: Waiters,
    pub own: Broker,
}

/// Registrations made before a plan's publications go out, so that no
/// answer can arrive before someone listens for it.
pub struct Listening {
    neighbours: Option<mpsc::UnboundedReceiver<Arrival>>,
    local: Option<oneshot::Receiver<Reply>>,
}

impl Answering {
    pub fn listen(&self, respond: &Respond) -> Listening {
        Listening {
            neighbours: (!respond.awaiting.is_empty())
                .then(|| self.waiters.wait_for(&respond.message.uuid)),
            local: respond
                .local_call
                .as_deref()
                .map(|id| self.caller.expect(id)),
        }
    }

    /// Undoes [`Answering::listen`] when the publications failed.
    pub fn abandon(&self, respond: &Respond) {
        if !respond.awaiting.is_empty() {
            self.waiters.done(&respond.message.uuid);
        }
        if let Some(id) = &respond.local_call {
            self.caller.forget(id);
        }
    }

    /// Responses reached their destination here.
    pub fn arrived(&self, response_uuid: &str, from: String, responses: Vec<CellResponse>) {
        match self.waiters.deliver(response_uuid, from.clone(), responses) {
            Arrived::Delivered => {}
            Arrived::Late => {
                self.router
                    .stats
                    .late_responses
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    cell = %self.router.cell_name(),
                    response_to = response_uuid,
                    from = %from,
                    "late response: its request had stopped waiting"
                );
            }
            Arrived::NotOurs => {
                tracing::debug!(
                    response_to = response_uuid,
                    "response for another host of this cell"
                )
            }
        }
    }

    /// Waits for what `respond` expects, then answers. False when the
    /// answer could not be handed to the own broker (the message should come
    /// back to be answered again); an answer nobody waits for any more (its
    /// reply queue is gone) counts as answered.
    pub async fn answer(self: Arc<Self>, respond: Respond, listening: Listening) -> bool {
        let path = respond.message.routing_path.clone();
        let uuid = respond.message.uuid.clone();
        // A caller that asked for call monitoring hears from this cell while
        // it gathers, as it would from an oslo server, and stops waiting
        // when it no longer does.
        let heartbeats = respond
            .reply_to
            .as_ref()
            .filter(|_| respond.is_origin)
            .and_then(|call| {
                let every = monitor_interval(call.timeout?)?;
                Some(tokio::spawn(self.clone().heartbeat(call.clone(), every)))
            });
        let mut responses = Vec::new();
        if let Some(failure) = respond.failure.clone() {
            responses.push(failure);
        } else {
            let neighbours = self.gather_neighbours(&respond, listening.neighbours);
            let local = self.local_answer(&respond, listening.local);
            let (from_neighbours, local) = tokio::join!(neighbours, local);
            responses.extend(from_neighbours);
            // Nova puts the cell's own response after its neighbours'.
            responses.extend(local);
        }
        if let Some(heartbeats) = heartbeats {
            heartbeats.abort();
        }
        let sent = if respond.is_origin {
            self.reply_to_application(&respond, responses).await
        } else {
            self.respond_to_sender(&respond, responses).await
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                let unroutable = matches!(
                    e.downcast_ref::<PublishError>(),
                    Some(PublishError::Unroutable { .. })
                );
                if unroutable {
                    tracing::warn!(cell = %self.router.cell_name(), %uuid, path = %path, error = %format!("{e:#}"), "answer not delivered: nobody waits for it any more");
                } else {
                    tracing::error!(cell = %self.router.cell_name(), %uuid, path = %path, error = %format!("{e:#}"), "could not send the answer; the message goes back to its queue");
                }
                unroutable
            }
        }
    }

    /// Sends `call`'s caller a heartbeat reply every `every` until aborted.
    async fn heartbeat(self: Arc<Self>, call: CallInfo, every: Duration) {
        let start = tokio::time::Instant::now() + every;
        let mut ticks = tokio::time::interval_at(start, every);
        loop {
            ticks.tick().await;
            let beat = Reply::heartbeat(call.msg_id.clone()).encode();
            if let Err(e) = self
                .own
                .publish(&Publication::new("", call.reply_q.clone(), beat).mandatory())
                .await
            {
                tracing::warn!(cell = %self.router.cell_name(), msg_id = %call.msg_id, error = %format!("{e:#}"), "call-monitor heartbeat not sent");
            }
        }
    }

    async fn gather_neighbours(
        &self,
        respond: &Respond,
        arrivals: Option<mpsc::UnboundedReceiver<Arrival>>,
    ) -> Vec<CellResponse> {
        let Some(mut arrivals) = arrivals else {
            return Vec::new();
        };
        let by_name = respond.message.message_type == MessageType::Broadcast;
        let mut answered: Vec<String> = Vec::new();
        let mut responses = Vec::new();
        let deadline = tokio::time::Instant::from_std(respond.wait_until());
        while answered.len() < respond.awaiting.len() {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((from, list))) => {
                    if by_name && !respond.awaiting.contains(&from) {
                        tracing::warn!(from = %from, "response list from a cell this one did not relay to");
                        continue;
                    }
                    answered.push(from);
                    responses.extend(list);
                }
                _ => break,
            }
        }
        self.waiters.done(&respond.message.uuid);
        let missing: Vec<&String> = if by_name {
            respond
                .awaiting
                .iter()
                .filter(|n| !answered.contains(n))
                .collect()
        } else {
            respond.awaiting.iter().skip(answered.len()).collect()
        };
        for neighbour in missing {
            let name = match respond.message.message_type {
                MessageType::Broadcast => format!("{}!{neighbour}", respond.message.routing_path),
                _ => respond
                    .message
                    .target_cell
                    .clone()
                    .unwrap_or_else(|| neighbour.clone()),
            };
            tracing::warn!(cell = %self.router.cell_name(), uuid = %respond.message.uuid, waited_for = %name, "no response in time");
            responses.push(CellResponse::failed(
                name.clone(),
                &nova_failure(
                    "CellTimeout",
                    format!("Timeout waiting for response from cell {name}"),
                ),
            ));
        }
        responses
    }

    async fn local_answer(
        &self,
        respond: &Respond,
        reply: Option<oneshot::Receiver<Reply>>,
    ) -> Option<CellResponse> {
        let reply = reply?;
        let path = respond.message.routing_path.clone();
        let timeout = respond
            .local_timeout()
            .saturating_sub(respond.received.elapsed());
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Some(match reply.outcome {
                ReplyOutcome::Result(value) => CellResponse::ok(path, value),
                ReplyOutcome::Failure(failure) => CellResponse::failed(path, &failure),
            }),
            _ => {
                if let Some(id) = &respond.local_call {
                    self.caller.forget(id);
                }
                let topic = &self.router.config().local.topic;
                Some(CellResponse::failed(
                    path,
                    &nova_failure(
                        "CellTimeout",
                        format!(
                            "no local worker on topic {topic} answered within {:?}",
                            respond.local_timeout()
                        ),
                    ),
                ))
            }
        }
    }

    /// At the origin: the application's call gets one response object for a
    /// targeted message, the list for a broadcast; a timeout is a failure.
    async fn reply_to_application(
        &self,
        respond: &Respond,
        responses: Vec<CellResponse>,
    ) -> anyhow::Result<()> {
        let Some(call) = &respond.reply_to else {
            tracing::info!(uuid = %respond.message.uuid, "answer ready but the application did not call; nothing to reply to");
            return Ok(());
        };
        let outcome = match respond.message.message_type {
            MessageType::Broadcast => ReplyOutcome::Result(Value::Array(
                responses.iter().map(CellResponse::to_value).collect(),
            )),
            _ => match responses.into_iter().next() {
                Some(r) if is_timeout(&r) && respond.failure.is_none() => {
                    ReplyOutcome::Failure(nova_failure(
                        "CellTimeout",
                        format!("Timeout waiting for response from cell {}", r.cell_name),
                    ))
                }
                Some(r) => ReplyOutcome::Result(r.to_value()),
                None => ReplyOutcome::Failure(nova_failure("CellTimeout", "no response")),
            },
        };
        let reply = Reply {
            msg_id: call.msg_id.clone(),
            outcome,
            ending: true,
        };
        self.own
            .publish(&Publication::new("", call.reply_q.clone(), reply.encode()).mandatory())
            .await?;
        Ok(())
    }

    /// Elsewhere: a `parse_responses` message back to the origin (targeted)
    /// or to the neighbour this cell got the broadcast from, which gathers.
    async fn respond_to_sender(
        &self,
        respond: &Respond,
        responses: Vec<CellResponse>,
    ) -> anyhow::Result<()> {
        let message = &respond.message;
        let reversed: Vec<&str> = message.routing_path.rsplit('!').collect();
        let target = match message.message_type {
            MessageType::Broadcast => reversed[..reversed.len().min(2)].join("!"),
            _ => reversed.join("!"),
        };
        let mut kwargs = Map::new();
        kwargs.insert("orig_message".into(), Value::String(message.to_json()));
        kwargs.insert(
            "responses".into(),
            Value::Array(
                responses
                    .iter()
                    .map(|r| Value::String(r.to_json()))
                    .collect(),
            ),
        );
        let config = self.router.config();
        let response = CellsMessage {
            message_type: MessageType::Response,
            ctxt: message.ctxt.clone(),
            method_name: "parse_responses".into(),
            method_kwargs: kwargs,
            direction: message.direction.flipped(),
            need_response: false,
            fanout: false,
            uuid: uuid::Uuid::new_v4().to_string(),
            routing_path: String::new(),
            hop_count: 0,
            max_hop_count: config.cell.max_hop_count,
            target_cell: Some(target),
            response_uuid: Some(message.uuid.clone()),
            extra: Map::new(),
        };
        // Entered at this cell like any message, it takes the one road:
        // the response consumer routes it with the policy.
        self.own
            .publish(
                &entry_cast(
                    &config.cell.control_exchange,
                    &config.cell.queue_base,
                    &response,
                )
                .mandatory(),
            )
            .await?;
        Ok(())
    }
}

/// How often to heartbeat a caller whose call-monitor timeout is `seconds`:
/// every half of it, as oslo.messaging's server does (never more often than
/// ten times a second).
fn monitor_interval(seconds: f64) -> Option<Duration> {
    (seconds.is_finite() && seconds > 0.0)
        .then(|| Duration::from_secs_f64((seconds / 2.0).clamp(0.1, 86_400.0)))
}

fn is_timeout(r: &CellResponse) -> bool {
    r.failure
        && r.value
            .as_str()
            .is_some_and(|text| text.contains("\"CellTimeout\""))
}

#[cfg(test)]
mod tests {
    use super::monitor_interval;
    use std::time::Duration;

    #[test]
    fn heartbeats_come_every_half_monitor_timeout() {
        assert_eq!(monitor_interval(5.0), Some(Duration::from_millis(2500)));
        assert_eq!(monitor_interval(0.05), Some(Duration::from_millis(100)));
        assert_eq!(monitor_interval(0.0), None);
        assert_eq!(monitor_interval(f64::NAN), None);
    }
}
