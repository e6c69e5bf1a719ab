//! Cell paths and neighbour lookup: the vocabulary policies route with.
//!
//! Nova names a cell by the path from the root of the tree (the API cell),
//! cell names joined with `!`, and a message records the path it has
//! travelled the same way.

use crate::{Cell, Direction, Neighbour};

/// What joins cell names into a path, as in Nova's `_PATH_CELL_SEP`.
pub const PATH_SEPARATOR: char = '!';

/// The cell names of a path, root first.
///
/// The empty path has no parts at all (where `str::split` would yield one
/// empty name), so "no path yet" and "one cell" stay distinct.
pub fn path_parts(path: &str) -> impl Iterator<Item = &str> {
    (!path.is_empty())
        .then(|| path.split(PATH_SEPARATOR))
        .into_iter()
        .flatten()
}

impl Cell {
    /// The configured parent called `name`.
    pub fn parent(&self, name: &str) -> Option<&Neighbour> {
        self.parents.iter().find(|n| n.name == name)
    }

    /// The configured child called `name`.
    pub fn child(&self, name: &str) -> Option<&Neighbour> {
        self.children.iter().find(|n| n.name == name)
    }

    /// The neighbours a message travelling in `direction` goes to next:
    /// parents going up, children going down, in configured order.
    pub fn neighbours(&self, direction: Direction) -> &[Neighbour] {
        match direction {
            Direction::Up => &self.parents,
            Direction::Down => &self.children,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neighbour(name: &str, is_parent: bool) -> Neighbour {
        Neighbour {
            name: name.into(),
            is_parent,
            weight_offset: 0.0,
            weight_scale: 1.0,
            capabilities: Vec::new(),
        }
    }

    #[test]
    fn path_parts_splits_on_the_separator() {
        let parts: Vec<_> = path_parts("api!child!grandchild").collect();
        assert_eq!(parts, ["api", "child", "grandchild"]);
    }

    #[test]
    fn empty_path_has_no_parts() {
        assert_eq!(path_parts("").count(), 0);
    }

    #[test]
    fn single_cell_path_has_one_part() {
        assert_eq!(path_parts("api").collect::<Vec<_>>(), ["api"]);
    }

    #[test]
    fn neighbours_follow_the_direction() {
        let cell = Cell {
            name: "child".into(),
            parents: vec![neighbour("api", true)],
            children: vec![neighbour("g1", false), neighbour("g2", false)],
        };
        assert_eq!(cell.neighbours(Direction::Up).len(), 1);
        assert_eq!(cell.neighbours(Direction::Down).len(), 2);
        assert_eq!(cell.parent("api").map(|n| n.is_parent), Some(true));
        assert!(cell.parent("g1").is_none());
        assert_eq!(cell.child("g2").map(|n| n.name.as_str()), Some("g2"));
        assert!(cell.child("api").is_none());
    }
}
