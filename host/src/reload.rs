//! Hot reload of a cell's policy, make-before-break.
//!
//! A reload reads the policy file, compiles and validates the new version off
//! the message path (on a blocking thread: the world must match and `init`
//! must accept the configured config), and only then swaps it in atomically.
//! Each consumer notices the swap before its next message and takes a fresh
//! instance of the new version; a message already being planned finishes on
//! the version it started with. A version that fails at any step leaves the
//! current one serving, and the reason is logged and kept for operators.
//!
//! Reloads are triggered by changes to the policy file (watched through its
//! folder, so deploys that rename a new file into place are seen), by SIGHUP
//! (`cellhost run`), and by calling [`PolicyReloader::reload`].

use crate::file_watch::{watch_file, FileWatch};
use crate::lock;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::config::PolicySection;
use crate::policy::PolicyEngine;
use crate::router::Router;

/// How long a file must stay unchanged before it is read: a writer that is
/// still copying it in is waited for.
const SETTLE: Duration = Duration::from_millis(10);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// A new version serves, identified by its content hash.
    Swapped { hash: String },
    /// The file holds the version already serving.
    Unchanged,
}

/// Reloads one cell's policy.
pub struct PolicyReloader {
    engine: Arc<PolicyEngine>,
    section: PolicySection,
    router: Arc<Router>,
    /// One reload at a time, so two triggers cannot race their swaps.
    busy: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    swaps: AtomicU64,
}

impl PolicyReloader {
    pub fn new(engine: Arc<PolicyEngine>, router: Arc<Router>) -> Arc<PolicyReloader> {
        Arc::new(PolicyReloader {
            engine,
            section: router.config().policy.clone(),
            router,
            busy: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
            swaps: AtomicU64::new(0),
        })
    }

    /// The file this cell's policy comes from, if it is not the embedded one.
    pub fn path(&self) -> Option<&Path> {
        self.section.path.as_deref()
    }

    /// Why the last reload failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// How many times a new version was swapped in.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Loads the policy file again and swaps it in if it is a new, valid version.
    pub async fn reload(&self) -> Result<Reloaded> {
        let _one_at_a_time = self.busy.lock().await;
        let result = self.load_and_swap().await;
        match &result {
            Ok(Reloaded::Swapped { hash }) => {
                *lock(&self.last_error) = None;
                tracing::info!(cell = %self.router.cell_name(), version = &hash[..12], "policy reloaded");
            }
            Ok(Reloaded::Unchanged) => {
                tracing::debug!(cell = %self.router.cell_name(), "policy file unchanged")
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(cell = %self.router.cell_name(), %reason, "policy reload refused; the current version keeps serving");
                *lock(&self.last_error) = Some(reason);
            }
        }
        result
    }

    async fn load_and_swap(&self) -> Result<Reloaded> {
        let Some(path) = self.section.path.clone() else {
            anyhow::bail!(
                "this cell runs the embedded policy; set `policy.path` to reload from a file"
            );
        };
        let wasm = read_settled(&path).await?;
        let hash = crate::policy::content_hash(&wasm);
        if hash == self.router.active_policy().hash() {
            return Ok(Reloaded::Unchanged);
        }
        // Compiling takes milliseconds to seconds: never on a consumer's thread.
        let engine = self.engine.clone();
        let section = self.section.clone();
        let source = path.display().to_string();
        let config = self.router.config().clone();
        let policy = tokio::task::spawn_blocking(move || {
            let policy = engine.load(
                &source,
                &wasm,
                &section.config,
                crate::plugins::limits(&section),
            )?;
            // The promotion gate, when the cell has one: the candidate must
            // decide the gate's messages as expected before it may serve.
            if let Some(gate) = &section.gate {
                crate::policy_tools::gate(&policy, &config, gate)?;
            }
            anyhow::Ok(policy)
        })
        .await
        .context("the policy loader stopped")??;
        self.router.swap_policy(policy);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        Ok(Reloaded::Swapped { hash })
    }

    /// Watches the policy file and reloads when it changes. The watch stops
    /// when the returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<FileWatch> {
        let Some(path) = self.section.path.clone() else {
            anyhow::bail!("no policy file to watch: the cell runs the embedded policy");
        };
        let reloader = self.clone();
        let watch = watch_file(&path, "policy file", SETTLE, move || {
            let reloader = reloader.clone();
            async move {
                // The outcome is logged; a refused version leaves the current one.
                let _ = reloader.reload().await;
                true
            }
        })?;
        tracing::info!(cell = %self.router.cell_name(), file = %path.display(), "watching the policy file");
        Ok(watch)
    }
}

/// Reads `path` once its size and modification time have stopped changing,
/// so a file still being written is not read half-way.
async fn read_settled(path: &PathBuf) -> Result<Vec<u8>> {
    let stamp = |path: &PathBuf| -> Result<(u64, SystemTime)> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read policy {}", path.display()))?;
        Ok((
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        ))
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut before = stamp(path)?;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = stamp(path)?;
        if now == before {
            break;
        }
        if Instant::now() > give_up {
            anyhow::bail!(
                "policy {} kept changing for 10 s; not loaded",
                path.display()
            );
        }
        before = now;
    }
    let wasm = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read policy {}", path.display()))?;
    if stamp(path)? != before {
        anyhow::bail!(
            "policy {} changed while it was read; waiting for the next change",
            path.display()
        );
    }
    Ok(wasm)
}
