//! The Kubernetes source against a scripted API server on loopback (tests/support/apiserver.rs):
//! real list/watch over HTTP, 410 Gone, status and EndpointSlice writes, Events, Leases.

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::apiserver::ApiServer;
use vmlb_user::{
    model::{ConfiguredService, NodeConfig},
    source::kube::{ownership::Timing, pools::parse_range, pools::Pool, KubeSource, Options},
};

const NS: &str = "vmlb-system";

fn client(s: &ApiServer) -> kube::Client {
    let mut cfg = kube::Config::new(s.url().parse().unwrap());
    cfg.default_namespace = NS.into();
    kube::Client::try_from(cfg).unwrap()
}

fn node() -> NodeConfig {
    NodeConfig {
        snat: Some("10.10.1.125".parse().unwrap()),
        ..Default::default()
    }
}

/// Fast Leases so that the tests take a second, not a minute. The 600 ms between "a node
/// stops" and "the others start" is what a starved 2-CPU test machine needs (the trackers and
/// the watch may each lag by 100 ms and more).
fn fast() -> Timing {
    Timing {
        lease_duration: Duration::from_millis(1000),
        renew_every: Duration::from_millis(100),
        renew_deadline: Duration::from_millis(400),
    }
}

fn opts(name: &str) -> Options {
    let mut o = Options::new(name, NS, node());
    o.timing = fast();
    o.leader_timing = fast();
    o.pools = vec![Pool {
        name: "vlan-1512-pool".into(),
        ranges: vec![parse_range("10.10.1.128/25").unwrap()],
        auto_assign: true,
        avoid_buggy_ips: false,
    }];
    o
}

fn service(name: &str, ip: Option<&str>, annotations: Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations,
                     "labels": {"service.kubernetes.io/service-proxy-name": "vmlb"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "vmlb.io/vmlb",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    });
    if let Some(ip) = ip {
        s["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
    }
    s
}

fn slice(name: &str, service: &str, addrs: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

fn vmi(name: &str, addr: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "httpd"}},
        "spec": {"networks": [{"name": "nic0", "multus": {"networkName": "default/vlan-1512"}}]},
        "status": {"phase": "Running", "nodeName": "worker-0",
                   "interfaces": [{"name": "nic0", "ipAddress": addr, "infoSource": "domain"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

type History = Arc<Mutex<Vec<Option<Vec<ConfiguredService>>>>>;

/// Records every value the source publishes.
fn record(src: &KubeSource) -> History {
    let hist: History = Arc::default();
    let (mut rx, h) = (src.services.clone(), hist.clone());
    tokio::spawn(async move {
        loop {
            h.lock().unwrap().push(rx.borrow_and_update().clone());
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    hist
}

/// Waits for the published services to satisfy `cond`.
async fn services_until(
    src: &KubeSource,
    what: &str,
    cond: impl Fn(&[ConfiguredService]) -> bool,
) -> Vec<ConfiguredService> {
    let mut rx = src.services.clone();
    let got = match tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|v| v.as_ref().is_some_and(|v| cond(v))),
    )
    .await
    {
        Ok(Ok(v)) => v.clone(),
        _ => panic!(
            "timed out waiting for {what}; have {:?}",
            *src.services.borrow()
        ),
    };
    got.unwrap()
}

fn backends(s: &ConfiguredService) -> Vec<String> {
    s.spec.backends.iter().map(|b| b.addr.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_feed_the_model_and_a_410_relists_without_dropping_it() {
    let api = ApiServer::start().await;
    api.put("services", service("vms", Some("10.10.1.128"), json!({})));
    api.put(
        "endpointslices",
        slice("vms-1", "vms", &["10.10.1.2", "10.10.1.3"]),
    );
    let mut other = service("metallb", Some("10.10.1.200"), json!({}));
    other["spec"]["loadBalancerClass"] = Value::Null;
    api.put("services", other);

    let src = KubeSource::start(client(&api), opts("worker-0"));
    let hist = record(&src);
    let got = services_until(&src, "the Service", |s| s.len() == 1).await;
    assert_eq!(got[0].name, "default/vms/http");
    assert_eq!(got[0].spec.vip.to_string(), "10.10.1.128");
    assert_eq!(backends(&got[0]), ["10.10.1.2", "10.10.1.3"]);

    // Every watch is told 410 Gone; meanwhile a backend goes away. The re-list must bring the
    // change without ever publishing a state without the Service.
    api.expire_watches();
    api.put("endpointslices", slice("vms-1", "vms", &["10.10.1.2"]));
    services_until(&src, "the re-listed slice", |s| {
        s.len() == 1 && backends(&s[0]) == ["10.10.1.2"]
    })
    .await;
    let relists = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/apis/discovery.k8s.io/v1/endpointslices")
        .count();
    assert!(
        relists >= 2,
        "the slices were listed {relists} time(s): no re-list"
    );
    let h = hist.lock().unwrap().clone();
    let first = h.iter().position(Option::is_some).unwrap();
    assert!(h[..first].iter().all(Option::is_none));
    assert!(
        h[first..]
            .iter()
            .all(|v| v.as_ref().is_some_and(|v| v.len() == 1)),
        "the Service was dropped during the re-list: {h:?}"
    );

    api.delete("services", "v1", "default", "vms");
    services_until(&src, "the Service to go", |s| s.is_empty()).await;
    src.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_allocates_writes_slices_and_reports_bad_objects() {
    let api = ApiServer::start().await;
    let vm_ann =
        json!({"vmlb.io/network": "default/vlan-1512", "vmlb.io/vmi-selector": "app=httpd"});
    api.put("services", service("vms", None, vm_ann));
    api.put("virtualmachineinstances", vmi("vm1", "10.10.1.2"));
    api.put("virtualmachineinstances", vmi("vm2", "10.10.1.3"));
    api.put(
        "services",
        service("typo", None, json!({"vmlb.io/health-intervall": "2s"})),
    );
    api.put(
        "services",
        service(
            "outside",
            None,
            json!({"vmlb.io/loadBalancerIPs": "192.0.2.1"}),
        ),
    );

    let src = KubeSource::start(client(&api), opts("worker-0"));
    // The VIP goes to status, the VMs into the slice, the slice back through the watch into
    // the model: the whole loop.
    let got = services_until(&src, "the VM service", |s| {
        s.iter()
            .any(|s| s.name == "default/vms/http" && s.spec.backends.len() == 2)
    })
    .await;
    let vms = got.iter().find(|s| s.name == "default/vms/http").unwrap();
    assert_eq!(vms.spec.vip.to_string(), "10.10.1.128");
    assert_eq!(backends(vms), ["10.10.1.2", "10.10.1.3"]);
    assert!(*src.leader.borrow(), "a single node leads");

    let svc = api.get("services", "v1", "default", "vms").unwrap();
    let cond = |s: &Value, t: &str| {
        s["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(cond(&svc, "vmlb.io/AddressAllocated")["status"], "True");
    let slice = api
        .get(
            "endpointslices",
            "discovery.k8s.io/v1",
            "default",
            "vms-vmlb",
        )
        .unwrap();
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "vmlb.io/endpoint-controller"
    );
    assert_eq!(
        slice["metadata"]["ownerReferences"][0]["uid"],
        svc["metadata"]["uid"]
    );
    assert_eq!(slice["endpoints"][0]["nodeName"], "worker-0");

    // The typo is skipped, gets an address anyway (it is a valid request), a False Valid
    // condition and one Warning Event; the out-of-pool request gets no address and an Event.
    let typo = api
        .wait_for(10, "the typo's condition", |a| {
            let s = a.get("services", "v1", "default", "typo")?;
            (cond(&s, "vmlb.io/Valid")["status"] == "False").then_some(s)
        })
        .await;
    assert!(cond(&typo, "vmlb.io/Valid")["message"]
        .as_str()
        .unwrap()
        .contains("health-intervall"));
    let outside = api
        .wait_for(10, "the out-of-pool condition", |a| {
            let s = a.get("services", "v1", "default", "outside")?;
            (cond(&s, "vmlb.io/AddressAllocated")["status"] == "False").then_some(s)
        })
        .await;
    assert!(cond(&outside, "vmlb.io/AddressAllocated")["message"]
        .as_str()
        .unwrap()
        .contains("192.0.2.1 is in no vmlb address pool"));
    assert_eq!(outside["status"]["loadBalancer"]["ingress"], json!([]));
    let events = api
        .wait_for(10, "two Events", |a| {
            let e = a.list("events");
            (e.len() >= 2).then_some(e)
        })
        .await;
    let reasons: BTreeSet<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["regarding"]["name"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        reasons.contains(&("typo".into(), "Invalid".into())),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("outside".into(), "AllocationFailed".into())),
        "{reasons:?}"
    );
    assert!(
        !got.iter().any(|s| s.name.starts_with("default/typo")),
        "a malformed Service is not served"
    );

    // A VMI goes away: the slice follows, and so does the model.
    api.delete(
        "virtualmachineinstances",
        "kubevirt.io/v1",
        "default",
        "vm2",
    );
    services_until(&src, "vm2 to leave", |s| {
        s.iter()
            .any(|s| s.name == "default/vms/http" && backends(s) == ["10.10.1.2"])
    })
    .await;
    // Nothing is written over and over: the Events were posted once each.
    let posted = api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("/events"))
        .count();
    assert_eq!(posted, api.list("events").len());
    src.shutdown().await;
}

fn vmi_dual(name: &str, v4: &str, v6: &str) -> Value {
    let mut v = vmi(name, v4);
    // As KubeVirt reports a dual-stack NIC: every address, the link-local one too.
    v["status"]["interfaces"][0]["ipAddresses"] = json!([v4, v6, "fe80::a5:cfff:fe00:7"]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_service_gets_a_vip_and_endpoints_per_family() {
    let api = ApiServer::start().await;
    let vm_ann =
        json!({"vmlb.io/network": "default/vlan-1512", "vmlb.io/vmi-selector": "app=httpd"});
    let mut dual = service("dual", None, vm_ann);
    dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    dual["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    api.put("services", dual);
    // RequireDualStack from a pool without IPv6: no address at all, and a Warning Event.
    let mut half = service("half", None, json!({"vmlb.io/address-pool": "v4-only"}));
    half["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    half["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    api.put("services", half);
    api.put(
        "virtualmachineinstances",
        vmi_dual("vm1", "10.10.1.2", "fd00:10:10:1::2"),
    );
    api.put(
        "virtualmachineinstances",
        vmi_dual("vm2", "10.10.1.3", "fd00:10:10:1::3"),
    );

    let mut o = opts("worker-0");
    o.node.snat6 = Some("fd00:10:10:1::125".parse().unwrap());
    o.pools = vec![
        Pool {
            name: "vlan-1512-pool".into(),
            ranges: vec![
                parse_range("10.10.1.128/25").unwrap(),
                parse_range("fd00:10:10:1::1000/120").unwrap(),
            ],
            auto_assign: true,
            avoid_buggy_ips: false,
        },
        Pool {
            name: "v4-only".into(),
            ranges: vec![parse_range("10.10.2.0/24").unwrap()],
            auto_assign: false,
            avoid_buggy_ips: false,
        },
    ];
    let src = KubeSource::start(client(&api), o);
    // Both VIPs to status, both slices written, both back through the watch into the model.
    let got = services_until(&src, "both families with their VMs", |s| {
        s.iter().filter(|s| s.spec.backends.len() == 2).count() == 2
    })
    .await;
    let view: Vec<(&str, String, Vec<String>)> = got
        .iter()
        .map(|s| (s.name.as_str(), s.spec.vip.to_string(), backends(s)))
        .collect();
    assert_eq!(
        view,
        [
            (
                "default/dual/http@10.10.1.128",
                "10.10.1.128".to_string(),
                vec!["10.10.1.2".to_string(), "10.10.1.3".to_string()]
            ),
            (
                "default/dual/http@fd00:10:10:1::1000",
                "fd00:10:10:1::1000".to_string(),
                vec!["fd00:10:10:1::2".to_string(), "fd00:10:10:1::3".to_string()]
            ),
        ],
        "the half-servable Service is not served"
    );
    let snat: Vec<String> = got[1].spec.snat.iter().map(ToString::to_string).collect();
    assert_eq!(snat, ["fd00:10:10:1::125"]);

    let svc = api.get("services", "v1", "default", "dual").unwrap();
    let ingress: Vec<&str> = svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ingress, ["10.10.1.128", "fd00:10:10:1::1000"]);
    for (name, family, addr) in [
        ("dual-vmlb", "IPv4", "10.10.1.2"),
        ("dual-vmlb-ipv6", "IPv6", "fd00:10:10:1::2"),
    ] {
        let slice = api
            .get("endpointslices", "discovery.k8s.io/v1", "default", name)
            .unwrap_or_else(|| panic!("slice {name}"));
        assert_eq!(slice["addressType"], family);
        assert_eq!(slice["endpoints"][0]["addresses"], json!([addr]));
    }

    let cond = |s: &Value, t: &str| {
        s["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or(Value::Null)
    };
    let half = api
        .wait_for(10, "the RequireDualStack failure", |a| {
            let s = a.get("services", "v1", "default", "half")?;
            (cond(&s, "vmlb.io/AddressAllocated")["status"] == "False").then_some(s)
        })
        .await;
    let msg = cond(&half, "vmlb.io/AddressAllocated")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("RequireDualStack: no IPv6 address") && msg.contains("neither family"),
        "{msg}"
    );
    assert_eq!(half["status"]["loadBalancer"]["ingress"], json!([]));
    api.wait_for(10, "the AllocationFailed Event", |a| {
        a.list("events")
            .into_iter()
            .find(|e| e["regarding"]["name"] == "half" && e["reason"] == "AllocationFailed")
    })
    .await;

    // The only node owns both VIPs: the IPv6 one is answered (neighbour advertisements) too.
    let mut owned = src.owned.clone();
    let want: BTreeSet<IpAddr> = ["10.10.1.128", "fd00:10:10:1::1000"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    tokio::time::timeout(Duration::from_secs(10), owned.wait_for(|o| *o == want))
        .await
        .expect("the node to own both VIPs")
        .unwrap();
    src.shutdown().await;
}

/// Both nodes' owned sets, with the instant each changed.
/// (when the tracker saw it, node, owned set); a watch so that tests can await entries. The
/// margin between "a stops" and "b starts" (600 ms with `fast()`) dwarfs the trackers' lag.
type Owned = Arc<tokio::sync::watch::Sender<Vec<(Instant, &'static str, BTreeSet<IpAddr>)>>>;

fn track(src: &KubeSource, who: &'static str, log: &Owned) {
    let (mut rx, log) = (src.owned.clone(), log.clone());
    tokio::spawn(async move {
        loop {
            let set = rx.borrow_and_update().clone();
            log.send_modify(|l| l.push((Instant::now(), who, set)));
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
}

/// Waits, on both nodes' owned channels, until `cond` holds.
async fn until(a: &KubeSource, b: &KubeSource, what: &str, cond: impl Fn() -> bool) {
    let (mut ra, mut rb) = (a.owned.clone(), b.owned.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        let changed = async {
            tokio::select! {
                r = ra.changed() => r,
                r = rb.changed() => r,
            }
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(Ok(())) => {}
            _ => panic!("timed out waiting for {what}"),
        }
    }
}

/// When the tracker first saw `who` in a state that satisfies `cond` after `cut`.
async fn logged(
    log: &Owned,
    cut: Instant,
    who: &str,
    cond: impl Fn(&BTreeSet<IpAddr>) -> bool,
) -> Instant {
    let find = |l: &Vec<(Instant, &'static str, BTreeSet<IpAddr>)>| {
        l.iter()
            .find(|(t, w, s)| *t >= cut && *w == who && cond(s))
            .map(|e| e.0)
    };
    let mut rx = log.subscribe();
    let l = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|l| find(l).is_some()))
        .await
        .expect("the tracker logs the change")
        .unwrap();
    find(&l).unwrap()
}

/// Replays the log: at no point do both nodes answer for the same VIP.
fn never_both(log: &Owned) {
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    let l = log.borrow();
    let t0 = l[0].0;
    for (_, who, set) in l.iter() {
        if *who == "a" {
            a = set.clone()
        } else {
            b = set.clone()
        }
        let shown: Vec<_> = l.iter().map(|(t, w, s)| (*t - t0, *w, s.len())).collect();
        assert!(
            a.is_disjoint(&b),
            "both nodes own {:?}; log {shown:?}",
            a.intersection(&b).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_ownership_moves_when_a_node_cannot_renew_and_when_it_leaves() {
    let api = ApiServer::start().await;
    let vips: BTreeSet<IpAddr> = (128..136)
        .map(|i| Ipv4Addr::new(10, 10, 1, i).into())
        .collect();
    for (i, v) in vips.iter().enumerate() {
        api.put(
            "services",
            service(&format!("s{i}"), Some(&v.to_string()), json!({})),
        );
    }
    let a = KubeSource::start(client(&api), opts("a"));
    let b = KubeSource::start(client(&api), opts("b"));
    let log: Owned = Arc::new(tokio::sync::watch::channel(Vec::new()).0);
    track(&a, "a", &log);
    track(&b, "b", &log);
    let split = |a: &KubeSource, b: &KubeSource| {
        let (oa, ob) = (a.owned.borrow().clone(), b.owned.borrow().clone());
        !oa.is_empty() && !ob.is_empty() && oa.len() + ob.len() == vips.len()
    };
    until(&a, &b, "the VIPs to be split", || split(&a, &b)).await;
    let a_share = a.owned.borrow().clone();

    // `a`'s renewals fail: it must let go first, then `b` takes everything.
    let cut = Instant::now();
    api.fail_writes("leases/vmlb-node-a");
    until(&a, &b, "b to own every VIP", || *b.owned.borrow() == vips).await;
    let took = cut.elapsed();
    assert!(a.owned.borrow().is_empty());
    assert!(
        took < fast().lease_duration + fast().renew_every * 3,
        "takeover took {took:?}"
    );
    let a_stopped = logged(&log, cut, "a", |s| s.is_empty()).await;
    let b_took = logged(&log, cut, "b", |s| s.is_superset(&a_share)).await;
    assert!(a_stopped <= b_took, "b took a's VIPs before a let go");
    eprintln!(
        "takeover after renewals stopped: {took:?} (a stopped after {:?})",
        a_stopped - cut
    );

    // Renewals work again: `a` gets its share back.
    api.heal();
    until(&a, &b, "a to get its VIPs back", || {
        *a.owned.borrow() == a_share
    })
    .await;

    // A clean shutdown deletes the Lease: `b` takes over without waiting for expiry.
    let t = Instant::now();
    let mut b_owned = b.owned.clone();
    a.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), b_owned.wait_for(|o| *o == vips))
        .await
        .expect("b to own every VIP again")
        .unwrap();
    assert!(
        t.elapsed() < fast().lease_duration,
        "took {:?}",
        t.elapsed()
    );
    assert!(api
        .get("leases", "coordination.k8s.io/v1", NS, "vmlb-node-a")
        .is_none());
    never_both(&log);
    b.shutdown().await;
}

/// A real cluster speaks HTTPS: building a client for one must work (rustls needs its crypto
/// provider chosen at build time; a missing one panics only when the first TLS client is made).
#[tokio::test]
async fn a_client_for_an_https_api_server_can_be_built() {
    let cfg = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    kube::Client::try_from(cfg).expect("an HTTPS client");
}
