"""The component's exports: world `policy` of `wit/policy.wit`, with Nova
cells v1 routing (see `nova_routing.py`). componentize-py builds this module
into `nova_cells_py.wasm`; `scripts/build-python-policy` runs it.

This file owns only the WIT boundary. Like the Rust nova-cells, the policy
has no configuration and never fails a call: messages it cannot route get a
reply-error action.
"""

from typing import List

import wit_world
from wit_world.imports.types import Action, Cell, Message

import nova_routing


class WitWorld(wit_world.WitWorld):
    def init(self, config: str) -> None:
        # Any config is accepted, as nova-cells does: there is nothing to set.
        pass

    def route(self, message: Message, cell: Cell) -> List[Action]:
        return nova_routing.route(message, cell)
