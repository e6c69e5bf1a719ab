//! The application's side of a cell: building a message that enters the
//! network (empty routing path, hop count 0) and casting it onto the cell's
//! intercell topic, as `cellhost send`, the demo and the tests do, and as any
//! oslo.messaging client does with `cast(ctxt, 'process_message', message=...)`.

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::transport::{Broker, Publication};
use crate::wire::{
    CallInfo, CellsMessage, Context, Direction, MessageType, Reply, ReplyOutcome, Request,
};

/// What an application wants sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub message_type: MessageType,
    pub method_name: String,
    pub method_kwargs: Map<String, Value>,
    pub ctxt: Map<String, Value>,
    pub direction: Direction,
    /// The destination's full path, for targeted messages.
    pub target_cell: Option<String>,
    pub max_hop_count: u32,
    /// For broadcasts: also process in the originating cell.
    pub run_locally: bool,
    /// Whether the sender waits for the response(s).
    pub need_response: bool,
}

impl Outgoing {
    pub fn targeted(target: &str, direction: Direction, method: &str) -> Outgoing {
        Outgoing {
            message_type: MessageType::Targeted,
            method_name: method.to_string(),
            method_kwargs: Map::new(),
            ctxt: Map::new(),
            direction,
            target_cell: Some(target.to_string()),
            max_hop_count: 10,
            run_locally: true,
            need_response: false,
        }
    }

    pub fn broadcast(direction: Direction, method: &str) -> Outgoing {
        Outgoing {
            message_type: MessageType::Broadcast,
            target_cell: None,
            ..Outgoing::targeted("", direction, method)
        }
    }

    /// The cells message as it enters the network, with a fresh uuid.
    pub fn to_message(&self) -> CellsMessage {
        let mut extra = Map::new();
        if !self.run_locally {
            extra.insert("run_locally".into(), Value::Bool(false));
        }
        CellsMessage {
            message_type: self.message_type,
            ctxt: self.ctxt.clone(),
            method_name: self.method_name.clone(),
            method_kwargs: self.method_kwargs.clone(),
            direction: self.direction,
            need_response: self.need_response,
            fanout: false,
            uuid: uuid::Uuid::new_v4().to_string(),
            routing_path: String::new(),
            hop_count: 0,
            max_hop_count: self.max_hop_count,
            target_cell: self.target_cell.clone(),
            response_uuid: None,
            extra,
        }
    }
}

/// The oslo cast of `process_message` that puts `message` into the network
/// at the cell whose broker receives it.
pub fn entry_cast(control_exchange: &str, queue_base: &str, message: &CellsMessage) -> Publication {
    let topic = format!("{queue_base}.{}", message.message_type.as_str());
    Publication::new(
        control_exchange,
        topic,
        crate::wire::relay_cast(message, &crate::new_unique_id()),
    )
}

/// Calls `process_message` on a cell, as an application waiting for the
/// response(s) would: the reply's result is one response object for a
/// targeted message, a list for a broadcast.
pub async fn call_into(
    caller: &Caller,
    control_exchange: &str,
    queue_base: &str,
    message: &CellsMessage,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let mut message = message.clone();
    message.need_response = true;
    let mut args = Map::new();
    args.insert("message".into(), Value::String(message.to_json()));
    let request = caller.request("process_message", args, Context(message.ctxt.clone()));
    let topic = format!("{queue_base}.{}", message.message_type.as_str());
    caller
        .call(control_exchange, &topic, request, timeout)
        .await
}

/// Declares, on a cell's broker, what messages cast to it need: the control
/// exchange, the shared intercell queues and their fanout exchanges, with the
/// properties an oslo.messaging peer declares under that broker's options. A
/// message sent before the cell's host is up then waits in its queue instead
/// of being dropped.
pub async fn declare_intercell(
    broker: &Broker,
    control_exchange: &str,
    queue_base: &str,
) -> anyhow::Result<()> {
    let oslo = broker.oslo();
    broker
        .declare_exchange(&oslo.control_exchange(control_exchange))
        .await?;
    for kind in MessageType::all() {
        let topic = format!("{queue_base}.{}", kind.as_str());
        broker
            .declare_queue(&oslo.topic_queue(&topic), control_exchange, &topic)
            .await?;
        broker
            .declare_exchange(&oslo.fanout_exchange(&format!("{topic}_fanout")))
            .await?;
    }
    Ok(())
}

/// Makes oslo calls over one broker: publishes requests carrying `_msg_id`
/// and `_reply_q`, consumes its own reply queue, and hands each reply to the
/// request that waits for it. The host calls its cell's application with it;
/// `cellhost send --wait` and the tests call into a cell with it.
#[derive(Clone)]
pub struct Caller {
    broker: Broker,
    reply_queue: String,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
}

/// A call waiting for its final reply.
struct Pending {
    tx: oneshot::Sender<Reply>,
    /// A result that came without `ending`, as oslo.messaging before 2017
    /// sent it: the `ending` reply that follows completes the call with it.
    early: Option<Reply>,
}

/// Hands `reply` to the call waiting for it. Only a reply with `ending`
/// completes a call: a heartbeat (call monitoring) never does.
fn take_reply(pending: &Mutex<HashMap<String, Pending>>, reply: Reply) {
    let mut pending = lock(pending);
    let Some(waiting) = pending.get_mut(&reply.msg_id) else {
        tracing::info!(msg_id = %reply.msg_id, "reply for no waiting call (late or repeated)");
        return;
    };
    if reply.is_heartbeat() {
        tracing::debug!(msg_id = %reply.msg_id, "call-monitor heartbeat");
        return;
    }
    if !reply.ending {
        waiting.early = Some(reply);
        return;
    }
    let Some(waiting) = pending.remove(&reply.msg_id) else {
        return;
    };
    let reply = match waiting.early {
        Some(early) if reply.outcome == ReplyOutcome::Result(Value::Null) => Reply {
            ending: true,
            ..early
        },
        _ => reply,
    };
    let _ = waiting.tx.send(reply);
}

impl Caller {
    /// Declares a reply queue of its own on `broker`, as an oslo caller does
    /// under the broker's options, and starts consuming it.
    pub async fn start(broker: Broker) -> anyhow::Result<Caller> {
        let reply_queue = format!("reply_{}", crate::new_unique_id());
        let spec = broker.oslo().reply_queue(&reply_queue);
        broker.declare_queue(&spec, "", "").await?;
        let mut inbox = broker
            .consume(std::slice::from_ref(&reply_queue), 512, "caller")
            .await?;
        let pending: Arc<Mutex<HashMap<String, Pending>>> = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(inbound) = inbox.next().await {
                match crate::wire::decode_reply(&inbound.body, crate::wire::DEFAULT_BODY_LIMIT) {
                    Ok(reply) => take_reply(&waiting, reply),
                    Err(e) => tracing::warn!(error = %e, "undecodable reply ignored"),
                }
                inbound.settle(crate::transport::Outcome::Ack);
            }
        });
        Ok(Caller {
            broker,
            reply_queue,
            pending,
        })
    }

    /// The queue replies come back on (`_reply_q`).
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Registers interest in the reply to `msg_id`; call before publishing
    /// the request, so a fast reply is never missed.
    pub fn expect(&self, msg_id: &str) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(msg_id.to_string(), Pending { tx, early: None });
        rx
    }

    /// Stops waiting for `msg_id` (after a timeout).
    pub fn forget(&self, msg_id: &str) {
        lock(&self.pending).remove(msg_id);
    }

    /// The request of an oslo call, with a fresh `_msg_id`, without call
    /// monitoring (its deadline goes in the `expiration` when it is sent).
    pub fn request(&self, method: &str, args: Map<String, Value>, context: Context) -> Request {
        let mut request = Request::cast(method, args, context, crate::new_unique_id());
        request.call = Some(CallInfo {
            msg_id: crate::new_unique_id(),
            reply_q: self.reply_queue.clone(),
            timeout: None,
        });
        request
    }

    /// Calls `method` on `topic` and waits up to `timeout` for the reply.
    pub async fn call(
        &self,
        exchange: &str,
        topic: &str,
        request: Request,
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let Some(msg_id) = request.call.as_ref().map(|c| c.msg_id.clone()) else {
            anyhow::bail!("not a call: the request has no _msg_id");
        };
        let reply = self.expect(&msg_id);
        let mut publication = Publication::new(exchange, topic, request.encode());
        publication.expiration_ms = Some(timeout.as_millis() as u64);
        if let Err(e) = self.broker.publish(&publication).await {
            self.forget(&msg_id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => anyhow::bail!("the reply consumer stopped"),
            Err(_) => {
                self.forget(&msg_id);
                anyhow::bail!("no reply to {msg_id} on {topic} within {timeout:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(msg_id: &str) -> (Mutex<HashMap<String, Pending>>, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let pending = HashMap::from([(msg_id.to_string(), Pending { tx, early: None })]);
        (Mutex::new(pending), rx)
    }

    fn result(msg_id: &str, value: Value, ending: bool) -> Reply {
        Reply {
            msg_id: msg_id.into(),
            outcome: ReplyOutcome::Result(value),
            ending,
        }
    }

    #[test]
    fn heartbeats_never_complete_a_call() {
        let (pending, mut rx) = waiting("m1");
        take_reply(&pending, Reply::heartbeat("m1"));
        take_reply(&pending, Reply::heartbeat("m1"));
        assert!(rx.try_recv().is_err(), "still waiting after heartbeats");
        take_reply(&pending, result("m1", Value::from("done"), true));
        assert_eq!(
            rx.try_recv().expect("answered").outcome,
            ReplyOutcome::Result(Value::from("done"))
        );
    }

    #[test]
    fn a_result_before_its_ending_completes_with_the_ending() {
        // oslo.messaging before 2017 sent the result, then an empty ending.
        let (pending, mut rx) = waiting("m2");
        take_reply(&pending, result("m2", Value::from(42), false));
        assert!(rx.try_recv().is_err());
        take_reply(&pending, result("m2", Value::Null, true));
        let reply = rx.try_recv().expect("answered");
        assert_eq!(reply.outcome, ReplyOutcome::Result(Value::from(42)));
        assert!(reply.ending);
    }
}
