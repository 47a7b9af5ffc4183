//! The contract between vmlb's XDP program and its user space: map names, map key/value layouts,
//! the counter enum, and the pure functions both sides must compute identically (flow hash, SNAT
//! port choice, checksum arithmetic). `#![no_std]` so the eBPF crate can use it; the `user`
//! feature adds `aya::Pod` impls and the Maglev builder.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod abi;
pub mod abi6;
pub mod csum;
pub mod hash;
pub mod index;
#[cfg(feature = "user")]
pub mod maglev;
pub mod stats;

pub use abi::*;
pub use abi6::*;
pub use index::FlowBucket;
pub use stats::Counter;
