//! `vmlb run --kubernetes` end to end: the daemon on the lab's node, fed by the scripted API
//! server (vmlb-user/tests/support/apiserver.rs, bound on the node namespace's loopback so the
//! daemon reaches it there), serving the seed's VMs to the lab's client through the VIP.
//!
//! The cluster holds what the seed's example holds: a vmlb Service with the VM annotations,
//! no address yet, and two VMIs on default/vlan-1512. The daemon must allocate 10.10.1.128
//! from the pool, write the VMs' EndpointSlice, read both back, and put the service into the
//! data path; requests to the VIP must reach both VMs, and a deleted VMI must leave. Needs root
//! and the lab's tools (scripts/bootstrap.sh).

#[path = "../../vmlb-user/tests/support/apiserver.rs"]
mod apiserver;

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use apiserver::{kubeconfig, ApiServer};
use serde_json::{json, Value};
use vmlb_tests::{
    daemon::vmlb_bin,
    lab::{curl, mount_bpffs, stop_group, unmount_bpffs, Httpd, Lab, NODE_ADDR, NODE_DEV, VIP},
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

/// Which VMs answer `n` requests to the VIP (connection failures count as "-").
fn answers(lab: &Lab, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            curl(&lab.client, &format!("http://{VIP}/"), 2)
                .map_or_else(|_| "-".into(), |b| b.trim().to_string())
        })
        .collect()
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
    let bin = vmlb_bin();
    let lab = Lab::new().expect("building the lab");
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).unwrap())
        .collect();
    let dir = Dir::new();

    // The API server listens on the node namespace's loopback, where the daemon runs.
    let listener = {
        let _in = lab.node.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    };
    let api = rt.block_on(ApiServer::start_on(listener));
    api.put("services", json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "vms", "namespace": "default",
                     "labels": {"service.kubernetes.io/service-proxy-name": "vmlb"},
                     "annotations": {"vmlb.io/network": "default/vlan-1512", "vmlb.io/vmi-selector": "app=httpd"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "vmlb.io/vmlb",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    }));
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
    let out = fs::File::create(&log).unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], 19534));
    let mut daemon = Daemon(
        lab.node
            .command(bin)
            .args([
                "run",
                "--kubernetes",
                "--iface",
                NODE_DEV,
                "--xdp-mode",
                "native",
            ])
            .args([
                "--snat-addr",
                &NODE_ADDR.to_string(),
                "--metrics-addr",
                &metrics.to_string(),
            ])
            .arg("--pin-dir")
            .arg(dir.0.join("bpf"))
            .arg("--run-dir")
            .arg(dir.0.join("run"))
            .arg("--pools")
            .arg(dir.0.join("pools.yaml"))
            .env("KUBECONFIG", dir.0.join("kubeconfig"))
            .env("NODE_NAME", NODE)
            .env("POD_NAMESPACE", NS)
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning vmlb run"),
    );

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
        answers(&lab, 12) == both
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
    eventually(20, "vm2 to leave", &log, || answers(&lab, 16) == only);

    eprintln!("{:?}: vm2 left", t0.elapsed());
    // A clean stop releases the node Lease.
    stop_group(daemon.0.id(), Duration::from_secs(10), || {
        matches!(daemon.0.try_wait(), Ok(Some(_)))
    });
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "vmlb exited with {status}:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(api
        .get("leases", "coordination.k8s.io/v1", NS, "vmlb-node-node-0")
        .is_none());
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
        let out = fs::File::create(&log).unwrap();
        let child = ns
            .command(vmlb_bin())
            .args([
                "run",
                "--kubernetes",
                "--iface",
                NODE_IFACE,
                "--xdp-mode",
                "skb",
            ])
            .args([
                "--snat-addr",
                &NODE_ADDR.to_string(),
                "--metrics-addr",
                "127.0.0.1:19535",
            ])
            .arg("--pin-dir")
            .arg(dir.0.join("bpf"))
            .arg("--run-dir")
            .arg(dir.0.join("run"))
            .env("KUBECONFIG", dir.0.join("kubeconfig"))
            .env("NODE_NAME", name)
            .env("POD_NAMESPACE", NS)
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
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
