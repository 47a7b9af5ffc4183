//! Two vmlb nodes on the lab's segment, one scripted cluster, and the VIP's owner dying under
//! traffic (issue 9, "nodes that agree").
//!
//! Both nodes (`Lab::node` and one `Lab::add_node`, each with its own MAC, address and pins) run
//! `vmlb run --kubernetes` against the same scripted API server: it serves one object store on
//! a listener in each node namespace's loopback, so every request stays inside the namespace
//! that makes it. The cluster holds the seed's vmlb Service and two VMIs.
//!
//! Checked: the nodes' Maglev tables are equal (`vmlb inspect maglev` and the
//! `vmlb_maglev_table_info` metric), and exactly one node, the one the ranking names, answers ARP
//! for the VIP. Then, with new connections running from the client and a few keep-alive
//! connections open, the owner dies, and the test measures when the other node owns the VIP
//! (its state file), when the client's ARP entry moves to it (its gratuitous ARP) and when new
//! connections succeed again, through the survivor (its SNAT address in the VMs' logs).
//!
//! "The owner dies" is a node death: its VLAN-side link goes down (no frame reaches or leaves
//! it, as when a node loses power) and its daemon is killed with SIGKILL (no Lease release, so
//! the other node waits for the Lease to expire). Killing only the daemon is a different case:
//! the program is pinned, so it keeps answering ARP and forwarding for the VIP it owned until a
//! daemon starts again (see README, Kubernetes).
//!
//! Established connections: in snat mode the flow state is per node, so the survivor has no flow
//! for them and drops their packets (`drop_tcp_no_flow`); the test counts what happens to them
//! and prints it. Needs root and the lab's tools (scripts/bootstrap.sh).

#[path = "../../vmlb-user/tests/support/apiserver.rs"]
mod apiserver;

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use apiserver::{kubeconfig, ApiServer};
use serde_json::{json, Value};
use vmlb_tests::{
    daemon::{vmlb_bin, KubeRun},
    lab::{
        curl, mount_bpffs, stop_group, unmount_bpffs, HttpConn, Httpd, Lab, Ns, NODE_ADDR,
        NODE_DEV, NODE_MAC, VIP,
    },
    netns::Netns,
    packet,
};
use vmlb_user::{
    observe::state::{state_path, DaemonState},
    source::kube::ownership,
};

const NS: &str = "vmlb-system";
/// The second node: the address after the first node's (10.10.1.125) and a MAC to match.
const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 126);
const NODE2_MAC: &str = "02:00:0a:0a:01:7e";
const CLIENT_DEV: &str = "eth0";
/// Each daemon's metrics, on its own namespace's loopback.
const METRICS: &str = "127.0.0.1:19536";
/// How long the test waits for the survivor; the target is 2 s, the default lease 1.5 s.
const TAKEOVER_BOUND: Duration = Duration::from_secs(10);

/// The new-connection load: one request every 20 ms, at most 1,000 and for at most 20 s. A
/// connect gives up after 250 ms, so a worker whose SYN went to the dead node tries again soon
/// (a kernel retransmission would come only after 1 s) and the first success after the
/// takeover is seen within a few tens of milliseconds.
const RATE: u32 = 50;
const MAX_REQUESTS: u64 = 1_000;
const LOAD_LIMIT: Duration = Duration::from_secs(20);
const WORKERS: u64 = 6;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Keep-alive connections open across the failover.
const ESTABLISHED: usize = 4;

/// One node's directory with a bpffs for its pins; unmounted and removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        // Unique per test too: the tests of this file run in parallel in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("vmlb-failover-{}-{n}-{tag}", std::process::id()));
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

/// One vmlb node of the test: the lab namespace it runs in (owned by the lab), its daemon and
/// its pins. Field order is drop order: the daemon first, then its pins.
struct Member {
    name: &'static str,
    ns: String,
    addr: Ipv4Addr,
    mac: &'static str,
    daemon: Daemon,
    dir: Dir,
    log: PathBuf,
}

impl Member {
    /// Start `vmlb run --kubernetes` in `ns` against the cluster at `url` (reachable there).
    fn start(name: &'static str, ns: &Ns, addr: Ipv4Addr, mac: &'static str, url: &str) -> Self {
        let dir = Dir::new(name);
        fs::write(dir.0.join("kubeconfig"), kubeconfig(url, NS)).unwrap();
        fs::write(
            dir.0.join("pools.yaml"),
            "apiVersion: vmlb.io/v1alpha1\nkind: IPAddressPool\nmetadata: {name: vlan-1512-pool}\nspec: {addresses: [10.10.1.128/25]}\n",
        )
        .unwrap();
        let log = dir.0.join("daemon.log");
        let run = KubeRun {
            iface: NODE_DEV,
            xdp_mode: "native",
            snat: &[IpAddr::V4(addr)],
            metrics: METRICS.parse().unwrap(),
            dir: &dir.0,
            pools: true,
            node: name,
            namespace: NS,
        };
        let child = run
            .spawn(ns.command(vmlb_bin()), &log)
            .expect("spawning vmlb run");
        Self {
            name,
            ns: ns.name().to_string(),
            addr,
            mac,
            daemon: Daemon(child),
            dir,
            log,
        }
    }

    fn ns(&self) -> Netns {
        Netns::named(&self.ns)
    }

    fn state(&self) -> Option<DaemonState> {
        let text = fs::read_to_string(state_path(&self.dir.0.join("run"), NODE_DEV)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn owned(&self) -> Option<Vec<Ipv4Addr>> {
        let v4 = |a: &std::net::IpAddr| match a {
            std::net::IpAddr::V4(a) => Some(*a),
            std::net::IpAddr::V6(_) => None,
        };
        Some(self.state()?.owned_vips.iter().filter_map(v4).collect())
    }

    /// The backends of the one service, as its state file says, sorted.
    fn backends(&self) -> Vec<String> {
        let Some(s) = self.state() else {
            return Vec::new();
        };
        let mut out: Vec<String> = s
            .services
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.addr.to_string()))
            .collect();
        out.sort();
        out
    }

    /// `vmlb inspect -o json <what>` on this node's pins.
    fn inspect(&self, what: &[&str]) -> Value {
        let out = Command::new(vmlb_bin())
            .arg("inspect")
            .arg("--pin-dir")
            .arg(self.dir.0.join("bpf"))
            .arg("--run-dir")
            .arg(self.dir.0.join("run"))
            .args(["--iface", NODE_DEV, "-o", "json"])
            .args(what)
            .output()
            .expect("running vmlb inspect");
        assert!(
            out.status.success(),
            "vmlb inspect {what:?} on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("inspect's JSON")
    }

    fn counter(&self, name: &str) -> u64 {
        let stats = self.inspect(&["stats"]);
        stats["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["value"].as_u64())
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// The digest label of `vmlb_maglev_table_info` on this node's metrics endpoint.
    fn metric_digest(&self) -> Option<String> {
        let text = curl(&self.ns(), &format!("http://{METRICS}/metrics"), 2).ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("vmlb_maglev_table_info{"))?;
        let (_, rest) = line.split_once("digest=\"")?;
        Some(rest.split('"').next()?.to_string())
    }

    fn logs(&self) -> String {
        format!(
            "--- vmlb on {}:\n{}",
            self.name,
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

fn logs(members: &[&Member]) -> String {
    members.iter().map(|m| m.logs()).collect()
}

/// Polls `cond` (other processes' state: nothing to await) for at most `secs`.
fn eventually(secs: u64, what: &str, members: &[&Member], mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs(members)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn vmi(name: &str, addr: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "httpd"}},
        "spec": {"networks": [{"name": "nic0", "multus": {"networkName": "default/vlan-1512"}}]},
        "status": {"phase": "Running", "nodeName": "node-a",
                   "interfaces": [{"name": "nic0", "ipAddress": addr.to_string(), "infoSource": "domain"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn parse_mac(s: &str) -> packet::Mac {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex MAC"))
        .collect();
    v.try_into().expect("6-byte MAC")
}

fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Asks "who has `target`?" once from `dev` in `ns` (an AF_PACKET socket: the namespace's ARP
/// cache is not involved) and returns every MAC that answered within `listen`, in order.
fn who_has(ns: &Ns, dev: &str, target: Ipv4Addr, listen: Duration) -> Vec<String> {
    let out = ns
        .exec(&["cat", &format!("/sys/class/net/{dev}/address")])
        .expect("reading the MAC");
    let mac = parse_mac(&String::from_utf8_lossy(&out.stdout));
    let out = ns
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", dev])
        .expect("reading the address");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let addr: Ipv4Addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on {dev}: {text}"));

    let _in = ns.enter().expect("entering the namespace");
    let ifindex = nix::net::if_::if_nametoindex(dev).expect("interface");
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sll = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: proto,
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is an initialised sockaddr_ll of `len` bytes that lives across the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) };
    assert_eq!(rc, 0, "binding to {dev}: {}", io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval; `tv` lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());

    let request = packet::arp(1, [0xff; 6], mac, addr, [0; 6], target);
    // SAFETY: the buffer is valid for its length during the call.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    assert_eq!(
        sent,
        request.len() as isize,
        "sending the ARP request: {}",
        io::Error::last_os_error()
    );
    let mut answers = Vec::new();
    let deadline = Instant::now() + listen;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else {
            continue; // the timeout: look at the deadline again
        };
        let f = &buf[..n];
        // An ARP reply (op 2) whose sender protocol address is the target.
        if n >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == target.octets() {
            answers.push(fmt_mac(&f[22..28]));
        }
    }
    answers
}

/// The link-layer address the namespace's neighbour table holds for `addr`, if any.
fn neighbour(ns: &Ns, addr: Ipv4Addr) -> Option<String> {
    let out = ns
        .exec(&["ip", "neigh", "show", &addr.to_string(), "dev", CLIENT_DEV])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

/// One new connection of the load.
#[derive(Debug)]
struct Attempt {
    i: u64,
    started: Instant,
    finished: Instant,
    /// The VM that answered, or why it failed.
    outcome: Result<String, String>,
}

fn one_request(to: SocketAddrV4, i: u64) -> Result<String, String> {
    let e = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::V4(to), CONNECT_TIMEOUT).map_err(e("connect"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(e("timeout"))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(e("timeout"))?;
    write!(
        s,
        "GET /?t=new-{i} HTTP/1.0\r\nHost: vms.vlan-1512.org\r\nConnection: close\r\n\r\n"
    )
    .map_err(e("send"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(e("read"))?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("status {:?}", text.lines().next()));
    }
    Ok(text.lines().last().unwrap_or_default().trim().to_string())
}

/// New connections from `ns` to the VIP, request i due at `start + i / RATE`: at most
/// `MAX_REQUESTS`, none started after `LOAD_LIMIT` or once `stop` is set. Every attempt goes to
/// `log`.
fn new_connections(ns: &Ns, stop: &AtomicBool, log: &Mutex<Vec<Attempt>>) {
    let to = SocketAddrV4::new(VIP, 80);
    let start = Instant::now();
    let until = start + LOAD_LIMIT;
    let interval = Duration::from_secs(1) / RATE;
    thread::scope(|scope| {
        for w in 0..WORKERS {
            scope.spawn(move || {
                let _in = ns.enter().expect("entering the client namespace");
                let mut i = w;
                while i < MAX_REQUESTS {
                    let due = start + interval * u32::try_from(i).expect("bounded");
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    if stop.load(Ordering::Relaxed) || Instant::now() > until {
                        return;
                    }
                    let started = Instant::now();
                    let outcome = one_request(to, i);
                    let a = Attempt {
                        i,
                        started,
                        finished: Instant::now(),
                        outcome,
                    };
                    log.lock().expect("load log").push(a);
                    i += WORKERS;
                }
            });
        }
    });
}

/// Request number -> the source address the VM saw (the node's SNAT address), from the access
/// logs of every VM.
fn carried_by(servers: &[Httpd]) -> BTreeMap<u64, Ipv4Addr> {
    let mut out = BTreeMap::new();
    for s in servers {
        for line in s.access_lines() {
            let mut w = line.split_whitespace();
            let (Some(addr), Some(_port), Some(_get), Some(path)) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                continue;
            };
            let i = path.strip_prefix("/?t=new-").and_then(|i| i.parse().ok());
            if let (Some(i), Ok(addr)) = (i, addr.parse()) {
                out.insert(i, addr);
            }
        }
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// One scripted cluster (an object store with a listener on each node's loopback), the seed's
/// service and VMIs, and a vmlb daemon on each node; returns once both serve both VMs and the
/// ranked node alone owns the VIP.
fn two_nodes(lab: &Lab, rt: &tokio::runtime::Runtime) -> (ApiServer, [Member; 2]) {
    let node2_ns = &lab.more_nodes[0].ns;
    // One object store, a listener on each node's loopback.
    let listener_in = |ns: &Ns| {
        let _in = ns.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    };
    let api = rt.block_on(ApiServer::start_on(listener_in(&lab.node)));
    let url2 = {
        let _rt = rt.enter();
        api.serve_also(listener_in(node2_ns))
    };
    api.put("services", json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "vms", "namespace": "default",
                     "labels": {"service.kubernetes.io/service-proxy-name": "vmlb"},
                     "annotations": {"vmlb.io/network": "default/vlan-1512", "vmlb.io/vmi-selector": "app=httpd"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "vmlb.io/vmlb",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    }));
    for vm in &lab.vms {
        api.put("virtualmachineinstances", vmi(vm.name, vm.addr));
    }

    let members = [
        Member::start("node-a", &lab.node, NODE_ADDR, NODE_MAC, &api.url()),
        Member::start("node-b", node2_ns, NODE2_ADDR, NODE2_MAC, &url2),
    ];
    let all: Vec<&Member> = members.iter().collect();
    let (owner, survivor) = owner_and_survivor(&members);

    // Both serve both VMs, and exactly the ranked node owns the VIP.
    eventually(40, "both nodes to serve both VMs", &all, || {
        members
            .iter()
            .all(|m| m.backends() == ["10.10.1.2", "10.10.1.3"])
    });
    eventually(20, "the VIP to have exactly one owner", &all, || {
        owner.owned() == Some(vec![VIP]) && survivor.owned() == Some(vec![])
    });

    (api, members)
}

/// The ranking every node applies decides who owns the VIP while both live.
fn owner_and_survivor(members: &[Member; 2]) -> (&Member, &Member) {
    let owner_name = ownership::owner(VIP.into(), members.iter().map(|m| m.name)).unwrap();
    if members[0].name == owner_name {
        (&members[0], &members[1])
    } else {
        (&members[1], &members[0])
    }
}

#[test]
fn the_vip_moves_to_the_other_node_when_its_owner_dies() {
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _ = vmlb_bin();
    eprintln!("{:?}: vmlb built", t0.elapsed());
    let mut lab = Lab::new().expect("building the lab");
    lab.add_node("node2", NODE2_ADDR, NODE2_MAC)
        .expect("adding the second node");
    let lab = lab;
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).unwrap())
        .collect();
    eprintln!("{:?}: lab and httpds up", t0.elapsed());

    let (_api, members) = two_nodes(&lab, &rt);
    let all: Vec<&Member> = members.iter().collect();
    let (owner, survivor) = owner_and_survivor(&members);
    eprintln!(
        "{:?}: both nodes serve; {} owns {VIP}",
        t0.elapsed(),
        owner.name
    );

    // Equal tables: the digest from the pinned maps, and the same in the metric.
    let digests: Vec<String> = members
        .iter()
        .map(|m| {
            let view = m.inspect(&["maglev", &format!("{VIP}:80/tcp")]);
            let d = view["digest"].as_str().expect("digest").to_string();
            assert_eq!(d.len(), 16, "{view}");
            assert_eq!(view["empty_slots"], 0, "{}: {view}", m.name);
            eventually(10, "the digest metric", &all, || {
                m.metric_digest().as_deref() == Some(d.as_str())
            });
            d
        })
        .collect();
    assert_eq!(
        digests[0], digests[1],
        "the nodes built different Maglev tables"
    );
    eprintln!("{:?}: both tables have digest {}", t0.elapsed(), digests[0]);

    // Only the owner answers ARP for the VIP (the other's program has it without the owned
    // flag), and the client's cache points at it once it has talked to the VIP.
    eventually(10, "only the owner to answer ARP", &all, || {
        who_has(&lab.client, CLIENT_DEV, VIP, Duration::from_millis(200)) == [owner.mac]
    });
    eventually(20, "both VMs to answer through the VIP", &all, || {
        let got: std::collections::BTreeSet<String> = (0..12)
            .map(|_| {
                curl(&lab.client, &format!("http://{VIP}/"), 2)
                    .map_or_else(|_| "-".into(), |b| b.trim().to_string())
            })
            .collect();
        got == ["vm1".to_string(), "vm2".to_string()].into()
    });
    assert_eq!(
        neighbour(&lab.client, VIP).as_deref(),
        Some(owner.mac),
        "the client's ARP entry for the VIP"
    );

    let mut established: Vec<HttpConn> = (0..ESTABLISHED)
        .map(|_| {
            let mut c = HttpConn::open(&lab.client, SocketAddr::from((VIP, 80))).unwrap();
            c.get("/")
                .expect("a request on a fresh keep-alive connection");
            c
        })
        .collect();

    let stop = AtomicBool::new(false);
    let attempts = Mutex::new(Vec::<Attempt>::new());
    let ok_after = |t: Instant| {
        attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.started >= t && a.outcome.is_ok())
            .count()
    };
    let first_ok_after = |t: Instant| {
        attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.started >= t && a.outcome.is_ok())
            .map(|a| a.finished)
            .min()
    };
    let (killed, dead, took_state, took_arp, took_conn) = thread::scope(|scope| {
        let load = scope.spawn(|| new_connections(&lab.client, &stop, &attempts));
        // Stops the load also when an assertion below fails.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        eventually(10, "the load to get going", &all, || ok_after(t0) >= 25);

        // The owner dies: its link goes down first (so nothing it sends after `dead` reaches
        // the segment), then its daemon is killed without a chance to release its Lease.
        let killed = Instant::now();
        owner
            .ns()
            .ip(&["link", "set", NODE_DEV, "down"])
            .expect("taking the owner's link down");
        // SAFETY: kill(2) on the daemon's own process group (it leads it).
        unsafe { libc::kill(-(owner.daemon.0.id() as i32), libc::SIGKILL) };
        let dead = Instant::now();

        let (mut took_state, mut took_arp, mut took_conn) = (None, None, None);
        while took_state.is_none() || took_arp.is_none() || took_conn.is_none() {
            assert!(
                killed.elapsed() < TAKEOVER_BOUND,
                "no takeover within {TAKEOVER_BOUND:?}: survivor owns {:?}, client's entry {:?}, \
                 first new connection {:?}\n{}\n{}",
                survivor.owned(),
                neighbour(&lab.client, VIP),
                first_ok_after(dead).map(|t| t - killed),
                logs(&all),
                lab.describe()
            );
            if took_state.is_none() && survivor.owned() == Some(vec![VIP]) {
                took_state = Some(killed.elapsed());
            }
            if took_arp.is_none() && neighbour(&lab.client, VIP).as_deref() == Some(survivor.mac) {
                took_arp = Some(killed.elapsed());
            }
            if took_conn.is_none() {
                took_conn = first_ok_after(dead).map(|t| t - killed);
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Some more traffic through the survivor, then stop the load.
        let settled = killed + took_conn.unwrap();
        eventually(10, "new connections through the survivor", &all, || {
            ok_after(settled) >= 50
        });
        stop.store(true, Ordering::Relaxed);
        load.join().expect("the load panicked");
        (killed, dead, took_state, took_arp, took_conn)
    });
    let (took_state, took_arp, took_conn) =
        (took_state.unwrap(), took_arp.unwrap(), took_conn.unwrap());

    // The established connections, tried once more each (in parallel: a dropped one waits for
    // its read timeout).
    let no_flow_before = survivor.counter("drop_tcp_no_flow");
    let fates: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = established
            .iter_mut()
            .map(|c| scope.spawn(move || c.get("/")))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join().expect("a keep-alive request panicked") {
                Ok(body) => format!("survived ({})", body.trim()),
                Err(e) => {
                    let kind = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<io::Error>())
                        .map(io::Error::kind);
                    match kind {
                        Some(io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                            "timed out".to_string()
                        }
                        Some(io::ErrorKind::ConnectionReset) => "reset".to_string(),
                        _ => format!("failed: {e:#}"),
                    }
                }
            })
            .collect()
    });
    let no_flow = survivor.counter("drop_tcp_no_flow") - no_flow_before;

    // What the VMs saw: every request before the kill came through the owner, every one that
    // started after it through the survivor.
    let attempts = attempts.into_inner().unwrap();
    let via = carried_by(&servers);
    let mut before = (0, 0);
    let mut after = (0, 0);
    let mut failed_windows = Vec::new();
    for a in &attempts {
        let node = via.get(&a.i).copied();
        match &a.outcome {
            Ok(_) if a.finished < killed => {
                before.0 += 1;
                assert_eq!(node, Some(owner.addr), "request {} before the kill", a.i);
            }
            Ok(_) if a.started >= dead => {
                after.0 += 1;
                assert_eq!(node, Some(survivor.addr), "request {} after the kill", a.i);
            }
            Ok(_) => {}
            Err(e) => {
                failed_windows.push((a.started, e.clone()));
                if a.finished < killed {
                    before.1 += 1;
                } else {
                    after.1 += 1;
                }
            }
        }
    }
    assert_eq!(
        before.1,
        0,
        "new connections failed before the kill: {:?}",
        &failed_windows[..failed_windows.len().min(5)]
    );
    // Once the client's cache points at the survivor, new connections do not fail.
    let late: Vec<_> = failed_windows
        .iter()
        .filter(|(s, _)| *s >= killed + took_arp + Duration::from_millis(200))
        .collect();
    assert!(
        late.is_empty(),
        "new connections failed after the takeover: {late:?}"
    );
    // Now only the survivor answers ARP, and it owns the VIP.
    let answers = who_has(&lab.client, CLIENT_DEV, VIP, Duration::from_millis(300));
    assert_eq!(answers, [survivor.mac], "ARP answers after the takeover");
    assert_eq!(survivor.owned(), Some(vec![VIP]));
    let survived = fates.iter().filter(|f| f.starts_with("survived")).count();
    if survived < fates.len() {
        assert!(
            no_flow > 0,
            "broken established connections but no drop_tcp_no_flow on the survivor: {fates:?}"
        );
    }

    let outage = failed_windows
        .iter()
        .map(|(s, _)| *s)
        .max()
        .map(|last| last.saturating_duration_since(killed));
    eprintln!(
        "FAILOVER {} -> {} (lease 1.5 s): survivor owns the VIP after {}, client's ARP entry \
         moved after {}, first new connection through it after {}; new connections: {} ok and \
         {} failed before the kill, {} ok and {} failed after it (last failed one started {:?} \
         after the kill); established keep-alive connections: {survived} of {} survived ({fates:?}; \
         the survivor dropped {no_flow} of their packets as drop_tcp_no_flow); test took {:?}",
        owner.name,
        survivor.name,
        ms(took_state),
        ms(took_arp),
        ms(took_conn),
        before.0,
        before.1,
        after.0,
        after.1,
        outage,
        fates.len(),
        t0.elapsed()
    );
    assert!(after.0 >= 50, "too few new connections after the takeover");
}

/// A daemon that dies while its node lives (a crash, an OOM kill) leaves its pinned program
/// attached, forwarding what reaches it, but the ownership deadline its last Lease renewal set
/// lapses in the data path before the other node counts it dead: the segment never has two
/// nodes answering ARP for the VIP, and the survivor takes it.
#[test]
fn a_crashed_daemon_stops_answering_before_the_other_node_takes_over() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _ = vmlb_bin();
    let mut lab = Lab::new().expect("building the lab");
    lab.add_node("node2", NODE2_ADDR, NODE2_MAC)
        .expect("adding the second node");
    let lab = lab;
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).unwrap())
        .collect();
    let (_api, members) = two_nodes(&lab, &rt);
    let all: Vec<&Member> = members.iter().collect();
    let (owner, survivor) = owner_and_survivor(&members);
    eventually(10, "only the owner to answer ARP", &all, || {
        who_has(&lab.client, CLIENT_DEV, VIP, Duration::from_millis(200)) == [owner.mac]
    });

    // Only the daemon dies; the node, its link and its pinned program stay.
    let killed = Instant::now();
    // SAFETY: kill(2) on the daemon's own process group (it leads it).
    unsafe { libc::kill(-(owner.daemon.0.id() as i32), libc::SIGKILL) };
    let mut silent_from = None;
    let mut taken = None;
    let mut after_takeover = 0;
    while after_takeover < 5 {
        let who = who_has(&lab.client, CLIENT_DEV, VIP, Duration::from_millis(100));
        let at = killed.elapsed();
        assert!(
            who.len() <= 1,
            "two nodes answered ARP for {VIP} {at:?} after the owner's daemon died: {who:?}\n{}",
            logs(&all)
        );
        if who.is_empty() && silent_from.is_none() {
            silent_from = Some(at);
        }
        if who == [survivor.mac] {
            taken.get_or_insert(at);
            after_takeover += 1;
        } else {
            assert!(
                taken.is_none(),
                "{who:?} answered after the survivor took over"
            );
        }
        assert!(
            at < TAKEOVER_BOUND,
            "the survivor did not take the VIP within {TAKEOVER_BOUND:?} ({who:?} answers)\n{}",
            logs(&all)
        );
    }
    eprintln!(
        "owner's daemon killed: its node went silent after {:?}, the survivor answered after {:?}",
        silent_from,
        taken.unwrap()
    );
    assert!(
        silent_from.is_some(),
        "no silent gap: the dead daemon's node answered until the survivor took over"
    );
}
