//! vmlb's user space: loads the XDP program and fills its maps.
//!
//! Each concern has one room:
//! - `source`: where desired services come from (`source::file`: ServiceEntry YAML and its
//!   watcher; `source::node`: the node's own settings);
//! - `health`: probes, whose verdicts join the desired state;
//! - `model`: desired state, independent of ids and map layout;
//! - `reconcile` (+ `ring_alloc`): the pure diff, ids and Maglev tables;
//! - `dataplane`: the `Dataplane` trait, the BPF maps behind it, where they are pinned, and
//!   loading / attaching / adopting / upgrading the program;
//! - `observe`: Prometheus metrics, the HTTP endpoints and the daemon's state file;
//! - `daemon`: the loop that wires these together, its options and its telemetry;
//! - `cli`: one file per subcommand, rendering through `cli::output`;
//! - `addr`: how addresses, ports and protocols are spelled.

pub mod addr;
pub mod cli;
pub mod daemon;
pub mod dataplane;
pub mod garp;
pub mod health;
pub mod model;
pub mod neigh;
pub mod observe;
pub mod reconcile;
pub mod ring_alloc;
pub mod source;
