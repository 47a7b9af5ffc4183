//! VIP ownership: which node answers ARP for which VIP. Pure; the Lease I/O is in `leases.rs`.
//!
//! Design: every node renews one Lease of its own (`vmlb-node-<node>`), and every node ranks
//! the live nodes for each VIP with the same hash of (node, VIP); the highest rank owns the VIP
//! (MetalLB's layer-2 scheme). API writes grow with the number of nodes, not of VIPs, and
//! VIPs spread over the nodes. One Lease per VIP (kube-vip, Cilium) would make every VIP cost
//! renewals of its own.
//!
//! Safety rule: a node stops counting itself live `renew_deadline` after it *sent* its last
//! successful renewal, while the others count it live until `lease_duration` after they *saw*
//! that renewal, which is later. With `renew_deadline < lease_duration` a node that cannot
//! renew has stopped answering before anyone else starts. Expiry is measured on the observer's
//! own monotonic clock from when it saw the Lease change (as client-go's leader election
//! does), so clock skew between nodes does not matter.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long the others count a node live after seeing its renewal.
    pub lease_duration: Duration,
    /// How often a node renews.
    pub renew_every: Duration,
    /// How long after its last successful renewal a node still counts itself live.
    pub renew_deadline: Duration,
}

impl Default for Timing {
    /// Takeover within 1.5 s of a node dying (plus the watch's delivery), for two Lease writes
    /// per node per second. The deadline leaves 0.5 s between "I stop" and "they start".
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_millis(1500),
            renew_every: Duration::from_millis(500),
            renew_deadline: Duration::from_millis(1000),
        }
    }
}

impl Timing {
    /// How long a node that becomes live waits before it claims VIPs: the others must first see
    /// its Lease and let go. The same margin that separates "I stop" from "they start" on a
    /// failure, and at least one renewal interval.
    pub fn settle(&self) -> Duration {
        self.renew_every
            .max(self.lease_duration.saturating_sub(self.renew_deadline))
    }

    pub fn check(&self) -> Result<(), String> {
        if self.renew_every >= self.renew_deadline || self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "lease timing must satisfy renew interval ({:?}) < renew deadline ({:?}) < lease duration ({:?})",
                self.renew_every, self.renew_deadline, self.lease_duration
            ));
        }
        Ok(())
    }
}

/// A node's score for a VIP: FNV-1a over the node name and the address, then the splitmix64
/// finaliser so that similar names spread. Written out rather than taken from `std::hash`,
/// whose output may change between Rust releases: every node, whatever version it runs, must
/// rank the same way. An IPv4 VIP hashes its 4 octets (as before IPv6 VIPs were owned, so the
/// ranking of IPv4 VIPs did not change), an IPv6 VIP its 16.
pub fn score(node: &str, vip: IpAddr) -> u64 {
    let octets: Vec<u8> = match vip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0]).chain(octets) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The live node that owns `vip`: highest score, ties (practically never) by name.
pub fn owner<'a>(vip: IpAddr, live: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    live.into_iter()
        .max_by(|a, b| score(a, vip).cmp(&score(b, vip)).then(b.cmp(a)))
}

#[derive(Clone, Debug)]
struct Seen {
    /// The Lease's renewTime as written; a new value is a renewal.
    renew: String,
    at: Instant,
    duration: Duration,
}

/// One node's view of who is live, fed by Lease watch events and its own renewals.
#[derive(Debug)]
pub struct Membership {
    me: String,
    timing: Timing,
    peers: BTreeMap<String, Seen>,
    /// When the last successful renewal was sent.
    renewed_at: Option<Instant>,
    /// When this run of successful renewals began (reset when the deadline passes).
    live_since: Option<Instant>,
    /// Whether the peers' Leases have been listed: until then a node that believes itself
    /// alone would take every VIP.
    synced: bool,
}

impl Membership {
    pub fn new(me: impl Into<String>, timing: Timing) -> Self {
        Self {
            me: me.into(),
            timing,
            peers: BTreeMap::new(),
            renewed_at: None,
            live_since: None,
            synced: false,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// A peer's Lease as the watch shows it. `duration` is what the Lease says.
    pub fn observe(&mut self, node: &str, renew: &str, duration: Duration, now: Instant) {
        if node == self.me {
            return;
        }
        match self.peers.get_mut(node) {
            Some(s) if s.renew == renew => s.duration = duration,
            _ => {
                self.peers.insert(
                    node.to_string(),
                    Seen {
                        renew: renew.to_string(),
                        at: now,
                        duration,
                    },
                );
            }
        }
    }

    /// A peer's Lease is gone (a node that shut down cleanly deletes it): it is not live.
    pub fn forget(&mut self, node: &str) {
        self.peers.remove(node);
    }

    /// After a (re-)list: peers whose Lease is no longer there are gone, and this node knows
    /// its peers.
    pub fn retain_peers(&mut self, present: &BTreeSet<String>) {
        self.peers.retain(|n, _| present.contains(n));
        self.synced = true;
    }

    /// Our renewal, sent at `sent`, was accepted.
    pub fn renewed(&mut self, sent: Instant) {
        if !self.me_live(sent) {
            self.live_since = Some(sent);
        }
        self.renewed_at = Some(sent);
    }

    /// Until when this node counts itself live without another accepted renewal.
    pub fn live_until(&self) -> Option<Instant> {
        self.renewed_at.map(|t| t + self.timing.renew_deadline)
    }

    pub fn me_live(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|t| now < t + self.timing.renew_deadline)
    }

    /// Nodes live at `now`. A node counts itself only once it has been live for
    /// `Timing::settle`, by when the others have seen its Lease: a joining node takes its VIPs
    /// after the old owner has let go (a short gap rather than two nodes answering).
    pub fn live(&self, now: Instant) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self
            .peers
            .iter()
            .filter(|(_, s)| now < s.at + s.duration)
            .map(|(n, _)| n.as_str())
            .collect();
        let settled = self
            .live_since
            .is_some_and(|t| now >= t + self.timing.settle());
        if self.me_live(now) && settled && self.synced {
            out.insert(&self.me);
        }
        out
    }

    /// The VIPs this node should answer for now.
    pub fn owned(&self, vips: &BTreeSet<IpAddr>, now: Instant) -> BTreeSet<IpAddr> {
        let live = self.live(now);
        if !live.contains(self.me.as_str()) {
            return BTreeSet::new();
        }
        vips.iter()
            .copied()
            .filter(|&v| owner(v, live.iter().copied()) == Some(self.me.as_str()))
            .collect()
    }

    /// The next instant at which `live` can change without a new event (a peer's expiry, our
    /// deadline, our settling): the caller sets a timer for it.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let peers = self.peers.values().map(|s| s.at + s.duration);
        let mine = self.renewed_at.map(|t| t + self.timing.renew_deadline);
        let settle = self.live_since.map(|t| t + self.timing.settle());
        peers.chain(mine).chain(settle).filter(|t| *t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        std::net::Ipv4Addr::new(10, 10, 1, i).into()
    }

    #[test]
    fn the_score_is_pinned_so_every_version_ranks_alike() {
        // Changing the hash would move VIPs between nodes during a rolling upgrade. The value was
        // computed by an independent implementation (Python) of FNV-1a + splitmix64.
        assert_eq!(score("node-a", ip(128)), score("node-a", ip(128)));
        assert_ne!(score("node-a", ip(128)), score("node-b", ip(128)));
        assert_eq!(score("node-a", ip(128)), 0x106e_4931_ab7a_c734);
        // IPv6 VIPs hash their 16 octets: distinct from any IPv4 VIP, and spread as well.
        let v6 = |i: u16| IpAddr::from(std::net::Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, i));
        assert_ne!(score("node-a", v6(0x1000)), score("node-b", v6(0x1000)));
        let nodes = ["worker-0", "worker-1", "worker-2"];
        for n in nodes {
            let c = (0x1000..0x1080)
                .filter(|&i| owner(v6(i), nodes) == Some(n))
                .count();
            assert!((20..=70).contains(&c), "{n} owns {c} of 128 IPv6 VIPs");
        }
    }

    #[test]
    fn ownership_spreads_and_moves_only_from_the_dead_node() {
        let nodes = ["worker-0", "worker-1", "worker-2"];
        let vips: Vec<IpAddr> = (128..=255).map(ip).collect();
        let before: Vec<&str> = vips.iter().map(|&v| owner(v, nodes).unwrap()).collect();
        for n in nodes {
            let c = before.iter().filter(|o| **o == n).count();
            assert!((20..=70).contains(&c), "{n} owns {c} of 128");
        }
        let after: Vec<&str> = vips
            .iter()
            .map(|&v| owner(v, ["worker-0", "worker-2"]).unwrap())
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "worker-1" {
                assert_eq!(b, a, "a VIP of a live node must not move");
            }
        }
        assert_eq!(owner(ip(1), []), None);
    }

    #[test]
    fn a_node_that_cannot_renew_stops_before_the_others_take_over() {
        let t = Timing::default();
        t.check().unwrap();
        let t0 = Instant::now();
        let mut a = Membership::new("a", t);
        let mut b = Membership::new("b", t);
        a.retain_peers(&BTreeSet::new());
        b.retain_peers(&BTreeSet::new());
        let vips: BTreeSet<IpAddr> = (128..160).map(ip).collect();
        // Both renew at t0 and see each other 10 ms later.
        a.renewed(t0);
        b.renewed(t0);
        let seen = t0 + Duration::from_millis(10);
        a.observe("b", "r1", t.lease_duration, seen);
        b.observe("a", "r1", t.lease_duration, seen);
        let now = t0 + t.renew_every;
        let (oa, ob) = (a.owned(&vips, now), b.owned(&vips, now));
        assert!(oa.is_disjoint(&ob));
        assert_eq!(
            oa.len() + ob.len(),
            vips.len(),
            "every VIP has exactly one owner"
        );
        assert!(!oa.is_empty() && !ob.is_empty());

        // `a` can no longer renew (partitioned). Walk time in 10 ms steps: at no instant do
        // both answer for a VIP, and `b` owns everything within the lease duration.
        let mut took_all = None;
        let mut step = now;
        while step < t0 + Duration::from_secs(3) {
            b.renewed(step);
            let (oa, ob) = (a.owned(&vips, step), b.owned(&vips, step));
            assert!(oa.is_disjoint(&ob), "two owners at {:?}", step - t0);
            if ob.len() == vips.len() && took_all.is_none() {
                took_all = Some(step - t0);
            }
            step += Duration::from_millis(10);
        }
        let took = took_all.expect("b never took over");
        assert!(
            took <= t.lease_duration + Duration::from_millis(20),
            "took {took:?}"
        );
        assert!(
            took >= t.renew_deadline,
            "took over while a could still answer"
        );
        assert!(a.owned(&vips, t0 + t.renew_deadline).is_empty());
    }

    #[test]
    fn a_clean_shutdown_hands_over_at_once_and_a_newcomer_waits_to_settle() {
        let t = Timing::default();
        let t0 = Instant::now();
        let mut b = Membership::new("b", t);
        b.renewed(t0);
        b.observe("a", "r1", t.lease_duration, t0);
        b.retain_peers(&["a".to_string()].into());
        let vip: BTreeSet<IpAddr> = (128..136).map(ip).collect();
        let now = t0 + t.renew_every;
        assert!(b.owned(&vip, now).len() < vip.len());
        b.forget("a");
        assert_eq!(b.owned(&vip, now).len(), vip.len());

        let mut c = Membership::new("c", t);
        c.renewed(now);
        assert!(
            c.owned(&vip, now + t.settle()).is_empty(),
            "never before the peers are known"
        );
        c.retain_peers(&BTreeSet::new());
        assert!(c.owned(&vip, now).is_empty(), "not settled yet");
        assert_eq!(c.next_change(now), Some(now + t.settle()));
        assert_eq!(c.owned(&vip, now + t.settle()).len(), vip.len());
    }

    #[test]
    fn an_unchanged_renew_time_is_not_a_renewal() {
        let t = Timing::default();
        let t0 = Instant::now();
        let mut b = Membership::new("b", t);
        b.observe("a", "r1", t.lease_duration, t0);
        // A re-list shows the same Lease again later: it must not extend the peer's life.
        b.observe("a", "r1", t.lease_duration, t0 + Duration::from_secs(1));
        assert!(!b.live(t0 + t.lease_duration).contains("a"));
        b.observe("a", "r2", t.lease_duration, t0 + Duration::from_secs(1));
        assert!(b.live(t0 + t.lease_duration).contains("a"));
        assert!(Timing {
            renew_deadline: t.lease_duration,
            ..t
        }
        .check()
        .is_err());
    }
}
