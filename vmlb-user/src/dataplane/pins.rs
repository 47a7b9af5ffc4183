//! Where the daemon pins its state: `<root>/<iface>/link` is the XDP link, and the maps of
//! layout version N (`vmlb_common::LAYOUT_VERSION`) are files named as in
//! `vmlb_common::map_names` under `<root>/<iface>/v<N>/` (version 1 had them flat in
//! `<root>/<iface>/`). The link stays put across layouts, so an upgrade swaps the program inside
//! it. A restarted daemon reopens these instead of loading and attaching again, so established
//! flows never notice; the inspection CLI reads the same maps with or without a daemon running.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::BPF_FS_MAGIC,
};
use vmlb_common::LAYOUT_VERSION;

use super::layout;

/// Default root of the pin directories (one per interface below it).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/vmlb";

#[derive(Clone, Debug)]
pub struct PinLayout {
    /// `<root>/<iface>`: the link.
    iface_dir: PathBuf,
    /// The maps' directory.
    dir: PathBuf,
    version: u32,
}

impl PinLayout {
    /// This version's layout for `iface`.
    pub fn new(root: &Path, iface: &str) -> Self {
        Self::of_version(root, iface, LAYOUT_VERSION)
    }

    /// Layout version `version`'s pins for `iface` (to migrate from, or to remove).
    pub fn of_version(root: &Path, iface: &str, version: u32) -> Self {
        let iface_dir = root.join(iface);
        let dir = match layout::version_dir(version) {
            Some(sub) => iface_dir.join(sub),
            None => iface_dir.clone(),
        };
        Self {
            iface_dir,
            dir,
            version,
        }
    }

    /// Another version's layout on the same interface.
    pub fn with_version(&self, version: u32) -> Self {
        let dir = match layout::version_dir(version) {
            Some(sub) => self.iface_dir.join(sub),
            None => self.iface_dir.clone(),
        };
        Self {
            iface_dir: self.iface_dir.clone(),
            dir,
            version,
        }
    }

    /// The maps' directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The interface's directory (the link, and one directory per layout version).
    pub fn iface_dir(&self) -> &Path {
        &self.iface_dir
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.iface_dir.join(layout::LINK)
    }

    /// The layout versions pinned for this interface (from its directory listing).
    pub fn versions_present(&self) -> BTreeSet<u32> {
        let entries = std::fs::read_dir(&self.iface_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let dir = e.file_type().ok()?.is_dir();
                Some((e.file_name().into_string().ok()?, dir))
            });
        layout::versions_present(entries)
    }

    /// Remove this version's pins: its map files (whatever their names: they may be an older
    /// version's) and, unless it is the interface's own directory, the directory. The link is
    /// never touched.
    pub fn remove_maps(&self) -> std::io::Result<()> {
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            if e.file_type()?.is_dir() || name == layout::LINK {
                continue;
            }
            std::fs::remove_file(e.path())?;
        }
        if self.dir != self.iface_dir {
            std::fs::remove_dir(&self.dir)?;
        }
        Ok(())
    }

    /// A message for readers of the pins (`vmlb inspect`) when this version's maps are not
    /// there: which version is, and what that means.
    pub fn missing_version_hint(&self) -> Option<String> {
        if self.dir.join(vmlb_common::map_names::CONFIG).exists() {
            return None;
        }
        let present = self.versions_present();
        let other = present.iter().next_back()?;
        let dir = self.with_version(*other);
        Some(if *other > self.version {
            format!(
                "the maps pinned in {} are of layout v{other}, newer than this vmlb's v{}: use \
                 the vmlb that pinned them",
                dir.dir().display(),
                self.version
            )
        } else {
            format!(
                "the maps pinned in {} are of layout v{other}, older than this vmlb's v{}: \
                 they belong to an older vmlb (start this version's daemon to migrate them, or \
                 use the older vmlb to read them)",
                dir.dir().display(),
                self.version
            )
        })
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

/// Create `dir` (and missing parents) and make it 0700: the pins are the data path's control
/// surface (anyone who can open them rewrites forwarding), and the run directory names every
/// backend. Parents created here are 0700 too; existing parents keep their mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Make sure `root` lies on a BPF filesystem, mounting one if needed (as Cilium and systemd do
/// at /sys/fs/bpf): at /sys/fs/bpf when `root` is below it, else at `root` itself. Returns
/// whether this call mounted it.
///
/// A mount made here is visible only in this mount namespace: processes started with
/// `ip netns exec` get a private one, so their pins would not survive them. Run the daemon with
/// `nsenter --net=...` instead, or pass a --pin-dir on a bpffs mounted in the host namespace.
pub fn ensure_bpffs(root: &Path) -> std::io::Result<bool> {
    // Already on a BPF filesystem if the nearest existing ancestor is one (the directories
    // below it are created later).
    if root.ancestors().find(|p| p.exists()).is_some_and(is_bpffs) {
        return Ok(false);
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    let mount_at = if root.starts_with(sys_bpf) {
        sys_bpf
    } else {
        root
    };
    std::fs::create_dir_all(mount_at)?;
    mount(
        Some("bpffs"),
        mount_at,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    Ok(true)
}
