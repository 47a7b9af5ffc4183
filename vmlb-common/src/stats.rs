//! One closed set of counters for every path a packet can take, shared by the data path (index
//! into the per-CPU `STATS` array) and user space (metric labels, CLI). Drops and passes are
//! reasons in the same enum so one array answers "where did my packets go".

/// Index into `STATS`. Append only: the numbers are part of the pinned-map ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Neither IPv4, IPv6 nor ARP (LLDP, ...): left to the kernel.
    PassNotIpv4 = 0,
    /// IPv4 neither to a VIP nor a reply to a NATed flow: the node's own traffic.
    PassNotVip = 1,
    /// Too short to tell whose packet it is (cut inside the Ethernet or IPv4 header).
    PassTruncated = 2,
    /// To a VIP, but cut inside the TCP/UDP header.
    DropTruncated = 3,
    /// To a VIP with an invalid IPv4 header (IHL < 5, total length shorter than the header).
    DropBadHeader = 4,
    /// An IPv4 fragment to a VIP: without ports on every fragment it cannot be balanced
    /// consistently, so fragments to VIPs are dropped (policy; see README).
    DropFragment = 5,
    /// To a VIP on a port/protocol that no service listens on.
    DropUnknownPort = 6,
    /// The service has no backend with weight > 0 (every Maglev slot empty).
    DropNoBackend = 7,
    /// Every candidate SNAT tuple was held (by a live flow, or waiting out TIME_WAIT safety).
    DropSnatExhausted = 8,
    /// The flow table is full (both of the new flow's `FLOW_INDEX` buckets are full): the new
    /// flow is refused, established flows are never evicted for it.
    DropFlowTableFull = 9,
    /// The next hop's MAC is not resolved: the packet goes to the kernel untouched, no flow is
    /// created (user space keeps backend neighbours resolved).
    PassNoNeigh = 10,
    /// bpf_fib_lookup found no usable route (blackhole, unreachable, forwarding disabled...).
    PassFibFailed = 11,
    /// New flow balanced with Maglev.
    FlowNew = 12,
    /// Packet of an established flow.
    FlowHit = 13,
    /// Established flow whose backend is down, moved to a new backend.
    FlowRebalanced = 14,
    /// Backend reply reverse-NATed back to the client.
    ReplyHit = 15,
    /// SNAT port candidates that were in use (each costs one retry).
    SnatPortCollision = 16,
    /// Sent back out of the receiving interface.
    TxSameIface = 17,
    /// Redirected to another interface.
    TxRedirect = 18,
    /// To a VIP with a protocol vmlb does not balance (SCTP, GRE, ICMP other than echo
    /// requests and errors, ...).
    PassUnsupportedProto = 19,
    /// An entry named a backend id that does not exist (map changed under the flow).
    DropBadBackend = 20,
    /// A `FLOW_INDEX` entry whose tag matched the packet's hash but whose slot holds another
    /// flow (two 5-tuples with the same 32-bit hash): skipped, the lookup goes on.
    FlowStale = 21,
    /// To a SNAT address, but no live flow holds the tuple: left to the kernel (a late packet
    /// of an expired flow, or the node's own traffic when the SNAT address is also its own).
    PassReplyNoFlow = 22,
    /// TCP to a VIP without a flow and not a SYN (policy: dropped, no state created).
    DropTcpNoFlow = 23,
    /// A new flow from a martian source (0/8, 127/8, 224/4, 240/4, broadcast, a VIP or SNAT
    /// address): dropped, never NATed.
    DropMartian = 24,
    /// A new flow over this CPU's new-flow rate limit (flood guard).
    DropFlood = 25,
    /// A flow saw FIN or RST and entered closing (event).
    FlowClosing = 26,
    /// A SYN reused the client 5-tuple of a closing flow: reopened on its SNAT tuple when the
    /// Maglev table still names its backend, else a new flow with a new SNAT tuple (the old one
    /// waits out TIME_WAIT safety).
    FlowTupleReuse = 27,
    /// A backend's next hop was (re)looked up with bpf_fib_lookup (event).
    HopLookup = 28,
    /// VIP traffic or a reply in a frame not addressed to the interface's own MAC (broadcast,
    /// multicast, another host's): left to the kernel, never NATed.
    PassOtherMac = 29,
    /// TTL 0 or 1: forwarding would expire it; left to the kernel, which answers with ICMP
    /// time-exceeded.
    PassTtlExceeded = 30,
    /// An ARP request for an owned VIP, answered with the interface's MAC (XDP_TX).
    TxArpReply = 31,
    /// ARP that is not a request for an owned VIP (other addresses, replies, gratuitous ARP):
    /// left to the kernel.
    PassArp = 32,
    /// An 802.1Q-tagged frame of a VLAN this interface does not serve, or whose next hop is
    /// on another VLAN: left to the kernel.
    PassOtherVlan = 33,
    /// Stacked tags (802.1ad S-tag, or two 802.1Q tags): QinQ is recognised, not served.
    PassQinq = 34,
    /// An ICMP echo request to a VIP, answered (XDP_TX).
    TxIcmpEchoReply = 35,
    /// An ICMP echo request to a VIP over this CPU's echo rate limit, or from a martian source.
    DropIcmpEcho = 36,
    /// An ICMP error (unreachable, fragmentation needed, time exceeded) quoting a NATed flow,
    /// translated for the other side (event; the packet then counts as sent).
    IcmpErrorTranslated = 37,
    /// An ICMP error to a VIP that quotes no flow, or too little of the packet to name one.
    DropIcmpError = 38,
    /// A dnat backend's reply that no flow here knows (the VIP moved to this node, or the flow
    /// expired): its source is rewritten to the service's VIP and port (`DNAT_ENDPOINTS`) and
    /// the node's kernel routes it to the client.
    PassDnatStateless = 39,
    /// A client's packet for a dnat service without a flow and not a SYN (a connection made
    /// through another node before a takeover): sent to its Maglev backend without creating
    /// state.
    DnatStateless = 40,
    /// IPv6 to a VIP with an extension header or a fragment header: not walked, not balanced
    /// (policy, see `IPV6_EXT_HEADERS`).
    DropIpv6ExtHeader = 41,
    /// A neighbour solicitation for an owned IPv6 VIP, answered with a neighbour advertisement
    /// (XDP_TX).
    TxNdpAdvert = 42,
    /// Neighbour discovery that is not a solicitation for an owned VIP: left to the kernel.
    PassNdp = 43,
    /// A new flow found another CPU creating the same 5-tuple at the same moment (a SYN and
    /// its retransmission on two CPUs): the later one gives way and its packet is dropped; the
    /// client's next packet finds the flow.
    DropFlowRace = 44,
}

impl Counter {
    /// Number of counters; the size of `STATS`.
    pub const COUNT: u32 = 45;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PassNotIpv4,
        Counter::PassNotVip,
        Counter::PassTruncated,
        Counter::DropTruncated,
        Counter::DropBadHeader,
        Counter::DropFragment,
        Counter::DropUnknownPort,
        Counter::DropNoBackend,
        Counter::DropSnatExhausted,
        Counter::DropFlowTableFull,
        Counter::PassNoNeigh,
        Counter::PassFibFailed,
        Counter::FlowNew,
        Counter::FlowHit,
        Counter::FlowRebalanced,
        Counter::ReplyHit,
        Counter::SnatPortCollision,
        Counter::TxSameIface,
        Counter::TxRedirect,
        Counter::PassUnsupportedProto,
        Counter::DropBadBackend,
        Counter::FlowStale,
        Counter::PassReplyNoFlow,
        Counter::DropTcpNoFlow,
        Counter::DropMartian,
        Counter::DropFlood,
        Counter::FlowClosing,
        Counter::FlowTupleReuse,
        Counter::HopLookup,
        Counter::PassOtherMac,
        Counter::PassTtlExceeded,
        Counter::TxArpReply,
        Counter::PassArp,
        Counter::PassOtherVlan,
        Counter::PassQinq,
        Counter::TxIcmpEchoReply,
        Counter::DropIcmpEcho,
        Counter::IcmpErrorTranslated,
        Counter::DropIcmpError,
        Counter::PassDnatStateless,
        Counter::DnatStateless,
        Counter::DropIpv6ExtHeader,
        Counter::TxNdpAdvert,
        Counter::PassNdp,
        Counter::DropFlowRace,
    ];

    /// snake_case name, used as a metric label and in the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassNotVip => "pass_not_vip",
            Counter::PassTruncated => "pass_truncated",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropBadHeader => "drop_bad_header",
            Counter::DropFragment => "drop_fragment",
            Counter::DropUnknownPort => "drop_unknown_port",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropFlowTableFull => "drop_flow_table_full",
            Counter::PassNoNeigh => "pass_no_neigh",
            Counter::PassFibFailed => "pass_fib_failed",
            Counter::FlowNew => "flow_new",
            Counter::FlowHit => "flow_hit",
            Counter::FlowRebalanced => "flow_rebalanced",
            Counter::ReplyHit => "reply_hit",
            Counter::SnatPortCollision => "snat_port_collision",
            Counter::TxSameIface => "tx_same_iface",
            Counter::TxRedirect => "tx_redirect",
            Counter::PassUnsupportedProto => "pass_unsupported_proto",
            Counter::DropBadBackend => "drop_bad_backend",
            Counter::FlowStale => "flow_stale",
            Counter::PassReplyNoFlow => "pass_reply_no_flow",
            Counter::DropTcpNoFlow => "drop_tcp_no_flow",
            Counter::DropMartian => "drop_martian",
            Counter::DropFlood => "drop_flood",
            Counter::FlowClosing => "flow_closing",
            Counter::FlowTupleReuse => "flow_tuple_reuse",
            Counter::HopLookup => "hop_lookup",
            Counter::PassOtherMac => "pass_other_mac",
            Counter::PassTtlExceeded => "pass_ttl_exceeded",
            Counter::TxArpReply => "tx_arp_reply",
            Counter::PassArp => "pass_arp",
            Counter::PassOtherVlan => "pass_other_vlan",
            Counter::PassQinq => "pass_qinq",
            Counter::TxIcmpEchoReply => "tx_icmp_echo_reply",
            Counter::DropIcmpEcho => "drop_icmp_echo",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::DropIcmpError => "drop_icmp_error",
            Counter::PassDnatStateless => "pass_dnat_stateless",
            Counter::DnatStateless => "dnat_stateless",
            Counter::DropIpv6ExtHeader => "drop_ipv6_ext_header",
            Counter::TxNdpAdvert => "tx_ndp_advert",
            Counter::PassNdp => "pass_ndp",
            Counter::DropFlowRace => "drop_flow_race",
        }
    }

    /// What the counter counts, for metrics. Every packet the program sees ends in exactly one
    /// `Pass`, `Drop` or `Tx` counter (so their sum is the packets seen); `Flow` counters say
    /// how conntrack resolved a packet that went on, `Event` counters count things that can
    /// happen several times per packet. Exhaustive on purpose: a new counter does not compile
    /// until it is classified.
    pub const fn kind(self) -> CounterKind {
        match self {
            Counter::PassNotIpv4
            | Counter::PassNotVip
            | Counter::PassTruncated
            | Counter::PassNoNeigh
            | Counter::PassFibFailed
            | Counter::PassUnsupportedProto
            | Counter::PassReplyNoFlow
            | Counter::PassOtherMac
            | Counter::PassTtlExceeded
            | Counter::PassArp
            | Counter::PassOtherVlan
            | Counter::PassQinq
            | Counter::PassDnatStateless
            | Counter::PassNdp => CounterKind::Pass,
            Counter::DropTruncated
            | Counter::DropBadHeader
            | Counter::DropFragment
            | Counter::DropUnknownPort
            | Counter::DropNoBackend
            | Counter::DropSnatExhausted
            | Counter::DropFlowTableFull
            | Counter::DropBadBackend
            | Counter::DropTcpNoFlow
            | Counter::DropMartian
            | Counter::DropFlood
            | Counter::DropIcmpEcho
            | Counter::DropIcmpError
            | Counter::DropIpv6ExtHeader
            | Counter::DropFlowRace => CounterKind::Drop,
            Counter::TxSameIface
            | Counter::TxRedirect
            | Counter::TxArpReply
            | Counter::TxIcmpEchoReply
            | Counter::TxNdpAdvert => CounterKind::Tx,
            Counter::FlowNew
            | Counter::FlowHit
            | Counter::FlowRebalanced
            | Counter::ReplyHit
            | Counter::DnatStateless => CounterKind::Flow,
            Counter::SnatPortCollision
            | Counter::FlowStale
            | Counter::FlowClosing
            | Counter::FlowTupleReuse
            | Counter::HopLookup
            | Counter::IcmpErrorTranslated => CounterKind::Event,
        }
    }

    /// The name without its kind's prefix (`drop_no_backend` -> `no_backend`), a metric label.
    pub fn reason(self) -> &'static str {
        let name = self.name();
        let prefix = match self.kind() {
            CounterKind::Pass => "pass_",
            CounterKind::Drop => "drop_",
            CounterKind::Tx => "tx_",
            CounterKind::Flow | CounterKind::Event => "",
        };
        match name.strip_prefix(prefix) {
            Some(rest) => rest,
            None => name,
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(self.kind(), CounterKind::Drop)
    }
}

/// See [`Counter::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CounterKind {
    /// The packet went to the kernel untouched.
    Pass,
    /// The packet was dropped.
    Drop,
    /// The packet was rewritten and sent.
    Tx,
    /// How conntrack resolved a packet that went on (new flow, hit, rebalanced, reply).
    Flow,
    /// Something that happened on the way, possibly several times per packet.
    Event,
}

#[cfg(test)]
mod tests {
    use super::{Counter, CounterKind};

    #[test]
    fn kinds_agree_with_names_and_drops() {
        for c in Counter::ALL {
            assert_eq!(c.is_drop(), c.kind() == CounterKind::Drop, "{c:?}");
            let prefixed = c.name().starts_with("pass_")
                || c.name().starts_with("drop_")
                || c.name().starts_with("tx_");
            let verdict = matches!(
                c.kind(),
                CounterKind::Pass | CounterKind::Drop | CounterKind::Tx
            );
            assert_eq!(prefixed, verdict, "{c:?}");
            assert!(
                !c.reason().is_empty() && c.name().ends_with(c.reason()),
                "{c:?}"
            );
        }
        assert_eq!(Counter::DropNoBackend.reason(), "no_backend");
        assert_eq!(Counter::FlowNew.reason(), "flow_new");
    }

    #[test]
    fn all_is_complete_and_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{c:?} out of order");
        }
    }

    #[test]
    fn names_are_unique() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                assert!(
                    a == b || a.name() != b.name(),
                    "{a:?} and {b:?} share a name"
                );
            }
        }
    }
}
