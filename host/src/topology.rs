//! Trees of cells as configs: Nova's test topology, and the configs of any
//! tree given each cell's broker. The demo, the policy tools' corpus and
//! bench, and the tests all build their cells here.

use std::collections::BTreeMap;

use crate::config::{Config, NeighbourConfig, TransportUrl};

/// Nova's test topology: each cell and its parent.
pub const NOVA_TOPOLOGY: [(&str, Option<&str>); 8] = [
    ("api-cell", None),
    ("child-cell1", Some("api-cell")),
    ("child-cell2", Some("api-cell")),
    ("child-cell3", Some("api-cell")),
    ("child-cell4", Some("api-cell")),
    ("grandchild-cell1", Some("child-cell2")),
    ("grandchild-cell2", Some("child-cell3")),
    ("grandchild-cell3", Some("child-cell3")),
];

/// Configs for a tree of cells, given each cell's broker URL.
pub fn tree_configs(
    topology: &[(&str, Option<&str>)],
    url_of: impl Fn(&str) -> TransportUrl,
) -> Vec<Config> {
    topology
        .iter()
        .map(|(name, parent)| {
            let mut config = Config::for_cell(name, url_of(name));
            if let Some(parent) = parent {
                config
                    .neighbours
                    .push(neighbour(parent, true, url_of(parent)));
            }
            for (child, _) in topology.iter().filter(|(_, p)| p == &Some(*name)) {
                config
                    .neighbours
                    .push(neighbour(child, false, url_of(child)));
            }
            config
        })
        .collect()
}

fn neighbour(name: &str, is_parent: bool, transport_url: TransportUrl) -> NeighbourConfig {
    NeighbourConfig {
        name: name.to_string(),
        is_parent,
        transport_url,
        weight_offset: 0.0,
        weight_scale: 1.0,
        capabilities: BTreeMap::new(),
        oslo_messaging_rabbit: None,
    }
}
