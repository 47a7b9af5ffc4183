use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Value};

use super::*;
use crate::model::{HealthKind, NodeConfig, Proto};
use crate::source::kube::{
    pools::parse_range,
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
    asks.metadata.annotations = Some(BTreeMap::from([(
        LB_IPS.into(),
        "10.10.1.200, fd00::1".into(),
    )]));
    let mut legacy = fresh.clone();
    legacy.metadata.name = Some("legacy".into());
    legacy.spec.as_mut().unwrap().load_balancer_ip = Some("10.10.1.201".into());
    let mut garbage = fresh.clone();
    garbage.metadata.name = Some("garbage".into());
    garbage.metadata.annotations = Some(BTreeMap::from([(LB_IPS.into(), "ten".into())]));
    ix.replace_services([svc_fixture(), fresh, asks, legacy, garbage]);
    let a = ix.allocations();
    let ip = |k: &str| a[k].clone().map(|i| i.to_string());
    assert_eq!(
        ip("default/vms"),
        Ok("10.10.1.128".into()),
        "kept from status"
    );
    assert_eq!(ip("default/fresh"), Ok("10.10.1.129".into()));
    assert_eq!(ip("default/asks"), Ok("10.10.1.200".into()));
    assert_eq!(ip("default/legacy"), Ok("10.10.1.201".into()));
    assert!(matches!(&a["default/garbage"], Err(NoAddress::Invalid(m)) if m.contains("\"ten\"")));
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
