//! vmlb's user space: loads the XDP program and fills its maps.
//!
//! Control stages, each in its own module: config (source: ServiceEntry YAML) and health
//! (probes) -> model (desired state) -> reconcile (pure diff, ids, Maglev tables) -> dataplane
//! (the `Dataplane` trait; `maps` implements it on BPF maps, `pins` says where they live).
//! `cli` holds one file per subcommand, `metrics` the Prometheus endpoint.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod garp;
pub mod health;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod neigh;
pub mod pins;
pub mod reconcile;
pub mod ring_alloc;
pub mod source;
pub mod state;
