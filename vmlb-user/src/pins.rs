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

/// The statfs magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
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
    let target = std::ffi::CString::new(mount_at.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain mount(2) with valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}
