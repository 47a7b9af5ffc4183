//! vmlb's user space: loads the XDP program and fills its maps.
//!
//! Control stages, each in its own module: model (desired state) -> reconcile (pure diff, ids,
//! Maglev tables) -> dataplane (the `Dataplane` trait; `maps` implements it on BPF maps).

pub mod dataplane;
pub mod loader;
pub mod maps;
pub mod model;
pub mod reconcile;
pub mod ring_alloc;
