//! The VM endpoint controller's pure half: VirtualMachineInstances -> the EndpointSlice a vmlb
//! Service should have.
//!
//! A Service opts in with `vmlb.io/network` (the NetworkAttachmentDefinition, `ns/name` or
//! `name` in the Service's namespace) and `vmlb.io/vmi-selector` (a label selector such as
//! `app=httpd,tier in (web)`). It stays selector-less, so Kubernetes' own controller (which
//! would list virt-launcher pod addresses on the pod network) leaves it alone; vmlb writes one
//! slice per family the Service is served in, owned by the Service: `<service>-vmlb` (IPv4)
//! and `<service>-vmlb-ipv6`, as Kubernetes writes one slice per `addressType`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::core::{Expression, Selector, SelectorExt as _};
use serde::{Deserialize, Serialize};

use super::pools::Family;

pub const NETWORK: &str = "vmlb.io/network";
pub const VMI_SELECTOR: &str = "vmlb.io/vmi-selector";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER_NAME: &str = "vmlb.io/endpoint-controller";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// An EndpointSlice holds at most 1000 endpoints (API validation); past that we report.
pub const MAX_ENDPOINTS: usize = 1000;

/// The part of a KubeVirt `VirtualMachineInstance` (kubevirt.io/v1) that vmlb reads. Local
/// types: the published KubeVirt crates lag the API and pull in far more than this.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Vmi {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VmiSpec,
    #[serde(default)]
    pub status: VmiStatus,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct VmiSpec {
    #[serde(default)]
    pub networks: Vec<Network>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Network {
    pub name: String,
    #[serde(default)]
    pub multus: Option<Multus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Multus {
    pub network_name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ip_address: Option<String>,
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    /// Comma-separated: `domain`, `guest-agent`, `multus-status`.
    #[serde(default)]
    pub info_source: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl Vmi {
    fn condition(&self, t: &str) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    }
}

/// What a Service asks the endpoint controller for.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// The NAD as `namespace/name`.
    pub network: String,
    pub selector: Selector,
}

/// `None`: not a VM-backed Service. `Err`: annotated, but wrongly (reported on the Service).
pub fn binding(svc: &Service) -> Option<Result<Binding, String>> {
    let ann = svc.metadata.annotations.as_ref()?;
    let (net, sel) = (ann.get(NETWORK), ann.get(VMI_SELECTOR));
    if net.is_none() && sel.is_none() {
        return None;
    }
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    Some((|| {
        let net = net.ok_or_else(|| format!("{VMI_SELECTOR} is set but {NETWORK} is not"))?;
        let sel = sel.ok_or_else(|| format!("{NETWORK} is set but {VMI_SELECTOR} is not"))?;
        if svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| !s.is_empty())
        {
            return Err(format!(
                "spec.selector must be empty when {VMI_SELECTOR} is used: Kubernetes would \
                 write pod-network slices for it"
            ));
        }
        Ok(Binding {
            network: qualify(net, ns)?,
            selector: parse_selector(sel).map_err(|e| format!("{VMI_SELECTOR}: {e}"))?,
        })
    })())
}

/// `name` -> `ns/name`; `ns/name` stays (Multus' notation).
fn qualify(net: &str, ns: &str) -> Result<String, String> {
    let net = net.trim();
    let ok = |s: &str| !s.is_empty() && !s.contains('/');
    match net.split_once('/') {
        Some((a, b)) if ok(a) && ok(b) => Ok(net.to_string()),
        None if ok(net) => Ok(format!("{ns}/{net}")),
        _ => Err(format!(
            "{NETWORK}: {net:?} is not a name or namespace/name"
        )),
    }
}

/// A label selector in kubectl's notation: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
/// `k in (a,b)`, `k notin (a,b)`, joined by commas. Empty selects nothing here (an empty
/// selector selecting every VM in the namespace is never what was meant).
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut exprs = Vec::new();
    for t in terms.into_iter().map(str::trim) {
        let bad = || format!("cannot read {t:?}");
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        let set = |rest: &str| -> Result<BTreeSet<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let e = if let Some((k, v)) = t.split_once("!=") {
            Expression::NotEqual(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            Expression::Equal(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = t.split_once(" notin ") {
            Expression::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = t.split_once(" in ") {
            Expression::In(k.trim().into(), set(rest)?)
        } else if let Some(k) = t.strip_prefix('!') {
            Expression::DoesNotExist(k.trim().into())
        } else {
            Expression::Exists(t.into())
        };
        let key = match &e {
            Expression::In(k, _)
            | Expression::NotIn(k, _)
            | Expression::Equal(k, _)
            | Expression::NotEqual(k, _)
            | Expression::Exists(k)
            | Expression::DoesNotExist(k) => k,
        };
        if !key_ok(key) {
            return Err(bad());
        }
        exprs.push(e);
    }
    Ok(Selector::from_iter(exprs))
}

/// A VMI's endpoint of `family` on `network`: `None` when it is not on that network or has no
/// address of that family there yet (a NAD without IPAM shows the address only once the
/// guest agent reports it). IPv6 link-local addresses are not endpoints: they need the
/// interface's scope. Not ready unless Running and `Ready` (and `AgentConnected` when the
/// address came from the guest agent, which may otherwise be stale).
pub fn endpoint(vmi: &Vmi, network: &str, family: Family) -> Option<Endpoint> {
    let ns = vmi.metadata.namespace.as_deref().unwrap_or("default");
    let net = vmi.spec.networks.iter().find(|n| {
        n.multus
            .as_ref()
            .is_some_and(|m| qualify(&m.network_name, ns).ok().as_deref() == Some(network))
    })?;
    let iface = vmi
        .status
        .interfaces
        .iter()
        .find(|i| i.name.as_deref() == Some(net.name.as_str()))?;
    let ip = iface
        .ip_address
        .iter()
        .chain(&iface.ip_addresses)
        .filter_map(|a| a.split('/').next()?.parse::<std::net::IpAddr>().ok())
        .find(|ip| {
            Family::of(*ip) == family
                && !ip.is_unspecified()
                && !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local())
        })?;
    let from_agent = iface
        .info_source
        .as_deref()
        .is_some_and(|s| s.split(',').any(|p| p.trim() == "guest-agent"));
    let terminating = vmi.metadata.deletion_timestamp.is_some();
    let serving = vmi.status.phase.as_deref() == Some("Running")
        && vmi.condition("Ready")
        && (!from_agent || vmi.condition("AgentConnected"));
    Some(Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(serving && !terminating),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        // A migrating VMI keeps its address and stays an endpoint; the node follows status.
        node_name: vmi.status.node_name.clone(),
        target_ref: Some(ObjectReference {
            api_version: Some("kubevirt.io/v1".into()),
            kind: Some("VirtualMachineInstance".into()),
            namespace: Some(ns.to_string()),
            name: vmi.metadata.name.clone(),
            uid: vmi.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `<service>-vmlb` for IPv4 (the name single-stack Services always had), `-vmlb-ipv6` for
/// IPv6.
pub fn slice_name(svc: &Service, family: Family) -> String {
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    match family {
        Family::V4 => format!("{name}-vmlb"),
        Family::V6 => format!("{name}-vmlb-ipv6"),
    }
}

/// The slice of `family` the Service should have, and what to report about it. `vmis` are all
/// VMIs known (any namespace); only the Service's namespace is considered.
pub fn desired_slice<'a>(
    svc: &Service,
    binding: &Binding,
    family: Family,
    vmis: impl IntoIterator<Item = &'a Vmi>,
) -> (EndpointSlice, Vec<String>) {
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let mut by_addr: BTreeMap<String, Endpoint> = BTreeMap::new();
    for vmi in vmis {
        if vmi.metadata.namespace.as_deref().unwrap_or("default") != ns {
            continue;
        }
        let labels = vmi.metadata.labels.clone().unwrap_or_default();
        if !binding.selector.matches(&labels) {
            continue;
        }
        if let Some(ep) = endpoint(vmi, &binding.network, family) {
            let addr = ep.addresses[0].clone();
            if let Some(other) = by_addr.get(&addr) {
                problems.push(format!(
                    "VMIs {} and {} both have {addr} on {}; using the first",
                    ref_name(other),
                    ref_name(&ep),
                    binding.network
                ));
                continue;
            }
            by_addr.insert(addr, ep);
        }
    }
    if by_addr.len() > MAX_ENDPOINTS {
        problems.push(format!(
            "{} VMIs match; an EndpointSlice holds {MAX_ENDPOINTS}, the rest are left out",
            by_addr.len()
        ));
    }
    let endpoints: Vec<Endpoint> = by_addr.into_values().take(MAX_ENDPOINTS).collect();
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            let port = match &p.target_port {
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(s)) => {
                    problems.push(format!(
                        "port {}: a named targetPort ({s}) means nothing for a VM; using {}",
                        p.name.as_deref().unwrap_or_default(),
                        p.port
                    ));
                    p.port
                }
                None => p.port,
            };
            EndpointPort {
                name: p.name.clone(),
                port: Some(port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            }
        })
        .collect();
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(svc, family)),
            namespace: Some(ns),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME.to_string(), name.clone()),
                (MANAGED_BY.to_string(), CONTROLLER_NAME.to_string()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name,
                uid: svc.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        address_type: family.to_string(),
        endpoints,
        ports: Some(ports),
    };
    (slice, problems)
}

fn ref_name(ep: &Endpoint) -> String {
    ep.target_ref
        .as_ref()
        .and_then(|r| r.name.clone())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{ServicePort, ServiceSpec},
        apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
    };

    /// A Service in `default` annotated for VMs, with one port.
    pub(crate) fn mk_vm_service(name: &str, network: &str, selector: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                annotations: Some(BTreeMap::from([
                    (NETWORK.into(), network.into()),
                    (VMI_SELECTOR.into(), selector.into()),
                ])),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(super::super::LB_CLASS.into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::Int(8080)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// A Running, Ready VMI on `default/vlan-1512` with `addr`, as the DHCP/static case reports
    /// it (address from the domain, no guest agent needed).
    pub(crate) fn mk_vmi(name: &str, app: &str, addr: &str, node: &str) -> Vmi {
        let v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "labels": {"app": app}},
            "spec": {"networks": [{"name": "nic0", "multus": {"networkName": "default/vlan-1512"}}]},
            "status": {
                "phase": "Running", "nodeName": node,
                "interfaces": [{"name": "nic0", "ipAddress": addr, "ipAddresses": [addr],
                                "mac": "02:a5:cf:00:00:07", "infoSource": "domain, multus-status"}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        serde_json::from_value(v).unwrap()
    }

    fn cond(ep: &Endpoint) -> (bool, bool, bool) {
        let c = ep.conditions.as_ref().unwrap();
        (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
    }

    #[test]
    fn selectors_read_kubectl_notation() {
        let s = parse_selector("app=httpd, tier in (web,front),!canary,env!=dev").unwrap();
        let l = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(s.matches(&l(&[("app", "httpd"), ("tier", "web")])));
        assert!(!s.matches(&l(&[("app", "httpd"), ("tier", "db")])));
        assert!(!s.matches(&l(&[("app", "httpd"), ("tier", "web"), ("canary", "")])));
        assert!(!s.matches(&l(&[("app", "httpd"), ("tier", "web"), ("env", "dev")])));
        for bad in ["", "app=httpd,", "tier in web", "a b"] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seed_vms_become_one_owned_slice() {
        let svc = mk_vm_service("vms", "vlan-1512", "app=httpd");
        let b = binding(&svc).unwrap().unwrap();
        assert_eq!(
            b.network, "default/vlan-1512",
            "a bare name is in the Service's namespace"
        );
        let mut other_ns = mk_vmi("vm9", "httpd", "10.10.1.9", "w0");
        other_ns.metadata.namespace = Some("other".into());
        let vmis = [
            mk_vmi("vm2", "httpd", "10.10.1.3", "w1"),
            mk_vmi("vm1", "httpd", "10.10.1.2", "w0"),
            mk_vmi("db", "postgres", "10.10.1.20", "w0"),
            other_ns,
        ];
        let (slice, problems) = desired_slice(&svc, &b, Family::V4, &vmis);
        assert!(problems.is_empty(), "{problems:?}");
        let addrs: Vec<&str> = slice
            .endpoints
            .iter()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(addrs, ["10.10.1.2", "10.10.1.3"]);
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("w0"));
        assert_eq!(cond(&slice.endpoints[0]), (true, true, false));
        let md = &slice.metadata;
        assert_eq!(md.name.as_deref(), Some("vms-vmlb"));
        assert_eq!(md.labels.as_ref().unwrap()[MANAGED_BY], CONTROLLER_NAME);
        assert_eq!(md.labels.as_ref().unwrap()[SERVICE_NAME], "vms");
        let owner = &md.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Service", "uid-vms")
        );
        assert_eq!(owner.controller, Some(true));
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
    }

    #[test]
    fn readiness_follows_phase_conditions_agent_and_deletion() {
        let net = "default/vlan-1512";
        let base = mk_vmi("vm1", "httpd", "10.10.1.2", "w0");
        assert_eq!(
            cond(&endpoint(&base, net, Family::V4).unwrap()),
            (true, true, false)
        );

        let mut not_ready = base.clone();
        not_ready.status.conditions[0].status = "False".into();
        assert_eq!(
            cond(&endpoint(&not_ready, net, Family::V4).unwrap()),
            (false, false, false)
        );

        let mut scheduling = base.clone();
        scheduling.status.phase = Some("Scheduled".into());
        assert_eq!(
            cond(&endpoint(&scheduling, net, Family::V4).unwrap()),
            (false, false, false)
        );

        let mut agent = base.clone();
        agent.status.interfaces[0].info_source = Some("domain, guest-agent".into());
        assert_eq!(
            cond(&endpoint(&agent, net, Family::V4).unwrap()),
            (false, false, false)
        );
        agent.status.conditions.push(Condition {
            type_: "AgentConnected".into(),
            status: "True".into(),
        });
        assert_eq!(
            cond(&endpoint(&agent, net, Family::V4).unwrap()),
            (true, true, false)
        );

        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(
            cond(&endpoint(&deleting, net, Family::V4).unwrap()),
            (false, true, true)
        );

        // Live migration: same address, new node, still an endpoint.
        let mut migrated = base.clone();
        migrated.status.node_name = Some("w1".into());
        let ep = endpoint(&migrated, net, Family::V4).unwrap();
        assert_eq!(
            (ep.node_name.as_deref(), cond(&ep)),
            (Some("w1"), (true, true, false))
        );

        let mut no_ip = base.clone();
        no_ip.status.interfaces[0].ip_address = None;
        no_ip.status.interfaces[0].ip_addresses = vec!["fe80::1/64".into()];
        assert!(
            endpoint(&no_ip, net, Family::V4).is_none(),
            "no IPv4 address yet"
        );
        assert!(
            endpoint(&no_ip, net, Family::V6).is_none(),
            "link-local only"
        );
        no_ip.status.interfaces[0].ip_addresses = vec!["fd00::2/64".into()];
        assert_eq!(
            endpoint(&no_ip, net, Family::V6).unwrap().addresses,
            ["fd00::2"],
            "an IPv6 address with its prefix"
        );
        assert!(
            endpoint(&base, "default/vlan-9", Family::V4).is_none(),
            "other network"
        );
    }

    #[test]
    fn kubectl_shaped_vmi_with_a_cidr_and_ipv6() {
        let text = include_str!("testdata/vmi-vm1.json");
        let vmi: Vmi = serde_json::from_str(text).unwrap();
        let ep = endpoint(&vmi, "default/vlan-1512", Family::V4).expect("endpoint");
        assert_eq!(ep.addresses, ["10.10.1.2"]);
        assert_eq!(ep.node_name.as_deref(), Some("worker-0"));
        assert_eq!(cond(&ep), (true, true, false));
        assert!(
            endpoint(&vmi, "default/vlan-1512", Family::V6).is_none(),
            "a link-local address is no endpoint"
        );
    }

    #[test]
    fn kubectl_shaped_dual_stack_vmi_has_an_endpoint_per_family() {
        let text = include_str!("testdata/vmi-vm2-dualstack.json");
        let vmi: Vmi = serde_json::from_str(text).unwrap();
        let net = "default/vlan-1512";
        let v4 = endpoint(&vmi, net, Family::V4).expect("IPv4 endpoint");
        let v6 = endpoint(&vmi, net, Family::V6).expect("IPv6 endpoint");
        assert_eq!(v4.addresses, ["10.10.1.3"]);
        assert_eq!(
            v6.addresses,
            ["fd00:10:10:1::3"],
            "the global address, not fe80::"
        );
        assert_eq!(cond(&v6), (true, true, false));
        let svc = mk_vm_service("vms", "vlan-1512", "app=httpd");
        let b = binding(&svc).unwrap().unwrap();
        let (slice, problems) = desired_slice(&svc, &b, Family::V6, [&vmi]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(slice.address_type, "IPv6");
        assert_eq!(slice.metadata.name.as_deref(), Some("vms-vmlb-ipv6"));
        assert_eq!(slice.endpoints[0].addresses, ["fd00:10:10:1::3"]);
    }

    #[test]
    fn bad_annotations_are_reported_not_fatal() {
        let mut svc = mk_vm_service("vms", "a/b/c", "app=httpd");
        assert!(binding(&svc)
            .unwrap()
            .unwrap_err()
            .contains("vmlb.io/network"));
        svc.metadata.annotations.as_mut().unwrap().remove(NETWORK);
        assert!(binding(&svc).unwrap().is_err());
        svc.metadata.annotations = None;
        assert!(binding(&svc).is_none());
        let mut sel = mk_vm_service("vms", "vlan-1512", "app=httpd");
        sel.spec.as_mut().unwrap().selector =
            Some(BTreeMap::from([("app".to_string(), "httpd".to_string())]));
        assert!(binding(&sel)
            .unwrap()
            .unwrap_err()
            .contains("spec.selector"));
    }

    #[test]
    fn duplicate_addresses_and_the_slice_bound() {
        let svc = mk_vm_service("vms", "vlan-1512", "app=httpd");
        let b = binding(&svc).unwrap().unwrap();
        let vmis: Vec<Vmi> = (0..1100u32)
            .map(|i| {
                let a = format!("10.20.{}.{}", i / 250, i % 250 + 1);
                mk_vmi(&format!("vm{i}"), "httpd", &a, "w0")
            })
            .chain([mk_vmi("dup", "httpd", "10.20.0.1", "w0")])
            .collect();
        let (slice, problems) = desired_slice(&svc, &b, Family::V4, &vmis);
        assert_eq!(slice.endpoints.len(), MAX_ENDPOINTS);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("both have 10.20.0.1")));
    }
}
