//! Reload triggers for the file source: a change to a configured file, or to a YAML file in a
//! configured directory.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::mpsc;

/// Watch the configured files (through their directories: editors replace files by rename, and
/// a ConfigMap volume swaps a symlink) and the configured directories; every relevant change
/// sends `()` on `tx` (dropped when a reload is already queued). A change other than a file
/// renamed into place (which is whole the moment it appears) first sets `in_place`: the file
/// may be being written where it is, and the reader should let the writer finish. Watching
/// stops when the returned watcher is dropped.
pub fn watch(
    paths: &[PathBuf],
    tx: mpsc::Sender<()>,
    in_place: Arc<AtomicBool>,
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
                if !renamed_into_place(&ev, &relevant) {
                    // Before the message: whoever receives it sees the flag.
                    in_place.store(true, Ordering::SeqCst);
                }
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

/// A relevant file renamed into place (the target of a rename): complete when it appears.
fn renamed_into_place(ev: &notify::Event, relevant: impl Fn(&Path) -> bool) -> bool {
    use notify::event::{ModifyKind, RenameMode};
    match ev.kind {
        notify::EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            ev.paths.iter().all(|p| relevant(p))
        }
        // [from, to]: what moved away is not relevant, or the file left the configuration.
        notify::EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            ev.paths.len() == 2 && !relevant(&ev.paths[0]) && relevant(&ev.paths[1])
        }
        _ => false,
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use notify::event::{DataChange, EventKind, ModifyKind, RenameMode};

    use super::*;

    fn ev(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |e, p| {
            e.add_path(PathBuf::from(p))
        })
    }

    #[test]
    fn only_a_rename_onto_a_configured_file_is_whole_at_once() {
        let relevant = |p: &Path| p == Path::new("/etc/vmlb/services.yaml");
        let name = |m| EventKind::Modify(ModifyKind::Name(m));
        let conf = "/etc/vmlb/services.yaml";
        let tmp = "/etc/vmlb/.services.yaml.tmp";
        assert!(renamed_into_place(
            &ev(name(RenameMode::To), &[conf]),
            relevant
        ));
        assert!(renamed_into_place(
            &ev(name(RenameMode::Both), &[tmp, conf]),
            relevant
        ));
        // Renamed away, or written, created, truncated in place: maybe not whole yet.
        assert!(!renamed_into_place(
            &ev(name(RenameMode::From), &[conf]),
            relevant
        ));
        assert!(!renamed_into_place(
            &ev(name(RenameMode::Both), &[conf, tmp]),
            relevant
        ));
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!renamed_into_place(&ev(data, &[conf]), relevant));
        let create = EventKind::Create(notify::event::CreateKind::File);
        assert!(!renamed_into_place(&ev(create, &[conf]), relevant));
    }
}
