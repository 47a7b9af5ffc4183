//! What the daemon tells the outside: Prometheus metrics and the HTTP endpoints (`metrics`), and
//! the state file that `vmlb inspect` reads names and health from (`state`).

pub mod digest;
pub mod metrics;
pub mod state;
