//! Every manifest under deploy/kubernetes is read with the k8s-openapi types (strictly: a field
//! the type does not know, a typo, fails the round trip), kustomizations point at files that
//! exist, patches apply to an object they name, and the DaemonSet keeps its security promises.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    Resource,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use vmlb_user::{
    model::NodeConfig,
    source::kube::{index, pools, vmi},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push(p);
        }
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Drops what serializing adds or leaves out without meaning (empty objects/lists).
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        _ => v.clone(),
    }
}

/// Reads `doc` as `T` and back: every field must survive, so none is unknown or misspelt.
fn strict<T: DeserializeOwned + Serialize + Resource>(doc: &Value, at: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let (want, got) = (normalize(doc), normalize(&back));
    assert_eq!(got, want, "{at}: a field was not understood by {}", T::KIND);
    typed
}

/// Strategic-merge-patch for what the overlays use: objects merge, lists of named objects
/// merge by name, anything else is replaced.
fn smp(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                smp(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (Value::Array(t), Value::Array(p)) if p.iter().all(|i| i.get("name").is_some()) => {
            for item in p {
                match t.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(x) => smp(x, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[expect(dead_code, reason = "read for validation only")]
struct Scc {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    allow_host_network: bool,
    allow_host_ports: bool,
    allow_host_dir_volume_plugin: bool,
    #[serde(rename = "allowHostIPC")]
    allow_host_ipc: bool,
    #[serde(rename = "allowHostPID")]
    allow_host_pid: bool,
    allow_privileged_container: bool,
    allow_privilege_escalation: bool,
    allowed_capabilities: Vec<String>,
    required_drop_capabilities: Vec<String>,
    default_add_capabilities: Vec<String>,
    read_only_root_filesystem: bool,
    run_as_user: Value,
    se_linux_context: Value,
    fs_group: Value,
    supplemental_groups: Value,
    volumes: Vec<String>,
    users: Vec<String>,
}

const CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"];

fn check_daemonset(ds: &DaemonSet, at: &str) {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "{at}: hostNetwork");
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "{at}: must not be privileged");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref().unwrap(),
        CAPS,
        "{at}: added capabilities"
    );
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"], "{at}");
    let bpf = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap_or_else(|| panic!("{at}: /sys/fs/bpf is not mounted"));
    assert_eq!(
        bpf.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "{at}"
    );
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == bpf.name)
        .unwrap();
    assert_eq!(
        vol.host_path.as_ref().unwrap().path,
        "/sys/fs/bpf",
        "{at}: from the host"
    );
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    // The arguments are vmlb's: `$(VAR)` expanded as the kubelet does (downward-API values by
    // stand-ins), NODE_NAME given as the flag it feeds.
    let mut args = vec!["vmlb".to_string()];
    for a in c.args.iter().flatten() {
        let mut a = a.clone();
        for (name, e) in &env {
            let value = e.value.clone().unwrap_or_else(|| "192.0.2.10".into());
            a = a.replace(&format!("$({name})"), &value);
        }
        assert!(!a.contains("$("), "{at}: {a} refers to an unknown variable");
        args.push(a);
    }
    args.push("--node-name=node-0".into());
    match vmlb_user::cli::Cli::try_parse_from(&args) {
        Ok(cli) => {
            let vmlb_user::cli::Command::Run(run) = cli.command else {
                panic!("{at}: {args:?} is not `vmlb run`")
            };
            assert!(run.kubernetes, "{at}: the DaemonSet must read the cluster");
        }
        Err(e) => panic!("{at}: vmlb does not accept {args:?}: {e}"),
    }
    let field = |n: &str| {
        env[n]
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"), "{at}");
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace"),
        "{at}"
    );
}

#[test]
fn every_manifest_is_valid_and_the_daemonset_keeps_its_promises() {
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    assert!(files.len() >= 10, "found only {files:?}");
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut objects: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut patches = Vec::new();
    // Kustomizations first, so that every patch is known before the objects are read.
    files.sort_by_key(|f| f.file_name().unwrap() != "kustomization.yaml");
    for file in &files {
        let at = file.strip_prefix(root()).unwrap().display().to_string();
        let dir = file.parent().unwrap();
        if file.file_name().unwrap() == "kustomization.yaml" {
            let k = &documents(file)[0];
            assert_eq!(k["kind"], "Kustomization", "{at}");
            for r in k["resources"].as_array().unwrap() {
                let p = dir.join(r.as_str().unwrap());
                assert!(
                    p.is_file() || p.join("kustomization.yaml").is_file(),
                    "{at}: {} is missing",
                    p.display()
                );
            }
            for p in k["patches"].as_array().into_iter().flatten() {
                let p = dir.join(p["path"].as_str().unwrap());
                assert!(p.is_file(), "{at}: patch {} is missing", p.display());
                patches.push(p);
            }
            continue;
        }
        for (i, doc) in documents(file).into_iter().enumerate() {
            let at = format!("{at}[{i}]");
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{at}: no kind"))
                .to_string();
            *by_kind.entry(kind.clone()).or_default() += 1;
            if patches.contains(file) {
                // Checked below, applied to what it patches.
                continue;
            }
            objects.insert(
                (
                    kind.clone(),
                    doc["metadata"]["name"].as_str().unwrap().to_string(),
                ),
                doc.clone(),
            );
            match kind.as_str() {
                "Namespace" => drop(strict::<Namespace>(&doc, &at)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(&doc, &at)),
                "ClusterRole" => drop(strict::<ClusterRole>(&doc, &at)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(&doc, &at)),
                "Role" => drop(strict::<Role>(&doc, &at)),
                "RoleBinding" => drop(strict::<RoleBinding>(&doc, &at)),
                "EndpointSlice" => drop(strict::<EndpointSlice>(&doc, &at)),
                "DaemonSet" => check_daemonset(&strict::<DaemonSet>(&doc, &at), &at),
                "ConfigMap" => {
                    let cm = strict::<ConfigMap>(&doc, &at);
                    if let Some(text) = cm.data.as_ref().and_then(|d| d.get("pools.yaml")) {
                        pools::parse_pools_yaml(text).unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                }
                "Service" => {
                    let svc = strict::<Service>(&doc, &at);
                    assert!(index::is_ours(&svc), "{at}: not of vmlb's class");
                    let labels = svc.metadata.labels.clone().unwrap_or_default();
                    assert_eq!(
                        labels
                            .get("service.kubernetes.io/service-proxy-name")
                            .map(String::as_str),
                        Some("vmlb"),
                        "{at}"
                    );
                    if let Some(b) = vmi::binding(&svc) {
                        b.unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                    index::ip_families(&svc).unwrap_or_else(|e| panic!("{at}: {e}"));
                    index::requested_ips(&svc).unwrap_or_else(|e| panic!("{at}: {e}"));
                }
                "ServiceEntry" => {
                    let node = NodeConfig::default();
                    vmlb_user::source::file::parse_str(&doc.to_string(), Path::new(&at), &node)
                        .unwrap_or_else(|e| panic!("{at}: {e}"));
                }
                "SecurityContextConstraints" => {
                    let scc: Scc =
                        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(!scc.allow_privileged_container, "{at}");
                    assert_eq!(scc.allowed_capabilities, CAPS, "{at}");
                    assert_eq!(
                        scc.users,
                        ["system:serviceaccount:vmlb-system:vmlb"],
                        "{at}"
                    );
                }
                "VirtualMachine" => {
                    let nets: Vec<vmi::Network> =
                        serde_json::from_value(doc["spec"]["template"]["spec"]["networks"].clone())
                            .unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(
                        nets.iter().any(|n| n
                            .multus
                            .as_ref()
                            .is_some_and(|m| m.network_name == "default/vlan-1512")),
                        "{at}"
                    );
                }
                other => panic!("{at}: no check for kind {other}"),
            }
        }
    }
    // Patches: applied to the object they name, the result must still be valid.
    for p in &patches {
        for patch in documents(p) {
            let kind = patch["kind"].as_str().unwrap().to_string();
            let name = patch["metadata"]["name"].as_str().unwrap().to_string();
            let at = format!("{} applied to {kind}/{name}", p.display());
            let mut target = objects
                .get(&(kind.clone(), name))
                .unwrap_or_else(|| panic!("{at}: no such object"))
                .clone();
            smp(&mut target, &patch);
            match kind.as_str() {
                "DaemonSet" => check_daemonset(&strict::<DaemonSet>(&target, &at), &at),
                "ConfigMap" => {
                    let cm = strict::<ConfigMap>(&target, &at);
                    let text = &cm.data.unwrap()["pools.yaml"];
                    let pools =
                        pools::parse_pools_yaml(text).unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(!pools.is_empty(), "{at}: no pool");
                }
                other => panic!("{at}: no check for patched kind {other}"),
            }
        }
    }
    for k in [
        "DaemonSet",
        "ClusterRole",
        "SecurityContextConstraints",
        "Service",
        "ServiceEntry",
    ] {
        assert!(
            by_kind.contains_key(k),
            "no {k} in deploy/kubernetes: {by_kind:?}"
        );
    }
}

#[test]
fn the_seed_example_allocates_the_seed_vip() {
    let text = std::fs::read_to_string(root().join("examples/seed/pools.yaml")).unwrap();
    let cm: ConfigMap = serde_norway::from_str(&text).unwrap();
    let pools = pools::parse_pools_yaml(&cm.data.unwrap()["pools.yaml"]).unwrap();
    let svc: Service = serde_norway::from_str(
        &std::fs::read_to_string(root().join("examples/seed/service-vms.yaml")).unwrap(),
    )
    .unwrap();
    let mut ix = index::Index::default();
    ix.set_pools(pools);
    ix.upsert_service(svc);
    let got = ix.allocations();
    let ips = got["default/vms"].as_ref().map(|a| a.ips.clone());
    assert_eq!(ips, Ok(vec!["10.10.1.128".parse().unwrap()]));
}

/// What `kubectl kustomize` (offline: it only reads the files) renders from every entry point
/// is what the checks above read by hand: the overlays' patches land, every namespaced vmlb
/// object is in vmlb-system, and the rendered objects are valid. Without kubectl on the PATH
/// this says so and checks nothing.
#[test]
fn kubectl_kustomize_renders_every_entry_point() {
    for (dir, openshift) in [
        ("base", false),
        ("overlays/openshift", true),
        ("examples/seed", true),
    ] {
        let out = match std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(root().join(dir))
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("kubectl is not installed: the kustomize rendering is not checked");
                return;
            }
            Err(e) => panic!("running kubectl: {e}"),
        };
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{dir}: {e}")))
            .filter(|v| !v.is_null())
            .collect();
        let mut kinds = Vec::new();
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let name = doc["metadata"]["name"].as_str().unwrap();
            let at = format!("kubectl kustomize {dir}: {kind}/{name}");
            let ns = doc["metadata"]["namespace"].as_str();
            match kind.as_str() {
                "Namespace" => drop(strict::<Namespace>(doc, &at)),
                "ClusterRole" => drop(strict::<ClusterRole>(doc, &at)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(doc, &at)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(doc, &at)),
                "Role" => drop(strict::<Role>(doc, &at)),
                "RoleBinding" => drop(strict::<RoleBinding>(doc, &at)),
                "ConfigMap" => {
                    let cm = strict::<ConfigMap>(doc, &at);
                    let text = &cm.data.unwrap()["pools.yaml"];
                    let pools =
                        pools::parse_pools_yaml(text).unwrap_or_else(|e| panic!("{at}: {e}"));
                    if dir == "examples/seed" {
                        // The example's patch replaced the base's empty pool list.
                        assert_eq!(pools.len(), 1, "{at}");
                        assert_eq!(
                            pools[0].ranges,
                            [(
                                "10.10.1.128".parse().unwrap(),
                                "10.10.1.255".parse().unwrap()
                            )],
                            "{at}"
                        );
                    }
                }
                "DaemonSet" => {
                    let ds = strict::<DaemonSet>(doc, &at);
                    check_daemonset(&ds, &at);
                    let pod = ds.spec.unwrap().template.spec.unwrap();
                    let se = pod.containers[0]
                        .security_context
                        .as_ref()
                        .and_then(|s| s.se_linux_options.as_ref())
                        .and_then(|o| o.type_.as_deref());
                    if openshift {
                        assert_eq!(se, Some("spc_t"), "{at}: the overlay's SELinux type");
                    }
                }
                "Service" => drop(strict::<Service>(doc, &at)),
                "SecurityContextConstraints" | "VirtualMachine" => {}
                other => panic!("{at}: no check for kind {other}"),
            }
            if matches!(
                kind.as_str(),
                "ServiceAccount" | "Role" | "RoleBinding" | "ConfigMap" | "DaemonSet"
            ) {
                assert_eq!(ns, Some("vmlb-system"), "{at}: namespace");
            }
            kinds.push(kind);
        }
        for k in ["Namespace", "ClusterRole", "DaemonSet", "ConfigMap"] {
            assert!(kinds.iter().any(|x| x == k), "{dir}: no {k} rendered");
        }
        assert_eq!(
            kinds.iter().any(|x| x == "SecurityContextConstraints"),
            openshift,
            "{dir}: the SCC comes with the OpenShift overlay only"
        );
    }
}
