//! The application's side of a cell: building a message that enters the
//! network (empty routing path, hop count 0) and casting it onto the cell's
//! intercell topic, as `cellhost send`, the demo and the tests do, and as any
//! oslo.messaging client does with `cast(ctxt, 'process_message', message=...)`.

use serde_json::{Map, Value};

use crate::router::relay_body;
use crate::transport::{Broker, ExchangeKind, Publication, QueueSpec};
use crate::wire::{CellsMessage, Direction, MessageType};

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
            need_response: false,
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
    Publication::new(control_exchange, topic, relay_body(message))
}

/// Declares, on a cell's broker, what messages cast to it need: the control
/// exchange, the shared intercell queues and their fanout exchanges, with the
/// properties an oslo.messaging peer declares. A message sent before the
/// cell's host is up then waits in its queue instead of being dropped.
pub async fn declare_intercell(
    broker: &Broker,
    control_exchange: &str,
    queue_base: &str,
) -> anyhow::Result<()> {
    broker
        .declare_exchange(control_exchange, ExchangeKind::Topic)
        .await?;
    for kind in MessageType::all() {
        let topic = format!("{queue_base}.{}", kind.as_str());
        broker
            .declare_queue(&QueueSpec::oslo(&topic), control_exchange, &topic)
            .await?;
        broker
            .declare_exchange(&format!("{topic}_fanout"), ExchangeKind::Fanout)
            .await?;
    }
    Ok(())
}
