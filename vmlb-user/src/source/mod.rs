//! Sources of desired state. `kube`: the cluster's objects (the file source is `config`).

pub mod kube;
