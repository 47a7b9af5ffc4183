//! The cluster's services join the file source's in the one desired state. A file is the
//! node's local override, so it wins a conflict (same VIP:port/protocol, or same name); the
//! cluster service that lost is left out and reported.

use std::collections::BTreeSet;

use crate::model::ConfiguredService;

/// File services first, then the cluster's that do not clash with them; and what was left out.
pub fn merge(
    file: &[ConfiguredService],
    cluster: &[ConfiguredService],
) -> (Vec<ConfiguredService>, Vec<String>) {
    let keys: BTreeSet<_> = file
        .iter()
        .map(|s| (s.spec.vip, s.spec.port, s.spec.proto))
        .collect();
    let names: BTreeSet<&str> = file.iter().map(|s| s.name.as_str()).collect();
    let mut out = file.to_vec();
    let mut dropped = Vec::new();
    for s in cluster {
        let key = (s.spec.vip, s.spec.port, s.spec.proto);
        if keys.contains(&key) || names.contains(s.name.as_str()) {
            dropped.push(format!(
                "{} ({}:{}/{}) is left out: a configuration file defines it",
                s.name,
                s.spec.vip,
                s.spec.port,
                s.spec.proto.name()
            ));
        } else {
            out.push(s.clone());
        }
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HealthSpec, Proto, ServiceSpec};

    fn svc(name: &str, vip: [u8; 4], port: u16) -> ConfiguredService {
        ConfiguredService {
            spec: ServiceSpec {
                vip: vip.into(),
                port,
                proto: Proto::Tcp,
                mode: Default::default(),
                snat: vec![[10, 10, 1, 125].into()],
                snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
                ring_size: 16381,
                backends: Vec::new(),
            },
            name: name.into(),
            hosts: Vec::new(),
            location: None,
            file: "x".into(),
            line: 1,
            health: HealthSpec::default(),
        }
    }

    #[test]
    fn the_file_wins_and_the_rest_joins() {
        let file = [svc("vms/http", [10, 10, 1, 128], 80)];
        let cluster = [
            svc("default/vms/http", [10, 10, 1, 128], 80),
            svc("default/vms/https", [10, 10, 1, 128], 443),
            svc("vms/http", [10, 10, 1, 129], 80),
        ];
        let (all, dropped) = merge(&file, &cluster);
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["vms/http", "default/vms/https"]);
        assert_eq!(dropped.len(), 2);
        assert!(dropped[0].starts_with("default/vms/http (10.10.1.128:80/tcp)"));
    }
}
