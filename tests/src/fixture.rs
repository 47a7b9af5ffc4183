//! The fixture runner: the real, verifier-accepted vmlb program, its maps filled by the same
//! reconcile code the daemon uses, packets run through BPF_PROG_TEST_RUN inside a namespace whose
//! routes and neighbours make bpf_fib_lookup deterministic.
//!
//! Namespace "node": fx0 = 10.10.1.125/24 (the VLAN side, MAC NODE_MAC) with permanent neighbours
//! VM1..VM3; fx2 = 10.10.2.125/24 with REMOTE as a permanent neighbour (for redirects); NO_NEIGH
//! (10.10.1.9) is on-link but unresolved. The veth peers live in a second namespace.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use vmlb_common::{hash, Counter, FlowKey, DEFAULT_MAGLEV_ENTRIES, PROGRAM_NAME};
use vmlb_user::{
    dataplane::{loader, maps::BpfMaps},
    model::{BackendSpec, Proto, ServiceSpec},
    reconcile::Reconciler,
};

use crate::{
    netns::{self, Netns, NsGuard},
    packet::Mac,
};

pub const NODE_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x25];
pub const PEER_MAC: Mac = [0x02, 0, 0, 0, 0x0f, 0x01];
pub const NODE2_MAC: Mac = [0x02, 0, 0, 0, 0x02, 0x25];
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x50];
pub const VM1_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
pub const VM2_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];
pub const VM3_MAC: Mac = [0x02, 0, 0, 0, 0, 0x04];
pub const REMOTE_MAC: Mac = [0x02, 0, 0, 0, 0x02, 0x09];

pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 125);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 50);
pub const VM1: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const VM2: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 3);
pub const VM3: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 4);
pub const NO_NEIGH: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 9);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 9);

/// The IPv6 twins (ULA fd00:10:10:1::/64 on fx0), same last digits.
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x125);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x128);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x50);
pub const VM1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 2);
pub const VM2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 3);

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A backend at `addr:port`, weight 1, up.
pub fn be(addr: Ipv4Addr, port: u16) -> BackendSpec {
    BackendSpec {
        addr: addr.into(),
        port,
        weight: 1,
        up: true,
    }
}

/// A service on VIP:`port` SNATed to SNAT, with the default Maglev size.
pub fn svc(port: u16, proto: Proto, backends: &[BackendSpec]) -> ServiceSpec {
    ServiceSpec {
        vip: VIP.into(),
        port,
        proto,
        mode: Default::default(),
        snat: vec![SNAT.into()],
        snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
        ring_size: vmlb_common::maglev::DEFAULT_RING_SIZE,
        backends: backends.to_vec(),
    }
}

/// The `xdp_md` passed as BPF_PROG_TEST_RUN's context: only the ingress interface is set.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

pub struct Env {
    // Field order is drop order: leave the namespace before deleting it.
    _guard: NsGuard,
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pub reconciler: Reconciler,
    pub services: Vec<ServiceSpec>,
    pub ifindex: u32,
    pub ifindex2: u32,
    baseline: BTreeMap<Counter, u64>,
    pub node: Netns,
    _peer: Netns,
}

impl Env {
    pub fn new() -> anyhow::Result<Self> {
        Self::with_flows(None)
    }

    /// With a flow table of `flows` concurrent flows (default: the compiled-in size).
    pub fn with_flows(flows: Option<u32>) -> anyhow::Result<Self> {
        Self::with_sizes(loader::Sizes {
            flows,
            ..Default::default()
        })
    }

    /// With these map sizes (the reconciler's id spaces and Maglev space follow them).
    pub fn with_sizes(sizes: loader::Sizes) -> anyhow::Result<Self> {
        netns::sweep_stale();
        let node = Netns::new("fxnode")?;
        let peer = Netns::new("fxpeer")?;
        netns::veth(&node, "fx0", &mac(&NODE_MAC), &peer, "fx1", &mac(&PEER_MAC))?;
        netns::veth(
            &node,
            "fx2",
            &mac(&NODE2_MAC),
            &peer,
            "fx3",
            "02:00:00:00:0f:03",
        )?;
        node.ip(&["addr", "add", "10.10.1.125/24", "dev", "fx0"])?;
        node.ip(&["addr", "add", "10.10.2.125/24", "dev", "fx2"])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:10:10:1::125/64",
            "dev",
            "fx0",
            "nodad",
        ])?;
        for (ip, m) in [(VM1_6, VM1_MAC), (VM2_6, VM2_MAC)] {
            node.ip(&[
                "-6",
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac(&m),
                "dev",
                "fx0",
                "nud",
                "permanent",
            ])?;
        }
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (ip, m, dev) in [
            (VM1, VM1_MAC, "fx0"),
            (VM2, VM2_MAC, "fx0"),
            (VM3, VM3_MAC, "fx0"),
            (REMOTE, REMOTE_MAC, "fx2"),
        ] {
            node.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac(&m),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        // bpf_fib_lookup answers only where the kernel would forward.
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let ifindex = node.ifindex("fx0")?;
        let ifindex2 = node.ifindex("fx2")?;
        let guard = node.enter()?;
        let reconciler = Reconciler::with_limits(
            sizes.maglev.unwrap_or(DEFAULT_MAGLEV_ENTRIES),
            sizes.services.unwrap_or(vmlb_common::MAX_SERVICES),
            sizes.backends.unwrap_or(vmlb_common::MAX_BACKENDS),
        );
        let mut ebpf = loader::load(sizes)?;
        let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
        maps.init_config(ifindex, NODE_MAC)?;
        let mut env = Self {
            _guard: guard,
            ebpf,
            maps,
            reconciler,
            services: Vec::new(),
            ifindex,
            ifindex2,
            baseline: BTreeMap::new(),
            node,
            _peer: peer,
        };
        env.snapshot()?;
        Ok(env)
    }

    /// Install exactly these services through the reconciler (as the daemon would).
    pub fn install(&mut self, services: &[ServiceSpec]) -> anyhow::Result<()> {
        self.services = services.to_vec();
        self.reconciler
            .apply(services, &mut self.maps)
            .context("reconcile")?;
        Ok(())
    }

    fn prog(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .expect("program present")
            .try_into()
            .expect("an XDP program")
    }

    /// Run one packet received on fx0; returns the action and the packet as the program left it.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.ifindex, input)
    }

    pub fn run_on(&self, ifindex: u32, input: &[u8]) -> (u32, Vec<u8>) {
        // The kernel wants data_end == the input's length (data and data_meta 0: no metadata).
        let md = XdpMd {
            data_end: input.len() as u32,
            ingress_ifindex: ifindex,
            ..Default::default()
        };
        // SAFETY: XdpMd is repr(C) plain integers; viewing it as bytes is sound.
        let ctx = unsafe {
            std::slice::from_raw_parts(
                (&md as *const XdpMd).cast::<u8>(),
                std::mem::size_of::<XdpMd>(),
            )
        };
        let mut out = vec![0u8; input.len() + 512];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(ctx);
        let res = self.prog().test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    /// Remember the current counters; `delta` reports changes since.
    pub fn snapshot(&mut self) -> anyhow::Result<()> {
        self.baseline = self.maps.counters()?.into_iter().collect();
        Ok(())
    }

    /// Counters that changed since the last snapshot. `hop_lookup` is left out: the next-hop
    /// cache is per CPU and a test thread may move between CPUs, so how many lookups a run
    /// needs is not the test's to fix (fixtures_flow.rs checks the cache on its own).
    pub fn delta(&self) -> BTreeMap<Counter, u64> {
        self.maps
            .counters()
            .expect("reading counters")
            .into_iter()
            .filter_map(|(c, v)| {
                let d = v - self.baseline.get(&c).copied().unwrap_or(0);
                (d != 0 && c != Counter::HopLookup).then_some((c, d))
            })
            .collect()
    }

    /// Assert that exactly these counters moved by exactly these amounts, then re-snapshot.
    #[track_caller]
    pub fn expect_counters(&mut self, want: &[(Counter, u64)]) {
        let want: BTreeMap<Counter, u64> = want.iter().copied().collect();
        let got = self.delta();
        assert_eq!(got, want, "counter deltas");
        self.snapshot().expect("snapshot");
    }

    /// The backend (address, port) and SNAT port that user space predicts for a new client flow
    /// of `spec`, from its own Maglev table and the shared flow hash (first SNAT candidate).
    pub fn predict(&self, spec: &ServiceSpec, key: &FlowKey) -> (Ipv4Addr, u16, u16) {
        let skey = spec.key();
        let table = self.reconciler.table(skey).expect("service installed");
        let h = hash::flow_hash(key);
        let id = table[hash::maglev_slot(h, table.len() as u32) as usize];
        let b = spec
            .backends
            .iter()
            .find(|b| self.reconciler.backend_id(skey, b.addr, b.port) == Some(id))
            .expect("table names a known backend");
        let range = hash::prime_range(spec.snat_ports.0, spec.snat_ports.1);
        let std::net::IpAddr::V4(addr) = b.addr else {
            panic!("the packet fixtures serve IPv4 services");
        };
        (
            addr,
            b.port,
            hash::snat_port(h, 0, spec.snat_ports.0, range),
        )
    }
}

/// The `FlowKey` of a client packet.
pub fn flow_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: Proto) -> FlowKey {
    FlowKey {
        src_addr: u32::from_ne_bytes(src.0.octets()),
        dst_addr: u32::from_ne_bytes(dst.0.octets()),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto: proto.number(),
        _pad0: 0,
        _pad1: 0,
    }
}

/// The `attempt`-th SNAT port candidate of a client flow with the default port range.
pub fn snat_port(key: &FlowKey, attempt: u32) -> u16 {
    let range = hash::prime_range(vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX);
    hash::snat_port(
        hash::flow_hash(key),
        attempt,
        vmlb_common::SNAT_PORT_MIN,
        range,
    )
}
