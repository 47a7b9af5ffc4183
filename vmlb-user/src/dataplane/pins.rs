//! Where the daemon pins its state: `<root>/<iface>/` holds one file per map (named as in
//! `vmlb_common::map_names`) and `link`, the XDP link. A restarted daemon reopens these instead
//! of loading and attaching again, so established flows never notice; the inspection CLI reads
//! the same maps with or without a daemon running.

use std::path::{Path, PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::BPF_FS_MAGIC,
};

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
