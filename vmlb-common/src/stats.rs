//! One closed set of counters for every path a packet can take, shared by the data path (index
//! into the per-CPU `STATS` array) and user space (metric labels, CLI). Drops and passes are
//! reasons in the same enum so one array answers "where did my packets go".

/// Index into `STATS`. Append only: the numbers are part of the pinned-map ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Not IPv4 (ARP, IPv6, ... until those are handled): left to the kernel.
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
    /// Every candidate SNAT port was taken for this backend.
    DropSnatExhausted = 8,
    /// The conntrack map refused the new flow.
    DropFlowInsert = 9,
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
    /// To a VIP with a protocol vmlb does not balance (ICMP until it is handled, ...).
    PassUnsupportedProto = 19,
    /// An entry named a backend id that does not exist (map changed under the flow).
    DropBadBackend = 20,
}

impl Counter {
    /// Number of counters; the size of `STATS`.
    pub const COUNT: u32 = 21;

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
        Counter::DropFlowInsert,
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
            Counter::DropFlowInsert => "drop_flow_insert",
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
            | Counter::PassUnsupportedProto => CounterKind::Pass,
            Counter::DropTruncated
            | Counter::DropBadHeader
            | Counter::DropFragment
            | Counter::DropUnknownPort
            | Counter::DropNoBackend
            | Counter::DropSnatExhausted
            | Counter::DropFlowInsert
            | Counter::DropBadBackend => CounterKind::Drop,
            Counter::TxSameIface | Counter::TxRedirect => CounterKind::Tx,
            Counter::FlowNew | Counter::FlowHit | Counter::FlowRebalanced | Counter::ReplyHit => {
                CounterKind::Flow
            }
            Counter::SnatPortCollision => CounterKind::Event,
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
        matches!(
            self,
            Counter::DropTruncated
                | Counter::DropBadHeader
                | Counter::DropFragment
                | Counter::DropUnknownPort
                | Counter::DropNoBackend
                | Counter::DropSnatExhausted
                | Counter::DropFlowInsert
                | Counter::DropBadBackend
        )
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
