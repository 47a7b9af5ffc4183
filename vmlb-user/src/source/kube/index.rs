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
    net::Ipv4Addr,
    path::PathBuf,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Map, Value};

use super::{
    pools::{self, NoAddress, Pool, Request},
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
                    for doc in docs {
                        match parse(&doc, &obj, node) {
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

    /// One ServiceEntry document per Service port, so that each port gets exactly the
    /// endpoints whose slices carry it. No documents while the Service has no address yet.
    fn service_documents(&self, svc: &Service) -> Result<Vec<Value>, String> {
        let key = key_of(&svc.metadata);
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let Some(vip) = status_ip(svc)? else {
            return Ok(Vec::new());
        };
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
                    && s.address_type == "IPv4"
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
                    for a in &e.addresses {
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
        Ok(docs)
    }

    /// The address every Service should have (run by the leader; the answer is the same on
    /// every node).
    pub fn allocations(&self) -> BTreeMap<String, Result<Ipv4Addr, NoAddress>> {
        let mut reqs = Vec::new();
        let mut bad = BTreeMap::new();
        for (key, svc) in &self.services {
            let ann = svc.metadata.annotations.clone().unwrap_or_default();
            let wanted = match requested_ip(svc) {
                Ok(w) => w,
                Err(m) => {
                    bad.insert(key.clone(), Err(NoAddress::Invalid(m)));
                    continue;
                }
            };
            reqs.push(Request {
                key: key.clone(),
                created: created(&svc.metadata),
                current: status_ip(svc).ok().flatten(),
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
                    let (slice, problems) = vmi::desired_slice(svc, &b, self.vmis.values());
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

/// The VIP in status (written by the leader's allocator). IPv6 and hostnames are ignored.
pub fn status_ip(svc: &Service) -> Result<Option<Ipv4Addr>, String> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    Ok(ingress
        .into_iter()
        .flatten()
        .find_map(|i| i.ip.as_deref()?.parse().ok()))
}

/// `vmlb.io/loadBalancerIPs` (comma-separated, as in MetalLB; one IPv4 address per Service for
/// now), else `spec.loadBalancerIP`.
pub fn requested_ip(svc: &Service) -> Result<Option<Ipv4Addr>, String> {
    let ann = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_IPS));
    let spec = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_ref())
        .filter(|s| !s.is_empty());
    let Some(text) = ann.or(spec) else {
        return Ok(None);
    };
    let field = if ann.is_some() {
        LB_IPS
    } else {
        "spec.loadBalancerIP"
    };
    let mut v4 = Vec::new();
    for a in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match a.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => v4.push(ip),
            Ok(std::net::IpAddr::V6(_)) => {} // dual-stack requests: IPv6 is not served yet
            Err(_) => return Err(format!("{field}: {a:?} is not an IP address")),
        }
    }
    match v4.as_slice() {
        [] => Err(format!("{field}: no IPv4 address in {text:?}")),
        [ip] => Ok(Some(*ip)),
        _ => Err(format!(
            "{field}: one IPv4 address per Service is supported, got {text:?}"
        )),
    }
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
