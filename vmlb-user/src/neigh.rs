//! Backend neighbours kept resolved for the data path.
//!
//! XDP cannot resolve a neighbour: `bpf_fib_lookup` only reads the kernel's neighbour table, and a
//! backend the node never talked to stays unresolved (its packets are passed, `pass_no_neigh`).
//! So user space installs a *managed* neighbour entry (`NTF_EXT_MANAGED`, kernel >= 5.16) for
//! every backend's next hop: the kernel resolves it at once and re-probes it for as long as it
//! exists, with no traffic through the stack and no daemon loop (Cilium's approach).
//!
//! The next hop is the backend itself when it is on-link, otherwise the gateway of its route
//! (`ip route get`). A [`NeighKeeper`] serves one interface and only installs entries on it.
//!
//! Ownership: the keeper marks its entries with [`NEIGH_PROTOCOL`] (NDA_PROTOCOL) and the managed
//! flag, and only ever deletes entries that carry both. Because the mark lives in the kernel, a
//! restarted daemon recognises the entries of the previous one and removes those no longer wanted.
//! Static entries (permanent, noarp, externally learned) belong to an administrator and are never
//! changed; a kernel-made dynamic entry for a wanted next hop is replaced by a managed one.
//!
//! The pure parts (the diff, state names, reading netlink messages) are tested without root; the
//! netlink part in `tests/tests/neigh_netns.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags,
            NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType, RouteVia},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};
use tokio::task::JoinHandle;

/// NDA_PROTOCOL value that marks vmlb's entries ('v'; not one of iproute2's `rt_protos`).
pub const NEIGH_PROTOCOL: u8 = 118;

const NUD_INCOMPLETE: u16 = 0x01;
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// A neighbour entry's state (the kernel's NUD_* values), or `None` when there is no entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NeighState {
    None,
    Incomplete,
    Reachable,
    Stale,
    Delay,
    Probe,
    Failed,
    NoArp,
    Permanent,
}

impl NeighState {
    /// Every state, for metrics that export one series per state.
    pub const ALL: [NeighState; 9] = [
        Self::None,
        Self::Incomplete,
        Self::Reachable,
        Self::Stale,
        Self::Delay,
        Self::Probe,
        Self::Failed,
        Self::NoArp,
        Self::Permanent,
    ];

    /// From the kernel's `ndm_state`. The kernel reports one state; should several bits be set,
    /// the static ones win, then the most advanced resolution state.
    pub fn from_nud(nud: u16) -> Self {
        [
            (NUD_PERMANENT, Self::Permanent),
            (NUD_NOARP, Self::NoArp),
            (NUD_REACHABLE, Self::Reachable),
            (NUD_STALE, Self::Stale),
            (NUD_DELAY, Self::Delay),
            (NUD_PROBE, Self::Probe),
            (NUD_INCOMPLETE, Self::Incomplete),
            (NUD_FAILED, Self::Failed),
        ]
        .into_iter()
        .find(|(bit, _)| nud & bit != 0)
        .map_or(Self::None, |(_, s)| s)
    }

    /// Lower-case name, as `ip neigh` prints it; used by `inspect` and as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Incomplete => "incomplete",
            Self::Reachable => "reachable",
            Self::Stale => "stale",
            Self::Delay => "delay",
            Self::Probe => "probe",
            Self::Failed => "failed",
            Self::NoArp => "noarp",
            Self::Permanent => "permanent",
        }
    }

    /// The entry holds a MAC that `bpf_fib_lookup` uses (the kernel's NUD_VALID): stale, delay
    /// and probe entries still forward while the kernel re-confirms them.
    pub const fn is_usable(self) -> bool {
        matches!(
            self,
            Self::Reachable
                | Self::Stale
                | Self::Delay
                | Self::Probe
                | Self::NoArp
                | Self::Permanent
        )
    }
}

impl fmt::Display for NeighState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the kernel's neighbour table, as read from netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighEntry {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub state: NeighState,
    pub mac: Option<[u8; 6]>,
    pub managed: bool,
    pub protocol: u8,
    pub ext_learned: bool,
}

impl NeighEntry {
    /// Reads an RTM_NEWNEIGH message; `None` for entries without an IP destination (bridge FDB).
    pub fn from_message(msg: &NeighbourMessage) -> Option<Self> {
        let mut addr = None;
        let mut mac = None;
        let mut managed = false;
        let mut protocol = 0;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    addr = Some(IpAddr::V4(*a))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    addr = Some(IpAddr::V6(*a))
                }
                NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
                NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
                NeighbourAttribute::Protocol(p) => protocol = u8::from(*p),
                _ => {}
            }
        }
        Some(Self {
            ifindex: msg.header.ifindex,
            addr: addr?,
            state: NeighState::from_nud(u16::from(msg.header.state)),
            mac,
            managed,
            protocol,
            ext_learned: msg.header.flags.contains(NeighbourFlags::ExtLearned),
        })
    }

    /// Installed by a keeper (this one or a previous daemon's): the only entries it may delete.
    pub fn is_ours(&self) -> bool {
        self.managed && self.protocol == NEIGH_PROTOCOL
    }

    /// Configured by someone else on purpose; a keeper leaves it exactly as it is.
    pub fn is_static(&self) -> bool {
        matches!(self.state, NeighState::Permanent | NeighState::NoArp) || self.ext_learned
    }
}

/// Where a backend's traffic goes, from the kernel's route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Leaves through the keeper's interface to this neighbour: the backend itself when it is
    /// on-link, else the route's gateway.
    NextHop(IpAddr),
    /// Leaves through another interface; the keeper does not manage neighbours there.
    OtherInterface(u32),
    /// An address of this node: no neighbour.
    Local,
    /// No usable route (unreachable, blackhole, prohibit, no route at all).
    NoRoute(String),
}

/// Reads the answer to `ip route get <backend>` (pure, so it is tested without root).
pub fn resolve_route(backend: IpAddr, ifindex: u32, route: &RouteMessage) -> Resolution {
    match route.header.kind {
        RouteType::Unicast => {}
        RouteType::Local => return Resolution::Local,
        other => return Resolution::NoRoute(format!("route type {other:?}")),
    }
    let mut oif = None;
    let mut gateway = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            // An IPv4 route through an IPv6 next hop (RFC 5549): the neighbour is the IPv6 one.
            RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    match oif {
        Some(i) if i == ifindex => Resolution::NextHop(gateway.unwrap_or(backend)),
        Some(i) => Resolution::OtherInterface(i),
        None => Resolution::NoRoute("route without output interface".into()),
    }
}

/// What a sync must change: next hops to install, and entries of ours to delete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<IpAddr>,
    pub remove: Vec<IpAddr>,
}

/// The diff between the wanted next hops and the entries this keeper owns.
pub fn plan(desired: &BTreeSet<IpAddr>, ours: &BTreeSet<IpAddr>) -> Plan {
    Plan {
        add: desired.difference(ours).copied().collect(),
        remove: ours.difference(desired).copied().collect(),
    }
}

/// One backend's neighbour as `inspect` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendNeigh {
    pub backend: IpAddr,
    pub resolution: Resolution,
    /// The next hop's entry state; `None` when there is no entry (or no next hop).
    pub state: NeighState,
    pub mac: Option<[u8; 6]>,
    /// The entry is a managed one of ours (false for a static entry we leave alone).
    pub managed: bool,
}

/// What one [`NeighKeeper::sync`] did. Per-address failures do not stop the others; the next
/// sync retries them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Wanted next hops that have a static entry, left as they are.
    pub foreign: Vec<IpAddr>,
    pub failed: Vec<(IpAddr, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("opening a netlink route socket")]
    Connect(#[source] std::io::Error),
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("netlink: {op}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Keeps a managed neighbour entry for the next hop of every wanted backend on one interface.
///
/// Needs a tokio runtime (the netlink connection runs as a task) and CAP_NET_ADMIN. The netlink
/// socket lives in the network namespace of the thread that calls [`NeighKeeper::new`].
pub struct NeighKeeper {
    handle: Handle,
    conn: JoinHandle<()>,
    ifindex: u32,
    /// The last sync's route answers, for [`NeighKeeper::status`].
    resolutions: BTreeMap<IpAddr, Resolution>,
}

impl NeighKeeper {
    pub async fn new(ifindex: u32) -> Result<Self, NeighError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NeighError::Connect)?;
        Ok(Self {
            handle,
            conn: tokio::spawn(conn),
            ifindex,
            resolutions: BTreeMap::new(),
        })
    }

    /// Looks the interface up by name (in the caller's namespace) and opens the keeper.
    pub async fn for_interface(name: &str) -> Result<Self, NeighError> {
        let ifindex = nix::net::if_::if_nametoindex(name)
            .map_err(|_| NeighError::NoInterface(name.into()))?;
        Self::new(ifindex).await
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Makes the installed entries match `backends`: resolves each backend's next hop, adds a
    /// managed entry for each new one, and deletes entries of ours no longer wanted. Call it when
    /// the backend set changes and periodically (routes can change under it); the kernel keeps
    /// the entries resolved in between.
    pub async fn sync(
        &mut self,
        backends: impl IntoIterator<Item = IpAddr>,
    ) -> Result<SyncReport, NeighError> {
        let mut report = SyncReport::default();
        let mut resolutions = BTreeMap::new();
        for backend in backends {
            let r = match self.route_get(backend).await {
                Ok(route) => resolve_route(backend, self.ifindex, &route),
                Err(e) => Resolution::NoRoute(netlink_reason(&e)),
            };
            resolutions.insert(backend, r);
        }
        self.resolutions = resolutions;
        let desired: BTreeSet<IpAddr> = self
            .resolutions
            .values()
            .filter_map(|r| match r {
                Resolution::NextHop(a) => Some(*a),
                _ => None,
            })
            .collect();

        let entries = self.entries().await?;
        let ours: BTreeSet<IpAddr> = entries
            .values()
            .filter(|e| e.is_ours())
            .map(|e| e.addr)
            .collect();
        let plan = plan(&desired, &ours);

        for addr in plan.add {
            let existing = entries.get(&addr);
            if existing.is_some_and(NeighEntry::is_static) {
                report.foreign.push(addr);
                continue;
            }
            // A dynamic entry the kernel made from traffic is only a cache: replace it. Where
            // there was none, refuse to overwrite one that appeared since the dump (EXCL).
            match self.add(addr, existing.is_some()).await {
                Ok(()) => report.added.push(addr),
                Err(e) => report.failed.push((addr, netlink_reason(&e))),
            }
        }
        for addr in plan.remove {
            match self.delete(addr).await {
                Ok(()) => report.removed.push(addr),
                Err(e) => report.failed.push((addr, netlink_reason(&e))),
            }
        }
        Ok(report)
    }

    /// The neighbour of every backend of the last sync, in backend order.
    pub async fn status(&self) -> Result<Vec<BackendNeigh>, NeighError> {
        let entries = self.entries().await?;
        Ok(self
            .resolutions
            .iter()
            .map(|(backend, resolution)| {
                let entry = match resolution {
                    Resolution::NextHop(a) => entries.get(a),
                    _ => None,
                };
                BackendNeigh {
                    backend: *backend,
                    resolution: resolution.clone(),
                    state: entry.map_or(NeighState::None, |e| e.state),
                    mac: entry.and_then(|e| e.mac),
                    managed: entry.is_some_and(NeighEntry::is_ours),
                }
            })
            .collect())
    }

    /// Deletes every entry of ours on the interface (for a node that stops serving for good; a
    /// daemon restart should keep them so traffic keeps flowing).
    pub async fn release_all(&mut self) -> Result<SyncReport, NeighError> {
        self.sync(std::iter::empty()).await
    }

    /// The interface's IPv4 and IPv6 neighbour entries, by address.
    pub async fn entries(&self) -> Result<BTreeMap<IpAddr, NeighEntry>, NeighError> {
        let mut out = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(msg) = dump
                .try_next()
                .await
                .map_err(|source| NeighError::Netlink {
                    op: "dumping neighbours",
                    source,
                })?
            {
                if let Some(e) = NeighEntry::from_message(&msg) {
                    if e.ifindex == self.ifindex {
                        out.insert(e.addr, e);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn route_get(&self, dst: IpAddr) -> Result<RouteMessage, rtnetlink::Error> {
        let prefix = if dst.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, prefix)
            .map_err(|e| rtnetlink::Error::InvalidNla(e.to_string()))?
            .build();
        let mut answers = self.handle.route().get(msg).execute();
        answers
            .try_next()
            .await?
            .ok_or(rtnetlink::Error::RequestFailed)
    }

    async fn add(&self, addr: IpAddr, replace: bool) -> Result<(), rtnetlink::Error> {
        // State NONE with the managed flag: the kernel starts resolving at once (a managed entry
        // cannot be permanent, and a MAC given here would only be overridden by the first probe).
        let mut req = self
            .handle
            .neighbours()
            .add(self.ifindex, addr)
            .state(NeighbourState::None);
        let msg = req.message_mut();
        msg.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        msg.attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                NEIGH_PROTOCOL,
            )));
        if replace {
            req.replace().execute().await
        } else {
            req.execute().await
        }
    }

    async fn delete(&self, addr: IpAddr) -> Result<(), rtnetlink::Error> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = self.ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        self.handle.neighbours().del(msg).execute().await
    }
}

impl Drop for NeighKeeper {
    fn drop(&mut self) {
        // The entries stay (the kernel keeps resolving them); only the socket task ends.
        self.conn.abort();
    }
}

/// A short reason for a report line: the errno's text for kernel refusals.
fn netlink_reason(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    }
}

/// `aa:bb:cc:dd:ee:ff`, for `inspect` and logs.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 10, 1, last))
    }

    #[test]
    fn plan_adds_new_and_removes_only_unwanted_own_entries() {
        let desired: BTreeSet<_> = [v4(2), v4(3), v4(4)].into();
        let ours: BTreeSet<_> = [v4(3), v4(9)].into();
        assert_eq!(
            plan(&desired, &ours),
            Plan {
                add: vec![v4(2), v4(4)],
                remove: vec![v4(9)],
            }
        );
        assert_eq!(plan(&desired, &desired), Plan::default());
        assert_eq!(
            plan(&BTreeSet::new(), &ours).remove,
            vec![v4(3), v4(9)],
            "an empty wanted set releases everything of ours"
        );
    }

    #[test]
    fn nud_values_map_to_states_and_names() {
        let cases = [
            (0x00, NeighState::None, "none", false),
            (0x01, NeighState::Incomplete, "incomplete", false),
            (0x02, NeighState::Reachable, "reachable", true),
            (0x04, NeighState::Stale, "stale", true),
            (0x08, NeighState::Delay, "delay", true),
            (0x10, NeighState::Probe, "probe", true),
            (0x20, NeighState::Failed, "failed", false),
            (0x40, NeighState::NoArp, "noarp", true),
            (0x80, NeighState::Permanent, "permanent", true),
        ];
        for (nud, state, name, usable) in cases {
            assert_eq!(NeighState::from_nud(nud), state, "nud {nud:#x}");
            assert_eq!(state.to_string(), name);
            assert_eq!(state.is_usable(), usable, "{name}");
        }
        assert_eq!(NeighState::ALL.len(), cases.len());
        assert_eq!(NeighState::from_nud(0x80 | 0x02), NeighState::Permanent);
    }

    fn neigh_msg(
        addr: IpAddr,
        state: NeighbourState,
        attrs: Vec<NeighbourAttribute>,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.ifindex = 7;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        m.attributes.extend(attrs);
        m
    }

    #[test]
    fn entries_are_read_from_netlink_messages_and_ownership_needs_both_marks() {
        let mac = [2, 0, 0, 0, 0, 0xb];
        let ours = neigh_msg(
            v4(2),
            NeighbourState::Reachable,
            vec![
                NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
                NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
                NeighbourAttribute::Protocol(RouteProtocol::from(NEIGH_PROTOCOL)),
            ],
        );
        let e = NeighEntry::from_message(&ours).expect("an IP entry");
        assert_eq!(
            e,
            NeighEntry {
                ifindex: 7,
                addr: v4(2),
                state: NeighState::Reachable,
                mac: Some(mac),
                managed: true,
                protocol: NEIGH_PROTOCOL,
                ext_learned: false,
            }
        );
        assert!(e.is_ours() && !e.is_static());

        // Managed by someone else (another protocol) or ours-looking but not managed: not ours.
        let other_managed = neigh_msg(
            v4(3),
            NeighbourState::Incomplete,
            vec![NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed)],
        );
        let e = NeighEntry::from_message(&other_managed).unwrap();
        assert!(!e.is_ours());
        assert_eq!((e.state, e.mac), (NeighState::Incomplete, None));
        let unmanaged = neigh_msg(
            v4(4),
            NeighbourState::Stale,
            vec![NeighbourAttribute::Protocol(RouteProtocol::from(
                NEIGH_PROTOCOL,
            ))],
        );
        assert!(!NeighEntry::from_message(&unmanaged).unwrap().is_ours());

        let permanent = neigh_msg(v4(5), NeighbourState::Permanent, vec![]);
        assert!(NeighEntry::from_message(&permanent).unwrap().is_static());

        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
        let e = NeighEntry::from_message(&neigh_msg(v6, NeighbourState::Delay, vec![])).unwrap();
        assert_eq!((e.addr, e.state), (v6, NeighState::Delay));

        let fdb = NeighbourMessage::default();
        assert_eq!(NeighEntry::from_message(&fdb), None, "no IP destination");
    }

    fn route(kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.kind = kind;
        m.attributes = attrs;
        m
    }

    #[test]
    fn next_hop_is_the_backend_on_link_and_the_gateway_behind_a_router() {
        let backend = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5));
        let on_link = route(RouteType::Unicast, vec![RouteAttribute::Oif(7)]);
        assert_eq!(
            resolve_route(backend, 7, &on_link),
            Resolution::NextHop(backend)
        );

        let gw = Ipv4Addr::new(10, 10, 1, 1);
        let routed = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet(gw)),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(
            resolve_route(backend, 7, &routed),
            Resolution::NextHop(IpAddr::V4(gw))
        );
        assert_eq!(
            resolve_route(backend, 8, &routed),
            Resolution::OtherInterface(7)
        );

        let v6_gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let rfc5549 = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Via(RouteVia::Inet6(v6_gw)),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(
            resolve_route(backend, 7, &rfc5549),
            Resolution::NextHop(IpAddr::V6(v6_gw))
        );

        assert_eq!(
            resolve_route(
                backend,
                7,
                &route(RouteType::Local, vec![RouteAttribute::Oif(1)])
            ),
            Resolution::Local
        );
        assert!(matches!(
            resolve_route(backend, 7, &route(RouteType::Unreachable, vec![])),
            Resolution::NoRoute(_)
        ));
        assert!(matches!(
            resolve_route(backend, 7, &route(RouteType::Unicast, vec![])),
            Resolution::NoRoute(_)
        ));
    }

    #[test]
    fn macs_print_like_iproute2() {
        assert_eq!(format_mac(&[2, 0, 0, 0xab, 0, 0xb]), "02:00:00:ab:00:0b");
    }
}
