"""Native unit tests of app.py's routing, run with plain Python against the
bindings `componentize-py bindings` writes (see README.md); no WebAssembly
involved. The built component is tested with `cellhost policy test`."""

import unittest
from unittest import mock

from wit_world.imports import host
from wit_world.imports.types import (
    Action_Drop,
    Action_ProcessHere,
    Action_Relay,
    Action_ReplyError,
    Cell,
    Direction,
    Message,
    MessageType,
    Neighbour,
)

import app


def neighbour(name: str, is_parent: bool) -> Neighbour:
    return Neighbour(name=name, is_parent=is_parent, weight_offset=0.0, weight_scale=1.0,
                     capabilities=[])


# child-cell2 under api-cell, with one child of its own.
CHILD_CELL2 = Cell(
    name="child-cell2",
    parents=[neighbour("api-cell", True)],
    children=[neighbour("grandchild-cell1", False)],
)


def message(message_type: MessageType, direction: Direction, routing_path: str,
            target_cell=None, run_locally: bool = True) -> Message:
    """A message as the policy sees it at the last cell of routing_path."""
    return Message(
        uuid="m1", message_type=message_type, direction=direction, method_name="reboot",
        routing_path=routing_path, hop_count=routing_path.count("!") + 1, max_hop_count=10,
        target_cell=target_cell, need_response=False, fanout=False,
        is_origin="!" not in routing_path, run_locally=run_locally, ctxt="{}",
        method_kwargs="{}",
    )


def policy(config: str = "") -> app.WitWorld:
    """The policy after `init(config)`, as the host calls it. Like
    componentize-py, `route` is called on another `WitWorld` object."""
    # The host's functions exist only inside the component: stand in for them.
    with mock.patch.object(host, "log"):
        app.WitWorld().init(config)
    return app.WitWorld()


class TargetedTest(unittest.TestCase):
    def test_processed_at_its_target(self):
        m = message(MessageType.TARGETED, Direction.DOWN, "api-cell!child-cell2",
                    "api-cell!child-cell2")
        self.assertEqual(policy().route(m, CHILD_CELL2), [Action_ProcessHere()])

    def test_relayed_to_the_next_cell_on_its_path(self):
        m = message(MessageType.TARGETED, Direction.DOWN, "api-cell!child-cell2",
                    "api-cell!child-cell2!grandchild-cell1")
        self.assertEqual(policy().route(m, CHILD_CELL2), [Action_Relay("grandchild-cell1")])

    def test_refused_when_the_next_cell_is_not_a_neighbour(self):
        m = message(MessageType.TARGETED, Direction.DOWN, "api-cell!child-cell2",
                    "api-cell!child-cell2!grandchild-cell9")
        [action] = policy().route(m, CHILD_CELL2)
        self.assertIsInstance(action, Action_ReplyError)
        self.assertEqual(action.value.class_, "CellRoutingInconsistency")


class BroadcastTest(unittest.TestCase):
    def test_processed_and_passed_down(self):
        m = message(MessageType.BROADCAST, Direction.DOWN, "api-cell!child-cell2")
        self.assertEqual(policy().route(m, CHILD_CELL2),
                         [Action_ProcessHere(), Action_Relay("grandchild-cell1")])

    def test_not_run_at_its_origin_unless_asked(self):
        m = message(MessageType.BROADCAST, Direction.UP, "child-cell2", run_locally=False)
        self.assertEqual(policy().route(m, CHILD_CELL2), [Action_Relay("api-cell")])


class ConfigTest(unittest.TestCase):
    def test_listed_methods_are_dropped(self):
        m = message(MessageType.BROADCAST, Direction.DOWN, "api-cell!child-cell2")
        [action] = policy("reboot, sync").route(m, CHILD_CELL2)
        self.assertIsInstance(action, Action_Drop)


if __name__ == "__main__":
    unittest.main()
