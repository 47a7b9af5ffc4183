//! The pure index: the cluster objects vmlb watches -> desired services, VIP allocations and
//! the EndpointSlices the VM endpoint controller should write. Synchronous and I/O-free (the
//! watchers feed it, the writers act on what it says), so it is tested with small builders and
//! `kubectl get -o json` fixtures.
//!
//! Services and ServiceEntries mean what a ServiceEntry file means: each object is turned into
//! a ServiceEntry document and read by the file source's parser, so annotations, defaults and
//! errors are the same everywhere. An object with errors is skipped and reported; the others
//! keep serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Map, Value};

use super::{
    pools::{self, Allocated, Family, NoAddress, Policy, Pool, Request},
    vmi::{self, Vmi},
    ADDRESS_POOL, LB_CLASS, LB_IPS, SERVICE_ENTRY_LABEL,
};
use crate::{
    model::{ConfiguredService, NodeConfig},
    source::file as config,
};

/// The object a problem is about, for Events and status conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub object: ObjRef,
    pub message: String,
}

/// `namespace/name`.
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Is this Service vmlb's to serve?
pub fn is_ours(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer")
            && s.load_balancer_class.as_deref() == Some(LB_CLASS)
    })
}

/// Is this ServiceEntry opted in?
pub fn entry_opted_in(obj: &Value) -> bool {
    obj.pointer("/metadata/labels")
        .and_then(|l| l.get(SERVICE_ENTRY_LABEL))
        .and_then(Value::as_str)
        == Some("true")
}

#[derive(Clone, Debug, Default)]
pub struct Index {
    services: BTreeMap<String, Service>,
    /// EndpointSlices by `namespace/slice-name`.
    slices: BTreeMap<String, EndpointSlice>,
    vmis: BTreeMap<String, Vmi>,
    /// ServiceEntries as the API returned them (JSON), opted in by label.
    entries: BTreeMap<String, Value>,
    pools: Vec<Pool>,
    /// VMIs that could not be read, with why (reported once per change).
    bad_vmis: BTreeMap<String, String>,
}

/// Everything the index derives, in one go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Derived {
    pub services: Vec<ConfiguredService>,
    pub problems: Vec<Problem>,
}

impl Index {
    pub fn set_pools(&mut self, pools: Vec<Pool>) {
        self.pools = pools;
    }

    // ---- watch events. `upsert` and `remove` for single events, `replace_*` after a
    // (re-)list: the old set stays until the new one is complete, so a 410 Gone re-list never
    // empties the data path in between.

    pub fn upsert_service(&mut self, svc: Service) {
        let key = key_of(&svc.metadata);
        if is_ours(&svc) {
            self.services.insert(key, svc);
        } else {
            // Its class or type may have changed away from vmlb.
            self.services.remove(&key);
        }
    }

    pub fn remove_service(&mut self, svc: &Service) {
        self.services.remove(&key_of(&svc.metadata));
    }

    pub fn replace_services(&mut self, all: impl IntoIterator<Item = Service>) {
        self.services.clear();
        all.into_iter().for_each(|s| self.upsert_service(s));
    }

    pub fn upsert_slice(&mut self, s: EndpointSlice) {
        self.slices.insert(key_of(&s.metadata), s);
    }

    pub fn remove_slice(&mut self, s: &EndpointSlice) {
        self.slices.remove(&key_of(&s.metadata));
    }

    pub fn replace_slices(&mut self, all: impl IntoIterator<Item = EndpointSlice>) {
        self.slices = all.into_iter().map(|s| (key_of(&s.metadata), s)).collect();
    }

    /// A VMI as JSON (the watcher is untyped so that one odd object cannot fail a whole list).
    pub fn upsert_vmi(&mut self, obj: Value) {
        let key = json_key(&obj);
        match serde_json::from_value::<Vmi>(obj) {
            Ok(v) => {
                self.bad_vmis.remove(&key);
                self.vmis.insert(key, v);
            }
            Err(e) => {
                self.vmis.remove(&key);
                self.bad_vmis.insert(key, e.to_string());
            }
        }
    }

    pub fn remove_vmi(&mut self, obj: &Value) {
        let key = json_key(obj);
        self.vmis.remove(&key);
        self.bad_vmis.remove(&key);
    }

    pub fn replace_vmis(&mut self, all: impl IntoIterator<Item = Value>) {
        self.vmis.clear();
        self.bad_vmis.clear();
        all.into_iter().for_each(|v| self.upsert_vmi(v));
    }

    pub fn upsert_entry(&mut self, obj: Value) {
        let key = json_key(&obj);
        if entry_opted_in(&obj) {
            self.entries.insert(key, obj);
        } else {
            self.entries.remove(&key);
        }
    }

    pub fn remove_entry(&mut self, obj: &Value) {
        self.entries.remove(&json_key(obj));
    }

    pub fn replace_entries(&mut self, all: impl IntoIterator<Item = Value>) {
        self.entries.clear();
        all.into_iter().for_each(|e| self.upsert_entry(e));
    }

    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key)
    }

    // ---- what follows from the objects

    /// The services to serve, from Services (with their VIP already in status) and opted-in
    /// ServiceEntries. Conflicts between objects go to the older object.
    pub fn derive(&self, node: &NodeConfig) -> Derived {
        let mut out = Derived::default();
        // (creation time, kind, key) orders objects for conflicts.
        let mut per_object: Vec<(Order, ObjRef, Vec<ConfiguredService>)> = Vec::new();
        for (key, svc) in &self.services {
            let obj = obj_ref("Service", key);
            let created = created(&svc.metadata);
            match self.service_documents(svc) {
                Err(m) => out.problems.push(Problem {
                    object: obj,
                    message: m,
                }),
                Ok(docs) => {
                    let mut services = Vec::new();
                    let mut failed = false;
                    // Several VIPs (dual-stack): each service is named after its VIP too, as
                    // the file source names the services of a ServiceEntry with several VIPs.
                    let vips: BTreeSet<IpAddr> = docs.iter().map(|(vip, _)| *vip).collect();
                    for (vip, doc) in docs {
                        match parse(&doc, &obj, node) {
                            Ok(s) if vips.len() > 1 => {
                                services.extend(s.into_iter().map(|mut s| {
                                    s.name = format!("{}@{vip}", s.name);
                                    s
                                }))
                            }
                            Ok(s) => services.extend(s),
                            Err(ps) => {
                                failed = true;
                                out.problems.extend(ps);
                            }
                        }
                    }
                    if !failed {
                        per_object.push(((created, "Service", key.clone()), obj, services));
                    }
                }
            }
        }
        for (key, e) in &self.entries {
            let obj = obj_ref("ServiceEntry", key);
            let created = e
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut doc = e.clone();
            if let Some(m) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
                // The file source names services <namespace>/<name>/<port>, unique across
                // namespaces; an object always has one, "default" when it was left out.
                m.entry("namespace")
                    .or_insert_with(|| Value::String("default".into()));
            }
            match parse(&doc, &obj, node) {
                Ok(s) => per_object.push(((created, "ServiceEntry", key.clone()), obj, s)),
                Err(ps) => out.problems.extend(ps),
            }
        }
        for (key, why) in &self.bad_vmis {
            out.problems.push(Problem {
                object: obj_ref("VirtualMachineInstance", key),
                message: format!("cannot read: {why}"),
            });
        }
        per_object.sort_by(|a, b| a.0.cmp(&b.0));
        let mut taken: BTreeMap<_, String> = BTreeMap::new();
        let mut names = BTreeSet::new();
        for (_, obj, services) in per_object {
            let clash = services.iter().find_map(|s| {
                let k = (s.spec.vip, s.spec.port, s.spec.proto);
                taken.get(&k).map(|by| {
                    format!(
                        "{}:{}/{} is already served by {by}",
                        s.spec.vip,
                        s.spec.port,
                        s.spec.proto.name()
                    )
                })
            });
            if let Some(message) = clash {
                out.problems.push(Problem {
                    object: obj,
                    message,
                });
                continue;
            }
            for s in services {
                taken.insert((s.spec.vip, s.spec.port, s.spec.proto), obj.to_string());
                if names.insert(s.name.clone()) {
                    out.services.push(s);
                }
            }
        }
        out.problems.sort();
        // One annotation error is found once per port document.
        out.problems.dedup();
        out
    }

    /// One ServiceEntry document per VIP and Service port, so that each port gets exactly the
    /// endpoints whose slices carry it, and each VIP the endpoints of its own family (slices of
    /// its `addressType`): a family without endpoints yet drops, as a Service without
    /// endpoints does, instead of failing the other family. No documents while the Service has
    /// no address yet.
    fn service_documents(&self, svc: &Service) -> Result<Vec<(IpAddr, Value)>, String> {
        let (families, _) = ip_families(svc)?;
        let mut docs = Vec::new();
        // Status may hold a family the Service no longer asks for (until the leader rewrites
        // it): only the asked-for families are served.
        for vip in status_ips(svc)
            .into_iter()
            .filter(|ip| families.contains(&Family::of(*ip)))
        {
            docs.extend(self.vip_documents(svc, vip).into_iter().map(|d| (vip, d)));
        }
        Ok(docs)
    }

    fn vip_documents(&self, svc: &Service, vip: IpAddr) -> Vec<Value> {
        let key = key_of(&svc.metadata);
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let family = Family::of(vip).to_string();
        let annotations: Map<String, Value> = svc
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| !SERVICE_ONLY_ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let slices: Vec<&EndpointSlice> = self
            .slices
            .values()
            .filter(|s| {
                s.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(vmi::SERVICE_NAME))
                        .map(String::as_str)
                        == Some(name)
                    && s.address_type == family
            })
            .collect();
        let mut docs = Vec::new();
        for p in svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
        {
            // The port name as slices spell it (an unnamed single port is "").
            let pname = p.name.clone().unwrap_or_default();
            let se_name = if pname.is_empty() {
                p.port.to_string()
            } else {
                pname.clone()
            };
            // address -> (port, weight); a ready endpoint wins over a draining one.
            let mut eps: BTreeMap<(String, i32), u32> = BTreeMap::new();
            for s in &slices {
                let Some(sp) = s
                    .ports
                    .iter()
                    .flatten()
                    .find(|sp| sp.name.clone().unwrap_or_default() == pname)
                else {
                    continue;
                };
                let Some(port) = sp.port else { continue };
                for e in &s.endpoints {
                    let c = e.conditions.clone().unwrap_or_default();
                    // Kubernetes' meaning: ready unset is ready; serving+terminating drains.
                    let weight = if c.ready.unwrap_or(true) {
                        1
                    } else if c.serving == Some(true) && c.terminating == Some(true) {
                        0
                    } else {
                        continue;
                    };
                    // A slice's addresses are of its addressType; one of the other family would
                    // fail the whole Service in the family rule, so it is left out here. One
                    // that is no address at all goes on, for the parser to report.
                    for a in e.addresses.iter().filter(|a| {
                        a.parse::<IpAddr>()
                            .ok()
                            .is_none_or(|ip| Family::of(ip) == Family::of(vip))
                    }) {
                        let w = eps.entry((a.clone(), port)).or_insert(weight);
                        *w = (*w).max(weight);
                    }
                }
            }
            let endpoints: Vec<Value> = eps
                .into_iter()
                .map(|((address, port), weight)| {
                    json!({"address": address, "ports": {&se_name: port}, "weight": weight})
                })
                .collect();
            let target = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
                _ => p.port,
            };
            docs.push(json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": key, "annotations": annotations},
                "spec": {
                    "addresses": [vip.to_string()],
                    "ports": [{"number": p.port, "name": se_name,
                               "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                               "targetPort": target}],
                    "resolution": "STATIC",
                    "endpoints": endpoints,
                }
            }));
        }
        docs
    }

    /// The addresses every Service should have, one per served family (run by the leader;
    /// the answer is the same on every node).
    pub fn allocations(&self) -> BTreeMap<String, Result<Allocated, NoAddress>> {
        let mut reqs = Vec::new();
        let mut bad = BTreeMap::new();
        for (key, svc) in &self.services {
            let ann = svc.metadata.annotations.clone().unwrap_or_default();
            let (families, policy, wanted) =
                match ip_families(svc).and_then(|(f, p)| Ok((f, p, requested_ips(svc)?))) {
                    Ok(x) => x,
                    Err(m) => {
                        bad.insert(key.clone(), Err(NoAddress::Invalid(m)));
                        continue;
                    }
                };
            reqs.push(Request {
                key: key.clone(),
                created: created(&svc.metadata),
                families,
                policy,
                current: status_ips(svc),
                wanted,
                pool: ann.get(ADDRESS_POOL).cloned(),
            });
        }
        let mut out = pools::allocate(&self.pools, &reqs);
        out.extend(bad);
        out
    }

    /// EndpointSlices the VM endpoint controller should hold, and slices it wrote that should
    /// go (their Service no longer asks for VMs). Problems are about Services.
    pub fn endpoint_work(&self) -> EndpointWork {
        let mut work = EndpointWork::default();
        let mut wanted = BTreeSet::new();
        for (key, svc) in &self.services {
            match vmi::binding(svc) {
                None => {}
                Some(Err(m)) => work.problems.push(Problem {
                    object: obj_ref("Service", key),
                    message: m,
                }),
                Some(Ok(b)) => {
                    let families = match ip_families(svc) {
                        Ok((f, _)) => f,
                        Err(m) => {
                            // Reported with the Service; its slices stay as they are.
                            work.problems.push(Problem {
                                object: obj_ref("Service", key),
                                message: m,
                            });
                            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
                            for f in [Family::V4, Family::V6] {
                                wanted.insert(format!("{ns}/{}", vmi::slice_name(svc, f)));
                            }
                            continue;
                        }
                    };
                    // One slice per served family; a family no longer served loses its slice.
                    for f in families {
                        let (slice, problems) = vmi::desired_slice(svc, &b, f, self.vmis.values());
                        work.problems.extend(problems.into_iter().map(|m| Problem {
                            object: obj_ref("Service", key),
                            message: m,
                        }));
                        wanted.insert(key_of(&slice.metadata));
                        // Unchanged slices are not written again.
                        if !self
                            .slices
                            .get(&key_of(&slice.metadata))
                            .is_some_and(|have| same_slice(have, &slice))
                        {
                            work.apply.push(slice);
                        }
                    }
                }
            }
        }
        for (key, s) in &self.slices {
            let ours = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(vmi::MANAGED_BY))
                .map(String::as_str)
                == Some(vmi::CONTROLLER_NAME);
            if ours && !wanted.contains(key) {
                work.delete.push(key.clone());
            }
        }
        work.problems.sort();
        // A port problem is found once per family's slice.
        work.problems.dedup();
        work
    }
}

/// (creation time, kind, namespace/name): who wins a conflict.
type Order<'a> = (String, &'a str, String);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointWork {
    pub apply: Vec<EndpointSlice>,
    /// `namespace/name` of slices to delete.
    pub delete: Vec<String>,
    pub problems: Vec<Problem>,
}

/// Annotations that the index itself reads; the rest go to the ServiceEntry parser, which
/// refuses unknown `vmlb.io/` keys.
const SERVICE_ONLY_ANNOTATIONS: &[&str] = &[LB_IPS, ADDRESS_POOL, vmi::NETWORK, vmi::VMI_SELECTOR];

fn same_slice(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    have.endpoints == want.endpoints
        && have.ports == want.ports
        && have.address_type == want.address_type
        && have.metadata.labels == want.metadata.labels
        && have.metadata.owner_references == want.metadata.owner_references
}

fn parse(
    doc: &Value,
    obj: &ObjRef,
    node: &NodeConfig,
) -> Result<Vec<ConfiguredService>, Vec<Problem>> {
    // JSON is YAML, so the file source's parser reads it as it is.
    let text = doc.to_string();
    let file = PathBuf::from(obj.to_string());
    config::parse_str(&text, &file, node).map_err(|errs| {
        errs.0
            .into_iter()
            .map(|e| Problem {
                object: obj.clone(),
                message: if e.field.is_empty() {
                    e.message
                } else {
                    format!("{}: {}", e.field, e.message)
                },
            })
            .collect()
    })
}

/// The VIPs in status (written by the leader's allocator): the first address of each family,
/// in the order written. Hostnames are ignored.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ingress
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok())
    {
        if !out.iter().any(|o| Family::of(*o) == Family::of(ip)) {
            out.push(ip);
        }
    }
    out
}

/// The families a Service is served in, primary first, and its `spec.ipFamilyPolicy`.
/// `spec.ipFamilies` is what the API server settled for the Service (on a single-stack
/// cluster a PreferDualStack Service lists one family), so it is followed as written. An
/// object that never went through an API server may lack it: then the requested addresses'
/// families, else IPv4, and under a dual-stack policy both.
pub fn ip_families(svc: &Service) -> Result<(Vec<Family>, Policy), String> {
    let spec = svc.spec.clone().unwrap_or_default();
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => Policy::SingleStack,
        Some("PreferDualStack") => Policy::PreferDualStack,
        Some("RequireDualStack") => Policy::RequireDualStack,
        Some(p) => return Err(format!("spec.ipFamilyPolicy: {p:?} is not a policy")),
    };
    let mut families: Vec<Family> = Vec::new();
    for f in spec.ip_families.iter().flatten() {
        let f = Family::parse(f)
            .ok_or_else(|| format!("spec.ipFamilies: {f:?} is not IPv4 or IPv6"))?;
        if !families.contains(&f) {
            families.push(f);
        }
    }
    if families.is_empty() {
        for ip in parse_requested(svc).unwrap_or_default() {
            if !families.contains(&Family::of(ip)) {
                families.push(Family::of(ip));
            }
        }
    }
    if families.is_empty() {
        families.push(Family::V4);
    }
    let listed = spec.ip_families.as_ref().is_some_and(|f| !f.is_empty());
    match policy {
        Policy::SingleStack => families.truncate(1),
        // RequireDualStack is both families whatever is listed; PreferDualStack follows what
        // the API server listed, and only an unlisted one asks for both.
        Policy::RequireDualStack | Policy::PreferDualStack
            if families.len() == 1 && (policy == Policy::RequireDualStack || !listed) =>
        {
            families.push(families[0].other());
        }
        _ => {}
    }
    Ok((families, policy))
}

/// `vmlb.io/loadBalancerIPs` (comma-separated, as in MetalLB: at most one address per family),
/// else `spec.loadBalancerIP`. Every address must be of a family the Service is served in.
pub fn requested_ips(svc: &Service) -> Result<Vec<IpAddr>, String> {
    let ips = parse_requested(svc)?;
    let (families, _) = ip_families(svc)?;
    if let Some(ip) = ips.iter().find(|ip| !families.contains(&Family::of(**ip))) {
        let field = requested_text(svc).map_or(LB_IPS, |(f, _)| f);
        let list: Vec<String> = families.iter().map(Family::to_string).collect();
        return Err(format!(
            "{field}: {ip} is {}, but the Service is served in {} only (spec.ipFamilies, \
             spec.ipFamilyPolicy)",
            Family::of(*ip),
            list.join(" and ")
        ));
    }
    Ok(ips)
}

/// The requested addresses as written, one per family at most.
fn parse_requested(svc: &Service) -> Result<Vec<IpAddr>, String> {
    let Some((field, text)) = requested_text(svc) else {
        return Ok(Vec::new());
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let ip: IpAddr = a
            .parse()
            .map_err(|_| format!("{field}: {a:?} is not an IP address"))?;
        if ips.iter().any(|o| Family::of(*o) == Family::of(ip)) {
            return Err(format!(
                "{field}: one address per family (IPv4, IPv6), got {text:?}"
            ));
        }
        ips.push(ip);
    }
    if ips.is_empty() {
        return Err(format!("{field}: no address in {text:?}"));
    }
    Ok(ips)
}

fn requested_text(svc: &Service) -> Option<(&'static str, &String)> {
    let ann = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_IPS))
        .map(|t| (LB_IPS, t));
    let spec = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_ref())
        .filter(|s| !s.is_empty())
        .map(|t| ("spec.loadBalancerIP", t));
    ann.or(spec)
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

fn json_key(obj: &Value) -> String {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let ns = s("/metadata/namespace");
    format!(
        "{}/{}",
        if ns.is_empty() { "default".into() } else { ns },
        s("/metadata/name")
    )
}

fn obj_ref(kind: &'static str, key: &str) -> ObjRef {
    let (ns, name) = key.split_once('/').unwrap_or(("default", key));
    ObjRef {
        kind,
        namespace: ns.into(),
        name: name.into(),
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
