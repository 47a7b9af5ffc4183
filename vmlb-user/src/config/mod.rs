//! Source: Istio ServiceEntry YAML -> `model::ConfiguredService`.
