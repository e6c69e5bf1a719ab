//! What a policy is shown, and how its answers read: the conversion between
//! the host's messages and cells and the WIT records of the policy
//! interface, and the one-line notation of a decision that logs, the shadow
//! comparison and the policy tools share.
//!
//! A message is lowered into the policy from a [`MessageView`], which
//! borrows its text from wherever the host holds it: the relay's fast path
//! copies nothing out of the body for the call.

use serde_json::Value;
use wasmtime::component::{ComponentType, Lower};

use super::{
    Action, Cell, Direction as WitDirection, Message, MessageType as WitType, Neighbour,
    PolicyError,
};
use crate::config::{Config, NeighbourConfig};
use crate::wire::{CellsMessage, Direction, Hop, MessageType, Skim};

/// The policy's view of a decoded message, as it stands on arrival here
/// (this cell's hop already recorded).
pub fn message_view(m: &CellsMessage, is_origin: bool) -> Message {
    Message {
        uuid: m.uuid.clone(),
        message_type: wit_type(m.message_type),
        direction: wit_direction(m.direction),
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

/// The WIT `message` record, borrowing its text: what the host lowers into
/// each `route` call. Its fields, their names and order are the record's,
/// and wasmtime checks them against the policy's `route` when an instance
/// is made ([`super::PolicyInstance`]).
#[derive(Debug, Clone, Copy, ComponentType, Lower)]
#[component(record)]
pub struct MessageView<'a> {
    #[component(name = "uuid")]
    pub uuid: &'a str,
    #[component(name = "message-type")]
    pub message_type: WitType,
    #[component(name = "direction")]
    pub direction: WitDirection,
    #[component(name = "method-name")]
    pub method_name: &'a str,
    #[component(name = "routing-path")]
    pub routing_path: &'a str,
    #[component(name = "hop-count")]
    pub hop_count: u32,
    #[component(name = "max-hop-count")]
    pub max_hop_count: u32,
    #[component(name = "target-cell")]
    pub target_cell: Option<&'a str>,
    #[component(name = "need-response")]
    pub need_response: bool,
    #[component(name = "fanout")]
    pub fanout: bool,
    #[component(name = "is-origin")]
    pub is_origin: bool,
    #[component(name = "run-locally")]
    pub run_locally: bool,
    #[component(name = "ctxt")]
    pub ctxt: &'a str,
    #[component(name = "method-kwargs")]
    pub method_kwargs: &'a str,
}

impl<'a> From<&'a Message> for MessageView<'a> {
    fn from(m: &'a Message) -> MessageView<'a> {
        MessageView {
            uuid: &m.uuid,
            message_type: m.message_type,
            direction: m.direction,
            method_name: &m.method_name,
            routing_path: &m.routing_path,
            hop_count: m.hop_count,
            max_hop_count: m.max_hop_count,
            target_cell: m.target_cell.as_deref(),
            need_response: m.need_response,
            fanout: m.fanout,
            is_origin: m.is_origin,
            run_locally: m.run_locally,
            ctxt: &m.ctxt,
            method_kwargs: &m.method_kwargs,
        }
    }
}

/// The policy's view of a skimmed cast with `hop` recorded: the same as
/// [`message_view`] of the decoded message, except that the context and
/// the arguments are handed over as the sender wrote them, borrowed from
/// the skim.
pub fn skim_view<'a>(m: &'a Skim, hop: &'a Hop, is_origin: bool) -> MessageView<'a> {
    MessageView {
        uuid: &m.uuid,
        message_type: wit_type(m.message_type),
        direction: wit_direction(m.direction),
        method_name: &m.method_name,
        routing_path: &hop.routing_path,
        hop_count: hop.hop_count,
        max_hop_count: hop.max_hop_count,
        target_cell: m.target_cell.as_deref(),
        // A skimmed message never wants a response.
        need_response: false,
        fanout: m.fanout,
        is_origin,
        run_locally: m.run_locally,
        ctxt: m.ctxt(),
        method_kwargs: m.method_kwargs(),
    }
}

/// The cell of `config` as a policy sees it.
pub fn cell_view(config: &Config) -> Cell {
    cell_view_of(&config.cell.name, &config.neighbours)
}

/// Cell `name` with `neighbours`, as a policy sees it.
pub fn cell_view_of(name: &str, neighbours: &[NeighbourConfig]) -> Cell {
    let neighbour = |n: &NeighbourConfig| Neighbour {
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
    Cell {
        name: name.to_string(),
        parents: neighbours
            .iter()
            .filter(|n| n.is_parent)
            .map(neighbour)
            .collect(),
        children: neighbours
            .iter()
            .filter(|n| !n.is_parent)
            .map(neighbour)
            .collect(),
    }
}

fn wit_type(kind: MessageType) -> WitType {
    match kind {
        MessageType::Targeted => WitType::Targeted,
        MessageType::Broadcast => WitType::Broadcast,
        MessageType::Response => WitType::Response,
    }
}

fn wit_direction(direction: Direction) -> WitDirection {
    match direction {
        Direction::Up => WitDirection::Up,
        Direction::Down => WitDirection::Down,
    }
}

/// One action in the notation `policy test` prints and `--expect` holds.
pub fn action_notation(action: &Action) -> String {
    match action {
        Action::ProcessHere => "process-here".to_string(),
        Action::Relay(to) => format!("relay:{to}"),
        Action::ReplyError(f) => format!("reply-error:{}: {}", f.class, f.message),
        Action::Drop(reason) => format!("drop:{reason}"),
    }
}

/// A whole decision in that notation: its actions in order, or for a call
/// that failed a single `error:<reason code>: <reason>`.
pub fn decision_notation(result: &Result<Vec<Action>, PolicyError>) -> Vec<String> {
    match result {
        Ok(actions) => actions.iter().map(action_notation).collect(),
        Err(e) => vec![format!("error:{}: {e}", e.reason_code())],
    }
}

/// A decision on one line, the same for equal decisions: for logs and for
/// comparing the shadow policy with the active one.
pub fn decision_text(decision: &Result<Vec<Action>, PolicyError>) -> String {
    decision_notation(decision).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Failure;

    #[test]
    fn notation_names_every_action_kind() {
        let actions = vec![
            Action::ProcessHere,
            Action::Relay("child-cell2".into()),
            Action::ReplyError(Failure {
                class: "CellRoutingInconsistency".into(),
                message: "no route".into(),
            }),
            Action::Drop("stale".into()),
        ];
        assert_eq!(
            decision_notation(&Ok(actions)),
            [
                "process-here",
                "relay:child-cell2",
                "reply-error:CellRoutingInconsistency: no route",
                "drop:stale"
            ]
        );
        assert_eq!(
            decision_notation(&Err(PolicyError::Refused("no".into()))),
            ["error:policy-error: policy returned an error: no"]
        );
    }
}
