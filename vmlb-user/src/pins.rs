//! Where the daemon pins its state: `<root>/<iface>/` holds one file per map (named as in
//! `vmlb_common::map_names`) and `link`, the XDP link. A restarted daemon reopens these instead
//! of loading and attaching again, so established flows never notice; the inspection CLI reads
//! the same maps with or without a daemon running.

use std::path::{Path, PathBuf};

/// Default root of the pin directories (one per interface below it).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/vmlb";

#[derive(Clone, Debug)]
pub struct PinLayout {
    dir: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path, iface: &str) -> Self {
        Self {
            dir: root.join(iface),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.dir.join("link")
    }

    /// The interfaces that have pinned state under `root`.
    pub fn interfaces(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }
}
