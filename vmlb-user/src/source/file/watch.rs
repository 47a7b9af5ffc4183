//! Reload triggers for the file source: a change to a configured file, or to a YAML file in a
//! configured directory.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::mpsc;

/// Watch the configured files (through their directories: editors replace files by rename, and
/// a ConfigMap volume swaps a symlink) and the configured directories; every relevant change
/// sends `()` on `tx` (dropped when a reload is already queued). Watching stops when the
/// returned watcher is dropped.
pub fn watch(
    paths: &[PathBuf],
    tx: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let files: BTreeSet<PathBuf> = paths
        .iter()
        .filter(|p| !p.is_dir())
        .map(|p| absolute(p))
        .collect();
    let conf_dirs: BTreeSet<PathBuf> = paths
        .iter()
        .filter(|p| p.is_dir())
        .map(|p| absolute(p))
        .collect();
    let relevant = move |p: &Path| {
        files.contains(p)
            || (p.parent().is_some_and(|d| conf_dirs.contains(d))
                && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_))
                && ev.paths.iter().any(|p| relevant(p))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .context("starting the file watcher")?;
    let mut dirs = BTreeSet::new();
    for p in paths {
        let dir: &Path = if p.is_dir() {
            p
        } else {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        dirs.insert(dir.to_path_buf());
    }
    for d in dirs {
        watcher
            .watch(&d, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", d.display()))?;
    }
    Ok(watcher)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
