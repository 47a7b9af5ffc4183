use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Value};

use super::*;
use crate::model::{HealthKind, NodeConfig, Proto};
use crate::source::kube::{
    pools::{parse_range, Family},
    vmi::tests::{mk_vm_service, mk_vmi},
};

fn node() -> NodeConfig {
    NodeConfig {
        snat: Some("10.10.1.125".parse().unwrap()),
        ..Default::default()
    }
}

fn fixture<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap()
}

fn svc_fixture() -> Service {
    fixture(include_str!("testdata/service-vms.json"))
}

fn slice_fixture() -> EndpointSlice {
    fixture(include_str!("testdata/endpointslice-vms.json"))
}

fn entry_fixture() -> Value {
    fixture(include_str!("testdata/serviceentry-vms.json"))
}

fn backends(s: &ConfiguredService) -> Vec<(String, u16, u32)> {
    s.spec
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port, b.weight))
        .collect()
}

fn with_ip(mut svc: Service, ip: &str) -> Service {
    svc.status =
        Some(serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": ip}]}})).unwrap());
    svc
}

#[test]
fn kubectl_service_and_slice_become_two_services_with_drain_and_exclusion() {
    let mut ix = Index::default();
    ix.upsert_service(svc_fixture());
    ix.upsert_slice(slice_fixture());
    let d = ix.derive(&node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/vms/http", "default/vms/https"]);
    let http = &d.services[0];
    assert_eq!(http.spec.vip.to_string(), "10.10.1.128");
    assert_eq!((http.spec.port, http.spec.proto), (80, Proto::Tcp));
    assert_eq!(
        http.spec.snat,
        vec!["10.10.1.125".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    // ready -> weight 1; serving + terminating -> drain (0); neither -> left out.
    assert_eq!(
        backends(http),
        [("10.10.1.2".into(), 80, 1), ("10.10.1.3".into(), 80, 0)]
    );
    assert!(
        matches!(http.health.kind, HealthKind::Http { .. }),
        "annotations are honoured"
    );
}

#[test]
fn other_classes_types_and_unallocated_services_serve_nothing() {
    let mut ix = Index::default();
    let mut metallb = svc_fixture();
    metallb.metadata.name = Some("metallb".into());
    metallb.spec.as_mut().unwrap().load_balancer_class = None;
    let mut cluster_ip = svc_fixture();
    cluster_ip.metadata.name = Some("cip".into());
    cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let mut pending = svc_fixture();
    pending.status = None;
    ix.replace_services([metallb, cluster_ip, pending]);
    ix.upsert_slice(slice_fixture());
    let d = ix.derive(&node());
    assert!(d.services.is_empty() && d.problems.is_empty(), "{d:?}");
    assert!(ix.service("default/metallb").is_none());
    assert!(
        ix.service("default/vms").is_some(),
        "pending, but ours: gets an address"
    );

    // A Service that leaves vmlb's class is dropped on update.
    let mut moved = svc_fixture();
    ix.upsert_service(moved.clone());
    assert_eq!(ix.derive(&node()).services.len(), 2);
    moved.spec.as_mut().unwrap().load_balancer_class = Some("other".into());
    ix.upsert_service(moved);
    assert!(ix.derive(&node()).services.is_empty());
}

#[test]
fn deleting_objects_removes_their_services() {
    let mut ix = Index::default();
    ix.upsert_service(svc_fixture());
    ix.upsert_slice(slice_fixture());
    ix.upsert_entry(entry_fixture());
    assert_eq!(ix.derive(&node()).services.len(), 4);
    ix.remove_slice(&slice_fixture());
    let d = ix.derive(&node());
    assert_eq!(
        d.services.len(),
        4,
        "a Service without endpoints still exists (drops)"
    );
    assert!(d
        .services
        .iter()
        .filter(|s| s.name.starts_with("default/"))
        .all(|s| s.spec.backends.is_empty()));
    ix.remove_service(&svc_fixture());
    ix.remove_entry(&entry_fixture());
    assert!(ix.derive(&node()).services.is_empty());
}

#[test]
fn service_entries_need_the_label_and_mean_what_files_mean() {
    let mut ix = Index::default();
    let mut unlabelled = entry_fixture();
    unlabelled["metadata"]["name"] = json!("other");
    unlabelled["metadata"]["labels"] = json!({});
    ix.replace_entries([entry_fixture(), unlabelled]);
    let d = ix.derive(&node());
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["istio-system/vms/https", "istio-system/vms/http"]);
    let from_file = crate::source::file::parse_str(
        &entry_fixture()
            .to_string()
            .replace("\"vms\"", "\"istio-system/vms\""),
        std::path::Path::new("x"),
        &node(),
    )
    .unwrap();
    let specs = |v: &[ConfiguredService]| v.iter().map(|s| s.spec.clone()).collect::<Vec<_>>();
    assert_eq!(
        specs(&d.services),
        specs(&from_file),
        "same meaning as the file source"
    );
    assert_eq!(d.services[0].hosts, ["vms.vlan-1512.org"]);
}

#[test]
fn a_malformed_object_is_reported_and_skipped_while_others_serve() {
    let mut ix = Index::default();
    let mut bad = svc_fixture();
    bad.metadata.name = Some("bad".into());
    bad.metadata.annotations = Some(BTreeMap::from([(
        "vmlb.io/health-interval".into(),
        "soon".into(),
    )]));
    let mut sctp = with_ip(svc_fixture(), "10.10.1.140");
    sctp.metadata.name = Some("sctp".into());
    sctp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("SCTP".into());
    let mut bad_entry = entry_fixture();
    bad_entry["metadata"]["name"] = json!("broken");
    bad_entry["spec"]["endpoints"][0]["address"] = json!("10.10.1.300");
    ix.replace_services([bad, sctp, svc_fixture()]);
    ix.replace_entries([bad_entry]);
    ix.upsert_vmi(
        json!({"metadata": {"name": "odd", "namespace": "default"}, "spec": {"networks": "nope"}}),
    );
    let d = ix.derive(&node());
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/vms/http", "default/vms/https"]);
    let about: Vec<String> = d.problems.iter().map(|p| p.object.to_string()).collect();
    assert_eq!(
        about,
        [
            "Service default/bad",
            "Service default/sctp",
            "ServiceEntry istio-system/broken",
            "VirtualMachineInstance default/odd"
        ]
    );
    let msg = |i: usize| d.problems[i].message.as_str();
    assert!(msg(0).contains("vmlb.io/health-interval"), "{}", msg(0));
    assert!(msg(1).contains("SCTP"), "{}", msg(1));
    assert!(msg(2).contains("spec.endpoints[0].address"), "{}", msg(2));
}

#[test]
fn a_vip_port_claimed_twice_goes_to_the_older_object() {
    let mut ix = Index::default();
    let mut young = svc_fixture();
    young.metadata.name = Some("young".into());
    young.metadata.creation_timestamp =
        Some(serde_json::from_value(json!("2026-11-22T00:00:00Z")).unwrap());
    ix.replace_services([young, svc_fixture()]);
    let d = ix.derive(&node());
    assert!(d
        .services
        .iter()
        .all(|s| s.name.starts_with("default/vms/")));
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].object.name, "young");
    assert!(d.problems[0]
        .message
        .contains("10.10.1.128:80/tcp is already served by Service default/vms"));
}

#[test]
fn allocation_reads_requests_and_keeps_status() {
    let mut ix = Index::default();
    ix.set_pools(vec![Pool {
        name: "vlan-1512-pool".into(),
        ranges: vec![parse_range("10.10.1.128/25").unwrap()],
        auto_assign: true,
        avoid_buggy_ips: false,
    }]);
    let mut fresh = svc_fixture();
    fresh.status = None;
    fresh.metadata.name = Some("fresh".into());
    let mut asks = fresh.clone();
    asks.metadata.name = Some("asks".into());
    asks.metadata.annotations = Some(BTreeMap::from([(LB_IPS.into(), "10.10.1.200".into())]));
    // An IPv6 address for a Service served in IPv4 only (MetalLB refuses it too).
    let mut mismatch = fresh.clone();
    mismatch.metadata.name = Some("mismatch".into());
    mismatch.metadata.annotations = Some(BTreeMap::from([(
        LB_IPS.into(),
        "10.10.1.202, fd00::1".into(),
    )]));
    let mut twice = fresh.clone();
    twice.metadata.name = Some("twice".into());
    twice.metadata.annotations = Some(BTreeMap::from([(
        LB_IPS.into(),
        "10.10.1.202, 10.10.1.203".into(),
    )]));
    let mut legacy = fresh.clone();
    legacy.metadata.name = Some("legacy".into());
    legacy.spec.as_mut().unwrap().load_balancer_ip = Some("10.10.1.201".into());
    let mut garbage = fresh.clone();
    garbage.metadata.name = Some("garbage".into());
    garbage.metadata.annotations = Some(BTreeMap::from([(LB_IPS.into(), "ten".into())]));
    ix.replace_services([svc_fixture(), fresh, asks, legacy, garbage, mismatch, twice]);
    let a = ix.allocations();
    let ip = |k: &str| {
        a[k].clone().map(|a| {
            let ips: Vec<String> = a.ips.iter().map(ToString::to_string).collect();
            ips.join(",")
        })
    };
    assert_eq!(
        ip("default/vms"),
        Ok("10.10.1.128".into()),
        "kept from status"
    );
    assert_eq!(ip("default/fresh"), Ok("10.10.1.129".into()));
    assert_eq!(ip("default/asks"), Ok("10.10.1.200".into()));
    assert_eq!(ip("default/legacy"), Ok("10.10.1.201".into()));
    assert!(matches!(&a["default/garbage"], Err(NoAddress::Invalid(m)) if m.contains("\"ten\"")));
    assert!(
        matches!(&a["default/mismatch"], Err(NoAddress::Invalid(m)) if m.contains("fd00::1 is IPv6")),
        "{:?}",
        a["default/mismatch"]
    );
    assert!(
        matches!(&a["default/twice"], Err(NoAddress::Invalid(m)) if m.contains("one address per family")),
        "{:?}",
        a["default/twice"]
    );
}

#[test]
fn the_endpoint_controller_writes_only_what_changed_and_removes_stale_slices() {
    let mut ix = Index::default();
    ix.upsert_service(mk_vm_service("vms", "vlan-1512", "app=httpd"));
    ix.replace_vmis([
        serde_json::to_value(mk_vmi("vm1", "httpd", "10.10.1.2", "w0")).unwrap(),
        serde_json::to_value(mk_vmi("vm2", "httpd", "10.10.1.3", "w1")).unwrap(),
    ]);
    let w = ix.endpoint_work();
    assert_eq!(w.apply.len(), 1);
    assert!(w.delete.is_empty() && w.problems.is_empty());
    // The slice comes back through the watch: nothing more to write.
    ix.upsert_slice(w.apply[0].clone());
    assert_eq!(ix.endpoint_work(), EndpointWork::default());
    // vm2 is deleted: the slice is rewritten without it.
    ix.remove_vmi(&json!({"metadata": {"name": "vm2", "namespace": "default"}}));
    let w = ix.endpoint_work();
    assert_eq!(w.apply[0].endpoints.len(), 1);
    ix.upsert_slice(w.apply[0].clone());
    // The Service stops asking for VMs: its slice goes.
    let mut plain = mk_vm_service("vms", "vlan-1512", "app=httpd");
    plain.metadata.annotations = None;
    ix.upsert_service(plain);
    let w = ix.endpoint_work();
    assert_eq!(w.delete, ["default/vms-vmlb"]);
    // A slice written by someone else is never touched.
    let mut foreign = slice_fixture();
    foreign.metadata.name = Some("handmade".into());
    foreign
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(vmi::MANAGED_BY);
    ix.upsert_slice(foreign);
    assert_eq!(ix.endpoint_work().delete, ["default/vms-vmlb"]);
}

#[test]
fn vm_services_end_to_end_through_their_own_slice() {
    let mut ix = Index::default();
    ix.upsert_service(with_ip(
        mk_vm_service("vms", "vlan-1512", "app=httpd"),
        "10.10.1.128",
    ));
    ix.upsert_vmi(serde_json::to_value(mk_vmi("vm1", "httpd", "10.10.1.2", "w0")).unwrap());
    for s in ix.endpoint_work().apply {
        ix.upsert_slice(s);
    }
    let d = ix.derive(&node());
    assert_eq!(d.services.len(), 1);
    assert_eq!(backends(&d.services[0]), [("10.10.1.2".into(), 8080, 1)]);
}

fn dual_fixture() -> Service {
    fixture(include_str!("testdata/service-vms-dualstack.json"))
}

fn slice6_fixture() -> EndpointSlice {
    fixture(include_str!("testdata/endpointslice-vms-ipv6.json"))
}

/// The IPv4 slice of the dual-stack Service: the single-stack fixture, relabelled.
fn slice4_of_dual() -> EndpointSlice {
    let mut s = slice_fixture();
    s.metadata.name = Some("vms-dual-vmlb".into());
    s.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(vmi::SERVICE_NAME.into(), "vms-dual".into());
    s
}

fn dual_node() -> NodeConfig {
    NodeConfig {
        snat6: Some("fd00:10:10:1::125".parse().unwrap()),
        ..node()
    }
}

#[test]
fn a_dual_stack_service_is_one_service_per_family_with_that_familys_endpoints() {
    let mut ix = Index::default();
    ix.upsert_service(dual_fixture());
    ix.replace_slices([slice4_of_dual(), slice6_fixture()]);
    let d = ix.derive(&dual_node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let got: Vec<(&str, String, Vec<String>)> = d
        .services
        .iter()
        .map(|s| {
            let snat = s.spec.snat.iter().map(ToString::to_string).collect();
            (s.name.as_str(), s.spec.vip.to_string(), snat)
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "default/vms-dual/http@10.10.1.130",
                "10.10.1.130".into(),
                vec!["10.10.1.125".to_string()]
            ),
            (
                "default/vms-dual/http@fd00:10:10:1::1000",
                "fd00:10:10:1::1000".into(),
                vec!["fd00:10:10:1::125".to_string()]
            ),
        ]
    );
    assert_eq!(
        backends(&d.services[0]),
        [("10.10.1.2".into(), 80, 1), ("10.10.1.3".into(), 80, 0)]
    );
    assert_eq!(
        backends(&d.services[1]),
        [
            ("fd00:10:10:1::2".into(), 80, 1),
            ("fd00:10:10:1::3".into(), 80, 1)
        ]
    );

    // No IPv6 endpoints yet: the IPv6 VIP drops (as a Service without endpoints does) and
    // the IPv4 one keeps serving.
    ix.remove_slice(&slice6_fixture());
    let d = ix.derive(&dual_node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.services.len(), 2);
    assert!(d.services[1].spec.backends.is_empty());

    // A node without an IPv6 SNAT address cannot serve the IPv6 VIP: reported, not served
    // (the file source's rule), and the IPv4 one is not served half-silently either.
    let d = ix.derive(&node());
    assert!(d.services.is_empty());
    assert!(
        d.problems[0].message.contains("no IPv6 SNAT address"),
        "{:?}",
        d.problems
    );

    // `vmlb.io/snat-address` gives each family its own, as in a ServiceEntry file.
    let mut annotated = dual_fixture();
    annotated.metadata.annotations.as_mut().unwrap().insert(
        "vmlb.io/snat-address".into(),
        "10.10.1.126, fd00:10:10:1::126".into(),
    );
    ix.upsert_service(annotated);
    let d = ix.derive(&node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let snat: Vec<String> = d
        .services
        .iter()
        .flat_map(|s| s.spec.snat.iter().map(ToString::to_string))
        .collect();
    assert_eq!(snat, ["10.10.1.126", "fd00:10:10:1::126"]);

    // The Service becomes IPv4 only: the IPv6 address left in status is not served.
    let mut single = dual_fixture();
    let spec = single.spec.as_mut().unwrap();
    spec.ip_families = Some(vec!["IPv4".into()]);
    spec.ip_family_policy = Some("SingleStack".into());
    ix.upsert_service(single);
    let d = ix.derive(&node());
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/vms-dual/http"]);
}

#[test]
fn an_ipv6_single_stack_service_is_served_in_ipv6() {
    let mut ix = Index::default();
    let mut svc = dual_fixture();
    svc.metadata.name = Some("v6".into());
    let spec = svc.spec.as_mut().unwrap();
    spec.ip_families = Some(vec!["IPv6".into()]);
    spec.ip_family_policy = Some("SingleStack".into());
    svc.status = None;
    ix.set_pools(vec![Pool {
        name: "dual".into(),
        ranges: vec![
            parse_range("10.10.1.128/25").unwrap(),
            parse_range("fd00:10:10:1::1000/120").unwrap(),
        ],
        auto_assign: true,
        avoid_buggy_ips: false,
    }]);
    ix.upsert_service(svc.clone());
    let a = ix.allocations();
    let ips = a["default/v6"].as_ref().unwrap().ips.clone();
    assert_eq!(
        ips,
        ["fd00:10:10:1::1000".parse::<std::net::IpAddr>().unwrap()]
    );
    let mut slice = slice6_fixture();
    slice
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(vmi::SERVICE_NAME.into(), "v6".into());
    ix.upsert_slice(slice);
    ix.upsert_service(with_ip(svc, "fd00:10:10:1::1000"));
    let d = ix.derive(&dual_node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].name, "default/v6/http", "one VIP: no suffix");
    assert_eq!(d.services[0].spec.backends.len(), 2);
}

#[test]
fn dual_stack_allocation_follows_the_policy() {
    let mut ix = Index::default();
    let v4_only = Pool {
        name: "v4".into(),
        ranges: vec![parse_range("10.10.1.128/25").unwrap()],
        auto_assign: true,
        avoid_buggy_ips: false,
    };
    ix.set_pools(vec![v4_only.clone()]);
    let mk = |name: &str, policy: &str| {
        let mut s = dual_fixture();
        s.metadata.name = Some(name.into());
        s.spec.as_mut().unwrap().ip_family_policy = Some(policy.into());
        s.status = None;
        s
    };
    ix.replace_services([
        mk("require", "RequireDualStack"),
        mk("prefer", "PreferDualStack"),
    ]);
    let a = ix.allocations();
    let Err(e) = &a["default/require"] else {
        panic!("half served: {:?}", a["default/require"]);
    };
    assert!(
        e.to_string().contains("RequireDualStack: no IPv6 address"),
        "{e}"
    );
    let prefer = a["default/prefer"].as_ref().unwrap();
    assert_eq!(prefer.ips.len(), 1);
    assert!(prefer.ips[0].is_ipv4());
    assert_eq!(prefer.left_out[0].0, Family::V6);

    // With an IPv6 range both get both, and requests name one address per family.
    let mut dual = v4_only;
    dual.ranges
        .push(parse_range("fd00:10:10:1::1000-fd00:10:10:1::10ff").unwrap());
    ix.set_pools(vec![dual]);
    let mut asks = mk("asks", "RequireDualStack");
    asks.metadata.annotations = Some(BTreeMap::from([(
        LB_IPS.into(),
        "fd00:10:10:1::10aa, 10.10.1.200".into(),
    )]));
    ix.replace_services([
        mk("require", "RequireDualStack"),
        mk("prefer", "PreferDualStack"),
        asks,
    ]);
    let a = ix.allocations();
    let ips = |k: &str| -> Vec<String> {
        a[k].as_ref()
            .unwrap()
            .ips
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    // Same creation time: by name. ipFamilies order (IPv4 first) is the ingress order.
    assert_eq!(ips("default/asks"), ["10.10.1.200", "fd00:10:10:1::10aa"]);
    assert_eq!(ips("default/prefer"), ["10.10.1.128", "fd00:10:10:1::1000"]);
    assert_eq!(
        ips("default/require"),
        ["10.10.1.129", "fd00:10:10:1::1001"]
    );
}

#[test]
fn families_come_from_the_spec_or_the_request() {
    let fam = |s: &Service| ip_families(s).map(|(f, _)| f);
    let mut s = svc_fixture();
    assert_eq!(fam(&s), Ok(vec![Family::V4]));
    // Written by hand (no API server filled ipFamilies in): the request says.
    let spec = s.spec.as_mut().unwrap();
    spec.ip_families = None;
    spec.ip_family_policy = None;
    spec.load_balancer_ip = Some("fd00::5".into());
    assert_eq!(fam(&s), Ok(vec![Family::V6]));
    s.spec.as_mut().unwrap().ip_family_policy = Some("PreferDualStack".into());
    assert_eq!(fam(&s), Ok(vec![Family::V6, Family::V4]));
    s.spec.as_mut().unwrap().ip_family_policy = Some("Sometimes".into());
    assert!(fam(&s).unwrap_err().contains("spec.ipFamilyPolicy"));
    let mut bad = svc_fixture();
    bad.spec.as_mut().unwrap().ip_families = Some(vec!["IPv5".into()]);
    assert!(fam(&bad).unwrap_err().contains("IPv5"));
}

#[test]
fn vm_services_get_one_slice_per_family() {
    let mut ix = Index::default();
    let mut svc = mk_vm_service("vms", "vlan-1512", "app=httpd");
    let spec = svc.spec.as_mut().unwrap();
    spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    spec.ip_family_policy = Some("RequireDualStack".into());
    svc.status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "10.10.1.130"}, {"ip": "fd00:10:10:1::1000"}]}}))
        .unwrap(),
    );
    ix.upsert_service(svc.clone());
    let vm2: Value = fixture(include_str!("testdata/vmi-vm2-dualstack.json"));
    ix.replace_vmis([
        serde_json::to_value(mk_vmi("vm1", "httpd", "10.10.1.2", "w0")).unwrap(),
        vm2,
    ]);
    let w = ix.endpoint_work();
    assert!(w.problems.is_empty(), "{:?}", w.problems);
    let got: Vec<(String, String, Vec<String>)> = w
        .apply
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap(),
                s.address_type.clone(),
                s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "vms-vmlb".into(),
                "IPv4".into(),
                vec!["10.10.1.2".into(), "10.10.1.3".into()]
            ),
            (
                "vms-vmlb-ipv6".into(),
                "IPv6".into(),
                vec!["fd00:10:10:1::3".into()]
            ),
        ]
    );
    for s in w.apply {
        ix.upsert_slice(s);
    }
    let d = ix.derive(&dual_node());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let b: Vec<Vec<(String, u16, u32)>> = d.services.iter().map(backends).collect();
    assert_eq!(
        b,
        [
            vec![("10.10.1.2".into(), 8080, 1), ("10.10.1.3".into(), 8080, 1)],
            vec![("fd00:10:10:1::3".into(), 8080, 1)]
        ]
    );
    // Back to IPv4 only: the IPv6 slice goes.
    let mut single = svc;
    let spec = single.spec.as_mut().unwrap();
    spec.ip_families = Some(vec!["IPv4".into()]);
    spec.ip_family_policy = Some("SingleStack".into());
    ix.upsert_service(single);
    assert_eq!(ix.endpoint_work().delete, ["default/vms-vmlb-ipv6"]);
}
