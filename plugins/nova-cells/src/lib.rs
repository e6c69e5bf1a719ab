//! The default cellhost policy: OpenStack Nova cells v1 routing, as in
//! `nova/cells/messaging.py`.
//!
//! This crate owns the routing decision only. [`route`] is the whole policy,
//! a pure function that other policies can call to fall back on Nova's
//! behaviour; [`NovaCells`] wraps it as a [`Policy`], and the `export` feature
//! (on by default) exports that as the component `nova_cells.wasm`.
//!
//! Targeted messages and responses follow the target cell's path one hop at a
//! time (a response is a targeted message whose target the host has set to
//! the reversed routing path). Broadcasts flood the whole tree in one
//! direction. Errors are the ones Nova raises, `CellRoutingInconsistency` and
//! `CellMaxHopCountReached`, with Nova's wording.

// The exported component's allocator: the SDK's size classes, which serve
// the dozen strings and lists the host hands each call, and frees after it,
// in fewer instructions than wasm32-wasip2's dlmalloc or talc (see
// `cellhost_guest::alloc`), as its `cabi_realloc` too. Only with `export`: a
// policy that reuses [`route`] keeps its own.
#[cfg(feature = "export")]
cellhost_guest::global_allocator!();

use cellhost_guest::{
    Action, Cell, Direction, Failure, Message, MessageType, Policy, PATH_SEPARATOR,
};

/// Nova's exception class for a message whose path does not fit the tree.
pub const ROUTING_INCONSISTENCY: &str = "CellRoutingInconsistency";

/// Nova's exception class for a message that would exceed its hop limit.
pub const MAX_HOP_COUNT_REACHED: &str = "CellMaxHopCountReached";

/// Nova cells v1 routing as a [`Policy`]. It has no configuration.
#[derive(Debug, Default, Clone, Copy)]
pub struct NovaCells;

impl Policy for NovaCells {
    fn init(_config: &str) -> Result<Self, String> {
        Ok(NovaCells)
    }

    fn route(&self, message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
        route(message, cell)
    }
}

#[cfg(feature = "export")]
cellhost_guest::export_policy!(NovaCells);

/// Decides what `cell` does with `message`, as Nova cells v1 would.
///
/// The host has already appended `cell` to the routing path and counted the
/// hop. Nova's routing never fails as a policy: a message that cannot be
/// routed gets an [`Action::ReplyError`], so this always returns `Ok`.
pub fn route(message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
    Ok(match message.message_type {
        MessageType::Targeted | MessageType::Response => route_targeted(message, cell),
        MessageType::Broadcast => route_broadcast(message, cell),
    })
}

/// `_TargetedMessage.process` and its `_get_next_hop`.
fn route_targeted(message: &Message, cell: &Cell) -> Vec<Action> {
    let routing_path = message.routing_path.as_str();
    let Some(target) = message.target_cell.as_deref() else {
        let kind = match message.message_type {
            MessageType::Response => "response",
            _ => "targeted",
        };
        return vec![inconsistency(format!("{kind} message has no target cell"))];
    };
    if target == routing_path {
        return vec![Action::ProcessHere];
    }

    let Some(next_hop_name) = next_hop(routing_path, target) else {
        return vec![inconsistency(format!(
            "destination is {target} but routing_path is {routing_path}"
        ))];
    };

    let (next_hop, kind) = match message.direction {
        Direction::Up => (cell.parent(next_hop_name), "parent"),
        Direction::Down => (cell.child(next_hop_name), "child"),
    };
    let Some(next_hop) = next_hop else {
        return vec![inconsistency(format!(
            "Unknown {kind} when routing to {target}"
        ))];
    };

    // Nova checks the limit only when forwarding: a message that has arrived
    // is processed whatever its hop count.
    if message.hop_count >= message.max_hop_count {
        return vec![Action::ReplyError(Failure {
            class: MAX_HOP_COUNT_REACHED.to_owned(),
            message: format!(
                "Cell message has reached maximum hop count: {}",
                message.hop_count
            ),
        })];
    }
    vec![Action::Relay(next_hop.name.clone())]
}

/// The name of the next cell on the way from `routing_path` to `target`, as
/// Nova's `_get_next_hop` finds it: the target's path must start with every
/// cell of the path travelled so far, and the cell after those is the next
/// hop. `None` when the target is off that path, or is the path itself.
///
/// Nova splits both paths on `!` and compares the parts; a prefix that ends
/// where a part of the target ends is the same test without the lists.
fn next_hop<'a>(routing_path: &str, target: &'a str) -> Option<&'a str> {
    let rest = target
        .strip_prefix(routing_path)?
        .strip_prefix(PATH_SEPARATOR)?;
    Some(
        rest.split_once(PATH_SEPARATOR)
            .map_or(rest, |(name, _)| name),
    )
}

/// `_BroadcastMessage.process` and its `_get_next_hops`.
fn route_broadcast(message: &Message, cell: &Cell) -> Vec<Action> {
    let here = (!message.is_origin || message.run_locally).then_some(Action::ProcessHere);
    // Nova stops the flood silently at the hop limit: cells beyond it simply
    // do not hear of the broadcast.
    let next_hops = if message.hop_count >= message.max_hop_count {
        &[]
    } else {
        cell.neighbours(message.direction)
    };
    here.into_iter()
        .chain(next_hops.iter().map(|n| Action::Relay(n.name.clone())))
        .collect()
}

/// A `CellRoutingInconsistency`, worded as Nova's exception formats it.
fn inconsistency(reason: String) -> Action {
    Action::ReplyError(Failure {
        class: ROUTING_INCONSISTENCY.to_owned(),
        message: format!("Inconsistency in cell routing: {reason}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_guest::{path_parts, Neighbour};

    /// Nova's test topology (`nova/tests/unit/cells/fakes.py`): each cell
    /// with its parent, children in configured order.
    const TOPOLOGY: &[(&str, Option<&str>)] = &[
        ("api-cell", None),
        ("child-cell1", Some("api-cell")),
        ("child-cell2", Some("api-cell")),
        ("grandchild-cell1", Some("child-cell2")),
        ("child-cell3", Some("api-cell")),
        ("grandchild-cell2", Some("child-cell3")),
        ("grandchild-cell3", Some("child-cell3")),
        ("child-cell4", Some("api-cell")),
    ];

    const MAX_HOPS: u32 = 10;

    fn neighbour(name: &str, is_parent: bool) -> Neighbour {
        Neighbour {
            name: name.to_owned(),
            is_parent,
            weight_offset: 0.0,
            weight_scale: 1.0,
            capabilities: Vec::new(),
        }
    }

    /// The cell called `name` as its host would see it.
    fn cell(name: &str) -> Cell {
        let parents = TOPOLOGY
            .iter()
            .filter(|(cell, _)| *cell == name)
            .filter_map(|(_, parent)| *parent)
            .map(|parent| neighbour(parent, true))
            .collect();
        let children = TOPOLOGY
            .iter()
            .filter(|(_, parent)| *parent == Some(name))
            .map(|(child, _)| neighbour(child, false))
            .collect();
        Cell {
            name: name.to_owned(),
            parents,
            children,
        }
    }

    /// A message as `route` sees it at the last cell of `routing_path`.
    fn message(
        message_type: MessageType,
        direction: Direction,
        routing_path: &str,
        target_cell: Option<&str>,
    ) -> Message {
        Message {
            uuid: "6f1c3c8e-0000-4000-8000-000000000000".to_owned(),
            message_type,
            direction,
            method_name: "instance_update_at_top".to_owned(),
            routing_path: routing_path.to_owned(),
            hop_count: u32::try_from(path_parts(routing_path).count()).unwrap_or(u32::MAX),
            max_hop_count: MAX_HOPS,
            target_cell: target_cell.map(str::to_owned),
            need_response: true,
            fanout: false,
            is_origin: !routing_path.contains(PATH_SEPARATOR),
            run_locally: false,
            ctxt: "{}".to_owned(),
            method_kwargs: "{}".to_owned(),
        }
    }

    fn targeted(direction: Direction, routing_path: &str, target: &str) -> Message {
        message(MessageType::Targeted, direction, routing_path, Some(target))
    }

    fn broadcast(direction: Direction, routing_path: &str) -> Message {
        message(MessageType::Broadcast, direction, routing_path, None)
    }

    /// Routes `message` at the last cell of its routing path.
    fn actions(message: &Message) -> Vec<Action> {
        let here = message
            .routing_path
            .rsplit(PATH_SEPARATOR)
            .next()
            .unwrap_or_default();
        route(message, &cell(here)).expect("nova routing never fails as a policy")
    }

    /// Follows a message through the tree as hosts would, returning the
    /// routing path of every cell that processed it, and every failure.
    /// `next_hop` as Nova writes `_get_next_hop`: the paths split into
    /// lists of names, the travelled ones compared, the next one taken.
    fn next_hop_by_parts<'a>(routing_path: &str, target: &'a str) -> Option<&'a str> {
        let next_hop_num = routing_path.matches(PATH_SEPARATOR).count() + 1;
        let dest_parts: Vec<&str> = path_parts(target).collect();
        let on_route = dest_parts.get(..next_hop_num).is_some_and(|travelled| {
            travelled
                .iter()
                .copied()
                .eq(routing_path.split(PATH_SEPARATOR))
        });
        dest_parts.get(next_hop_num).copied().filter(|_| on_route)
    }

    /// Every path of up to `len` characters drawn from names `a` and `bc`
    /// and the separator, empty names and doubled separators included.
    fn paths(len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..len {
            let next: Vec<String> = last
                .iter()
                .flat_map(|path| ["a", "bc", "!"].map(|piece| format!("{path}{piece}")))
                .filter(|path| path.len() <= len)
                .collect();
            all.extend(next.iter().cloned());
            last = next;
        }
        all.sort();
        all.dedup();
        all
    }

    #[test]
    fn next_hop_is_novas_over_every_short_pair_of_paths() {
        let paths = paths(7);
        assert!(paths.len() > 500, "{} paths", paths.len());
        let mut hops = 0;
        for routing_path in &paths {
            for target in &paths {
                let expected = next_hop_by_parts(routing_path, target);
                assert_eq!(
                    next_hop(routing_path, target),
                    expected,
                    "routing_path {routing_path:?}, target {target:?}"
                );
                hops += usize::from(expected.is_some());
            }
        }
        // Not a comparison of two `None`s only.
        assert!(hops > 1000, "{hops} pairs with a next hop");
    }

    fn travel(first: Message) -> (Vec<String>, Vec<Failure>) {
        let mut processed = Vec::new();
        let mut failures = Vec::new();
        let mut queue = vec![first];
        while let Some(message) = queue.pop() {
            for action in actions(&message) {
                match action {
                    Action::ProcessHere => processed.push(message.routing_path.clone()),
                    Action::Relay(next) => {
                        let mut relayed = message.clone();
                        relayed.routing_path = format!("{}!{next}", message.routing_path);
                        relayed.hop_count += 1;
                        relayed.is_origin = false;
                        queue.push(relayed);
                    }
                    Action::ReplyError(failure) => failures.push(failure),
                    Action::Drop(reason) => panic!("nova never drops, but dropped: {reason}"),
                }
            }
        }
        processed.sort();
        (processed, failures)
    }

    fn failure(actions: &[Action]) -> Option<(&str, &str)> {
        match actions {
            [Action::ReplyError(f)] => Some((f.class.as_str(), f.message.as_str())),
            _ => None,
        }
    }

    fn relays(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Relay(name) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    fn processes_here(actions: &[Action]) -> bool {
        matches!(actions.first(), Some(Action::ProcessHere))
    }

    // --- targeted ------------------------------------------------------

    #[test]
    fn targeted_to_this_cell_is_processed_here() {
        let found = actions(&targeted(Direction::Down, "api-cell", "api-cell"));
        assert!(matches!(found.as_slice(), [Action::ProcessHere]));

        let path = "api-cell!child-cell3!grandchild-cell2";
        let found = actions(&targeted(Direction::Down, path, path));
        assert!(matches!(found.as_slice(), [Action::ProcessHere]));
    }

    #[test]
    fn targeted_down_relays_to_the_next_child_on_the_path() {
        let target = "api-cell!child-cell2!grandchild-cell1";
        let found = actions(&targeted(Direction::Down, "api-cell", target));
        assert_eq!(relays(&found), ["child-cell2"]);
        assert_eq!(found.len(), 1);

        let found = actions(&targeted(Direction::Down, "api-cell!child-cell2", target));
        assert_eq!(relays(&found), ["grandchild-cell1"]);
    }

    #[test]
    fn targeted_up_relays_to_the_next_parent_on_the_path() {
        let target = "grandchild-cell3!child-cell3!api-cell";
        let found = actions(&targeted(Direction::Up, "grandchild-cell3", target));
        assert_eq!(relays(&found), ["child-cell3"]);

        let found = actions(&targeted(
            Direction::Up,
            "grandchild-cell3!child-cell3",
            target,
        ));
        assert_eq!(relays(&found), ["api-cell"]);
    }

    #[test]
    fn targeted_down_reaches_a_grandchild_and_only_it() {
        let target = "api-cell!child-cell3!grandchild-cell3";
        let (processed, failures) = travel(targeted(Direction::Down, "api-cell", target));
        assert_eq!(processed, [target]);
        assert!(failures.is_empty());
    }

    #[test]
    fn targeted_up_reaches_the_api_cell() {
        let target = "grandchild-cell1!child-cell2!api-cell";
        let (processed, failures) = travel(targeted(Direction::Up, "grandchild-cell1", target));
        assert_eq!(processed, [target]);
        assert!(failures.is_empty());
    }

    #[test]
    fn response_is_routed_like_a_targeted_message() {
        // The host reverses the request's path into the target and flips the
        // direction; from there a response is routed hop by hop.
        let target = "grandchild-cell2!child-cell3!api-cell";
        let response = message(
            MessageType::Response,
            Direction::Up,
            "grandchild-cell2",
            Some(target),
        );
        assert_eq!(relays(&actions(&response)), ["child-cell3"]);
        let (processed, failures) = travel(response);
        assert_eq!(processed, [target]);
        assert!(failures.is_empty());
    }

    #[test]
    fn target_off_the_travelled_path_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Down,
            "api-cell!child-cell2",
            "api-cell!child-cell3!grandchild-cell2",
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: destination is \
                 api-cell!child-cell3!grandchild-cell2 but routing_path is api-cell!child-cell2"
            ))
        );
    }

    #[test]
    fn target_shorter_than_the_travelled_path_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Down,
            "api-cell!child-cell2!grandchild-cell1",
            "api-cell",
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: destination is api-cell \
                 but routing_path is api-cell!child-cell2!grandchild-cell1"
            ))
        );
    }

    #[test]
    fn target_as_deep_as_the_travelled_path_but_elsewhere_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Down,
            "api-cell!child-cell2",
            "api-cell!child-cell1",
        ));
        assert_eq!(failure(&found).map(|f| f.0), Some(ROUTING_INCONSISTENCY));
    }

    #[test]
    fn target_that_does_not_start_here_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Down,
            "api-cell",
            "other-api!child-cell1",
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: destination is other-api!child-cell1 \
                 but routing_path is api-cell"
            ))
        );
    }

    #[test]
    fn unknown_child_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Down,
            "api-cell",
            "api-cell!child-cell5",
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: Unknown child when routing to api-cell!child-cell5"
            ))
        );
    }

    #[test]
    fn unknown_parent_is_inconsistent() {
        let found = actions(&targeted(
            Direction::Up,
            "grandchild-cell1",
            "grandchild-cell1!child-cell3!api-cell",
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: Unknown parent when routing to \
                 grandchild-cell1!child-cell3!api-cell"
            ))
        );
    }

    #[test]
    fn next_hop_is_looked_up_in_the_direction_of_travel() {
        // child-cell2 is a child of api-cell, so going up it is unknown.
        let found = actions(&targeted(Direction::Up, "api-cell", "api-cell!child-cell2"));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: Unknown parent when routing to api-cell!child-cell2"
            ))
        );
    }

    #[test]
    fn targeted_without_target_cell_is_inconsistent() {
        let found = actions(&message(
            MessageType::Targeted,
            Direction::Down,
            "api-cell",
            None,
        ));
        assert_eq!(
            failure(&found),
            Some((
                ROUTING_INCONSISTENCY,
                "Inconsistency in cell routing: targeted message has no target cell"
            ))
        );

        let found = actions(&message(
            MessageType::Response,
            Direction::Up,
            "child-cell1",
            None,
        ));
        assert_eq!(failure(&found).map(|f| f.0), Some(ROUTING_INCONSISTENCY));
    }

    #[test]
    fn targeted_at_the_hop_limit_is_refused_instead_of_relayed() {
        let mut at_limit = targeted(Direction::Down, "api-cell", "api-cell!child-cell1");
        at_limit.hop_count = MAX_HOPS;
        assert_eq!(
            failure(&actions(&at_limit)),
            Some((
                MAX_HOP_COUNT_REACHED,
                "Cell message has reached maximum hop count: 10"
            ))
        );

        at_limit.hop_count = MAX_HOPS + 3;
        assert_eq!(
            failure(&actions(&at_limit)).map(|f| f.1),
            Some("Cell message has reached maximum hop count: 13")
        );

        at_limit.hop_count = MAX_HOPS - 1;
        assert_eq!(relays(&actions(&at_limit)), ["child-cell1"]);
    }

    #[test]
    fn targeted_at_the_hop_limit_is_still_processed_at_its_target() {
        let mut arrived = targeted(
            Direction::Down,
            "api-cell!child-cell1",
            "api-cell!child-cell1",
        );
        arrived.hop_count = MAX_HOPS;
        assert!(matches!(
            actions(&arrived).as_slice(),
            [Action::ProcessHere]
        ));
    }

    #[test]
    fn routing_inconsistency_is_reported_before_the_hop_limit() {
        let mut both = targeted(Direction::Down, "api-cell", "api-cell!child-cell5");
        both.hop_count = MAX_HOPS;
        assert_eq!(
            failure(&actions(&both)).map(|f| f.0),
            Some(ROUTING_INCONSISTENCY)
        );
    }

    #[test]
    fn small_hop_limit_stops_a_targeted_message_on_the_way() {
        let mut message = targeted(
            Direction::Down,
            "api-cell",
            "api-cell!child-cell3!grandchild-cell2",
        );
        message.max_hop_count = 2;
        let (processed, failures) = travel(message);
        assert!(processed.is_empty());
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].class, MAX_HOP_COUNT_REACHED);
        assert_eq!(
            failures[0].message,
            "Cell message has reached maximum hop count: 2"
        );
    }

    // --- broadcast -----------------------------------------------------

    #[test]
    fn broadcast_down_from_its_origin_goes_to_every_child_in_order() {
        let found = actions(&broadcast(Direction::Down, "api-cell"));
        assert!(!processes_here(&found));
        assert_eq!(
            relays(&found),
            ["child-cell1", "child-cell2", "child-cell3", "child-cell4"]
        );
        assert_eq!(found.len(), 4);
    }

    #[test]
    fn broadcast_run_locally_is_processed_at_its_origin_first() {
        let mut message = broadcast(Direction::Down, "api-cell");
        message.run_locally = true;
        let found = actions(&message);
        assert!(processes_here(&found));
        assert_eq!(found.len(), 5);
        assert_eq!(
            relays(&found),
            ["child-cell1", "child-cell2", "child-cell3", "child-cell4"]
        );
    }

    #[test]
    fn broadcast_is_processed_where_it_arrives_then_passed_on() {
        let found = actions(&broadcast(Direction::Down, "api-cell!child-cell3"));
        assert!(processes_here(&found));
        assert_eq!(relays(&found), ["grandchild-cell2", "grandchild-cell3"]);
        assert_eq!(found.len(), 3);
    }

    #[test]
    fn broadcast_ends_at_the_leaves() {
        let found = actions(&broadcast(Direction::Down, "api-cell!child-cell4"));
        assert!(matches!(found.as_slice(), [Action::ProcessHere]));
    }

    #[test]
    fn broadcast_up_goes_to_the_parents() {
        let found = actions(&broadcast(Direction::Up, "grandchild-cell2"));
        assert_eq!(relays(&found), ["child-cell3"]);
        assert!(!processes_here(&found));

        let found = actions(&broadcast(Direction::Up, "grandchild-cell2!child-cell3"));
        assert!(processes_here(&found));
        assert_eq!(relays(&found), ["api-cell"]);

        let found = actions(&broadcast(
            Direction::Up,
            "grandchild-cell2!child-cell3!api-cell",
        ));
        assert!(matches!(found.as_slice(), [Action::ProcessHere]));
    }

    #[test]
    fn broadcast_down_reaches_every_cell_once() {
        let mut message = broadcast(Direction::Down, "api-cell");
        message.run_locally = true;
        let (processed, failures) = travel(message);
        assert!(failures.is_empty());
        let mut expected = vec![
            "api-cell",
            "api-cell!child-cell1",
            "api-cell!child-cell2",
            "api-cell!child-cell2!grandchild-cell1",
            "api-cell!child-cell3",
            "api-cell!child-cell3!grandchild-cell2",
            "api-cell!child-cell3!grandchild-cell3",
            "api-cell!child-cell4",
        ];
        expected.sort_unstable();
        assert_eq!(processed, expected);
    }

    #[test]
    fn broadcast_at_the_hop_limit_is_not_passed_on() {
        let mut arrived = broadcast(Direction::Down, "api-cell!child-cell3");
        arrived.hop_count = MAX_HOPS;
        assert!(matches!(
            actions(&arrived).as_slice(),
            [Action::ProcessHere]
        ));

        let mut origin = broadcast(Direction::Down, "api-cell");
        origin.hop_count = MAX_HOPS;
        assert!(actions(&origin).is_empty());
    }

    #[test]
    fn small_hop_limit_cuts_a_broadcast_short_silently() {
        let mut message = broadcast(Direction::Down, "api-cell");
        message.max_hop_count = 2;
        let (processed, failures) = travel(message);
        assert!(failures.is_empty());
        assert_eq!(
            processed,
            [
                "api-cell!child-cell1",
                "api-cell!child-cell2",
                "api-cell!child-cell3",
                "api-cell!child-cell4",
            ]
        );
    }

    // --- policy --------------------------------------------------------

    #[test]
    fn init_accepts_any_config() {
        assert!(NovaCells::init("").is_ok());
        assert!(NovaCells::init("whatever = true").is_ok());
    }

    #[test]
    fn policy_routes_like_the_function() {
        let message = targeted(Direction::Down, "api-cell", "api-cell!child-cell2");
        let policy = NovaCells::init("").expect("nova init accepts any config");
        let found = policy
            .route(&message, &cell("api-cell"))
            .expect("nova routing never fails as a policy");
        assert_eq!(relays(&found), ["child-cell2"]);
    }
}
