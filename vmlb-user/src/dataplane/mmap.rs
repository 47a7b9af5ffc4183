//! A BPF array map created with BPF_F_MMAPABLE, mapped into this process: its values read and
//! written as memory, without a syscall per entry (or per batch). `FLOW_SLOTS` (the sweeper's
//! compare-and-swap) and `MAGLEV` (table writes at load) use it.

use std::{num::NonZeroUsize, os::fd::AsFd as _, ptr::NonNull};

use anyhow::Context as _;
use aya::maps::MapData;

/// `BPF_F_MMAPABLE` (uapi/linux/bpf.h), as vmlb-ebpf's map definitions set it.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Whether the map behind `map` was created mappable. A map pinned by an older vmlb may lack
/// the flag (the kernel keeps the flags a map was created with, whatever the object that
/// reuses its pin declares).
pub fn is_mmapable(map: &MapData) -> anyhow::Result<bool> {
    Ok(map.info().context("reading a map's info")?.map_flags() & BPF_F_MMAPABLE != 0)
}

/// The values of an array map, mapped shared: value `i` is at `base + i * stride`.
pub struct MappedArray {
    base: NonNull<u8>,
    bytes: usize,
    len: usize,
    stride: usize,
}

// SAFETY: shared memory that stays mapped until drop; what may be read or written concurrently
// (with the data path or other threads) is each user's discipline, stated where they access it.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Map the array behind `map`, whose values must be `value_size` bytes (`what` names it in
    /// errors).
    pub fn map(map: &MapData, value_size: usize, what: &str) -> anyhow::Result<Self> {
        let info = map
            .info()
            .with_context(|| format!("reading {what}'s info"))?;
        anyhow::ensure!(
            info.value_size() as usize == value_size,
            "{what} holds {}-byte values; this vmlb expects {value_size}",
            info.value_size()
        );
        let len = info.max_entries() as usize;
        // The kernel lays an array's values out every round_up(value_size, 8) bytes
        // (`bpf_array::elem_size`), from the start of the mapping.
        let stride = value_size.next_multiple_of(8);
        let page = 4096usize;
        let bytes = (len * stride).div_ceil(page) * page;
        // SAFETY: mapping a BPF array map fd as the kernel documents (offset 0, shared); the
        // length is the array's values rounded up to whole pages.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(bytes).with_context(|| format!("empty {what}"))?,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {what} (it must be created with BPF_F_MMAPABLE)"))?;
        Ok(Self {
            base: ptr.cast(),
            bytes,
            len,
            stride,
        })
    }

    /// Entries (the map's max_entries).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes from one value to the next.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Where value `i` starts (8-byte aligned: the mapping is page-aligned and the stride a
    /// multiple of 8).
    pub fn at(&self, i: usize) -> *mut u8 {
        assert!(i < self.len, "entry {i} of {}", self.len);
        // SAFETY: in bounds of the mapping (i < len, len * stride <= bytes).
        unsafe { self.base.as_ptr().add(i * self.stride) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.bytes) };
    }
}
