//! The policies built from `plugins/` together with this crate (by
//! `build.rs`), and how a host picks the one its config names and the engine
//! (with its compiled-policy cache) it runs in.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::PolicySection;
use crate::policy::{EngineOptions, Limits, LoadedPolicy, PolicyEngine};

/// The folder holding the `.wasm` files built from `plugins/`.
pub const BUILT_DIR: &str = env!("CELLHOST_PLUGINS_DIR");

/// The nova-cells policy, embedded: the default when no `policy.path` is set.
pub const NOVA_CELLS: &[u8] =
    include_bytes!(concat!(env!("CELLHOST_PLUGINS_DIR"), "/nova_cells.wasm"));

/// The path of a policy built from `plugins/`, e.g. `built_path("adversary")`.
pub fn built_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(BUILT_DIR).join(format!("{name}.wasm"))
}

/// The engine for the cells whose `[policy]` sections are given: compiled
/// policies are cached in the first section's cache folder (one engine, one
/// cache). Sections asking for other folders are told so in the log.
pub fn engine<'a>(
    sections: impl IntoIterator<Item = &'a PolicySection>,
) -> Result<Arc<PolicyEngine>> {
    let mut sections = sections.into_iter();
    let first = sections.next();
    let cache_dir = first.and_then(PolicySection::cache_dir);
    if first.is_some_and(|s| s.cache_dir.is_none()) && cache_dir.is_none() {
        tracing::info!(
            "compiled policies are not cached on disk: neither $XDG_CACHE_HOME nor $HOME \
             is set; set `policy.cache_dir` to cache them"
        );
    }
    for other in sections.map(PolicySection::cache_dir) {
        if other != cache_dir {
            tracing::warn!(
                used = ?cache_dir,
                ignored = ?other,
                "cells ask for different `policy.cache_dir` folders; one process uses the first"
            );
        }
    }
    PolicyEngine::with_options(EngineOptions {
        cache_dir,
        ..EngineOptions::default()
    })
}

/// The limits a `[policy]` section sets.
pub fn limits(section: &PolicySection) -> Limits {
    Limits {
        deadline: std::time::Duration::from_millis(section.deadline_ms),
        memory_bytes: usize::try_from(section.memory_mib)
            .unwrap_or(usize::MAX)
            .saturating_mul(1 << 20),
        data_dir: section.data_dir.clone(),
    }
}

/// Loads the policy a `[policy]` section names, or the embedded nova-cells.
pub fn load(engine: &Arc<PolicyEngine>, section: &PolicySection) -> Result<Arc<LoadedPolicy>> {
    let limits = limits(section);
    match &section.path {
        Some(path) => {
            let wasm = std::fs::read(path)
                .with_context(|| format!("cannot read policy {}", path.display()))?;
            engine.load(&path.display().to_string(), &wasm, &section.config, limits)
        }
        None => engine.load("embedded nova-cells", NOVA_CELLS, &section.config, limits),
    }
}

/// Loads the shadow policy a `[policy]` section names, if any, with the same
/// config and limits as the active one.
pub fn load_shadow(
    engine: &Arc<PolicyEngine>,
    section: &PolicySection,
) -> Result<Option<Arc<LoadedPolicy>>> {
    let Some(path) = &section.shadow else {
        return Ok(None);
    };
    let shadow = PolicySection {
        path: Some(path.clone()),
        shadow: None,
        ..section.clone()
    };
    load(engine, &shadow)
        .with_context(|| format!("shadow policy {}", path.display()))
        .map(Some)
}
