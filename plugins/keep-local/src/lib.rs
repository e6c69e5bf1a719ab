//! A policy that keeps every message in the cell it reaches: each is
//! processed there and relayed nowhere. Operators use it to isolate a cell
//! (during maintenance, or to stop a flood); the host's tests swap it with
//! nova-cells to check that hot reloads lose and duplicate nothing.
//!
//! A response is still processed here, which completes the request waiting
//! for it when this cell is its destination.

use cellhost_guest::{log, Action, Cell, Message, Policy};

struct KeepLocal;

impl Policy for KeepLocal {
    fn init(_config: &str) -> Result<Self, String> {
        log::info("keep-local: every message stays in this cell");
        Ok(KeepLocal)
    }

    fn route(&self, _message: &Message, _cell: &Cell) -> Result<Vec<Action>, String> {
        Ok(vec![Action::ProcessHere])
    }
}

cellhost_guest::export_policy!(KeepLocal);
