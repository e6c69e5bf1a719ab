//! The policies built from `plugins/` together with this crate (by
//! `build.rs`), and how a host picks the one its config names.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::PolicySection;
use crate::policy::{Limits, LoadedPolicy, PolicyEngine};

/// The folder holding the `.wasm` files built from `plugins/`.
pub const BUILT_DIR: &str = env!("CELLHOST_PLUGINS_DIR");

/// The nova-cells policy, embedded: the default when no `policy.path` is set.
pub const NOVA_CELLS: &[u8] =
    include_bytes!(concat!(env!("CELLHOST_PLUGINS_DIR"), "/nova_cells.wasm"));

/// The path of a policy built from `plugins/`, e.g. `built_path("adversary")`.
pub fn built_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(BUILT_DIR).join(format!("{name}.wasm"))
}

/// Loads the policy a `[policy]` section names, or the embedded nova-cells.
pub fn load(engine: &Arc<PolicyEngine>, section: &PolicySection) -> Result<Arc<LoadedPolicy>> {
    let limits = Limits {
        deadline: std::time::Duration::from_millis(section.deadline_ms),
        memory_bytes: (section.memory_mib as usize) << 20,
    };
    match &section.path {
        Some(path) => {
            let wasm = std::fs::read(path)
                .with_context(|| format!("cannot read policy {}", path.display()))?;
            engine.load(&path.display().to_string(), &wasm, &section.config, limits)
        }
        None => engine.load("embedded nova-cells", NOVA_CELLS, &section.config, limits),
    }
}
