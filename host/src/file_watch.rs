//! Watching one file for changes: the policy file and the neighbours file
//! both apply what is written to them while the host runs.
//!
//! The file's folder is watched, not the file: an editor or a deploy tool
//! that writes a new file and renames it over the old one replaces the inode
//! a file watch would follow. A burst of events (write, chmod, rename) is
//! one change.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Keeps a file watched; the watch stops when it is dropped.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls `on_change` after each change to `path` (`what` names the file in
/// errors), once `settle` has passed without another event. The watch ends
/// when `on_change` returns false.
pub fn watch_file<F, Fut>(
    path: &Path,
    what: &str,
    settle: Duration,
    mut on_change: F,
) -> Result<FileWatch>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
        .to_path_buf();
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
            if ours && !event.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })
    .with_context(|| format!("starting the {what} watcher"))?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {} for the {what}", folder.display()))?;
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(settle).await;
            while rx.try_recv().is_ok() {}
            if !on_change().await {
                return;
            }
        }
    });
    Ok(FileWatch {
        _watcher: watcher,
        task,
    })
}
