//! The lab of DESIGN.md in network namespaces: a client, the "VLAN 1512" segment (a Linux bridge
//! in its own namespace), the node whose VLAN-side veth runs vmlb, and VMs serving real Apache
//! httpd. Every address lives only inside these namespaces; deleting them removes everything.
//!
//! One builder serves two lifetimes ([`Naming`]): the per-test lab (unique namespace names,
//! deleted on drop, also on panic) and the persistent lab of `vmlb-lab up|down|status`
//! ([`persistent`]: fixed `vmlb-lab-*` names, daemonized httpds and a pinned peer XDP link that
//! outlive the process), so tests and a running lab never collide.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use aya::{
    maps::PerCpuArray,
    programs::{links::FdLink, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use vmlb_user::dataplane::loader::TOOLS_OBJ;

use crate::netns::{run, sweep_stale};

/// The lab's namespaces are plain `netns::Netns` (fixed names for the persistent lab).
pub use crate::netns::{Netns as Ns, NsGuard as Entered};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);
/// The node's address on the VLAN: SNAT source towards the VMs (the EgressIP's role).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 125);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 50);
pub const VM1_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const VM2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 3);
/// A third VM that tests add while the daemon runs.
pub const VM3_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 4);
/// The IPv6 lab (`LabOptions::ipv6`): ULA fd00:10:10:1::/64 on the same segment, each host's
/// address ending in the same digits as its IPv4 one (`addr6`).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x128);
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x125);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x50);
/// The far side of the IPv6 PMTU lab.
pub const ROUTER_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 1);
pub const FAR_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 2, 0, 0, 0, 0x50);
pub const FAR_NET6: &str = "fd00:10:10:2::/64";

/// The IPv6 twin of a lab address on 10.10.1.0/24: fd00:10:10:1::<the same digits>.
pub fn addr6(v4: Ipv4Addr) -> Ipv6Addr {
    let last = u16::from_str_radix(&v4.octets()[3].to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, last)
}

/// The node's VLAN-side interface (untagged: this kernel has no 802.1Q devices).
pub const NODE_DEV: &str = "vlan1512";
pub const NODE_MAC: &str = "02:00:0a:0a:01:7d";
/// The bridge-side end of the node's veth: where the node's XDP_TX frames arrive.
pub const NODE_PEER: &str = "p-node";
pub const CLIENT_MAC: &str = "02:00:0a:0a:01:32";
const BRIDGE: &str = "br1512";
/// The ports every VM serves (the seed's ServiceEntry has 80 and 443; plain HTTP on both is all
/// an L4 balancer needs).
pub const VM_PORTS: [u16; 2] = [80, 443];

static NEXT_NS: AtomicU32 = AtomicU32::new(0);
static NEXT_HTTPD: AtomicU32 = AtomicU32::new(0);

/// A network namespace of the lab, driven by name through iproute2 as a person would. Unlike
/// `netns::Netns` (always unique, always deleted) it can carry a fixed name and outlive the
/// process, which the persistent lab needs.
/// How the lab's namespaces are named and how long they live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// `vmlbt-<pid>-l<n>-<tag>`, deleted on drop; `netns::sweep_stale` removes the ones of
    /// processes that were killed before their destructors ran.
    PerProcess,
    /// `vmlb-lab-<tag>`, kept until `vmlb-lab down`.
    Fixed,
}

impl Naming {
    fn ns(self, tag: &str) -> anyhow::Result<Ns> {
        match self {
            Naming::PerProcess => {
                let n = NEXT_NS.fetch_add(1, Ordering::Relaxed);
                Ns::create(format!("vmlbt-{}-l{n}-{tag}", std::process::id()), true)
            }
            Naming::Fixed => Ns::create(format!("{}{tag}", persistent::PREFIX), false),
        }
    }
}

pub struct Vm {
    pub name: &'static str,
    pub addr: Ipv4Addr,
    /// Its IPv6 address in the IPv6 lab.
    pub addr6: Option<Ipv6Addr>,
    pub ns: Ns,
}

/// One more vmlb node on the segment ([`Lab::add_node`]): its own namespace, MAC and address,
/// its VLAN-side interface named [`NODE_DEV`] like the first node's.
/// Field order is drop order: the peer's XDP program, then the namespace.
pub struct Node {
    _peer_xdp: Ebpf,
    pub ns: Ns,
    pub addr: Ipv4Addr,
    pub mac: String,
    /// The bridge-side end of its veth, in the segment.
    pub peer: String,
}

/// Field order is drop order: the peers' XDP links, then the namespaces, the segment last.
pub struct Lab {
    _peer_xdp: Option<Ebpf>,
    /// The trunk's tc programs (`LabOptions::trunk_vlan`); dropping it detaches them.
    pub trunk: Option<Trunk>,
    /// Nodes added with [`Lab::add_node`] (the first node is [`Lab::node`]).
    pub more_nodes: Vec<Node>,
    pub client: Ns,
    pub node: Ns,
    pub vms: Vec<Vm>,
    /// The routed part of the PMTU lab (`LabOptions::pmtu`).
    pub far: Option<Far>,
    pub segment: Ns,
    naming: Naming,
    /// `LabOptions::ipv6`: VMs added later get their IPv6 address too.
    ipv6: bool,
}

/// Variants of the per-test lab; `Default` is the seed's topology.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabOptions {
    /// Make the wire between the segment and the node an 802.1Q trunk carrying this VLAN id
    /// (see [`Trunk`]).
    pub trunk_vlan: Option<u16>,
    /// Add the router, the 1280-byte link and the far client of [`Far`].
    pub pmtu: bool,
    /// Dual stack: every host also gets its IPv6 address (`addr6`; the far side of the PMTU
    /// path too). Addresses skip duplicate address detection (`nodad`): the lab's addresses are
    /// unique by construction, and waiting out DAD would only slow every test down; neighbour
    /// discovery itself (the VIP's, the backends') is real.
    pub ipv6: bool,
}

/// The node's wire as an 802.1Q trunk, built from tc BPF because this kernel has neither 8021q
/// devices nor bridge VLAN filtering.
///
/// On the segment's side, `p-node` plays the switch's trunk port: its egress tags every frame
/// the bridge sends to the node (`trunk_push`), its ingress strips the tag of frames from the
/// node and drops untagged or other-VLAN ones (`trunk_pop`). On the node, `vlan1512` carries
/// the same pair, a lab-only stand-in for the VLAN sub-interface a real node would give its
/// kernel stack (the node still resolves the VMs with ARP and health-checks them from
/// 10.10.1.125): its egress tags what the stack sends, its ingress strips the tag before the
/// stack sees the frame. vmlb's XDP program runs before tc ingress, so it sees every frame
/// tagged, exactly as on a real trunk; and what it sends with XDP_TX skips tc egress, so it
/// must keep the tag itself.
///
/// `bpf_skb_vlan_push` only sets the skb's VLAN metadata. A device with tx VLAN offload (a veth
/// has it) would hand that metadata to its peer, whose XDP program would never see a tag, so
/// both ends have it turned off (`ethtool -K dev txvlan off`): the kernel then writes the tag
/// into the frame before it leaves. `xdp_vlan_census` checks that in the tests.
pub struct Trunk {
    pub vid: u16,
    obj: Ebpf,
}

/// Indices of the tools object's `TRUNK_STATS` (as in vmlb-ebpf/src/bin/tools.rs).
pub mod trunk_stat {
    pub const PUSHED: u32 = 0;
    pub const ALREADY_TAGGED: u32 = 1;
    pub const POPPED: u32 = 2;
    pub const DROPPED: u32 = 3;
    pub const CENSUS_TRUNK_VID: u32 = 4;
    pub const CENSUS_OTHER_TAG: u32 = 5;
    pub const CENSUS_UNTAGGED: u32 = 6;
}

/// The tools object with `TRUNK_VID` set.
pub fn tools_with_vid(vid: u16) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .override_global("TRUNK_VID", &vid, true)
        .load(TOOLS_OBJ)
        .context("loading the tools object")
}

/// `TRUNK_STATS[i]` of a tools object, summed over CPUs.
pub fn trunk_stat(obj: &Ebpf, i: u32) -> anyhow::Result<u64> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(obj.map("TRUNK_STATS").context("no TRUNK_STATS map")?)?;
    Ok(map.get(&i, 0)?.iter().sum())
}

impl Trunk {
    fn build(segment: &Ns, node: &Ns, vid: u16) -> anyhow::Result<Self> {
        let mut obj = tools_with_vid(vid)?;
        for name in ["trunk_push", "trunk_pop"] {
            let prog: &mut SchedClassifier = obj
                .program_mut(name)
                .with_context(|| format!("{name} missing"))?
                .try_into()?;
            prog.load()?;
        }
        let ends = [(segment, NODE_PEER), (node, NODE_DEV)];
        for (ns, dev) in ends {
            ns.exec(&["ethtool", "-K", dev, "txvlan", "off"])
                .context("turning off tx VLAN offload")?;
        }
        // Both ends tag before either drops untagged frames: the namespaces' stacks send on
        // their own (IPv6 DAD, MLD, router solicitations), and a frame sent untagged while
        // only the far end filtered would count as a drop the tests did not cause.
        for (name, how) in [
            ("trunk_push", TcAttachType::Egress),
            ("trunk_pop", TcAttachType::Ingress),
        ] {
            for (ns, dev) in ends {
                // Interface names are looked up in the calling thread's namespace.
                let _in_ns = ns.enter()?;
                let prog: &mut SchedClassifier =
                    obj.program_mut(name).expect("loaded above").try_into()?;
                prog.attach(dev, how)
                    .with_context(|| format!("attaching {name} to {dev} in {}", ns.name()))?;
            }
        }
        Ok(Self { vid, obj })
    }

    /// One of the trunk programs' counters (`trunk_stat::*`), summed over both ends.
    pub fn stat(&self, i: u32) -> anyhow::Result<u64> {
        trunk_stat(&self.obj, i)
    }
}

/// Where the PMTU lab's far client lives: the VLAN's router `rtr` (10.10.1.1 on the segment),
/// a 1280-byte link to a second router `wan`, and behind that `client` (10.10.2.50) on a 1500
/// link. The node and the VMs route 10.10.2.0/24 through 10.10.1.1.
///
/// The narrow link sits in the middle of the path on purpose. Were it the client's own link,
/// the client would announce MSS 1240 and nothing would ever need path-MTU discovery; with its
/// own link at 1500 it announces 1460, the VM sends 1500-byte segments with DF, and `rtr` (a
/// router, which a bridge is not) answers each with ICMP fragmentation-needed (MTU 1280) to the
/// packet's source. Through the VIP that source is the VIP: the ICMP reaches the node, and only
/// vmlb translating it back to the VM (inner VM:80 -> SNAT address) lets the VM lower its path
/// MTU; otherwise the response is black-holed. A VM fetched directly answers to its own
/// address and gets the ICMP itself, which the tests use to check the topology without vmlb.
pub struct Far {
    pub client: Ns,
    pub wan: Ns,
    pub router: Ns,
}

/// The VLAN's router in the PMTU lab.
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
/// The client behind the 1280-byte link.
pub const FAR_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 50);
pub const FAR_NET: &str = "10.10.2.0/24";
/// The narrow link's MTU.
pub const NARROW_MTU: u32 = 1280;

impl Far {
    fn build(naming: Naming, segment: &Ns, ipv6: bool) -> anyhow::Result<Self> {
        let router = naming.ns("rtr")?;
        plug(segment, &router, "eth0", &vm_mac(ROUTER_ADDR), "p-rtr")?;
        router.ip(&["addr", "add", &format!("{ROUTER_ADDR}/24"), "dev", "eth0"])?;
        let wan = naming.ns("wan")?;
        let mtu = NARROW_MTU.to_string();
        veth_between(&router, "narrow0", &wan, "narrow1")?;
        for (ns, dev, addr) in [
            (&router, "narrow0", "10.10.9.1/30"),
            (&wan, "narrow1", "10.10.9.2/30"),
        ] {
            ns.ip(&["link", "set", dev, "mtu", &mtu])?;
            ns.ip(&["addr", "add", addr, "dev", dev])?;
        }
        let client = naming.ns("farclient")?;
        veth_between(&wan, "eth1", &client, "eth0")?;
        wan.ip(&["addr", "add", "10.10.2.1/24", "dev", "eth1"])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{FAR_CLIENT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        client.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        wan.ip(&["route", "add", "default", "via", "10.10.9.1"])?;
        router.ip(&["route", "add", FAR_NET, "via", "10.10.9.2"])?;
        for ns in [&router, &wan] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
        }
        if ipv6 {
            // The same path over IPv6; the narrow link is then exactly IPv6's minimum MTU.
            let add = |ns: &Ns, a: &str, dev: &str| {
                ns.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"])
                    .map(drop)
            };
            add(&router, &format!("{ROUTER_ADDR6}/64"), "eth0")?;
            add(&router, "fd00:10:10:9::1/64", "narrow0")?;
            add(&wan, "fd00:10:10:9::2/64", "narrow1")?;
            add(&wan, "fd00:10:10:2::1/64", "eth1")?;
            add(&client, &format!("{FAR_CLIENT_ADDR6}/64"), "eth0")?;
            client.ip(&["-6", "route", "add", "default", "via", "fd00:10:10:2::1"])?;
            wan.ip(&["-6", "route", "add", "default", "via", "fd00:10:10:9::1"])?;
            router.ip(&["-6", "route", "add", FAR_NET6, "via", "fd00:10:10:9::2"])?;
            for ns in [&router, &wan] {
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
        }
        Ok(Self {
            client,
            wan,
            router,
        })
    }
}

/// A veth pair `a_dev` (in `a`) - `b_dev` (in `b`), both up, transmit checksum offload off (see
/// `plug`).
fn veth_between(a: &Ns, a_dev: &str, b: &Ns, b_dev: &str) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    a.exec(&["ethtool", "-K", a_dev, "tx", "off"])?;
    b.exec(&["ethtool", "-K", b_dev, "tx", "off"])?;
    Ok(())
}

/// Join a veth whose other end is `dev` in `ns` to the segment's bridge. Transmit checksum
/// offload is turned off on `dev`: a veth otherwise sends TCP with a partial (pseudo-header only)
/// checksum and metadata saying so, which XDP cannot see; once the node rewrites and XDP_TXes
/// such a frame the metadata is gone and the receiver rightly drops it. Real NICs on the VLAN put
/// complete checksums on the wire, which is what vmlb updates incrementally.
/// The bridge port's MAC is `mac` with its second byte set to 0x15.
fn plug(segment: &Ns, ns: &Ns, dev: &str, mac: &str, port: &str) -> anyhow::Result<()> {
    let port_mac = format!("02:15{}", &mac[5..]);
    ns.ip(&[
        "link",
        "add",
        dev,
        "address",
        mac,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "address",
        &port_mac,
        "netns",
        segment.name(),
    ])?;
    ns.ip(&["link", "set", dev, "up"])?;
    segment.ip(&["link", "set", port, "up"])?;
    segment.ip(&["link", "set", port, "master", BRIDGE])?;
    ns.exec(&["ethtool", "-K", dev, "tx", "off"])
        .context("turning off checksum offload (needs ethtool)")?;
    Ok(())
}

/// Attach the tools object's `xdp_pass` in native mode to `dev` in the calling thread's
/// namespace. Without `pin`, dropping the returned object detaches it; with `pin`, the link is
/// pinned there and stays attached until the pin is removed (or the device goes away).
fn attach_xdp_pass(dev: &str, pin: Option<&Path>) -> anyhow::Result<Ebpf> {
    let mut obj = Ebpf::load(TOOLS_OBJ).context("loading the tools object")?;
    let prog: &mut Xdp = obj
        .program_mut("xdp_pass")
        .context("xdp_pass missing")?
        .try_into()?;
    prog.load()?;
    let id = prog.attach(dev, XdpMode::Driver)?;
    if let Some(pin) = pin {
        // Taking the link out of the program means dropping the object no longer detaches it.
        let link = FdLink::try_from(prog.take_link(id)?).context("XDP link is not a bpf_link")?;
        link.pin(pin)
            .with_context(|| format!("pinning the peer XDP link at {}", pin.display()))?;
    }
    Ok(obj)
}

impl Lab {
    /// The per-test lab: unique names, everything deleted when it drops.
    pub fn new() -> anyhow::Result<Self> {
        Self::with(LabOptions::default())
    }

    /// A per-test lab with variants (a trunk, the PMTU path).
    pub fn with(opts: LabOptions) -> anyhow::Result<Self> {
        sweep_stale();
        let mut lab = Self::build(Naming::PerProcess, None)?;
        if let Some(vid) = opts.trunk_vlan {
            lab.trunk = Some(Trunk::build(&lab.segment, &lab.node, vid).context("the trunk")?);
        }
        if opts.ipv6 {
            lab.ipv6 = true;
            lab.client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{CLIENT_ADDR6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            lab.node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{NODE_ADDR6}/64"),
                "dev",
                NODE_DEV,
                "nodad",
            ])?;
            // bpf_fib_lookup answers IPv6 only where the kernel would forward it.
            lab.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            for vm in &mut lab.vms {
                let a = addr6(vm.addr);
                vm.ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                vm.addr6 = Some(a);
            }
        }
        if opts.pmtu {
            let far = Far::build(lab.naming, &lab.segment, opts.ipv6).context("the PMTU path")?;
            // The node reaches off-VLAN clients through the VLAN's router, as would the VMs.
            let via = ROUTER_ADDR.to_string();
            lab.node
                .ip(&["route", "add", FAR_NET, "via", &via, "dev", NODE_DEV])?;
            for vm in &lab.vms {
                vm.ns.ip(&["route", "add", "default", "via", &via])?;
            }
            if opts.ipv6 {
                let via = ROUTER_ADDR6.to_string();
                lab.node
                    .ip(&["-6", "route", "add", FAR_NET6, "via", &via, "dev", NODE_DEV])?;
                for vm in &lab.vms {
                    vm.ns.ip(&["-6", "route", "add", "default", "via", &via])?;
                }
            }
            lab.far = Some(far);
        }
        Ok(lab)
    }

    /// Build the seed's topology. `peer_pin` (fixed naming) pins the peer's XDP link instead of
    /// holding it in the returned value. On error a per-process lab is deleted by its drop; a
    /// fixed one is left for `persistent::down`.
    fn build(naming: Naming, peer_pin: Option<&Path>) -> anyhow::Result<Self> {
        let segment = naming.ns("seg")?;
        // STP is off by default, so ports forward as soon as they are up.
        segment.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        segment.ip(&["link", "set", BRIDGE, "up"])?;

        let client = naming.ns("client")?;
        plug(&segment, &client, "eth0", CLIENT_MAC, "p-client")?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        // No static neighbour anywhere: the client resolves the VIP through ARP, which vmlb's
        // program answers on the node, and the node resolves the VMs itself (the daemon keeps
        // managed neighbour entries for its backends).

        let node = naming.ns("node")?;
        plug(&segment, &node, NODE_DEV, NODE_MAC, NODE_PEER)?;
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", NODE_DEV])?;
        // bpf_fib_lookup answers FWD_DISABLED unless the ingress device forwards.
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // A veth's XDP_TX queues the frame on its peer's XDP ring, but only wakes the peer's
        // NAPI if the peer has an XDP program itself (veth_xdp_flush checks rcv_rq->xdp_prog).
        // Enabling GRO on the peer gives it NAPI and a ring, so XDP_TX "succeeds" (xdp_tx
        // counts, no xdp_tx_errors), yet on 6.18 the frames then sit in the ring and never
        // reach the bridge. An XDP_PASS program on the peer makes them flow.
        let peer_xdp = {
            let _in_segment = segment.enter()?;
            attach_xdp_pass(NODE_PEER, peer_pin)
                .context("native XDP_PASS on the node's peer veth")?
        };

        let mut lab = Self {
            // A pinned link keeps itself attached; the object is not needed any more.
            _peer_xdp: peer_pin.is_none().then_some(peer_xdp),
            trunk: None,
            more_nodes: Vec::new(),
            client,
            node,
            vms: Vec::new(),
            far: None,
            segment,
            naming,
            ipv6: false,
        };
        lab.add_vm("vm1", VM1_ADDR)?;
        lab.add_vm("vm2", VM2_ADDR)?;
        Ok(lab)
    }

    /// Plug one more VM into the segment (its namespace named like the lab's). The node learns
    /// its MAC through ARP, as on a real VLAN.
    pub fn add_vm(&mut self, name: &'static str, addr: Ipv4Addr) -> anyhow::Result<&Vm> {
        let ns = self.naming.ns(name)?;
        let mac = vm_mac(addr);
        plug(&self.segment, &ns, "eth0", &mac, &format!("p-{name}"))?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        let addr6 = if self.ipv6 {
            let a = addr6(addr);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            Some(a)
        } else {
            None
        };
        self.vms.push(Vm {
            name,
            addr,
            addr6,
            ns,
        });
        Ok(self.vms.last().expect("just pushed"))
    }

    /// Plug one more vmlb node into the segment, set up like the first one (its VLAN-side
    /// interface is [`NODE_DEV`] with `mac` and `addr`, forwarding on, the XDP_PASS workaround
    /// on its peer veth, see `build`). For the per-test lab: the peer's program is held by this
    /// value, not pinned, so it detaches when the lab drops.
    pub fn add_node(&mut self, tag: &str, addr: Ipv4Addr, mac: &str) -> anyhow::Result<&Node> {
        let ns = self.naming.ns(tag)?;
        let peer = format!("p-{tag}");
        plug(&self.segment, &ns, NODE_DEV, mac, &peer)?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", NODE_DEV])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let peer_xdp = {
            let _in_segment = self.segment.enter()?;
            attach_xdp_pass(&peer, None)
                .with_context(|| format!("native XDP_PASS on {peer}, the peer of node {tag}"))?
        };
        self.more_nodes.push(Node {
            _peer_xdp: peer_xdp,
            ns,
            addr,
            mac: mac.to_string(),
            peer,
        });
        Ok(self.more_nodes.last().expect("just pushed"))
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Interface statistics, neighbour tables, veth XDP counters (xdp_tx, xdp_tx_errors) and TCP
    /// checksum errors of every namespace, for failure reports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut show = |ns: &Ns, cmd: &[&str]| {
            let text = match ns.exec(cmd) {
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => format!("{e:#}\n"),
            };
            out += &format!("--- {}: {}\n{text}", ns.name(), cmd.join(" "));
        };
        let far = self.far.iter().flat_map(|f| [&f.router, &f.wan, &f.client]);
        for ns in [&self.client, &self.node, &self.segment]
            .into_iter()
            .chain(self.more_nodes.iter().map(|n| &n.ns))
            .chain(self.vms.iter().map(|v| &v.ns))
            .chain(far)
        {
            show(ns, &["ip", "-s", "link"]);
            show(ns, &["ip", "neigh"]);
            show(ns, &["nstat", "-asz", "TcpInCsumErrors", "TcpInSegs"]);
        }
        show(&self.node, &["ethtool", "-S", NODE_DEV]);
        show(&self.segment, &["ethtool", "-S", NODE_PEER]);
        for n in &self.more_nodes {
            show(&n.ns, &["ethtool", "-S", NODE_DEV]);
            show(&self.segment, &["ethtool", "-S", &n.peer]);
        }
        if let Some(t) = &self.trunk {
            out += &format!("--- trunk (VLAN {}) counters:", t.vid);
            for (name, i) in [
                ("pushed", trunk_stat::PUSHED),
                ("already_tagged", trunk_stat::ALREADY_TAGGED),
                ("popped", trunk_stat::POPPED),
                ("dropped", trunk_stat::DROPPED),
            ] {
                match t.stat(i) {
                    Ok(v) => out += &format!(" {name}={v}"),
                    Err(e) => out += &format!(" {name}=({e:#})"),
                }
            }
            out += "\n";
        }
        out
    }
}

/// A VM's MAC: 02:00 then its IPv4 address, so a neighbour table reads at a glance.
pub fn vm_mac(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// `curl -sS --max-time <secs> <url>` inside `ns`: the body, or an error with curl's stderr.
pub fn curl(ns: &Ns, url: &str, secs: u32) -> anyhow::Result<String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", &secs.to_string(), url])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// New connections from `ns` to `url(i)` (`i` = 0, 1, …) until both VMs have answered, at most
/// 20 (2^-19 that 20 miss one of two): each body (the VM's name) with its count. A failed
/// request panics with the error and `report()`.
pub fn until_both_answer(
    ns: &Ns,
    url: impl Fn(usize) -> String,
    report: impl Fn() -> String,
) -> std::collections::BTreeMap<String, usize> {
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..20 {
        let u = url(i);
        match curl(ns, &u, 3) {
            Ok(body) => *answers.entry(body.trim().to_string()).or_default() += 1,
            Err(e) => panic!("request {i} to {u}: {e:#}\n{}", report()),
        }
        if answers.len() == 2 {
            break;
        }
    }
    answers
}

/// Every server logged requests whose line contains `tag`, and each of them came from `source`
/// (what the VMs must see: the client for dnat, a SNAT address otherwise).
pub fn assert_logged_from(servers: &[Httpd], tag: &str, source: impl std::fmt::Display) {
    for s in servers {
        let lines: Vec<String> = s
            .access_lines()
            .into_iter()
            .filter(|l| l.contains(tag))
            .collect();
        assert!(!lines.is_empty(), "{} logged no {tag} request", s.name);
        for l in &lines {
            assert!(
                l.starts_with(&format!("{source} ")),
                "{} saw another source than {source}: {l}",
                s.name
            );
        }
    }
}

/// One HTTP/1.1 keep-alive connection opened from inside a namespace (the socket stays there),
/// for checks that need a connection to live across a change: each `get` reuses it.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn open(ns: &Ns, to: SocketAddr) -> anyhow::Result<Self> {
        let stream = {
            let _in_ns = ns.enter()?;
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connecting to {to} from {}", ns.name()))?
        };
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// The local (client-side) port, to find this connection in logs.
    pub fn local_port(&self) -> anyhow::Result<u16> {
        Ok(self.reader.get_ref().local_addr()?.port())
    }

    /// GET `path` on this connection; the body of a 200 answer (which must carry a
    /// Content-Length, as Apache's static files do).
    pub fn get(&mut self, path: &str) -> anyhow::Result<String> {
        self.reader
            .get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: vms.vlan-1512.org\r\n\r\n").as_bytes())
            .context("sending a request on the kept-alive connection")?;
        let mut line = String::new();
        self.reader.read_line(&mut line).context("reading status")?;
        ensure!(line.starts_with("HTTP/1.1 200"), "status line {line:?}");
        let mut len = None;
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .context("reading headers")?;
            ensure!(!line.is_empty(), "connection closed inside the headers");
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(v.trim().parse::<usize>()?);
                }
            }
        }
        let mut body = vec![0; len.context("no Content-Length")?];
        self.reader.read_exact(&mut body).context("reading body")?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// Write an Apache httpd site serving "<name>\n" on `addr` ports 80 and 443 into `dir` (config,
/// document root, logs and pid file all inside it); returns the config's path.
fn write_site(dir: &Path, name: &str, addrs: &[IpAddr]) -> anyhow::Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    let docs = dir.join("htdocs");
    fs::create_dir_all(&docs)?;
    fs::write(docs.join("index.html"), format!("{name}\n"))?;
    // The workers run as www-data and must read the document root whatever the umask.
    for (p, mode) in [
        (dir, 0o755),
        (&docs, 0o755),
        (&docs.join("index.html"), 0o644),
    ] {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
    }
    let d = dir.display();
    let listen: String = addrs
        .iter()
        .flat_map(|a| VM_PORTS.iter().map(move |p| SocketAddr::new(*a, *p)))
        .map(|s| format!("Listen {s}\n"))
        .collect();
    // log_config and unixd are compiled into Debian's apache2; the rest are modules.
    // %a is the client address and %{remote}p its port: what the SNAT must rewrite. Keep-alive
    // is on so one connection can carry many requests (tests check that it keeps its backend).
    let conf = format!(
        r#"ServerRoot "{d}"
ServerName {name}
{listen}PidFile "{d}/httpd.pid"
DefaultRuntimeDir "{d}"
Mutex file:{d} default
ErrorLog "{d}/error.log"
LogLevel warn
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
User www-data
Group www-data
StartServers 1
ServerLimit 1
ThreadsPerChild 16
MaxRequestWorkers 16
MinSpareThreads 1
MaxSpareThreads 16
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 60
TypesConfig /etc/mime.types
DocumentRoot "{d}/htdocs"
DirectoryIndex index.html
<Directory "{d}/htdocs">
    Require all granted
</Directory>
LogFormat "%a %{{remote}}p \"%r\" %>s" vmlb
CustomLog "{d}/access.log" vmlb
"#
    );
    let conf_path = dir.join("httpd.conf");
    fs::write(&conf_path, conf)?;
    Ok(conf_path)
}

/// Poll until the server at `addr` answers with its page from inside its own namespace (at most
/// ~10 s). `gone` says why the server can no longer come up (it exited), if it did.
fn wait_serving(
    ns: &Ns,
    name: &str,
    addr: Ipv4Addr,
    mut gone: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let url = format!("http://{addr}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(why) = gone()? {
            bail!("apache2 for {name} {why}");
        }
        let last = match curl(ns, &url, 1) {
            Ok(body) if body.trim() == name => return Ok(()),
            Ok(body) => format!("unexpected body {body:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("apache2 for {name} not ready after 10 s ({last})");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn read_or_empty(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn site_logs(dir: &Path, name: &str) -> String {
    let r = |f: &str| read_or_empty(&dir.join(f));
    format!(
        "\n--- {name} access.log\n{}--- {name} error.log\n{}--- {name} stderr\n{}",
        r("access.log"),
        r("error.log"),
        r("stderr.log"),
    )
}

/// Apache httpd serving "<name>\n" on `addr` ports 80 and 443 inside a namespace, with its own
/// config, logs and document root in a temporary directory. Dropping it stops the whole process
/// group.
pub struct Httpd {
    pub name: String,
    dir: PathBuf,
    child: Child,
    /// Access log bytes written before the test's traffic (the readiness probe).
    log_start: usize,
}

impl Httpd {
    pub fn start(ns: &Ns, name: &str, addr: Ipv4Addr) -> anyhow::Result<Self> {
        Self::start_on(ns, name, addr, None)
    }

    /// A VM's httpd on its IPv4 address and, in the IPv6 lab, on its IPv6 one too.
    pub fn start_vm(vm: &Vm) -> anyhow::Result<Self> {
        Self::start_on(&vm.ns, vm.name, vm.addr, vm.addr6)
    }

    fn start_on(
        ns: &Ns,
        name: &str,
        addr: Ipv4Addr,
        addr6: Option<Ipv6Addr>,
    ) -> anyhow::Result<Self> {
        // Unique per call: tests of one process run in parallel and all have a "vm1".
        let n = NEXT_HTTPD.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmlb-e2e-{}-{n}-{name}", std::process::id()));
        let mut addrs = vec![IpAddr::V4(addr)];
        addrs.extend(addr6.map(IpAddr::V6));
        let conf = write_site(&dir, name, &addrs)?;
        let stderr = fs::File::create(dir.join("stderr.log"))?;
        // `ip netns exec` execs apache2, so the child is apache's parent process; with
        // -DFOREGROUND it neither forks away nor calls setsid, so its own process group holds
        // it and its workers.
        let child = ns
            .command("apache2")
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawning apache2")?;
        let mut httpd = Self {
            name: name.to_string(),
            dir,
            child,
            log_start: 0,
        };
        let child = &mut httpd.child;
        let ready = wait_serving(ns, name, addr, || {
            Ok(child.try_wait()?.map(|s| format!("exited ({s})")))
        });
        if let Err(e) = ready.and_then(|()| httpd.skip_probe_lines()) {
            bail!("{e:#}: {}", httpd.logs());
        }
        Ok(httpd)
    }

    /// Wait until the readiness request is logged (Apache logs after answering), so the test's
    /// traffic is told apart from the probe.
    fn skip_probe_lines(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.read("access.log");
            if log.ends_with('\n') {
                self.log_start = log.len();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the readiness request of {} was never logged", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&self, file: &str) -> String {
        read_or_empty(&self.dir.join(file))
    }

    /// Serve `body` at `/<name>` too (readable by Apache's workers whatever the umask).
    pub fn write_doc(&self, name: &str, body: &[u8]) -> anyhow::Result<()> {
        let path = self.dir.join("htdocs").join(name);
        fs::write(&path, body)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        Ok(())
    }

    /// Access log lines written after readiness: "<client addr> <client port> \"<request>\" <status>".
    pub fn access_lines(&self) -> Vec<String> {
        let log = self.read("access.log");
        log.get(self.log_start..)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The access log's length in bytes now: a mark for [`Httpd::access_lines_since`].
    pub fn access_log_len(&self) -> u64 {
        fs::metadata(self.dir.join("access.log")).map_or(0, |m| m.len())
    }

    /// Access log lines written after the mark `from` (a benchmark's run among many: reads only
    /// the new part of a log that grows by megabytes).
    pub fn access_lines_since(&self, from: u64) -> anyhow::Result<Vec<String>> {
        use std::io::Seek as _;
        let mut f = fs::File::open(self.dir.join("access.log"))?;
        f.seek(std::io::SeekFrom::Start(from))?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        Ok(text.lines().map(str::to_string).collect())
    }

    /// Everything the server logged, for failure reports.
    pub fn logs(&self) -> String {
        site_logs(&self.dir, &self.name)
    }

    /// Stop the server (as a VM whose service dies): its ports then refuse connections.
    pub fn stop(self) {}
}

impl Drop for Httpd {
    fn drop(&mut self) {
        stop_group(self.child.id(), Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM `pid` and, when it leads a process group (servers we spawn do), the whole group: a
/// server's parent stops its workers. Wait until `done` or `grace` passes, then SIGKILL the same
/// way, so no worker is left behind by a dead parent.
pub fn stop_group(pid: u32, grace: Duration, mut done: impl FnMut() -> bool) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: getpgid and kill(2) take plain ids; no memory is involved.
    let target = if unsafe { libc::getpgid(pid) } == pid {
        -pid
    } else {
        pid
    };
    // SAFETY: as above.
    unsafe { libc::kill(target, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while !done() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(target, libc::SIGKILL) };
}

/// Whether `pid` runs `comm` (not a zombie): guards against signalling a recycled pid.
pub fn pid_runs(pid: u32, comm: &str) -> bool {
    let stat = read_or_empty(Path::new(&format!("/proc/{pid}/stat")));
    // "<pid> (<comm>) <state> ..."; comm may hold spaces, so split at the last ')'.
    match stat.rsplit_once(") ") {
        Some((head, tail)) => head.ends_with(&format!("({comm}")) && !tail.starts_with('Z'),
        None => false,
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let p = path.to_string_lossy();
    read_or_empty(Path::new("/proc/self/mountinfo"))
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Mount a bpffs of our own at `dir` (idempotent). Pins must live on a bpffs that every
/// `ip netns exec` sees: that command remounts /sys for the namespace, hiding any bpffs at
/// /sys/fs/bpf, and a bpffs mounted inside it would die with the process. A mount made in the
/// root mount namespace before `ip netns exec` runs is copied into it, so the daemon, a restarted
/// daemon and `vmlb inspect` all share it. Unmounting releases every pin in it.
pub fn mount_bpffs(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    if !is_mountpoint(dir) {
        run("mount", &["-t", "bpf", "bpf", &dir.to_string_lossy()])
            .with_context(|| format!("mounting a bpffs at {}", dir.display()))?;
    }
    Ok(())
}

/// Unmount a bpffs mounted by `mount_bpffs` (no-op if it is not mounted); never panics.
pub fn unmount_bpffs(dir: &Path) {
    if is_mountpoint(dir) {
        let _ = Command::new("umount").arg(dir).status();
    }
}

/// The lab that outlives the process: `vmlb-lab up | down | status`. Fixed namespace names
/// (`vmlb-lab-*`), Apache daemons with pid files and the peer's pinned XDP link all under
/// [`STATE_DIR`], so `down` can remove everything from any state, even a half-built one.
pub mod persistent {
    use super::*;

    pub const PREFIX: &str = "vmlb-lab-";
    pub const STATE_DIR: &str = "/run/vmlb-lab";
    pub const CLIENT: &str = "vmlb-lab-client";
    pub const NODE: &str = "vmlb-lab-node";
    const VMS: [(&str, Ipv4Addr); 2] = [("vm1", VM1_ADDR), ("vm2", VM2_ADDR)];
    /// Where the daemon's metrics listen inside the node namespace (its own loopback).
    pub const METRICS_ADDR: &str = "127.0.0.1:9434";

    fn state() -> PathBuf {
        PathBuf::from(STATE_DIR)
    }
    /// The lab's own bpffs (see `mount_bpffs`): holds the peer link and the daemon's pins.
    pub fn bpf_dir() -> PathBuf {
        state().join("bpf")
    }
    fn peer_pin() -> PathBuf {
        bpf_dir().join("peer-xdp-link")
    }
    /// `--pin-dir` for a daemon run in the lab.
    pub fn daemon_pin_dir() -> PathBuf {
        bpf_dir().join("vmlb")
    }
    /// `--run-dir` for a daemon run in the lab.
    pub fn daemon_run_dir() -> PathBuf {
        state().join("vmlb")
    }
    /// A daemon started in the lab writes its pid here, so `down` can stop one left behind.
    pub fn daemon_pid_file() -> PathBuf {
        state().join("vmlb.pid")
    }
    pub fn daemon_log() -> PathBuf {
        state().join("vmlb.log")
    }

    /// Every namespace the lab may have made, including VMs added later.
    fn lab_namespaces() -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let list = out.map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&list)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(PREFIX))
            .map(str::to_string)
            .collect()
    }

    fn pid_in(file: &Path) -> Option<u32> {
        read_or_empty(file).trim().parse().ok()
    }

    fn httpd_pid(vm: &str) -> Option<u32> {
        pid_in(&state().join(vm).join("httpd.pid")).filter(|&p| pid_runs(p, "apache2"))
    }

    fn daemon_pid() -> Option<u32> {
        pid_in(&daemon_pid_file()).filter(|&p| pid_runs(p, "vmlb"))
    }

    /// Fully up: every namespace, both httpds and the pinned peer link are there.
    fn is_up() -> bool {
        let names = lab_namespaces();
        ["seg", "client", "node", "vm1", "vm2"]
            .iter()
            .all(|t| names.contains(&format!("{PREFIX}{t}")))
            && VMS.iter().all(|(vm, _)| httpd_pid(vm).is_some())
            && peer_pin().exists()
    }

    /// Start Apache as a daemon in `ns` (it forks away and writes its pid file) and wait until it
    /// serves; returns its pid.
    fn start_daemonized_httpd(ns: &Ns, name: &str, addr: Ipv4Addr) -> anyhow::Result<u32> {
        let dir = state().join(name);
        let conf = write_site(&dir, name, &[addr.into()])?;
        let status = ns
            .command("apache2")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .status()
            .context("spawning apache2")?;
        let logs = || site_logs(&dir, name);
        ensure!(status.success(), "apache2 for {name}: {status}{}", logs());
        wait_serving(ns, name, addr, || Ok(None)).with_context(logs)?;
        pid_in(&dir.join("httpd.pid")).with_context(|| format!("no pid file for {name}"))
    }

    /// Build the lab unless it is fully up; a partial one is removed and rebuilt. Returns false
    /// when it was already up.
    pub fn up() -> anyhow::Result<bool> {
        if is_up() {
            return Ok(false);
        }
        if !lab_namespaces().is_empty() || state().exists() {
            eprintln!("vmlb-lab: the lab is partly up; removing it first");
            down()?;
        }
        let built = (|| {
            fs::create_dir_all(state())?;
            fs::set_permissions(state(), fs::Permissions::from_mode(0o755))?;
            mount_bpffs(&bpf_dir())?;
            let lab = Lab::build(Naming::Fixed, Some(&peer_pin()))?;
            for vm in &lab.vms {
                start_daemonized_httpd(&vm.ns, vm.name, vm.addr)?;
            }
            anyhow::Ok(())
        })();
        if let Err(e) = built {
            let _ = down();
            return Err(e.context("building the lab (what was built is removed again)"));
        }
        Ok(true)
    }

    /// Remove everything `up` (and a daemon run in the lab) may have created, from any state:
    /// returns what it removed.
    pub fn down() -> anyhow::Result<Vec<String>> {
        let mut done = Vec::new();
        // A daemon left running would keep its XDP link and maps: stop it first.
        if let Some(pid) = daemon_pid() {
            stop_group(pid, Duration::from_secs(10), || !pid_runs(pid, "vmlb"));
            done.push(format!("vmlb daemon (pid {pid})"));
        }
        for (vm, _) in VMS {
            if let Some(pid) = httpd_pid(vm) {
                // Apache's daemon calls setsid: its pid is its workers' process group.
                stop_group(pid, Duration::from_secs(5), || !pid_runs(pid, "apache2"));
                done.push(format!("httpd {vm} (pid {pid})"));
            }
        }
        // Releases the peer's XDP link and any daemon pins.
        if is_mountpoint(&bpf_dir()) {
            unmount_bpffs(&bpf_dir());
            done.push(format!("bpffs {}", bpf_dir().display()));
        }
        for ns in lab_namespaces() {
            run("ip", &["netns", "del", &ns])?;
            done.push(format!("netns {ns}"));
        }
        if state().exists() {
            ensure!(
                !is_mountpoint(&bpf_dir()),
                "{} is still mounted",
                bpf_dir().display()
            );
            fs::remove_dir_all(state())?;
            done.push(format!("state dir {STATE_DIR}"));
        }
        Ok(done)
    }

    /// What exists, for a person: namespaces, httpds, the peer link, a daemon, and whether the VIP
    /// answers from the client.
    pub fn status() -> String {
        let mut out = String::new();
        let names = lab_namespaces();
        let yes = |b: bool| if b { "yes" } else { "no" };
        for t in ["client", "seg", "node", "vm1", "vm2"] {
            let n = format!("{PREFIX}{t}");
            out += &format!("netns {n:<18} {}\n", yes(names.contains(&n)));
        }
        for n in names.iter().filter(|n| {
            !["client", "seg", "node", "vm1", "vm2"]
                .iter()
                .any(|t| **n == format!("{PREFIX}{t}"))
        }) {
            out += &format!("netns {n:<18} yes (added)\n");
        }
        for (vm, addr) in VMS {
            let pid = httpd_pid(vm).map_or("not running".into(), |p| format!("pid {p}"));
            out += &format!("httpd {vm} ({addr})    {pid}\n");
        }
        out += &format!("peer XDP link pinned  {}\n", yes(peer_pin().exists()));
        let daemon = daemon_pid().map_or("not running".into(), |p| format!("pid {p}"));
        out += &format!("vmlb daemon           {daemon}\n");
        if names.iter().any(|n| n == CLIENT) {
            let answer = match curl(&Ns::named(CLIENT), &format!("http://{VIP}/"), 2) {
                Ok(body) => format!("yes, answered by {}", body.trim()),
                Err(e) => {
                    // Only curl's own message, not the whole `ip netns exec` command line.
                    let e = format!("{e:#}");
                    let why = e.rsplit("failed: ").next().unwrap_or(&e);
                    format!("no ({why}); is a daemon running? `cargo xtask run`")
                }
            };
            out += &format!("VIP {VIP}:80 reachable from the client: {answer}\n");
        }
        out
    }
}
