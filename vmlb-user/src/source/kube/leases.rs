//! Lease I/O: this node's own Lease (renewed, deleted on a clean shutdown), the watch on the
//! other nodes' Leases that feeds `ownership::Membership`, and the leader election that picks
//! the one writer (allocation, EndpointSlices, Events). kube-rs has no leader election of its
//! own; both uses need the same small rule (renew with a deadline, judge others by when we saw
//! them renew), so it is written here once.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    client::MANAGER,
    ownership::{Membership, Timing},
};
use crate::model::ConfiguredService;

/// Label on the node Leases, which the others watch.
pub const NODE_LEASE_LABEL: &str = "vmlb.io/node-lease";
/// The exact lease duration in milliseconds (`leaseDurationSeconds` is whole seconds).
pub const DURATION_ANNOTATION: &str = "vmlb.io/lease-duration-ms";
/// The leader election's Lease.
pub const LEADER_LEASE: &str = "vmlb-leader";

pub fn node_lease_name(node: &str) -> String {
    format!("vmlb-node-{node}")
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn lease_duration(l: &Lease) -> Duration {
    let ms = l
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DURATION_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok());
    match ms {
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs(
            l.spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .unwrap_or(15)
                .max(1) as u64,
        ),
    }
}

fn renew_marker(l: &Lease) -> String {
    l.spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Renews this node's Lease every `renew_every`; each accepted renewal's send time goes to
/// `renewed`. A request that takes longer than the deadline counts as failed. Deletes the
/// Lease when `stop` fires, so the others take over at once.
pub async fn run_renewal(
    client: Client,
    namespace: String,
    node: String,
    timing: Timing,
    renewed: mpsc::Sender<Instant>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = node_lease_name(&node);
    let secs = timing.lease_duration.as_millis().div_ceil(1000) as i32;
    let mut tick = tokio::time::interval(timing.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let sent = Instant::now();
        let body = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {NODE_LEASE_LABEL: "true"},
                         "annotations": {DURATION_ANNOTATION: timing.lease_duration.as_millis().to_string()}},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": secs, "renewTime": micro_now()},
        });
        let (params, patch) = (PatchParams::apply(MANAGER).force(), Patch::Apply(&body));
        let req = api.patch(&name, &params, &patch);
        match tokio::time::timeout(timing.renew_deadline, req).await {
            Ok(Ok(_)) => {
                if failing {
                    info!(lease = %name, "node Lease renewed again");
                    failing = false;
                }
                if renewed.send(sent).await.is_err() {
                    break;
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(lease = %name, "renewing the node Lease: {e}");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    warn!(lease = %name, "renewing the node Lease timed out");
                }
                failing = true;
            }
        }
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => info!(lease = %name, "node Lease released"),
        Err(e) => warn!(lease = %name, "releasing the node Lease: {e}"),
    }
}

/// Where `run_ownership` publishes: the VIPs this node owns, and until when it may answer for
/// them without another accepted renewal.
pub struct OwnershipOut {
    pub owned_tx: watch::Sender<BTreeSet<IpAddr>>,
    pub until_tx: watch::Sender<Option<Instant>>,
}

/// Feeds the membership from the node Leases and this node's renewals, and publishes the VIPs
/// this node owns whenever that can change: a Lease event, a renewal, a change of services,
/// or a peer's (or our own) deadline passing.
pub async fn run_ownership(
    client: Client,
    namespace: String,
    mut membership: Membership,
    mut renewed: mpsc::Receiver<Instant>,
    mut services: watch::Receiver<Option<Vec<ConfiguredService>>>,
    out: OwnershipOut,
    mut stop: watch::Receiver<bool>,
) {
    let OwnershipOut { owned_tx, until_tx } = out;
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().labels(&format!("{NODE_LEASE_LABEL}=true"));
    let mut leases = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut listing: BTreeSet<String> = BTreeSet::new();
    let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        let now = Instant::now();
        let owned = membership.owned(&vips, now);
        owned_tx.send_if_modified(|cur| {
            let changed = *cur != owned;
            if changed {
                info!(node = membership.me(), vips = ?owned, "VIP ownership changed");
                *cur = owned;
            }
            changed
        });
        until_tx.send_if_modified(|cur| {
            let until = membership.live_until();
            let changed = *cur != until;
            *cur = until;
            changed
        });
        let wake = membership.next_change(now);
        tokio::select! {
            r = renewed.recv() => match r {
                Some(sent) => membership.renewed(sent),
                None => break,
            },
            r = services.changed() => {
                if r.is_err() { break }
                // Both families: an IPv6 VIP is owned (answered with neighbour
                // advertisements) by the node ranked first for it, as an IPv4 VIP is.
                vips = services
                    .borrow_and_update()
                    .iter()
                    .flatten()
                    .map(|s| s.spec.vip)
                    .collect();
            }
            ev = leases.next() => match ev {
                None => break,
                Some(Err(e)) => warn!("watching node Leases (retrying, state kept): {e}"),
                Some(Ok(ev)) => {
                    let now = Instant::now();
                    let mut see = |l: &Lease| {
                        if let Some(holder) = l.spec.as_ref().and_then(|s| s.holder_identity.clone()) {
                            membership.observe(&holder, &renew_marker(l), lease_duration(l), now);
                            Some(holder)
                        } else {
                            None
                        }
                    };
                    match ev {
                        Event::Init => listing.clear(),
                        Event::InitApply(l) => {
                            if let Some(h) = see(&l) {
                                listing.insert(h);
                            }
                        }
                        Event::InitDone => membership.retain_peers(&std::mem::take(&mut listing)),
                        Event::Apply(l) => {
                            see(&l);
                        }
                        Event::Delete(l) => {
                            if let Some(h) = l.spec.as_ref().and_then(|s| s.holder_identity.as_ref()) {
                                membership.forget(h);
                            }
                        }
                    }
                }
            },
            _ = sleep_until(wake) => {}
            _ = stop.changed() => break,
        }
    }
    // Let go of every VIP; only then may the Lease be released (the caller waits for this).
    owned_tx.send_replace(BTreeSet::new());
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Leader election on one Lease: acquire it when free or expired (judged by when we saw it
/// renewed, not by the holder's clock), renew it while leading, and stop leading at the renew
/// deadline if renewals fail. Writes go through resourceVersion preconditions, so two
/// candidates cannot both win.
pub async fn run_leader_election(
    client: Client,
    namespace: String,
    me: String,
    timing: Timing,
    leader_tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut last_ok: Option<Instant> = None;
    let mut seen: Option<(String, Instant)> = None;
    let secs = timing.lease_duration.as_millis().div_ceil(1000) as i32;
    loop {
        let sent = Instant::now();
        let attempt = async {
            let mine = |rv: Option<String>, transitions: i32| Lease {
                metadata: ObjectMeta {
                    name: Some(LEADER_LEASE.into()),
                    namespace: Some(namespace.clone()),
                    resource_version: rv,
                    annotations: Some(
                        [(
                            DURATION_ANNOTATION.to_string(),
                            timing.lease_duration.as_millis().to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(secs),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(transitions),
                    ..Default::default()
                }),
            };
            match api.get_opt(LEADER_LEASE).await? {
                None => api
                    .create(&PostParams::default(), &mine(None, 0))
                    .await
                    .map(|_| true),
                Some(l) => {
                    let spec = l.spec.clone().unwrap_or_default();
                    let holder = spec.holder_identity.clone().unwrap_or_default();
                    let transitions = spec.lease_transitions.unwrap_or(0);
                    let rv = l.metadata.resource_version.clone();
                    if holder == me {
                        return api
                            .replace(LEADER_LEASE, &PostParams::default(), &mine(rv, transitions))
                            .await
                            .map(|_| true);
                    }
                    let marker = format!("{holder}@{}", renew_marker(&l));
                    let at = match &seen {
                        Some((m, at)) if *m == marker => *at,
                        _ => {
                            seen = Some((marker, sent));
                            sent
                        }
                    };
                    if holder.is_empty() || sent >= at + lease_duration(&l) {
                        api.replace(
                            LEADER_LEASE,
                            &PostParams::default(),
                            &mine(rv, transitions + 1),
                        )
                        .await
                        .map(|_| true)
                    } else {
                        Ok(false)
                    }
                }
            }
        };
        match tokio::time::timeout(timing.renew_deadline, attempt).await {
            Ok(Ok(true)) => last_ok = Some(sent),
            Ok(Ok(false)) => last_ok = None,
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => last_ok = None, // someone else won
            Ok(Err(e)) => warn!("leader election: {e}"),
            Err(_) => warn!("leader election: the API did not answer in time"),
        }
        // Lead until the deadline after the last accepted renewal; check again then.
        let deadline = last_ok.map(|t| t + timing.renew_deadline);
        let leading = deadline.is_some_and(|d| Instant::now() < d);
        leader_tx.send_if_modified(|cur| {
            let changed = *cur != leading;
            if changed {
                info!(node = %me, leading, "leadership changed");
                *cur = leading;
            }
            changed
        });
        let next = sent + timing.renew_every;
        let wake = deadline.filter(|d| *d < next).unwrap_or(next);
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.changed() => break,
        }
    }
    leader_tx.send_replace(false);
    // Hand over at once: an empty holder is free for the next candidate.
    if last_ok.is_some() {
        if let Ok(Some(mut l)) = api.get_opt(LEADER_LEASE).await {
            if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me.as_str()) {
                if let Some(s) = l.spec.as_mut() {
                    s.holder_identity = None;
                }
                let _ = api.replace(LEADER_LEASE, &PostParams::default(), &l).await;
            }
        }
    }
}
