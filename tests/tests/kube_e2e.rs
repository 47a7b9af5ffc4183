//! `vmlb run --kubernetes` end to end: the daemon on the lab's node, fed by the scripted API
//! server (vmlb-user/tests/support/apiserver.rs, bound on the node namespace's loopback so the
//! daemon reaches it there), serving the seed's VMs to the lab's client through the VIP.
//!
//! The cluster holds what the seed's example holds: a vmlb Service with the VM annotations,
//! no address yet, and two VMIs on default/vlan-1512. The daemon must allocate 10.10.1.128
//! from the pool, write the VMs' EndpointSlice, read both back, and put the service into the
//! data path; requests to the VIP must reach both VMs, and a deleted VMI must leave. The same
//! Service made RequireDualStack, in the lab's IPv6 variant, must get an IPv6 VIP too and serve
//! it with IPv6 SNAT. Needs root and the lab's tools (scripts/bootstrap.sh).

#[path = "../../vmlb-user/tests/support/apiserver.rs"]
mod apiserver;

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use apiserver::{kubeconfig, ApiServer};
use serde_json::{json, Value};
use vmlb_tests::{
    daemon::{vmlb_bin, KubeRun},
    lab::{
        assert_logged_from, mount_bpffs, stop_group, unmount_bpffs, Httpd, Lab, LabOptions,
        NODE_ADDR, NODE_ADDR6, NODE_DEV, NODE_MAC, VIP, VIP6,
    },
    netns::Netns,
};
use vmlb_user::observe::state::{state_path, DaemonState};

const NS: &str = "vmlb-system";
const NODE: &str = "node-0";

/// The test's directory with a bpffs for the pins; removed (and unmounted) on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        Self::tagged("lab")
    }

    fn tagged(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmlb-kube-e2e-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("run")).unwrap();
        mount_bpffs(&p.join("bpf")).unwrap();
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        unmount_bpffs(&self.0.join("bpf"));
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The daemon in its own process group; stopped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let child = &mut self.0;
        if matches!(child.try_wait(), Ok(None)) {
            stop_group(child.id(), Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            let _ = child.wait();
        }
    }
}

fn vmi(name: &str, addr: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "httpd"}},
        "spec": {"networks": [{"name": "nic0", "multus": {"networkName": "default/vlan-1512"}}]},
        "status": {"phase": "Running", "nodeName": NODE,
                   "interfaces": [{"name": "nic0", "ipAddress": addr, "infoSource": "domain"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// A VMI on a dual-stack NIC, reported as KubeVirt does: every address, the link-local one too.
fn vmi_dual(name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Value {
    let mut v = vmi(name, &v4.to_string());
    v["status"]["interfaces"][0]["ipAddresses"] =
        json!([v4.to_string(), v6.to_string(), "fe80::a5:cfff:fe00:7"]);
    v
}

/// The seed's Service: vmlb's class, VMs picked by the annotations, no address yet.
fn vm_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "vms", "namespace": "default",
                     "labels": {"service.kubernetes.io/service-proxy-name": "vmlb"},
                     "annotations": {"vmlb.io/network": "default/vlan-1512", "vmlb.io/vmi-selector": "app=httpd"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "vmlb.io/vmlb",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    })
}

/// The scripted API server on the node namespace's loopback, where the daemon runs.
fn node_api(lab: &Lab, rt: &tokio::runtime::Runtime) -> ApiServer {
    let listener = {
        let _in = lab.node.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    };
    rt.block_on(ApiServer::start_on(listener))
}

/// `vmlb run --kubernetes` on the lab's node with `dir`'s kubeconfig and pools.yaml, one
/// `--snat-addr` per family; its output goes to `dir/daemon.log`.
fn run_on_node(lab: &Lab, dir: &Dir, metrics_port: u16, snat: &[IpAddr]) -> Daemon {
    let run = KubeRun {
        iface: NODE_DEV,
        xdp_mode: "native",
        snat,
        metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        dir: &dir.0,
        pools: true,
        node: NODE,
        namespace: NS,
    };
    Daemon(
        run.spawn(lab.node.command(vmlb_bin()), &dir.0.join("daemon.log"))
            .expect("spawning vmlb run"),
    )
}

/// Stops the daemon as its DaemonSet would (SIGTERM to the group) and asserts a clean exit
/// that released the node Lease.
fn clean_stop(mut daemon: Daemon, api: &ApiServer, log: &Path) {
    stop_group(daemon.0.id(), Duration::from_secs(10), || {
        matches!(daemon.0.try_wait(), Ok(Some(_)))
    });
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "vmlb exited with {status}:\n{}",
        fs::read_to_string(log).unwrap_or_default()
    );
    assert!(api
        .get("leases", "coordination.k8s.io/v1", NS, "vmlb-node-node-0")
        .is_none());
}

/// Which VMs answer `n` requests to `vip` (connection failures count as "-"). The query
/// says the family, so access logs tell the families' requests apart.
fn answers(lab: &Lab, vip: IpAddr, n: usize) -> BTreeSet<String> {
    let (flag, url) = match vip {
        IpAddr::V4(a) => ("-4", format!("http://{a}/?t=v4")),
        IpAddr::V6(a) => ("-6", format!("http://[{a}]/?t=v6")),
    };
    (0..n)
        .map(|_| {
            lab.client
                .exec(&["curl", flag, "-sS", "--max-time", "2", &url])
                .map_or_else(
                    |_| "-".into(),
                    |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
                )
        })
        .collect()
}

/// Prints the daemon's output when the test panics (`api.wait_for` does not know it).
struct LogOnPanic<'a>(&'a Path);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "vmlb's output:\n{}",
                fs::read_to_string(self.0).unwrap_or_default()
            );
        }
    }
}

/// The Service's `status.loadBalancer.ingress` IPs, in order.
fn ingress_ips(svc: &Value) -> Vec<String> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(String::from))
        .collect()
}

/// An EndpointSlice's endpoint addresses, sorted.
fn slice_addrs(slice: &Value) -> BTreeSet<String> {
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

/// The VIPs the node owns, as the daemon's state file says (none before it is written).
fn owned_vips(dir: &Dir) -> BTreeSet<IpAddr> {
    fs::read_to_string(state_path(&dir.0.join("run"), NODE_DEV))
        .ok()
        .and_then(|t| serde_json::from_str::<DaemonState>(&t).ok())
        .map(|s| s.owned_vips.into_iter().collect())
        .unwrap_or_default()
}

/// Polls `cond` (another process's state: nothing to await) for at most `secs`.
fn eventually(secs: u64, what: &str, log: &Path, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; vmlb's output:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vmlb_run_serves_the_clusters_vms_through_the_vip() {
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _ = vmlb_bin();
    let lab = Lab::new().expect("building the lab");
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).unwrap())
        .collect();
    let dir = Dir::new();

    let api = node_api(&lab, &rt);
    api.put("services", vm_service());
    for vm in &lab.vms {
        api.put(
            "virtualmachineinstances",
            vmi(vm.name, &vm.addr.to_string()),
        );
    }
    fs::write(dir.0.join("kubeconfig"), api.kubeconfig(NS)).unwrap();
    fs::write(
        dir.0.join("pools.yaml"),
        "apiVersion: vmlb.io/v1alpha1\nkind: IPAddressPool\nmetadata: {name: vlan-1512-pool}\nspec: {addresses: [10.10.1.128/25]}\n",
    )
    .unwrap();

    let log = dir.0.join("daemon.log");
    let daemon = run_on_node(&lab, &dir, 19534, &[NODE_ADDR.into()]);

    eprintln!("{:?}: daemon started", t0.elapsed());
    // The leader allocated the seed's VIP and wrote the VMs' slice.
    let svc = rt.block_on(api.wait_for(30, "the VIP in the Service's status", |a| {
        let s = a.get("services", "v1", "default", "vms")?;
        (s["status"]["loadBalancer"]["ingress"][0]["ip"] == VIP.to_string()).then_some(s)
    }));
    assert_eq!(svc["status"]["conditions"][0]["status"], "True");
    let slice = rt.block_on(api.wait_for(10, "the VMs' EndpointSlice", |a| {
        a.get(
            "endpointslices",
            "discovery.k8s.io/v1",
            "default",
            "vms-vmlb",
        )
    }));
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 2);

    eprintln!("{:?}: status and slice written", t0.elapsed());
    // Requests through the VIP reach both VMs.
    let both: BTreeSet<String> = ["vm1", "vm2"].map(String::from).into();
    eventually(20, "both VMs to answer through the VIP", &log, || {
        answers(&lab, VIP.into(), 12) == both
    });
    assert!(api
        .get("leases", "coordination.k8s.io/v1", NS, "vmlb-node-node-0")
        .is_some());
    // The only node owns the VIP (state file; ready for the data path's ARP answering).
    let state = fs::read_to_string(state_path(&dir.0.join("run"), NODE_DEV)).unwrap();
    let state: DaemonState = serde_json::from_str(&state).unwrap();
    assert_eq!(state.owned_vips, [std::net::IpAddr::from(VIP)], "{state:?}");

    eprintln!("{:?}: both VMs answer", t0.elapsed());
    // A VMI goes away: its endpoint leaves the slice, the model and the data path.
    api.delete(
        "virtualmachineinstances",
        "kubevirt.io/v1",
        "default",
        "vm2",
    );
    let only: BTreeSet<String> = ["vm1".to_string()].into();
    eventually(20, "vm2 to leave", &log, || {
        answers(&lab, VIP.into(), 16) == only
    });

    eprintln!("{:?}: vm2 left", t0.elapsed());
    // A clean stop releases the node Lease.
    clean_stop(daemon, &api, &log);
}

/// A dual-stack Service (RequireDualStack) in the lab's IPv6 variant: a VIP per family from
/// the pools, a slice per family from the VMIs' addresses, both VIPs owned, and `curl -6`
/// through the IPv6 VIP reaching both VMs from the node's IPv6 SNAT address while IPv4 keeps
/// working. Nothing static on the client: it learns the IPv6 VIP's MAC only from vmlb's
/// neighbour advertisements (the node has no such address, and no proxy NDP).
#[test]
fn vmlb_run_serves_a_dual_stack_service_through_both_vips() {
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _ = vmlb_bin();
    // Drop order (reverse of declaration): daemon, API server, pins, servers, lab.
    let lab = Lab::with(LabOptions {
        ipv6: true,
        ..Default::default()
    })
    .expect("building the IPv6 lab");
    // Each VM's httpd listens on its IPv6 address too.
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start_vm(vm).unwrap())
        .collect();
    let dir = Dir::tagged("lab6");

    let api = node_api(&lab, &rt);
    let mut svc = vm_service();
    svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    api.put("services", svc);
    for vm in &lab.vms {
        let v6 = vm.addr6.expect("an IPv6 lab VM");
        api.put("virtualmachineinstances", vmi_dual(vm.name, vm.addr, v6));
    }
    fs::write(dir.0.join("kubeconfig"), api.kubeconfig(NS)).unwrap();
    // The allocator gives each family the lowest free address of its ranges: the IPv6 range
    // starts at the lab's VIP6.
    fs::write(
        dir.0.join("pools.yaml"),
        format!(
            "apiVersion: vmlb.io/v1alpha1\nkind: IPAddressPool\nmetadata: {{name: vlan-1512-pool}}\n\
             spec: {{addresses: [10.10.1.128/25, \"{VIP6}-fd00:10:10:1::12f\"]}}\n"
        ),
    )
    .unwrap();

    let log = dir.0.join("daemon.log");
    let _log_on_panic = LogOnPanic(&log);
    let daemon = run_on_node(&lab, &dir, 19536, &[NODE_ADDR.into(), NODE_ADDR6.into()]);

    // One VIP per family, primary (IPv4) first.
    let svc = rt.block_on(api.wait_for(30, "both VIPs in the Service's status", |a| {
        let s = a.get("services", "v1", "default", "vms")?;
        (ingress_ips(&s) == [VIP.to_string(), VIP6.to_string()]).then_some(s)
    }));
    assert_eq!(svc["status"]["conditions"][0]["status"], "True");
    // One slice per family; the link-local address never becomes an endpoint.
    let v4: BTreeSet<String> = lab.vms.iter().map(|vm| vm.addr.to_string()).collect();
    let v6: BTreeSet<String> = lab
        .vms
        .iter()
        .filter_map(|vm| vm.addr6.map(|a| a.to_string()))
        .collect();
    for (name, family, want) in [("vms-vmlb", "IPv4", &v4), ("vms-vmlb-ipv6", "IPv6", &v6)] {
        rt.block_on(
            api.wait_for(10, &format!("the {family} EndpointSlice"), |a| {
                let s = a.get("endpointslices", "discovery.k8s.io/v1", "default", name)?;
                (s["addressType"] == family && slice_addrs(&s) == *want).then_some(())
            }),
        );
    }
    eprintln!("{:?}: status and both slices written", t0.elapsed());

    let both_vips: BTreeSet<IpAddr> = [VIP.into(), VIP6.into()].into();
    eventually(10, "the node to own both VIPs", &log, || {
        owned_vips(&dir) == both_vips
    });
    let both: BTreeSet<String> = ["vm1", "vm2"].map(String::from).into();
    eventually(20, "both VMs to answer through the IPv6 VIP", &log, || {
        answers(&lab, VIP6.into(), 12) == both
    });
    eventually(20, "both VMs to answer through the IPv4 VIP", &log, || {
        answers(&lab, VIP.into(), 12) == both
    });
    eprintln!("{:?}: both VMs answer on both VIPs", t0.elapsed());

    // Every request reached the VMs from the node's SNAT address of its family.
    assert_logged_from(&servers, "t=v6", NODE_ADDR6);
    assert_logged_from(&servers, "t=v4", NODE_ADDR);
    // The client learned the IPv6 VIP's MAC through neighbour discovery, from vmlb; nothing
    // was pinned on either side.
    let neigh = |ns: &Netns, args: &[&str]| {
        let out = ns.ip(args).expect("ip -6 neigh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let vip6 = VIP6.to_string();
    let entry = neigh(&lab.client, &["-6", "neigh", "show", &vip6]);
    assert!(
        entry.contains(NODE_MAC),
        "the client's neighbour entry for {vip6}: {entry:?}"
    );
    for ns in [&lab.client, &lab.node] {
        let all = neigh(ns, &["-6", "neigh", "show"]);
        assert!(!all.contains("PERMANENT"), "{}: {all}", ns.name());
    }

    clean_stop(daemon, &api, &log);
    eprintln!("{:?}: stopped cleanly", t0.elapsed());
}

/// One node of the two-node test: a namespace with a veth pair to attach to (no addresses:
/// nothing is sent), its own pins and run dir, a daemon on the shared scripted cluster.
/// Field order is drop order: daemon, then pins, then the namespace.
struct Node {
    daemon: Daemon,
    dir: Dir,
    _ns: Netns,
    log: PathBuf,
}

const NODE_IFACE: &str = "k0";

impl Node {
    fn start(name: &str, api: &ApiServer, rt: &tokio::runtime::Runtime) -> Node {
        let ns = Netns::new(name).unwrap();
        ns.ip(&[
            "link", "add", NODE_IFACE, "type", "veth", "peer", "name", "k1",
        ])
        .unwrap();
        ns.ip(&["link", "set", NODE_IFACE, "up"]).unwrap();
        ns.ip(&["link", "set", "k1", "up"]).unwrap();
        let dir = Dir::tagged(name);
        let listener = {
            let _in = ns.enter().unwrap();
            std::net::TcpListener::bind("127.0.0.1:0").unwrap()
        };
        let url = {
            let _rt = rt.enter();
            api.serve_also(listener)
        };
        fs::write(dir.0.join("kubeconfig"), kubeconfig(&url, NS)).unwrap();
        let log = dir.0.join("daemon.log");
        let run = KubeRun {
            iface: NODE_IFACE,
            xdp_mode: "skb",
            snat: &[IpAddr::V4(NODE_ADDR)],
            metrics: SocketAddr::from(([127, 0, 0, 1], 19535)),
            dir: &dir.0,
            pools: false,
            node: name,
            namespace: NS,
        };
        let child = run
            .spawn(ns.command(vmlb_bin()), &log)
            .expect("spawning vmlb run");
        Node {
            daemon: Daemon(child),
            dir,
            _ns: ns,
            log,
        }
    }

    fn state(&self) -> Option<DaemonState> {
        let text = fs::read_to_string(state_path(&self.dir.0.join("run"), NODE_IFACE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every service's backend addresses, by name.
    fn backends(&self) -> Vec<(String, Vec<String>)> {
        self.state()
            .map(|s| {
                s.services
                    .iter()
                    .map(|v| {
                        (
                            v.name.clone(),
                            v.backends.iter().map(|b| b.addr.to_string()).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The VIPs it owns, as its state file says.
    fn owned(&self) -> Option<BTreeSet<String>> {
        Some(
            self.state()?
                .owned_vips
                .iter()
                .map(ToString::to_string)
                .collect(),
        )
    }
}

fn vip(i: u8) -> String {
    format!("10.10.1.{}", 128 + i)
}

fn slice_of(svc: &str, addrs: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{svc}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

/// Two daemons on one scripted cluster: equal Maglev digests although they numbered their
/// backends differently, the VIPs split between them, and when one is killed (no clean
/// release) the other owns every VIP within the lease duration. The data path does not
/// answer ARP yet, so ownership is read from the daemons' state files, and no traffic is sent.
#[test]
fn two_nodes_agree_and_the_survivor_takes_every_vip() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _ = vmlb_bin();
    let api = {
        let _rt = rt.enter();
        rt.block_on(ApiServer::start())
    };
    const N: u8 = 6;
    for i in 0..N {
        let name = format!("s{i}");
        api.put("services", json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "vmlb.io/vmlb",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": vip(i)}]}},
        }));
        // Node a first sees another backend, so it numbers the final ones differently.
        api.put("endpointslices", slice_of(&name, &["10.10.1.9"]));
    }
    let a = Node::start("node-a", &api, &rt);
    eventually(30, "node a to serve the first backends", &a.log, || {
        let b = a.backends();
        b.len() == N as usize && b.iter().all(|(_, be)| be == &["10.10.1.9"])
    });
    for i in 0..N {
        api.put(
            "endpointslices",
            slice_of(&format!("s{i}"), &["10.10.1.2", "10.10.1.3"]),
        );
    }
    let fin = |n: &Node| {
        let b = n.backends();
        b.len() == N as usize && b.iter().all(|(_, be)| be == &["10.10.1.2", "10.10.1.3"])
    };
    eventually(10, "node a to serve the final backends", &a.log, || fin(&a));
    let b = Node::start("node-b", &api, &rt);
    eventually(30, "node b to serve the final backends", &b.log, || fin(&b));

    // Equal digests, different ids.
    let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
    for (x, y) in sa.services.iter().zip(&sb.services) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.maglev_digest.len(), 16);
        assert_eq!(
            x.maglev_digest, y.maglev_digest,
            "{}: the nodes' tables differ",
            x.name
        );
    }
    let ids = |s: &DaemonState| {
        s.services
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.id))
            .collect::<Vec<_>>()
    };
    assert_ne!(
        ids(&sa),
        ids(&sb),
        "the histories should have numbered the backends differently"
    );

    // The VIPs are split, each to exactly one node.
    let all: BTreeSet<String> = (0..N).map(vip).collect();
    let split = || match (a.owned(), b.owned()) {
        (Some(x), Some(y)) => {
            x.is_disjoint(&y)
                && x.union(&y).cloned().collect::<BTreeSet<_>>() == all
                && !x.is_empty()
                && !y.is_empty()
        }
        _ => false,
    };
    eventually(20, "the VIPs to be split between the nodes", &b.log, split);

    // Kill a (no Lease release): b takes over once a's Lease runs out (1.5 s by default).
    let mut a = a;
    let killed = Instant::now();
    // SAFETY: kill(2) on the daemon's own process group (it leads it).
    unsafe { libc::kill(-(a.daemon.0.id() as i32), libc::SIGKILL) };
    let _ = a.daemon.0.wait();
    // Polled every 20 ms: the measurement's resolution.
    while b.owned().as_ref() != Some(&all) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "node b never took every VIP:\n{}",
            fs::read_to_string(&b.log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    eprintln!("takeover after SIGKILL: {took:?} (1.5 s lease)");
    assert!(took < Duration::from_millis(2500), "takeover took {took:?}");
}
