//! `vmlb inspect` and `vmlb simulate` against the real program: a service is installed through
//! the reconciler, packets create flows (BPF_PROG_TEST_RUN), the maps are pinned the way the
//! daemon pins them and a state file is written; then every `inspect` view must agree with what
//! was configured and sent, and `simulate` must predict exactly the backend and SNAT port the
//! program then chooses. The same for an IPv6 service (its own maps, listed next to the IPv4
//! ones).
//!
//! Needs root (BPF, network namespaces, bpffs); part of the normal test run.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use aya::maps::IterableMap as _;
use nix::sched::{setns, unshare, CloneFlags};
use serde_json::Value;
use vmlb_common::{
    flow_state, hash, map_names, map_names6, Counter, Flow, DEFAULT_FLOW6_ENTRIES,
    DEFAULT_FLOW_ENTRIES, SNAT_PORT_MAX, SNAT_PORT_MIN,
};
use vmlb_tests::{
    fixture::*,
    fixture6::svc6,
    packet::{Packet, TCP_ACK, TCP_SYN},
    packet6::Packet6,
};
use vmlb_user::{
    cli::{
        inspect::{inspect_to, FlowArgs, InspectArgs, InspectCommand},
        simulate::{simulate_to, SimulateArgs},
        Output, PinArgs,
    },
    dataplane::{maps::BpfMaps, pins::PinLayout},
    model::Proto,
    observe::{
        metrics::{MetricsSource, SharedReader},
        state::{self, DaemonState, ServiceState},
    },
};

const IFACE: &str = "fx0";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(p: &Path) -> bool {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: a valid C string and a zeroed out-parameter of the right type.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// `/sys/fs/bpf/vmlb-test-<pid>-<tag>`, removed on drop (also when the test panics).
///
/// Where /sys/fs/bpf is not a bpffs (containers, minimal hosts), this thread gets a private
/// mount namespace with a bpffs mounted there, so nothing shows up on the host; drop unmounts it
/// and returns the thread to its original mount namespace (before the fixture's network
/// namespaces are deleted with `ip netns del`, which must run in the host's mount namespace).
struct PinRoot {
    root: PathBuf,
    orig_mnt: Option<File>,
}

impl PinRoot {
    fn new(tag: &str) -> Self {
        let base = Path::new("/sys/fs/bpf");
        let mut orig_mnt = None;
        if !is_bpffs(base) {
            let orig = File::open("/proc/thread-self/ns/mnt").expect("own mount namespace");
            unshare(CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
            orig_mnt = Some(orig);
            let none = CString::new("none").unwrap();
            let root = CString::new("/").unwrap();
            let bpf = CString::new("bpf").unwrap();
            let target = CString::new("/sys/fs/bpf").unwrap();
            // SAFETY: valid C strings; null data is allowed for both calls.
            unsafe {
                // Private first, so the bpffs mount does not propagate to the host.
                assert_eq!(
                    libc::mount(
                        none.as_ptr(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null()
                    ),
                    0,
                    "make / private: {}",
                    std::io::Error::last_os_error()
                );
                assert_eq!(
                    libc::mount(
                        bpf.as_ptr(),
                        target.as_ptr(),
                        bpf.as_ptr(),
                        0,
                        std::ptr::null()
                    ),
                    0,
                    "mount bpffs: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let root = base.join(format!("vmlb-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let guard = Self { root, orig_mnt };
        std::fs::create_dir(&guard.root).expect("creating the pin root");
        guard
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        // Never panic here: this may run while a failed assertion unwinds.
        let _ = std::fs::remove_dir_all(&self.root);
        if let Some(orig) = &self.orig_mnt {
            let target = CString::new("/sys/fs/bpf").unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            let _ = setns(orig.as_fd(), CloneFlags::CLONE_NEWNS);
        }
    }
}

/// A run directory for the state file, removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pin every map as the daemon does: `<root>/<iface>/v<LAYOUT_VERSION>/<MAP NAME>`.
fn pin_maps(env: &Env, root: &Path) {
    let layout = PinLayout::new(root, IFACE);
    let dir = layout.dir();
    std::fs::create_dir_all(dir).unwrap();
    let m = &env.maps;
    for (name, data) in [
        (map_names::SERVICES, m.services.map()),
        (map_names::VIPS, m.vips.map()),
        (map_names::BACKENDS, m.backends.map()),
        (map_names::MAGLEV, m.maglev.map()),
        (map_names::FLOW_INDEX, m.index.map_data()),
        (map_names::FLOW_SLOTS, m.slots.map_data()),
        (map_names::CONFIG, m.config.map()),
        (map_names::HOPS, m.hops.map()),
        (map_names::STATS, m.stats.map()),
        (map_names::SVC_STATS, m.svc_stats.map()),
        (map_names::BE_STATS, m.be_stats.map()),
        (map_names::DNAT_ENDPOINTS, m.dnat_endpoints.map()),
        (map_names6::SERVICES6, m.v6.services.map()),
        (map_names6::VIPS6, m.v6.vips.map()),
        (map_names6::BACKENDS6, m.v6.backends.map()),
        (map_names6::FLOW_INDEX6, m.v6.index.map_data()),
        (map_names6::FLOW_SLOTS6, m.v6.slots.map_data()),
        (map_names6::CONFIG6, m.v6.config.map()),
        (map_names6::DNAT_ENDPOINTS6, m.v6.dnat_endpoints.map()),
    ] {
        data.pin(dir.join(name))
            .unwrap_or_else(|e| panic!("pinning {name}: {e}"));
    }
}

struct Cli {
    pins: PathBuf,
    run: PathBuf,
}

impl Cli {
    fn pin_args(&self) -> PinArgs {
        PinArgs {
            pin_dir: self.pins.clone(),
            // One interface has state: the CLI finds it.
            iface: None,
        }
    }

    fn inspect(&self, what: InspectCommand, output: Output) -> anyhow::Result<String> {
        let args = InspectArgs {
            pins: self.pin_args(),
            run_dir: self.run.clone(),
            output,
            what,
        };
        let mut out = Vec::new();
        inspect_to(&args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[track_caller]
    fn json(&self, what: InspectCommand) -> Value {
        let text = self.inspect(what.clone(), Output::Json).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what:?}: {e}\n{text}"))
    }

    #[track_caller]
    fn simulate<A: Into<IpAddr>>(&self, proto: Proto, src: (A, u16), dst: (A, u16)) -> Value {
        let args = SimulateArgs {
            pins: self.pin_args(),
            output: Output::Json,
            proto,
            src: SocketAddr::new(src.0.into(), src.1),
            dst: SocketAddr::new(dst.0.into(), dst.1),
        };
        let mut out = Vec::new();
        simulate_to(&args, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }
}

fn client_syn(sport: u16) -> Vec<u8> {
    Packet::tcp((CLIENT, sport), (VIP, 80), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build()
}

/// Run a client SYN; returns the rewritten (source, destination) as "ip:port" strings.
fn send_syn(env: &Env, sport: u16) -> (String, String) {
    let (action, out) = env.run(&client_syn(sport));
    assert_eq!(action, XDP_TX, "SYN from port {sport}");
    tuple(&out)
}

/// Source and destination of an Ethernet + IPv4 (no options) + TCP/UDP frame.
fn tuple(frame: &[u8]) -> (String, String) {
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (
        format!("{}:{}", ip(26), port(34)),
        format!("{}:{}", ip(30), port(36)),
    )
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[test]
fn inspect_and_simulate_agree_with_the_data_path() {
    let mut env = Env::new().expect("fixture environment (needs root)");
    let spec = svc(80, Proto::Tcp, &[be(VM1, 8080), be(VM2, 8080)]);
    env.install(std::slice::from_ref(&spec)).unwrap();
    let key = spec.key();

    // Traffic: four client flows, one reply, one packet to a port without a service.
    let clients = [40000u16, 40001, 40002, 40003];
    let mut sent = Vec::new();
    for sport in clients {
        let (snat, backend) = send_syn(&env, sport);
        sent.push((format!("{CLIENT}:{sport}"), snat, backend));
    }
    let (snat0, backend0) = (sent[0].1.clone(), sent[0].2.clone());
    let b0: SocketAddrV4 = backend0.parse().unwrap();
    let s0: SocketAddrV4 = snat0.parse().unwrap();
    let reply = Packet::tcp(
        (*b0.ip(), b0.port()),
        (*s0.ip(), s0.port()),
        TCP_SYN | TCP_ACK,
    )
    .macs(VM1_MAC, NODE_MAC)
    .build();
    assert_eq!(env.run(&reply).0, XDP_TX);
    let stray = Packet::tcp((CLIENT, 1234), (VIP, 81), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    assert_eq!(env.run(&stray).0, XDP_DROP);

    // Declared after `env`, so dropped before it (see PinRoot).
    let pins = PinRoot::new("inspect");
    pin_maps(&env, &pins.root);
    let run = RunDir(std::env::temp_dir().join(format!("vmlb-test-{}-run", std::process::id())));
    let mut svc_state = ServiceState::installed(
        "web/http",
        &["web.example.com".to_string()],
        &spec,
        &env.reconciler,
    )
    .expect("service installed");
    svc_state.backends[1].last_error = Some("probe: connection refused".into());
    state::write_atomic(
        &state::state_path(&run.0, IFACE),
        &DaemonState {
            iface: IFACE.into(),
            pid: std::process::id(),
            generation: 1,
            updated_unix: 0,
            services: vec![svc_state],
            ..Default::default()
        },
    )
    .unwrap();
    let cli = Cli {
        pins: pins.root.clone(),
        run: run.0.clone(),
    };
    let ring_size = u64::from(spec.ring_size);
    let svc_id = env.reconciler.service(key).unwrap().id();
    let be_id = |addr| env.reconciler.backend_id(key, addr, 8080).unwrap();

    // services
    let v = cli.json(InspectCommand::Services);
    assert_eq!(v["iface"], IFACE);
    let svcs = v["services"].as_array().unwrap();
    assert_eq!(svcs.len(), 1, "{v}");
    let sv = &svcs[0];
    assert_eq!(sv["id"], svc_id);
    assert_eq!(sv["name"], "web/http");
    assert_eq!(sv["vip"], VIP.to_string());
    assert_eq!((sv["port"].as_u64(), s(&sv["proto"])), (Some(80), "tcp"));
    assert_eq!(sv["snat"], SNAT.to_string());
    assert_eq!(sv["ring_size"], ring_size);
    assert_eq!(
        (sv["backends"].as_u64(), sv["backends_up"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(sv["hosts"][0], "web.example.com");
    assert_eq!(sv["stats"]["new_flows"], 4);
    assert_eq!(sv["stats"]["packets"], 5);
    assert_eq!(sv["stats"]["reply_packets"], 1);

    // backends
    let v = cli.json(InspectCommand::Backends);
    let bes = v["backends"].as_array().unwrap();
    assert_eq!(bes.len(), 2, "{v}");
    let addrs: BTreeSet<&str> = bes.iter().map(|b| s(&b["addr"])).collect();
    assert_eq!(addrs, BTreeSet::from(["10.10.1.2", "10.10.1.3"]));
    let mut slots = 0;
    for b in bes {
        let addr: Ipv4Addr = s(&b["addr"]).parse().unwrap();
        assert_eq!(b["id"], be_id(addr));
        assert_eq!(
            (b["port"].as_u64(), b["up"].as_bool()),
            (Some(8080), Some(true))
        );
        assert_eq!(
            (b["service"].as_str(), b["service_id"].as_u64()),
            (Some("web/http"), Some(svc_id.into()))
        );
        assert_eq!(b["weight"], 1);
        assert!(b["slots"].as_u64().unwrap() > 0, "{b}");
        slots += b["slots"].as_u64().unwrap();
        let flows_to_it = sent
            .iter()
            .filter(|f| f.2.starts_with(&format!("{addr}:")))
            .count();
        assert_eq!(b["stats"]["new_flows"], flows_to_it as u64, "{b}");
    }
    assert_eq!(slots, ring_size);
    let vm2 = bes.iter().find(|b| b["addr"] == VM2.to_string()).unwrap();
    assert_eq!(vm2["last_error"], "probe: connection refused");

    // maglev, by address and by name
    let v = cli.json(InspectCommand::Maglev {
        service: "10.10.1.128:80/tcp".into(),
    });
    let by_name = cli.json(InspectCommand::Maglev {
        service: "web/http".into(),
    });
    assert_eq!(v, by_name);
    assert_eq!(v["service"]["name"], "web/http");
    assert_eq!(v["empty_slots"], 0);
    let table: Vec<u32> = serde_json::from_value(v["table"].clone()).unwrap();
    assert_eq!(table, env.reconciler.table(key).unwrap());
    // The live table's digest (read from the maps) is the one the daemon computed from its
    // own copy and wrote to the state file (what the metric shows).
    let digest = v["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 16);
    assert_eq!(digest, state::table_digest(&spec, &env.reconciler));
    let per_be: u64 = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(per_be, ring_size);
    let share: f64 = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["share_percent"].as_f64().unwrap())
        .sum();
    assert!((share - 100.0).abs() < 1e-6, "{share}");
    let e = cli
        .inspect(
            InspectCommand::Maglev {
                service: "10.10.1.128:81/tcp".into(),
            },
            Output::Json,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("installed: 10.10.1.128:80/tcp (web/http)"),
        "{e}"
    );

    // flows: exactly the four clients, as the program rewrote them
    let v = cli.json(InspectCommand::Flows(FlowArgs::default()));
    let flows = v["flows"].as_array().unwrap();
    let got: BTreeSet<(String, String, String)> = flows
        .iter()
        .map(|f| {
            assert_eq!(f["vip"], format!("{VIP}:80"));
            assert_eq!((s(&f["proto"]), s(&f["service"])), ("tcp", "web/http"));
            let backend: SocketAddrV4 = s(&f["backend"]).parse().unwrap();
            assert_eq!(f["backend_id"], be_id(*backend.ip()));
            (
                s(&f["client"]).to_string(),
                s(&f["snat"]).to_string(),
                s(&f["backend"]).to_string(),
            )
        })
        .collect();
    assert_eq!(got, sent.iter().cloned().collect());

    // Filters: by backend (address only, and with its port), by client address, by service,
    // and a limit that keeps the count of everything that matched.
    let first_backend: SocketAddrV4 = s(&flows[0]["backend"]).parse().unwrap();
    let to_first = sent
        .iter()
        .filter(|(_, _, b)| *b == first_backend.to_string())
        .count();
    assert!(to_first >= 1);
    for backend in [first_backend.ip().to_string(), first_backend.to_string()] {
        let v = cli.json(InspectCommand::Flows(FlowArgs {
            backend: Some(backend),
            ..Default::default()
        }));
        assert_eq!(v["flows"].as_array().unwrap().len(), to_first, "{v}");
        assert_eq!(v["matched"], to_first);
    }
    let client: SocketAddrV4 = sent[0].0.parse().unwrap();
    let v = cli.json(InspectCommand::Nat(FlowArgs {
        addr: Some((*client.ip()).into()),
        ..Default::default()
    }));
    let same_ip = sent
        .iter()
        .filter(|(c, _, _)| c.starts_with(&format!("{}:", client.ip())))
        .count();
    assert_eq!(v["nat"].as_array().unwrap().len(), same_ip, "{v}");
    let v = cli.json(InspectCommand::Flows(FlowArgs {
        service: Some("web/http".into()),
        limit: 1,
        ..Default::default()
    }));
    assert_eq!(
        (v["flows"].as_array().unwrap().len(), &v["matched"]),
        (1, &sent.len().into())
    );
    let v = cli.json(InspectCommand::Nat(FlowArgs {
        addr: Some(Ipv4Addr::new(192, 0, 2, 99).into()),
        ..Default::default()
    }));
    assert_eq!(
        (v["nat"].as_array().unwrap().len(), &v["matched"]),
        (0, &0.into())
    );
    let unknown = FlowArgs {
        service: Some("10.10.1.128:81/tcp".into()),
        ..Default::default()
    };
    let e = cli.inspect(InspectCommand::Flows(unknown), Output::Json);
    assert!(
        e.is_err(),
        "an unknown service is an error, not an empty list"
    );

    // nat: the reverse entries of the same four
    let v = cli.json(InspectCommand::Nat(FlowArgs::default()));
    let nat = v["nat"].as_array().unwrap();
    let got: BTreeSet<(String, String, String)> = nat
        .iter()
        .map(|n| {
            assert_eq!(n["vip"], format!("{VIP}:80"));
            (
                s(&n["client"]).to_string(),
                s(&n["snat"]).to_string(),
                s(&n["backend"]).to_string(),
            )
        })
        .collect();
    assert_eq!(got, sent.iter().cloned().collect());

    // stats: the counters the traffic moved
    let v = cli.json(InspectCommand::Stats);
    let counter = |name: &str| {
        let c = v["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        (c["value"].as_u64().unwrap(), c["drop"].as_bool().unwrap())
    };
    assert_eq!(v["counters"].as_array().unwrap().len(), Counter::ALL.len());
    assert_eq!(counter("flow_new"), (4, false));
    assert_eq!(counter("reply_hit"), (1, false));
    assert_eq!(counter("tx_same_iface"), (5, false));
    assert_eq!(counter("drop_unknown_port"), (1, true));
    assert_eq!(counter("drop_no_backend"), (0, true));
    assert_eq!(v["services"][0]["stats"]["new_flows"], 4);
    assert_eq!(v["backends"].as_array().unwrap().len(), 2);

    // Metrics read the same pinned maps (the BpfMaps StatsReader) with the daemon's names.
    let layout = PinLayout::new(&pins.root, IFACE);
    let reader: SharedReader = Arc::new(Mutex::new(BpfMaps::from_pins(&layout).unwrap()));
    let st = state::read(&state::state_path(&run.0, IFACE))
        .unwrap()
        .unwrap();
    let metrics = MetricsSource::new(reader, Arc::new(RwLock::new(st)));
    let started = Instant::now();
    let text = metrics.encode().unwrap();
    println!("scrape took {:?}", started.elapsed());
    let labels = r#"service="web/http",vip="10.10.1.128",port="80",proto="tcp""#;
    for line in [
        format!("vmlb_service_new_flows_total{{{labels}}} 4"),
        format!("vmlb_service_packets_total{{{labels}}} 5"),
        r#"vmlb_backend_up{service="web/http",backend="10.10.1.2:8080"} 1"#.into(),
        r#"vmlb_backend_weight{service="web/http",backend="10.10.1.3:8080"} 1"#.into(),
        r#"vmlb_datapath_flow_lookups_total{result="flow_new"} 4"#.into(),
        r#"vmlb_datapath_packets_total{verdict="drop",reason="unknown_port"} 1"#.into(),
        // Live flows: four, each one entry for both directions.
        r#"vmlb_map_entries{map="FLOW_INDEX"} 4"#.into(),
        format!(r#"vmlb_map_capacity{{map="FLOW_INDEX"}} {DEFAULT_FLOW_ENTRIES}"#),
        // No IPv6 flow in this test: IPv6 has its own tables.
        r#"vmlb_map_entries{map="FLOW_INDEX6"} 0"#.into(),
        format!(r#"vmlb_map_capacity{{map="FLOW_INDEX6"}} {DEFAULT_FLOW6_ENTRIES}"#),
        r#"vmlb_map_entries{map="SERVICES"} 1"#.into(),
        r#"vmlb_map_entries{map="VIPS"} 1"#.into(),
        r#"vmlb_map_entries{map="BACKENDS"} 2"#.into(),
        format!(r#"vmlb_map_entries{{map="MAGLEV"}} {ring_size}"#),
        "vmlb_maps_readable 1".into(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    // Table output of every view reads as intended.
    for what in [
        InspectCommand::Services,
        InspectCommand::Backends,
        InspectCommand::Maglev {
            service: "web/http".into(),
        },
        InspectCommand::Flows(FlowArgs::default()),
        InspectCommand::Nat(FlowArgs::default()),
        InspectCommand::Stats,
    ] {
        let t = cli.inspect(what.clone(), Output::Table).unwrap();
        assert!(t.lines().count() >= 2, "{what:?}:\n{t}");
        println!("$ vmlb inspect {what:?}\n{t}");
    }
    let t = cli
        .inspect(InspectCommand::Flows(FlowArgs::default()), Output::Table)
        .unwrap();
    assert!(
        t.contains(&format!("{CLIENT}:40000  ->  {VIP}:80  =>  {snat0}")),
        "{t}"
    );

    // simulate: a new flow is predicted exactly, then reported as established.
    let sport = 41000;
    let p = cli.simulate(Proto::Tcp, (CLIENT, sport), (VIP, 80));
    assert_eq!(p["verdict"], "new", "{p}");
    assert_eq!(p["snat_attempt"], 0);
    let (snat, backend) = send_syn(&env, sport);
    assert_eq!(
        (s(&p["snat"]), s(&p["backend"])),
        (snat.as_str(), backend.as_str())
    );
    let p2 = cli.simulate(Proto::Tcp, (CLIENT, sport), (VIP, 80));
    assert_eq!(p2["verdict"], "established", "{p2}");
    assert_eq!(
        (s(&p2["snat"]), s(&p2["backend"])),
        (snat.as_str(), backend.as_str())
    );
    assert_eq!(p2["backend_id"], p["backend_id"]);

    // A taken first SNAT candidate: simulate and the program both move to the second one.
    let sport = 41001;
    let fkey = flow_key((CLIENT, sport), (VIP, 80), Proto::Tcp);
    let p = cli.simulate(Proto::Tcp, (CLIENT, sport), (VIP, 80));
    let b: SocketAddrV4 = s(&p["backend"]).parse().unwrap();
    let port0 = vmlb_tests::fixture::snat_port(&fkey, 0);
    let idx = hash::tuple_slot(
        u32::from_ne_bytes(b.ip().octets()),
        u32::from_ne_bytes(SNAT.octets()),
        b.port().to_be(),
        port0.to_be(),
        6,
        env.maps.slots.len() as u32,
    );
    // Another client's live flow holds the first candidate's tuple.
    let squatter = Flow {
        ctl: flow_state::ESTABLISHED as u64,
        service_id: svc_id,
        backend_addr: u32::from_ne_bytes(b.ip().octets()),
        snat_addr: u32::from_ne_bytes(SNAT.octets()),
        backend_port: b.port().to_be(),
        snat_port: port0.to_be(),
        proto: 6,
        ..Default::default()
    };
    env.maps.slots.set(idx as usize, &squatter);
    let p = cli.simulate(Proto::Tcp, (CLIENT, sport), (VIP, 80));
    assert_eq!(p["snat_attempt"], 1, "{p}");
    let port2 = vmlb_tests::fixture::snat_port(&fkey, 1);
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port2));
    assert_eq!(p["snat"], format!("{SNAT}:{port2}"));
    let (snat, backend) = send_syn(&env, sport);
    assert_eq!(
        (s(&p["snat"]), s(&p["backend"])),
        (snat.as_str(), backend.as_str())
    );

    // A reply, a port without a service, an address that is not a VIP.
    let p = cli.simulate(Proto::Tcp, (*b0.ip(), b0.port()), (*s0.ip(), s0.port()));
    assert_eq!(
        (s(&p["verdict"]), s(&p["client"]), s(&p["vip"])),
        ("reply", sent[0].0.as_str(), "10.10.1.128:80")
    );
    let p = cli.simulate(Proto::Udp, (CLIENT, 5000), (VIP, 80));
    assert_eq!(
        (s(&p["verdict"]), s(&p["counter"])),
        ("dropped", "drop_unknown_port")
    );
    assert_eq!(p["message"], "dropped: no service on 10.10.1.128:80/udp");
    let p = cli.simulate(Proto::Tcp, (CLIENT, 5000), (REMOTE, 80));
    assert_eq!(
        (s(&p["verdict"]), s(&p["counter"])),
        ("passed", "pass_not_vip")
    );

    // Without the state file the maps alone still answer, by address.
    drop(run);
    let v = cli.json(InspectCommand::Services);
    assert_eq!(v["services"][0]["name"], Value::Null);
    let v = cli.json(InspectCommand::Backends);
    assert_eq!(v["backends"][0]["service"], "10.10.1.128:80/tcp");
    assert_eq!(v["backends"][0]["weight"], Value::Null);
}

/// Source and destination of an Ethernet + IPv6 + TCP frame, as "[ip]:port".
fn tuple6(frame: &[u8]) -> (String, String) {
    let a = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (
        SocketAddr::new(a(22).into(), port(54)).to_string(),
        SocketAddr::new(a(38).into(), port(56)).to_string(),
    )
}

fn send_syn6(env: &Env, sport: u16) -> (String, String) {
    let syn = Packet6::tcp((CLIENT6, sport), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = env.run(&syn.build());
    assert_eq!(action, XDP_TX, "IPv6 SYN from port {sport}");
    tuple6(&out)
}

#[test]
fn inspect_and_simulate_agree_with_the_data_path_over_ipv6() {
    let mut env = Env::new().expect("fixture environment (needs root)");
    let spec4 = svc(80, Proto::Tcp, &[be(VM1, 8080)]);
    let spec6 = svc6(80, Proto::Tcp, &[(VM1_6, 8080), (VM2_6, 8080)]);
    env.install(&[spec4.clone(), spec6.clone()]).unwrap();
    let key6 = spec6.key();
    let svc6_id = env.reconciler.service(key6).unwrap().id();
    let be_id = |addr: Ipv6Addr| env.reconciler.backend_id(key6, addr, 8080).unwrap();

    let mut sent = Vec::new();
    for sport in [40000u16, 40001, 40002] {
        let (snat, backend) = send_syn6(&env, sport);
        sent.push((
            SocketAddr::new(CLIENT6.into(), sport).to_string(),
            snat,
            backend,
        ));
    }
    // One IPv4 flow beside them.
    let (action, _) = env.run(
        &Packet::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_TX);

    let pins = PinRoot::new("inspect6");
    pin_maps(&env, &pins.root);
    let run = RunDir(std::env::temp_dir().join(format!("vmlb-test-{}-run6", std::process::id())));
    let named = |name: &str, spec| {
        ServiceState::installed(name, &[], spec, &env.reconciler).expect("service installed")
    };
    state::write_atomic(
        &state::state_path(&run.0, IFACE),
        &DaemonState {
            iface: IFACE.into(),
            pid: std::process::id(),
            generation: 1,
            services: vec![named("web/v4", &spec4), named("web/v6", &spec6)],
            ..Default::default()
        },
    )
    .unwrap();
    let cli = Cli {
        pins: pins.root.clone(),
        run: run.0.clone(),
    };

    // services: both families, the IPv6 one with its VIP and SNAT address
    let v = cli.json(InspectCommand::Services);
    let svcs = v["services"].as_array().unwrap();
    assert_eq!(svcs.len(), 2, "{v}");
    let sv = svcs.iter().find(|s| s["name"] == "web/v6").expect("{v}");
    assert_eq!(sv["id"], svc6_id);
    assert_eq!(sv["vip"], VIP6.to_string());
    assert_eq!(sv["snat"], SNAT6.to_string());
    assert_eq!(
        (sv["backends"].as_u64(), sv["backends_up"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(sv["stats"]["new_flows"], 3);
    assert!(svcs.iter().any(|s| s["vip"] == VIP.to_string()));

    // backends: the IPv6 ones by id, with their slots of the IPv6 service's table
    let v = cli.json(InspectCommand::Backends);
    let bes6: Vec<&Value> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["service"] == "web/v6")
        .collect();
    assert_eq!(bes6.len(), 2, "{v}");
    let mut slots = 0;
    for b in &bes6 {
        let addr: Ipv6Addr = s(&b["addr"]).parse().unwrap();
        assert!([VM1_6, VM2_6].contains(&addr), "{b}");
        assert_eq!(b["id"], be_id(addr));
        assert_eq!(b["weight"], 1);
        slots += b["slots"].as_u64().unwrap();
        let to_it = sent
            .iter()
            .filter(|f| f.2.starts_with(&format!("[{addr}]:")))
            .count();
        assert_eq!(b["stats"]["new_flows"], to_it as u64, "{b}");
    }
    assert_eq!(slots, u64::from(spec6.ring_size));

    // maglev by the IPv6 address spelling
    let v = cli.json(InspectCommand::Maglev {
        service: format!("[{VIP6}]:80/tcp"),
    });
    let table: Vec<u32> = serde_json::from_value(v["table"].clone()).unwrap();
    assert_eq!(table, env.reconciler.table(key6).unwrap());
    assert_eq!(v["digest"], state::table_digest(&spec6, &env.reconciler));

    // flows: the three IPv6 clients as the program rewrote them, next to the IPv4 one
    let v = cli.json(InspectCommand::Flows(FlowArgs::default()));
    let flows = v["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 4, "{v}");
    let got: BTreeSet<(String, String, String)> = flows
        .iter()
        .filter(|f| f["service"] == "web/v6")
        .map(|f| {
            assert_eq!(f["vip"], format!("[{VIP6}]:80"));
            (
                s(&f["client"]).to_string(),
                s(&f["snat"]).to_string(),
                s(&f["backend"]).to_string(),
            )
        })
        .collect();
    assert_eq!(got, sent.iter().cloned().collect());
    let v = cli.json(InspectCommand::Nat(FlowArgs {
        addr: Some(CLIENT6.into()),
        ..Default::default()
    }));
    assert_eq!(v["matched"], 3, "{v}");
    let v = cli.json(InspectCommand::Flows(FlowArgs {
        service: Some("web/v6".into()),
        backend: Some(sent[0].2.clone()),
        ..Default::default()
    }));
    let to_first = sent.iter().filter(|f| f.2 == sent[0].2).count();
    assert_eq!(v["matched"], to_first, "{v}");
    let t = cli
        .inspect(InspectCommand::Flows(FlowArgs::default()), Output::Table)
        .unwrap();
    assert!(
        t.contains(&format!(
            "{}  ->  [{VIP6}]:80  =>  {}",
            sent[0].0, sent[0].1
        )),
        "{t}"
    );
    for what in [InspectCommand::Services, InspectCommand::Backends] {
        let t = cli.inspect(what.clone(), Output::Table).unwrap();
        assert!(
            t.contains(&VIP6.to_string()) || t.contains(&VM1_6.to_string()),
            "{what:?}:\n{t}"
        );
        println!("$ vmlb inspect {what:?}\n{t}");
    }

    // simulate: the new flow predicted exactly, then established; its reply; refusals.
    let sport = 41000;
    let p = cli.simulate(Proto::Tcp, (CLIENT6, sport), (VIP6, 80));
    assert_eq!(p["verdict"], "new", "{p}");
    assert_eq!(p["snat_attempt"], 0);
    let (snat, backend) = send_syn6(&env, sport);
    assert_eq!(
        (s(&p["snat"]), s(&p["backend"])),
        (snat.as_str(), backend.as_str())
    );
    let p2 = cli.simulate(Proto::Tcp, (CLIENT6, sport), (VIP6, 80));
    assert_eq!(p2["verdict"], "established", "{p2}");
    assert_eq!(
        (s(&p2["snat"]), s(&p2["backend"]), &p2["backend_id"]),
        (snat.as_str(), backend.as_str(), &p["backend_id"])
    );

    // A taken first SNAT candidate (another flow's tuple in FLOW_SLOTS6): simulate and the
    // program both move to the second one.
    let sport = 41001;
    let p = cli.simulate(Proto::Tcp, (CLIENT6, sport), (VIP6, 80));
    let b: SocketAddr = s(&p["backend"]).parse().unwrap();
    let port0: u16 = s(&p["snat"]).parse::<SocketAddr>().unwrap().port();
    let b6 = match b.ip() {
        IpAddr::V6(a) => vmlb_common::addr6(a.octets()),
        IpAddr::V4(a) => panic!("IPv4 backend {a}"),
    };
    let snat6 = vmlb_common::addr6(SNAT6.octets());
    let idx = hash::tuple_slot6(
        &b6,
        &snat6,
        b.port().to_be(),
        port0.to_be(),
        6,
        env.maps.v6.slots.len() as u32,
    );
    let squatter = vmlb_common::Flow6 {
        ctl: flow_state::ESTABLISHED as u64,
        service_id: svc6_id,
        backend_addr: b6,
        snat_addr: snat6,
        backend_port: b.port().to_be(),
        snat_port: port0.to_be(),
        proto: 6,
        ..Default::default()
    };
    env.maps.v6.slots.set(idx as usize, &squatter);
    let p = cli.simulate(Proto::Tcp, (CLIENT6, sport), (VIP6, 80));
    assert_eq!(p["snat_attempt"], 1, "{p}");
    let (snat, backend) = send_syn6(&env, sport);
    assert_eq!(
        (s(&p["snat"]), s(&p["backend"])),
        (snat.as_str(), backend.as_str())
    );

    // The reply of the first flow, a port without a service, an address that is not a VIP.
    let (b0, s0): (SocketAddr, SocketAddr) =
        (sent[0].2.parse().unwrap(), sent[0].1.parse().unwrap());
    let p = cli.simulate(Proto::Tcp, (b0.ip(), b0.port()), (s0.ip(), s0.port()));
    assert_eq!(
        (s(&p["verdict"]), s(&p["client"]), s(&p["vip"])),
        ("reply", sent[0].0.as_str(), format!("[{VIP6}]:80").as_str())
    );
    let p = cli.simulate(Proto::Udp, (CLIENT6, 5000), (VIP6, 80));
    assert_eq!(
        (s(&p["verdict"]), s(&p["counter"])),
        ("dropped", "drop_unknown_port")
    );
    let (action, _) = env.run(
        &Packet6::udp((CLIENT6, 5000), (VIP6, 80))
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_DROP, "the program agrees");
    let p = cli.simulate(Proto::Tcp, (CLIENT6, 5000), (CLIENT6, 80));
    assert_eq!(
        (s(&p["verdict"]), s(&p["counter"])),
        ("passed", "pass_not_vip")
    );
}
