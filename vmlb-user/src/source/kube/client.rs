//! The Kubernetes source's I/O: watches feed the index (one task owns it), and the leader
//! writes what the index asks for (VIPs into Service status, the VM endpoint controller's
//! EndpointSlices, Events for bad objects). Node Leases and VIP ownership are in `leases`.
//!
//! Watches use kube-runtime's `watcher` with its default backoff: a dropped watch resumes, and
//! a 410 Gone re-lists. A (re-)list is buffered until complete and then replaces the kind's
//! objects in one step, so the published services never pass through an empty state. Nothing
//! is published before every kind has been listed once: a restarted daemon does not withdraw
//! services it simply has not read yet.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use futures::{stream::BoxStream, FutureExt as _, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerIngress, LoadBalancerStatus, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    index::{EndpointWork, Index, ObjRef, Problem},
    pools::{Allocated, NoAddress, Pool},
    SERVICE_ENTRY_LABEL,
};
use crate::model::{ConfiguredService, NodeConfig};

/// Field manager for vmlb's writes (server-side apply and patches).
pub const MANAGER: &str = "vmlb";
/// Service status condition saying whether vmlb gave the Service an address.
pub const COND_ADDRESS: &str = "vmlb.io/AddressAllocated";
/// Service status condition saying whether vmlb could read the Service.
pub const COND_VALID: &str = "vmlb.io/Valid";

/// What the leader should make true in the cluster, recomputed by the index task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaderWork {
    /// Every vmlb Service (current object) with the addresses it should have.
    pub allocations: Vec<(Service, Result<Allocated, NoAddress>)>,
    pub endpoints: EndpointWork,
    pub problems: Vec<Problem>,
}

/// One watched kind's events, tagged. Moved once per event, so the size spread between
/// variants costs nothing worth boxing for.
#[expect(clippy::large_enum_variant, reason = "each event is moved once")]
enum Ev {
    Service(Event<Service>),
    Slice(Event<EndpointSlice>),
    Vmi(Event<DynamicObject>),
    Entry(Event<DynamicObject>),
}

const KINDS: usize = 4;
/// Events applied at most before the services are derived and published again.
const BATCH: usize = 1000;

/// The custom resources vmlb reads, if the cluster serves them: a cluster without KubeVirt
/// or Istio still serves Services.
async fn served(
    client: &Client,
    group: &str,
    versions: &[&str],
    kind: &str,
) -> Option<ApiResource> {
    for v in versions {
        let gvk = kube::api::GroupVersionKind::gvk(group, v, kind);
        let ar = ApiResource::from_gvk(&gvk);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return Some(ar),
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => {
                // Not a clear "not served": watch it anyway and let the backoff retry.
                warn!(%group, %kind, "probing the API: {e}");
                return Some(ar);
            }
        }
    }
    None
}

/// The index task: owns the index, applies watch events, publishes the services for the data
/// path and the leader's work. Returns when every watch has ended (never, in practice).
pub async fn run_index(
    client: Client,
    node: NodeConfig,
    pools: Vec<Pool>,
    services_tx: watch::Sender<Option<Vec<ConfiguredService>>>,
    work_tx: watch::Sender<LeaderWork>,
) {
    let cfg = watcher::Config::default();
    let mut streams: Vec<BoxStream<'static, Result<Ev, watcher::Error>>> = vec![
        watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone())
            .default_backoff()
            .map(|e| e.map(Ev::Service))
            .boxed(),
        watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone())
            .default_backoff()
            .map(|e| e.map(Ev::Slice))
            .boxed(),
    ];
    let mut synced = [false; KINDS];
    match served(&client, "kubevirt.io", &["v1"], "VirtualMachineInstance").await {
        Some(ar) => {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            streams.push(
                watcher::watcher(api, cfg.clone())
                    .default_backoff()
                    .map(|e| e.map(Ev::Vmi))
                    .boxed(),
            );
        }
        None => {
            info!("KubeVirt is not installed: no VM endpoint controller");
            synced[2] = true;
        }
    }
    // v1 and v1beta1 are the same objects; watch the newest version served.
    match served(
        &client,
        "networking.istio.io",
        &["v1", "v1beta1"],
        "ServiceEntry",
    )
    .await
    {
        Some(ar) => {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let cfg = cfg.clone().labels(&format!("{SERVICE_ENTRY_LABEL}=true"));
            streams.push(
                watcher::watcher(api, cfg)
                    .default_backoff()
                    .map(|e| e.map(Ev::Entry))
                    .boxed(),
            );
        }
        None => {
            info!("Istio's ServiceEntry is not served: not watched");
            synced[3] = true;
        }
    }
    let mut index = Index::default();
    index.set_pools(pools);
    let mut buffers = Buffers::default();
    let mut all = futures::stream::select_all(streams);
    let mut apply = |ev: Result<Ev, watcher::Error>, index: &mut Index, synced: &mut [bool]| {
        match ev {
            Ok(ev) => {
                if let Some(kind) = buffers.apply(index, ev) {
                    synced[kind] = true;
                }
            }
            // The watcher re-lists or resumes by itself; the index keeps what it has.
            Err(e) => warn!("watch error (retrying, state kept): {e}"),
        }
    };
    while let Some(ev) = all.next().await {
        apply(ev, &mut index, &mut synced);
        // Take whatever else has already arrived before deriving once: a burst of updates
        // costs one derivation, not one each. Bounded, so a flood still publishes.
        for _ in 0..BATCH {
            match all.next().now_or_never() {
                Some(Some(ev)) => apply(ev, &mut index, &mut synced),
                _ => break,
            }
        }
        if synced.iter().all(|s| *s) {
            publish(&index, &node, &services_tx, &work_tx);
        }
    }
}

/// Objects of a (re-)list in progress, per kind.
#[derive(Default)]
struct Buffers {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    vmis: Vec<Value>,
    entries: Vec<Value>,
}

fn to_json(o: DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

impl Buffers {
    /// Applies one event; returns the kind's number when a list completed.
    fn apply(&mut self, index: &mut Index, ev: Ev) -> Option<usize> {
        match ev {
            Ev::Service(e) => match e {
                Event::Init => self.services.clear(),
                Event::InitApply(o) => self.services.push(o),
                Event::InitDone => {
                    index.replace_services(std::mem::take(&mut self.services));
                    return Some(0);
                }
                Event::Apply(o) => index.upsert_service(o),
                Event::Delete(o) => index.remove_service(&o),
            },
            Ev::Slice(e) => match e {
                Event::Init => self.slices.clear(),
                Event::InitApply(o) => self.slices.push(o),
                Event::InitDone => {
                    index.replace_slices(std::mem::take(&mut self.slices));
                    return Some(1);
                }
                Event::Apply(o) => index.upsert_slice(o),
                Event::Delete(o) => index.remove_slice(&o),
            },
            Ev::Vmi(e) => match e {
                Event::Init => self.vmis.clear(),
                Event::InitApply(o) => self.vmis.push(to_json(o)),
                Event::InitDone => {
                    index.replace_vmis(std::mem::take(&mut self.vmis));
                    return Some(2);
                }
                Event::Apply(o) => index.upsert_vmi(to_json(o)),
                Event::Delete(o) => index.remove_vmi(&to_json(o)),
            },
            Ev::Entry(e) => match e {
                Event::Init => self.entries.clear(),
                Event::InitApply(o) => self.entries.push(to_json(o)),
                Event::InitDone => {
                    index.replace_entries(std::mem::take(&mut self.entries));
                    return Some(3);
                }
                Event::Apply(o) => index.upsert_entry(to_json(o)),
                Event::Delete(o) => index.remove_entry(&to_json(o)),
            },
        }
        None
    }
}

fn publish(
    index: &Index,
    node: &NodeConfig,
    services_tx: &watch::Sender<Option<Vec<ConfiguredService>>>,
    work_tx: &watch::Sender<LeaderWork>,
) {
    let derived = index.derive(node);
    services_tx.send_if_modified(|cur| {
        let changed = cur.as_ref() != Some(&derived.services);
        if changed {
            debug!(
                services = derived.services.len(),
                "cluster services changed"
            );
            *cur = Some(derived.services.clone());
        }
        changed
    });
    let endpoints = index.endpoint_work();
    let mut problems = derived.problems;
    problems.extend(endpoints.problems.iter().cloned());
    problems.sort();
    problems.dedup();
    let allocations = index
        .allocations()
        .into_iter()
        .filter_map(|(k, r)| Some((index.service(&k)?.clone(), r)))
        .collect();
    let work = LeaderWork {
        allocations,
        endpoints,
        problems,
    };
    work_tx.send_if_modified(|cur| {
        let changed = *cur != work;
        if changed {
            *cur = work;
        }
        changed
    });
}

/// The leader's writer: whenever it leads and the work changes, makes the cluster match.
/// Failed writes are retried on the next change or after `retry`.
pub async fn run_writer(
    client: Client,
    reporter: Reporter,
    mut leader: watch::Receiver<bool>,
    mut work: watch::Receiver<LeaderWork>,
    retry: std::time::Duration,
) {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut reported: BTreeSet<Problem> = BTreeSet::new();
    let mut unechoed = Unechoed::default();
    loop {
        if *leader.borrow_and_update() {
            let w = work.borrow_and_update().clone();
            let ok = write_all(&client, &recorder, &mut reported, &mut unechoed, &w).await;
            if !ok {
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    r = work.changed() => if r.is_err() { return },
                    r = leader.changed() => if r.is_err() { return },
                }
                continue;
            }
        } else {
            // A new leader reports and writes afresh.
            reported.clear();
            unechoed = Unechoed::default();
        }
        tokio::select! {
            r = work.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

/// How long a write may take to come back through the watch before the same request is sent
/// again. Watch events arrive within milliseconds on a healthy API server.
const ECHO_WAIT: Duration = Duration::from_secs(2);

/// Recent successful writes the index has not seen come back yet. The index learns of a write
/// only from its watch event, and a recompute in between (any other object's event) asks for the
/// same write again: every status and slice was written twice at start-up, a thousand redundant
/// writes for a thousand services. A request equal to one that succeeded less than
/// `ECHO_WAIT` ago, against the same observed resourceVersion, is held back; after that it goes
/// out again (the object may have been changed or deleted meanwhile), so a held-back write is
/// late at worst, never lost.
#[derive(Default)]
struct Unechoed(HashMap<String, (Option<String>, Value, Instant)>);

impl Unechoed {
    /// Whether this request repeats one still awaiting its echo.
    fn holds(&self, key: &str, observed_rv: &Option<String>, body: &Value, now: Instant) -> bool {
        self.0.get(key).is_some_and(|(rv, b, at)| {
            rv == observed_rv && b == body && now.saturating_duration_since(*at) < ECHO_WAIT
        })
    }

    fn wrote(&mut self, key: String, observed_rv: Option<String>, body: Value, now: Instant) {
        // Bounded by the objects vmlb writes; entries past their wait are of no use.
        self.0
            .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < ECHO_WAIT);
        self.0.insert(key, (observed_rv, body, now));
    }
}

/// A status patch without its conditions' transition times, which `status_patch` stamps
/// afresh on every call: two patches for the same change compare equal.
fn without_times(patch: &Value) -> Value {
    let mut v = patch.clone();
    if let Some(cs) = v["status"]["conditions"].as_array_mut() {
        for c in cs {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    v
}

/// Returns whether every write succeeded (a write held back awaiting its echo counts as not yet
/// done, so the caller comes back to it).
async fn write_all(
    client: &Client,
    recorder: &Recorder,
    reported: &mut BTreeSet<Problem>,
    unechoed: &mut Unechoed,
    w: &LeaderWork,
) -> bool {
    let mut ok = true;
    let bad: BTreeMap<(String, String), String> = w
        .problems
        .iter()
        .filter(|p| p.object.kind == "Service")
        .map(|p| {
            (
                (p.object.namespace.clone(), p.object.name.clone()),
                p.message.clone(),
            )
        })
        .collect();
    for (svc, res) in &w.allocations {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let invalid = bad.get(&(ns.clone(), name.clone()));
        let patch = status_patch(svc, res, invalid);
        let key = format!("status {ns}/{name}");
        let rv = &svc.metadata.resource_version;
        if let Some(patch) = patch.filter(|p| {
            let held = unechoed.holds(&key, rv, &without_times(p), Instant::now());
            if held {
                debug!(service = %format!("{ns}/{name}"), "status write held back: the last one has not come back yet");
                ok = false;
            }
            !held
        }) {
            let api: Api<Service> = Api::namespaced(client.clone(), &ns);
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    unechoed.wrote(key, rv.clone(), without_times(&patch), Instant::now());
                    info!(service = %format!("{ns}/{name}"), addresses = ?res.as_ref().ok().map(|a| &a.ips), "status written")
                }
                Err(e) => {
                    warn!(service = %format!("{ns}/{name}"), "writing status: {e}");
                    ok = false;
                }
            }
        }
        if let Ok(a) = res {
            for (family, why) in &a.left_out {
                // PreferDualStack: served in the other family, which the condition says.
                debug!(service = %format!("{ns}/{name}"), %family, "family left out: {why}");
            }
        }
        if let Err(e) = res {
            let p = Problem {
                object: ObjRef {
                    kind: "Service",
                    namespace: ns,
                    name,
                },
                message: format!("no address: {e}"),
            };
            ok &= report(recorder, reported, &p, "AllocationFailed", Some(svc)).await;
        }
    }
    for slice in &w.endpoints.apply {
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        let name = slice.metadata.name.clone().unwrap_or_default();
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        let mut obj = slice.clone();
        obj.metadata.resource_version = None;
        let body = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": obj.metadata, "addressType": obj.address_type,
            "endpoints": obj.endpoints, "ports": obj.ports,
        });
        let key = format!("slice {ns}/{name}");
        let rv = &slice.metadata.resource_version;
        if unechoed.holds(&key, rv, &body, Instant::now()) {
            debug!(slice = %format!("{ns}/{name}"), "EndpointSlice write held back: the last one has not come back yet");
            ok = false;
            continue;
        }
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => {
                unechoed.wrote(key, rv.clone(), body, Instant::now());
                info!(slice = %format!("{ns}/{name}"), endpoints = slice.endpoints.len(), "EndpointSlice written")
            }
            Err(e) => {
                warn!(slice = %format!("{ns}/{name}"), "writing EndpointSlice: {e}");
                ok = false;
            }
        }
    }
    for key in &w.endpoints.delete {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => info!(slice = %key, "stale EndpointSlice deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                warn!(slice = %key, "deleting EndpointSlice: {e}");
                ok = false;
            }
        }
    }
    // Problems that went away may be reported again if they come back.
    let failing: BTreeSet<(String, String)> = w
        .allocations
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(s, _)| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    reported.retain(|p| {
        w.problems.contains(p)
            || (p.message.starts_with("no address: ")
                && failing.contains(&(p.object.namespace.clone(), p.object.name.clone())))
    });
    for p in &w.problems {
        let svc = w.allocations.iter().map(|(s, _)| s).find(|s| {
            p.object.kind == "Service"
                && s.metadata.name.as_deref() == Some(&p.object.name)
                && s.metadata.namespace.as_deref() == Some(&p.object.namespace)
        });
        ok &= report(recorder, reported, p, "Invalid", svc).await;
    }
    ok
}

/// A Warning Event about `p`, once per distinct problem.
async fn report(
    recorder: &Recorder,
    reported: &mut BTreeSet<Problem>,
    p: &Problem,
    reason: &str,
    svc: Option<&Service>,
) -> bool {
    if reported.contains(p) {
        return true;
    }
    warn!(object = %p.object, "{}", p.message);
    let (api_version, uid) = match p.object.kind {
        "Service" => ("v1", svc.and_then(|s| s.metadata.uid.clone())),
        "ServiceEntry" => ("networking.istio.io/v1", None),
        _ => ("kubevirt.io/v1", None),
    };
    let reference = ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(p.object.kind.into()),
        namespace: Some(p.object.namespace.clone()),
        name: Some(p.object.name.clone()),
        uid,
        ..Default::default()
    };
    let ev = KubeEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(p.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    match recorder.publish(&ev, &reference).await {
        Ok(()) => {
            reported.insert(p.clone());
            true
        }
        Err(e) => {
            warn!(object = %p.object, "publishing an Event: {e}");
            false
        }
    }
}

/// The status merge patch that makes `svc` say `res`, or `None` when it already does. One
/// ingress entry per family, primary family first.
pub fn status_patch(
    svc: &Service,
    res: &Result<Allocated, NoAddress>,
    invalid: Option<&String>,
) -> Option<Value> {
    let ingress: Vec<LoadBalancerIngress> = match res {
        Ok(a) => a
            .ips
            .iter()
            .map(|ip| LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let cur = svc.status.clone().unwrap_or_default();
    let cur_ingress = cur
        .load_balancer
        .and_then(|l| l.ingress)
        .unwrap_or_default();
    let mut conditions: Vec<Condition> = cur.conditions.unwrap_or_default();
    let generation = svc.metadata.generation;
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let existing = conditions.iter_mut().find(|c| c.type_ == type_);
        match existing {
            Some(c) if c.status == status && c.reason == reason && c.message == message => false,
            Some(c) => {
                // The transition time moves only when the status flips.
                if c.status != status {
                    c.last_transition_time = now();
                }
                c.status = status.into();
                c.reason = reason.into();
                c.message = message;
                c.observed_generation = generation;
                true
            }
            None => {
                conditions.push(Condition {
                    type_: type_.into(),
                    status: status.into(),
                    reason: reason.into(),
                    message,
                    last_transition_time: now(),
                    observed_generation: generation,
                });
                true
            }
        }
    };
    let mut changed = match res {
        Ok(a) => {
            let ips: Vec<String> = a.ips.iter().map(ToString::to_string).collect();
            let mut msg = ips.join(", ");
            for (family, why) in &a.left_out {
                msg += &format!("; no {family} address ({why}), served without it");
            }
            set(COND_ADDRESS, true, "Allocated", msg)
        }
        Err(e) => set(COND_ADDRESS, false, "NoAddress", e.to_string()),
    };
    changed |= match invalid {
        None => set(COND_VALID, true, "Valid", String::new()),
        Some(m) => set(COND_VALID, false, "Invalid", m.clone()),
    };
    if !changed && cur_ingress == ingress {
        return None;
    }
    Some(json!({"status": {
        "loadBalancer": LoadBalancerStatus { ingress: Some(ingress) },
        "conditions": conditions,
    }}))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_write_is_held_only_until_its_echo_is_overdue() {
        let t0 = Instant::now();
        let rv = Some("5".to_string());
        let body = json!({"endpoints": ["10.10.1.2"]});
        let mut u = Unechoed::default();
        assert!(!u.holds("slice default/vms-vmlb", &rv, &body, t0));
        u.wrote(
            "slice default/vms-vmlb".into(),
            rv.clone(),
            body.clone(),
            t0,
        );
        let soon = t0 + Duration::from_millis(50);
        assert!(u.holds("slice default/vms-vmlb", &rv, &body, soon));
        // Anything else goes out: another object, another body, a newer observation.
        assert!(!u.holds("slice default/other", &rv, &body, soon));
        assert!(!u.holds(
            "slice default/vms-vmlb",
            &rv,
            &json!({"endpoints": []}),
            soon
        ));
        assert!(!u.holds("slice default/vms-vmlb", &Some("6".into()), &body, soon));
        // Past the wait the same request is sent again (the object may have been deleted).
        assert!(!u.holds("slice default/vms-vmlb", &rv, &body, t0 + ECHO_WAIT));
        // Old entries do not pile up.
        u.wrote("b".into(), None, json!(1), t0 + ECHO_WAIT * 2);
        assert_eq!(u.0.len(), 1);
    }

    #[test]
    fn status_patches_for_the_same_change_compare_equal_without_their_times() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "vms", "namespace": "default", "resourceVersion": "7"},
        }))
        .unwrap();
        let res = Ok(Allocated {
            ips: vec!["10.10.1.128".parse().unwrap()],
            left_out: Vec::new(),
        });
        let a = status_patch(&svc, &res, None).unwrap();
        let mut b = status_patch(&svc, &res, None).unwrap();
        // As if stamped at another moment.
        b["status"]["conditions"][0]["lastTransitionTime"] = json!("2000-01-01T00:00:00Z");
        assert_ne!(a, b);
        assert_eq!(without_times(&a), without_times(&b));
        let other = status_patch(&svc, &Err(NoAddress::NoSuchPool("x".into())), None).unwrap();
        assert_ne!(without_times(&a), without_times(&other));
        assert!(a["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_some());
        assert!(without_times(&a)["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_none());
    }
}
