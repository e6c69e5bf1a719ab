"""Nova cells v1 routing in Python: the decision the Rust `nova-cells` plugin
takes, written for componentize-py.

This module owns the routing decision only, as a pure function of the
message and the cell: `route` returns the actions, in the order nova-cells
returns them, with Nova's exception classes and wording. It knows the WIT
types (from the bindings componentize-py generates) and nothing of the
component or the host; `app.py` exports it.

Targeted messages and responses follow the target cell's path one hop at a
time (the host has already set a response's target to the reversed routing
path); broadcasts flood the tree in one direction.
"""

from typing import List, Optional

from wit_world.imports.types import (
    Action,
    Action_ProcessHere,
    Action_Relay,
    Action_ReplyError,
    Cell,
    Direction,
    Failure,
    Message,
    MessageType,
    Neighbour,
)

PATH_SEPARATOR = "!"

# Nova's exception class for a message whose path does not fit the tree.
ROUTING_INCONSISTENCY = "CellRoutingInconsistency"

# Nova's exception class for a message that would exceed its hop limit.
MAX_HOP_COUNT_REACHED = "CellMaxHopCountReached"


def route(message: Message, cell: Cell) -> List[Action]:
    """Decides what `cell` does with `message`, as Nova cells v1 would.

    The host has already appended `cell` to the routing path and counted the
    hop. A message that cannot be routed gets a reply-error action; routing
    itself never fails.
    """
    if message.message_type == MessageType.BROADCAST:
        return _route_broadcast(message, cell)
    return _route_targeted(message, cell)


def path_parts(path: str) -> List[str]:
    """The cell names of a path, root first; the empty path has none."""
    return path.split(PATH_SEPARATOR) if path else []


def _route_targeted(message: Message, cell: Cell) -> List[Action]:
    """Nova's `_TargetedMessage.process` and its `_get_next_hop`."""
    routing_path = message.routing_path
    target = message.target_cell
    if target is None:
        kind = "response" if message.message_type == MessageType.RESPONSE else "targeted"
        return [_inconsistency(f"{kind} message has no target cell")]
    if target == routing_path:
        return [Action_ProcessHere()]

    # The target must start with the path travelled so far (compared as
    # whole names, not as text); the name after it is the next hop.
    next_hop_num = routing_path.count(PATH_SEPARATOR) + 1
    dest_parts = path_parts(target)
    travelled = routing_path.split(PATH_SEPARATOR)
    on_route = dest_parts[:next_hop_num] == travelled
    if not on_route or len(dest_parts) <= next_hop_num:
        return [
            _inconsistency(
                f"destination is {target} but routing_path is {routing_path}"
            )
        ]
    next_hop_name = dest_parts[next_hop_num]

    if message.direction == Direction.UP:
        next_hop, kind = _named(cell.parents, next_hop_name), "parent"
    else:
        next_hop, kind = _named(cell.children, next_hop_name), "child"
    if next_hop is None:
        return [_inconsistency(f"Unknown {kind} when routing to {target}")]

    # Nova checks the limit only when forwarding: a message that has arrived
    # is processed whatever its hop count.
    if message.hop_count >= message.max_hop_count:
        return [
            Action_ReplyError(
                Failure(
                    class_=MAX_HOP_COUNT_REACHED,
                    message="Cell message has reached maximum hop count: "
                    f"{message.hop_count}",
                )
            )
        ]
    return [Action_Relay(next_hop.name)]


def _route_broadcast(message: Message, cell: Cell) -> List[Action]:
    """Nova's `_BroadcastMessage.process` and its `_get_next_hops`."""
    actions: List[Action] = []
    if not message.is_origin or message.run_locally:
        actions.append(Action_ProcessHere())
    # Nova stops the flood silently at the hop limit: cells beyond it simply
    # do not hear of the broadcast.
    if message.hop_count < message.max_hop_count:
        neighbours = cell.parents if message.direction == Direction.UP else cell.children
        actions.extend(Action_Relay(n.name) for n in neighbours)
    return actions


def _named(neighbours: List[Neighbour], name: str) -> Optional[Neighbour]:
    """The first configured neighbour called `name`, as the host lists them."""
    return next((n for n in neighbours if n.name == name), None)


def _inconsistency(reason: str) -> Action:
    """A `CellRoutingInconsistency`, worded as Nova's exception formats it."""
    return Action_ReplyError(
        Failure(
            class_=ROUTING_INCONSISTENCY,
            message=f"Inconsistency in cell routing: {reason}",
        )
    )
