//! The daemon's layer-2 duties, as a task fed by every apply: keep each backend's next hop
//! resolved (`neigh::NeighKeeper`, managed neighbour entries: XDP cannot resolve neighbours,
//! and an unresolved one makes new flows pass to the kernel), and announce VIPs this node takes
//! (`garp::GarpSender`: gratuitous ARP for IPv4 VIPs, unsolicited neighbour advertisements for
//! IPv6 ones), so the segment's caches point at it at once. Both families alike: IPv4 backends'
//! next hops get ARP entries, IPv6 ones NDP entries, all managed. It
//! also reads the neighbours back (`NeighKeeper::status`) and publishes them whenever they
//! change, for the state file (`vmlb inspect neighbours`) and the metrics.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    garp::{GarpSender, GarpSocket, VlanId},
    neigh::NeighKeeper,
    observe::state::NeighbourState,
};

/// Routes can change under the managed entries (a backend moving behind another gateway):
/// re-resolve this often even without a configuration change.
const RESYNC: Duration = Duration::from_secs(15);

/// How often the neighbour entries are read back. A new entry resolves within milliseconds and a
/// changed MAC within seconds, so `inspect` lags the kernel by at most this; one netlink dump of
/// the interface's neighbours costs little.
const STATUS_POLL: Duration = Duration::from_secs(2);

/// What the data path serves now, as the applier publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Backend addresses of both families.
    pub backends: BTreeSet<IpAddr>,
    /// Owned VIPs of both families.
    pub owned_vips: BTreeSet<IpAddr>,
}

/// The task's two ends: what to serve goes in, the backends' neighbours come out.
pub struct Handles {
    pub wanted: watch::Sender<Wanted>,
    /// Changes only when a neighbour does (state, MAC, next hop, a backend added or removed).
    pub neighbours: watch::Receiver<Vec<NeighbourState>>,
}

/// Start the task on `iface`; it runs until `Handles::wanted` is dropped.
pub fn spawn(iface: &str, vlan: Option<u16>) -> anyhow::Result<Handles> {
    let (tx, mut rx) = watch::channel(Wanted::default());
    let (neigh_tx, neigh_rx) = watch::channel(Vec::new());
    let garp = match GarpSocket::open(iface) {
        Ok(s) => Some(GarpSender::new(s, vlan.and_then(VlanId::new))),
        Err(e) => {
            warn!("VIP announcements (gratuitous ARP, unsolicited NA) disabled: {e}");
            None
        }
    };
    let iface = iface.to_string();
    tokio::spawn(async move {
        let mut keeper = match NeighKeeper::for_interface(&iface).await {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("backend neighbours will not be kept resolved: {e}");
                None
            }
        };
        let mut garp = garp;
        let mut announced: BTreeSet<IpAddr> = BTreeSet::new();
        let mut tick = tokio::time::interval(RESYNC);
        let mut poll = tokio::time::interval(STATUS_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let resync = tokio::select! {
                changed = rx.changed() => if changed.is_err() { return } else { true },
                _ = tick.tick() => true,
                _ = poll.tick() => false,
            };
            if !resync {
                if let Some(k) = keeper.as_ref() {
                    publish_status(k, &neigh_tx).await;
                }
                continue;
            }
            let wanted = rx.borrow_and_update().clone();
            if let Some(k) = keeper.as_mut() {
                match k.sync(wanted.backends.iter().copied()).await {
                    Ok(r) if !r.failed.is_empty() => {
                        warn!(failed = ?r.failed, "some backend neighbours could not be installed")
                    }
                    Ok(r) => debug!(?r, "backend neighbours in sync"),
                    Err(e) => warn!("syncing backend neighbours: {e}"),
                }
                publish_status(k, &neigh_tx).await;
            }
            if let Some(g) = garp.as_mut() {
                for vip in wanted.owned_vips.difference(&announced) {
                    let how = if vip.is_ipv4() {
                        "gratuitous ARP"
                    } else {
                        "unsolicited neighbour advertisements"
                    };
                    info!(%vip, "taking the VIP: announcing it with {how}");
                    g.announce(*vip);
                }
                for vip in announced.difference(&wanted.owned_vips) {
                    g.withdraw(*vip);
                }
            }
            announced = wanted.owned_vips;
        }
    });
    Ok(Handles {
        wanted: tx,
        neighbours: neigh_rx,
    })
}

/// Read the neighbours back and publish them if anything changed.
async fn publish_status(keeper: &NeighKeeper, tx: &watch::Sender<Vec<NeighbourState>>) {
    match keeper.status().await {
        Ok(status) => {
            let now: Vec<NeighbourState> = status.iter().map(NeighbourState::from).collect();
            tx.send_if_modified(|shown| {
                let changed = *shown != now;
                if changed {
                    *shown = now;
                }
                changed
            });
        }
        Err(e) => debug!("reading backend neighbours back: {e}"),
    }
}
