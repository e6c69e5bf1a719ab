//! {{name}}: a cellhost routing policy.
//!
//! For every message its cell receives, cellhost calls `route` and carries out
//! the actions it returns: process the message here, relay it to neighbours,
//! refuse it with an error, or drop it. This one routes as Nova cells v1 does
//! (targeted messages follow their target's path, broadcasts flood the tree)
//! and adds two things to show the SDK: methods the operator refuses by
//! config, and a `dry_run` keyword argument that is dropped. Make it yours;
//! `cargo test` checks it natively and then as the compiled component.

use cellhost_guest::{log, path_parts, Action, Cell, Direction, Message, MessageType, Policy};

// The component's allocator, and its `cabi_realloc`: the SDK's, made for the
// strings and lists the host hands every call and takes back after it
// (`cellhost_guest::alloc`). Nothing outside WebAssembly.
cellhost_guest::global_allocator!();

/// The policy. One value lives as long as its instance in the host.
pub struct {{type_name}} {
    /// Methods this cell refuses, from the config `refuse=a,b`.
    refused: Vec<String>,
}

impl Policy for {{type_name}} {
    /// Reads the operator's `[policy] config`: empty, or `refuse=a,b`. An
    /// error here keeps the policy from loading, and says why.
    fn init(config: &str) -> Result<Self, String> {
        let refused = match config.trim() {
            "" => Vec::new(),
            setting => match setting.strip_prefix("refuse=") {
                Some(list) => list.split(',').map(|m| m.trim().to_string()).collect(),
                None => return Err(format!("unknown config {setting:?}: expected refuse=a,b")),
            },
        };
        log::info(&format!("ready, refusing {refused:?}"));
        Ok({{type_name}} { refused })
    }

    /// The host has already added this cell to `routing_path` and counted the
    /// hop; it checks every relay against the configured neighbours and the
    /// hop limit whatever this returns.
    fn route(&self, message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
        if self.refused.contains(&message.method_name) {
            let why = format!("{} is not run through {}", message.method_name, cell.name);
            return Ok(vec![Action::reply_error("MethodRefused", &why)]);
        }
        // Typed access to the keyword arguments; anything but `true` is no dry run.
        if let Ok(Some(true)) = message.kwarg::<bool>("dry_run") {
            return Ok(vec![Action::discard("dry run")]);
        }
        match message.message_type {
            MessageType::Broadcast => Ok(broadcast(message, cell)),
            MessageType::Targeted | MessageType::Response => Ok(targeted(message, cell)),
        }
    }
}

/// Every neighbour in the message's direction, and this cell too unless the
/// sender asked to skip the cell the broadcast starts from.
fn broadcast(message: &Message, cell: &Cell) -> Vec<Action> {
    let here = (message.run_locally || !message.is_origin).then_some(Action::ProcessHere);
    let next = cell
        .neighbours(message.direction)
        .iter()
        .map(|n| Action::relay(&n.name));
    here.into_iter().chain(next).collect()
}

/// One hop along the target's path. Nova names the target by the path the
/// message is to travel from where it entered, e.g. `api-cell!child-cell2`
/// going down or `grandchild-cell1!child-cell2!api-cell` going up; the next
/// hop is the name after the path travelled so far.
fn targeted(message: &Message, cell: &Cell) -> Vec<Action> {
    let Some(target) = message.target_cell.as_deref() else {
        return vec![Action::reply_error(
            "CellRoutingInconsistency",
            "no target cell",
        )];
    };
    let travelled: Vec<&str> = path_parts(&message.routing_path).collect();
    let wanted: Vec<&str> = path_parts(target).collect();
    if travelled == wanted {
        return vec![Action::ProcessHere];
    }
    let next_name = wanted
        .starts_with(&travelled)
        .then(|| wanted.get(travelled.len()))
        .flatten();
    let next = next_name.and_then(|name| match message.direction {
        Direction::Up => cell.parent(name),
        Direction::Down => cell.child(name),
    });
    match next {
        Some(neighbour) => vec![Action::relay(&neighbour.name)],
        None => {
            let why = format!("no way from {} to {target}", message.routing_path);
            vec![Action::reply_error("CellRoutingInconsistency", &why)]
        }
    }
}

cellhost_guest::export_policy!({{type_name}});

#[cfg(test)]
mod tests {
    //! The policy's logic, natively: fast, and no `.wasm` needed.

    use super::*;
    use cellhost_guest::{json, Tree};

    fn policy(config: &str) -> {{type_name}} {
        match {{type_name}}::init(config) {
            Ok(policy) => policy,
            Err(e) => panic!("init({config:?}) failed: {e}"),
        }
    }

    /// The decision at the cell that ends the message's routing path, in
    /// Nova's eight-cell test tree.
    fn decide(config: &str, message: &Message) -> Vec<Action> {
        let cell = Tree::nova()
            .cell(message.this_cell())
            .expect("a cell of the tree");
        policy(config)
            .route(message, &cell)
            .expect("route succeeds")
    }

    #[test]
    fn a_targeted_message_goes_down_one_hop_at_a_time() {
        let m = Message::targeted("api-cell!child-cell2!grandchild-cell1");
        assert_eq!(decide("", &m), [Action::relay("child-cell2")]);
        let m = m.at("api-cell!child-cell2");
        assert_eq!(decide("", &m), [Action::relay("grandchild-cell1")]);
        let m = m.at("api-cell!child-cell2!grandchild-cell1");
        assert_eq!(decide("", &m), [Action::ProcessHere]);
    }

    #[test]
    fn a_response_climbs_to_its_target() {
        // Going up, the target is the path from where the response set out.
        let m = Message::response("grandchild-cell2!child-cell3!api-cell").at("grandchild-cell2");
        assert_eq!(decide("", &m), [Action::relay("child-cell3")]);
        let m = m.at("grandchild-cell2!child-cell3");
        assert_eq!(decide("", &m), [Action::relay("api-cell")]);
        let m = m.at("grandchild-cell2!child-cell3!api-cell");
        assert_eq!(decide("", &m), [Action::ProcessHere]);
        let lost =
            Message::response("grandchild-cell2!child-cell1").at("grandchild-cell2!child-cell3");
        assert!(
            matches!(&decide("", &lost)[..], [Action::ReplyError(f)] if f.class == "CellRoutingInconsistency")
        );
    }

    #[test]
    fn a_broadcast_floods_down_and_runs_here() {
        let m = Message::broadcast(Direction::Down).at("api-cell!child-cell3");
        let actions = decide("", &m);
        assert_eq!(
            actions,
            [
                Action::ProcessHere,
                Action::relay("grandchild-cell2"),
                Action::relay("grandchild-cell3"),
            ]
        );
        let from_here = Message::broadcast(Direction::Down)
            .at("api-cell!child-cell3")
            .not_locally();
        assert!(
            decide("", &from_here).contains(&Action::ProcessHere),
            "not the origin: runs here"
        );
    }

    #[test]
    fn refused_methods_and_dry_runs_stop_here() {
        let m = Message::targeted("api-cell!child-cell1").method("delete");
        assert!(
            matches!(&decide("refuse=delete,resize", &m)[..], [Action::ReplyError(f)] if f.class == "MethodRefused")
        );
        let dry = Message::targeted("api-cell!child-cell1").kwargs(json!({"dry_run": true}));
        assert_eq!(decide("", &dry), [Action::discard("dry run")]);
    }

    #[test]
    fn a_config_it_does_not_understand_is_refused() {
        assert!({{type_name}}::init("deny=delete").is_err());
    }
}
