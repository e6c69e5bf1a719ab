//! Builders for the values a policy is called with, and typed access to the
//! JSON a message carries.
//!
//! A policy's unit tests build a [`Message`] and a [`Cell`] in a line each and
//! call `route` directly; the [`harness`](crate::harness) runs the same
//! messages through the compiled component. This file owns those
//! constructors, the short forms of [`Action`], the [`Tree`] of cells a test
//! takes its [`Cell`]s from, and reading `ctxt` and `method_kwargs` through
//! serde. It adds no behaviour to routing: every builder only fills fields.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{path_parts, Action, Cell, Direction, Failure, Message, MessageType, Neighbour};

/// The hop limit a built message starts with: Nova's default `max_hop_count`.
pub const DEFAULT_MAX_HOP_COUNT: u32 = 10;

/// Gives every built message its own uuid, so that a test routing several
/// messages can tell them apart without naming each.
fn next_uuid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("test-message-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Message {
    fn new(message_type: MessageType, direction: Direction, target: Option<&str>) -> Message {
        let routing_path = target
            .and_then(|t| path_parts(t).next())
            .unwrap_or_default()
            .to_string();
        Message {
            uuid: next_uuid(),
            message_type,
            direction,
            method_name: "test_method".to_string(),
            hop_count: path_parts(&routing_path).count() as u32,
            is_origin: true,
            routing_path,
            max_hop_count: DEFAULT_MAX_HOP_COUNT,
            target_cell: target.map(str::to_string),
            need_response: false,
            fanout: false,
            run_locally: true,
            ctxt: "{}".to_string(),
            method_kwargs: "{}".to_string(),
        }
    }

    /// A targeted message for the cell at `target` (a full path such as
    /// `api-cell!child-cell2`), travelling down, just entered at the root of
    /// that path. Place it elsewhere with [`Message::at`].
    ///
    /// ```
    /// use cellhost_guest::{Direction, Message};
    ///
    /// let m = Message::targeted("api-cell!child-cell2").method("reboot");
    /// assert_eq!(m.routing_path, "api-cell");
    /// assert_eq!((m.hop_count, m.is_origin), (1, true));
    /// assert_eq!(m.direction, Direction::Down);
    /// ```
    pub fn targeted(target: &str) -> Message {
        Message::new(MessageType::Targeted, Direction::Down, Some(target))
    }

    /// A response on its way back to `target`, the cell that asked, travelling
    /// up. Place it with [`Message::at`].
    pub fn response(target: &str) -> Message {
        Message::new(MessageType::Response, Direction::Up, Some(target))
    }

    /// A broadcast travelling `direction`. It has no routing path yet: place
    /// it with [`Message::at`].
    ///
    /// ```
    /// use cellhost_guest::{Direction, Message};
    ///
    /// let m = Message::broadcast(Direction::Down).at("api-cell!child-cell3");
    /// assert_eq!((m.hop_count, m.is_origin), (2, false));
    /// ```
    pub fn broadcast(direction: Direction) -> Message {
        Message::new(MessageType::Broadcast, direction, None)
    }

    /// Puts the message where the policy meets it: `path` is the routing path
    /// *including* the cell that is deciding, as the host hands it over. The
    /// hop count becomes the number of cells on it, and the message is at its
    /// origin when the path holds one cell.
    pub fn at(mut self, path: &str) -> Message {
        self.routing_path = path.to_string();
        self.hop_count = path_parts(path).count() as u32;
        self.is_origin = self.hop_count <= 1;
        self
    }

    /// Sets the direction of travel.
    pub fn direction(mut self, direction: Direction) -> Message {
        self.direction = direction;
        self
    }

    /// Travelling towards the parents.
    pub fn up(self) -> Message {
        self.direction(Direction::Up)
    }

    /// Travelling towards the children.
    pub fn down(self) -> Message {
        self.direction(Direction::Down)
    }

    /// Sets the method the destination is asked to run.
    pub fn method(mut self, name: &str) -> Message {
        self.method_name = name.to_string();
        self
    }

    /// Sets the request context (a JSON object, e.g. from `json!`).
    pub fn ctxt(mut self, ctxt: Value) -> Message {
        self.ctxt = ctxt.to_string();
        self
    }

    /// Sets the method's keyword arguments (a JSON object).
    pub fn kwargs(mut self, kwargs: Value) -> Message {
        self.method_kwargs = kwargs.to_string();
        self
    }

    /// Sets the hop limit.
    pub fn max_hops(mut self, max_hop_count: u32) -> Message {
        self.max_hop_count = max_hop_count;
        self
    }

    /// Sets the hop count, overriding the one [`Message::at`] derived.
    pub fn hops(mut self, hop_count: u32) -> Message {
        self.hop_count = hop_count;
        self
    }

    /// Sets the uuid (by default each built message has its own).
    pub fn uuid(mut self, uuid: &str) -> Message {
        self.uuid = uuid.to_string();
        self
    }

    /// The sender waits for an answer (Nova's `need_response`).
    pub fn need_response(mut self) -> Message {
        self.need_response = true;
        self
    }

    /// The destination's application is to fan the call out (Nova's `fanout`).
    pub fn fanout(mut self) -> Message {
        self.fanout = true;
        self
    }

    /// A broadcast that skips the cell it starts from (Nova's
    /// `run_locally=False`).
    pub fn not_locally(mut self) -> Message {
        self.run_locally = false;
        self
    }

    /// The request context read into `T` through serde.
    ///
    /// ```
    /// use cellhost_guest::{json, Message};
    /// use serde::Deserialize;
    ///
    /// #[derive(Deserialize)]
    /// struct Ctxt { project_id: String }
    ///
    /// let m = Message::targeted("api-cell").ctxt(json!({"project_id": "p1", "roles": []}));
    /// let ctxt: Ctxt = m.ctxt_as().map_err(|e| e.to_string())?;
    /// assert_eq!(ctxt.project_id, "p1");
    /// # Ok::<(), String>(())
    /// ```
    pub fn ctxt_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.ctxt)
    }

    /// The method's keyword arguments read into `T` through serde.
    pub fn kwargs_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.method_kwargs)
    }

    /// One keyword argument read into `T`; `Ok(None)` when it is absent.
    ///
    /// ```
    /// use cellhost_guest::{json, Message};
    ///
    /// let m = Message::targeted("api-cell").kwargs(json!({"instance": {"uuid": "i-1"}, "force": true}));
    /// assert_eq!(m.kwarg::<bool>("force").map_err(|e| e.to_string())?, Some(true));
    /// assert_eq!(m.kwarg::<bool>("reboot_type").map_err(|e| e.to_string())?, None);
    /// # Ok::<(), String>(())
    /// ```
    pub fn kwarg<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, serde_json::Error> {
        let mut kwargs: serde_json::Map<String, Value> = self.kwargs_as()?;
        kwargs.remove(name).map(serde_json::from_value).transpose()
    }

    /// The name of the cell deciding: the last on the routing path.
    pub fn this_cell(&self) -> &str {
        path_parts(&self.routing_path).last().unwrap_or_default()
    }
}

impl Action {
    /// Relay to the neighbour called `neighbour`.
    pub fn relay(neighbour: &str) -> Action {
        Action::Relay(neighbour.to_string())
    }

    /// Refuse with an error of exception class `class`.
    pub fn reply_error(class: &str, message: &str) -> Action {
        Action::ReplyError(Failure {
            class: class.to_string(),
            message: message.to_string(),
        })
    }

    /// Discard on purpose, with `reason` for the log.
    pub fn discard(reason: &str) -> Action {
        Action::Drop(reason.to_string())
    }
}

impl Neighbour {
    /// A parent with Nova's default weights and no capabilities.
    pub fn parent_named(name: &str) -> Neighbour {
        Neighbour::named(name, true)
    }

    /// A child with Nova's default weights and no capabilities.
    pub fn child_named(name: &str) -> Neighbour {
        Neighbour::named(name, false)
    }

    fn named(name: &str, is_parent: bool) -> Neighbour {
        Neighbour {
            name: name.to_string(),
            is_parent,
            weight_offset: 0.0,
            weight_scale: 1.0,
            capabilities: Vec::new(),
        }
    }

    /// Sets the weights, as Nova's cell `weight_offset` and `weight_scale`.
    pub fn weights(mut self, offset: f64, scale: f64) -> Neighbour {
        self.weight_offset = offset;
        self.weight_scale = scale;
        self
    }

    /// Adds a capability and its values.
    pub fn capability(mut self, name: &str, values: &[&str]) -> Neighbour {
        let values = values.iter().map(|v| v.to_string()).collect();
        self.capabilities.push((name.to_string(), values));
        self
    }
}

impl Cell {
    /// A cell with no neighbours yet.
    ///
    /// ```
    /// use cellhost_guest::Cell;
    ///
    /// let cell = Cell::named("child-cell2").with_parent("api-cell").with_child("grandchild-cell1");
    /// assert!(cell.parent("api-cell").is_some() && cell.child("grandchild-cell1").is_some());
    /// ```
    pub fn named(name: &str) -> Cell {
        Cell {
            name: name.to_string(),
            parents: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Adds a parent with default weights.
    pub fn with_parent(self, name: &str) -> Cell {
        self.with_neighbour(Neighbour::parent_named(name))
    }

    /// Adds a child with default weights.
    pub fn with_child(self, name: &str) -> Cell {
        self.with_neighbour(Neighbour::child_named(name))
    }

    /// Adds a neighbour built with [`Neighbour`]'s builders, as a parent or a
    /// child according to its `is_parent`.
    pub fn with_neighbour(mut self, neighbour: Neighbour) -> Cell {
        if neighbour.is_parent {
            self.parents.push(neighbour);
        } else {
            self.children.push(neighbour);
        }
        self
    }
}

/// A tree of cells, each with its parent, from which a test takes the
/// [`Cell`] a policy sees.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// `(cell, parent)` in the order given.
    cells: Vec<(String, Option<String>)>,
}

impl Tree {
    /// Nova's eight-cell test tree: api-cell; child-cell1 to 4 under it;
    /// grandchild-cell1 under child-cell2; grandchild-cell2 and 3 under
    /// child-cell3.
    ///
    /// ```
    /// use cellhost_guest::Tree;
    ///
    /// let cell = Tree::nova().cell("child-cell3").ok_or("no such cell")?;
    /// assert_eq!(cell.parents.len(), 1);
    /// assert_eq!(cell.children.len(), 2);
    /// # Ok::<(), &str>(())
    /// ```
    pub fn nova() -> Tree {
        let mut tree = Tree::default().root("api-cell");
        for child in ["child-cell1", "child-cell2", "child-cell3", "child-cell4"] {
            tree = tree.child(child, "api-cell");
        }
        tree.child("grandchild-cell1", "child-cell2")
            .child("grandchild-cell2", "child-cell3")
            .child("grandchild-cell3", "child-cell3")
    }

    /// Adds a cell with no parent.
    pub fn root(mut self, name: &str) -> Tree {
        self.cells.push((name.to_string(), None));
        self
    }

    /// Adds `name` under `parent`.
    pub fn child(mut self, name: &str, parent: &str) -> Tree {
        self.cells
            .push((name.to_string(), Some(parent.to_string())));
        self
    }

    /// The cell called `name` with its parent and children, as the host would
    /// hand it to a policy; `None` when the tree has no such cell.
    pub fn cell(&self, name: &str) -> Option<Cell> {
        let (_, parent) = self.cells.iter().find(|(cell, _)| cell == name)?;
        let mut cell = Cell::named(name);
        if let Some(parent) = parent {
            cell = cell.with_parent(parent);
        }
        for (child, _) in self
            .cells
            .iter()
            .filter(|(_, p)| p.as_deref() == Some(name))
        {
            cell = cell.with_child(child);
        }
        Some(cell)
    }

    /// The full path of `name` from the root, e.g. `api-cell!child-cell2`.
    pub fn path(&self, name: &str) -> Option<String> {
        let mut parts = vec![name.to_string()];
        let mut current = name;
        while let Some((_, parent)) = self.cells.iter().find(|(cell, _)| cell == current) {
            match parent {
                Some(parent) if parts.len() <= self.cells.len() => {
                    parts.push(parent.clone());
                    current = parent;
                }
                Some(_) => return None,
                None => {
                    parts.reverse();
                    return Some(parts.join("!"));
                }
            }
        }
        None
    }

    /// The tree as the topology file `cellhost policy test` reads.
    pub fn to_topology_toml(&self) -> String {
        let mut toml = String::new();
        for (name, parent) in &self.cells {
            toml.push_str("[[cell]]\n");
            toml.push_str(&format!("name = {}\n", Value::from(name.as_str())));
            if let Some(parent) = parent {
                toml.push_str(&format!("parent = {}\n", Value::from(parent.as_str())));
            }
        }
        toml
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_targeted_message_placed_further_down_is_not_at_its_origin() {
        let m = Message::targeted("api-cell!child-cell2!grandchild-cell1")
            .at("api-cell!child-cell2")
            .need_response();
        assert_eq!(m.this_cell(), "child-cell2");
        assert_eq!(
            (m.hop_count, m.is_origin, m.need_response),
            (2, false, true)
        );
        assert_eq!(
            m.target_cell.as_deref(),
            Some("api-cell!child-cell2!grandchild-cell1")
        );
    }

    #[test]
    fn built_messages_have_their_own_uuids() {
        let a = Message::broadcast(Direction::Up);
        let b = Message::broadcast(Direction::Up);
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(b.clone().uuid("m1").uuid, "m1");
    }

    #[test]
    fn kwargs_and_ctxt_read_through_serde() {
        let m = Message::targeted("api-cell")
            .ctxt(json!({"user_id": "u"}))
            .kwargs(json!({"count": 3}));
        assert_eq!(m.kwarg::<u32>("count").ok(), Some(Some(3)));
        assert!(m.kwarg::<String>("count").is_err(), "a number is no string");
        let ctxt: serde_json::Map<String, Value> = m.ctxt_as().unwrap_or_default();
        assert_eq!(ctxt.get("user_id"), Some(&json!("u")));
    }

    #[test]
    fn the_nova_tree_gives_paths_and_cells() {
        let tree = Tree::nova();
        assert_eq!(
            tree.path("grandchild-cell3").as_deref(),
            Some("api-cell!child-cell3!grandchild-cell3")
        );
        assert_eq!(tree.path("nowhere"), None);
        let api = tree
            .cell("api-cell")
            .map(|c| (c.parents.len(), c.children.len()));
        assert_eq!(api, Some((0, 4)));
        let toml = tree.to_topology_toml();
        assert!(toml.contains("name = \"grandchild-cell1\"\nparent = \"child-cell2\""));
    }

    #[test]
    fn a_parent_loop_has_no_path() {
        let tree = Tree::default().child("a", "b").child("b", "a");
        assert_eq!(tree.path("a"), None);
    }

    #[test]
    fn short_actions_compare_with_the_variants() {
        assert_eq!(Action::relay("c"), Action::Relay("c".into()));
        assert_eq!(Action::discard("r"), Action::Drop("r".into()));
        assert!(matches!(Action::reply_error("K", "m"), Action::ReplyError(f) if f.class == "K"));
    }
}
