"""A cellhost routing policy in Python: what this cell does with each
inter-cell message it receives. componentize-py builds this module into a
WebAssembly component of world `policy` (`wit/policy.wit`); see README.md.

The policy, kept small to show the API:
- a targeted message (or a response) is processed here when this cell is its
  target, relayed to the next cell on the target's path when that cell is a
  neighbour in the message's direction, and refused otherwise;
- a broadcast is processed here (unless it starts here and its sender asked
  not to run it locally) and relayed to every neighbour in its direction;
- a message whose method is listed in the config is dropped, with a reason
  for the host's log. The config is `[policy] config` in the cell's TOML:
  method names separated by commas, e.g. "debug_ping,legacy_sync".

The host enforces what a policy cannot override: relays go only to
configured neighbours and never past the hop limit.
"""

from typing import List, Set

import wit_world
from wit_world.imports import host
from wit_world.imports.types import (
    Action,
    Action_Drop,
    Action_ProcessHere,
    Action_Relay,
    Action_ReplyError,
    Cell,
    Direction,
    Failure,
    Message,
    MessageType,
)

# Routing paths name cells root first, joined with "!": "api-cell!child-cell2".
PATH_SEPARATOR = "!"


# Set by `init`. Module state, not instance state: componentize-py makes a
# new `WitWorld` object for every call, so attributes set on `self` in `init`
# are gone by the time `route` runs. The module lives as long as the
# component instance does.
dropped_methods: Set[str] = set()


class WitWorld(wit_world.WitWorld):
    """The component's exports. The host makes one component instance per
    cell (and a fresh one after a failure), calls `init` once, then `route`
    for every message."""

    def init(self, config: str) -> None:
        # Raising componentize_py_types.Err("why") here refuses the policy:
        # the host keeps the version it has and logs the reason.
        global dropped_methods
        dropped_methods = {name.strip() for name in config.split(",") if name.strip()}
        if dropped_methods:
            host.log(host.Level.INFO, f"dropping methods {sorted(dropped_methods)}")

    def route(self, message: Message, cell: Cell) -> List[Action]:
        # The host has already appended this cell to message.routing_path and
        # counted the hop. message.ctxt and message.method_kwargs are JSON
        # text: json.loads them to route on their contents.
        if message.method_name in dropped_methods:
            return [Action_Drop(f"method {message.method_name} is dropped by config")]
        if message.message_type == MessageType.BROADCAST:
            return route_broadcast(message, cell)
        return route_targeted(message, cell)


def route_targeted(message: Message, cell: Cell) -> List[Action]:
    target = message.target_cell or ""
    if target == message.routing_path:
        return [Action_ProcessHere()]
    travelled = message.routing_path.split(PATH_SEPARATOR)
    remaining = target.split(PATH_SEPARATOR)
    if remaining[: len(travelled)] != travelled or len(remaining) <= len(travelled):
        return [refuse(f"destination is {target} but routing_path is {message.routing_path}")]
    next_hop = remaining[len(travelled)]
    neighbours = cell.parents if message.direction == Direction.UP else cell.children
    if not any(n.name == next_hop for n in neighbours):
        return [refuse(f"{next_hop} is not a neighbour of {cell.name} going {message.direction.name.lower()}")]
    return [Action_Relay(next_hop)]


def route_broadcast(message: Message, cell: Cell) -> List[Action]:
    actions: List[Action] = []
    if not message.is_origin or message.run_locally:
        actions.append(Action_ProcessHere())
    neighbours = cell.parents if message.direction == Direction.UP else cell.children
    actions.extend(Action_Relay(n.name) for n in neighbours)
    return actions


def refuse(reason: str) -> Action:
    # A failure response to a sender that waits for one; else the host
    # dead-letters the message.
    return Action_ReplyError(Failure(class_="CellRoutingInconsistency", message=reason))
