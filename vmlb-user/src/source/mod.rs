//! Where desired services come from. Every source produces `model::ConfiguredService`s; the
//! daemon merges them into one desired state and hands it to the reconciler.
//!
//! - `file`: Istio ServiceEntry YAML files and directories, and the watcher that reloads them;
//! - `kube`: the cluster's objects;
//! - `node`: the node's own settings (SNAT address, VLAN) from flags and a node config file.

pub mod file;
pub mod kube;
pub mod node;
