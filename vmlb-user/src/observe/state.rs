//! The daemon's state file: what the maps cannot say (service names, ServiceEntry hosts, weights,
//! health-check verdicts), for `vmlb inspect` and the metrics labels. The maps stay the truth for
//! everything the data path uses; this file only adds names, so a missing or stale file degrades
//! the output to addresses and ids, never to wrong forwarding facts.
//!
//! Written by the daemon after every reconcile and health change with `write_atomic`, so a reader
//! sees the previous or the next version, never a torn one.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use vmlb_common::ServiceKey;

use crate::{
    addr,
    dataplane::pins::create_private_dir,
    model::ServiceSpec,
    neigh::{format_mac, BackendNeigh, Resolution},
    reconcile::Reconciler,
};

/// Default root of the per-interface run directories.
pub const DEFAULT_RUN_ROOT: &str = "/run/vmlb";

/// `<run_root>/<iface>/state.json`.
pub fn state_path(run_root: &Path, iface: &str) -> PathBuf {
    run_root.join(iface).join("state.json")
}

/// Everything the daemon knows beyond the maps. Fields added later get `#[serde(default)]` so
/// an older file still parses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct DaemonState {
    pub iface: String,
    pub pid: u32,
    /// Bumped on every write; lets a reader tell whether it raced a reconcile.
    #[serde(default)]
    pub generation: u64,
    /// Seconds since the Unix epoch of this write.
    #[serde(default)]
    pub updated_unix: u64,
    /// How this daemon got its program onto the interface: loaded_native, loaded_skb (generic
    /// XDP), adopted (a previous daemon's, same code) or upgraded (replaced in its link).
    #[serde(default)]
    pub attach: Option<String>,
    /// native or skb, when known (a daemon that adopted the program carries it over from the
    /// previous state file).
    #[serde(default)]
    pub xdp_mode: Option<String>,
    /// The last configuration load.
    #[serde(default)]
    pub last_reload: Option<ReloadState>,
    pub services: Vec<ServiceState>,
    /// The VIPs this node owns (answers ARP or neighbour solicitations for), with the
    /// Kubernetes source; empty otherwise.
    #[serde(default)]
    pub owned_vips: Vec<IpAddr>,
    /// Every backend address's neighbour as the kernel last showed it (`neigh::NeighKeeper`),
    /// in address order; refreshed every few seconds while it changes.
    #[serde(default)]
    pub neighbours: Vec<NeighbourState>,
}

/// One backend address's next hop and its neighbour entry: what `bpf_fib_lookup` will find.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NeighbourState {
    pub backend: IpAddr,
    /// The neighbour the backend's traffic goes to: the backend itself when on-link, else the
    /// gateway of its route; null when there is none (`route` says why).
    pub next_hop: Option<IpAddr>,
    /// How the kernel routes the backend: `on-link`, `gateway`, `local` (an address of this
    /// node), `other-interface <ifindex>` (not the one vmlb serves) or `no-route: <reason>`.
    pub route: String,
    /// The next hop's NUD state as `ip neigh` names it (`reachable`, `stale`, `incomplete`,
    /// `failed`, ...), or `none` without an entry.
    pub state: String,
    /// The resolved MAC (aa:bb:cc:dd:ee:ff), null while unresolved.
    pub mac: Option<String>,
    /// The entry is vmlb's (managed, marked with its protocol); false for an administrator's
    /// static entry, which is used as it is.
    pub managed: bool,
}

impl From<&BackendNeigh> for NeighbourState {
    fn from(b: &BackendNeigh) -> Self {
        let (next_hop, route) = match &b.resolution {
            Resolution::NextHop(a) if *a == b.backend => (Some(*a), "on-link".to_string()),
            Resolution::NextHop(a) => (Some(*a), "gateway".to_string()),
            Resolution::Local => (None, "local".to_string()),
            Resolution::OtherInterface(i) => (None, format!("other-interface {i}")),
            Resolution::NoRoute(why) => (None, format!("no-route: {why}")),
        };
        Self {
            backend: b.backend,
            next_hop,
            route,
            state: b.state.as_str().to_string(),
            mac: b.mac.as_ref().map(format_mac),
            managed: b.managed,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ReloadState {
    /// Seconds since the Unix epoch.
    pub unix: u64,
    /// applied, unchanged, invalid or failed.
    pub result: String,
    /// Errors and warnings of that load (file:line: field: message).
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServiceState {
    /// `<ServiceEntry name>/<port name or number>`.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: String,
    /// Service id (index of `SVC_STATS`).
    pub id: u32,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The SNAT pool.
    pub snat: Vec<IpAddr>,
    pub ring_size: u32,
    pub backends: Vec<BackendState>,
    /// `observe::digest` of the installed Maglev table (16 hex digits; empty if unknown):
    /// equal on nodes that agree.
    #[serde(default)]
    pub maglev_digest: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BackendState {
    pub addr: IpAddr,
    pub port: u16,
    /// Backend id (index of `BACKENDS` / `BE_STATS`).
    pub id: u32,
    pub weight: u32,
    /// The health verdict the daemon last installed.
    pub up: bool,
    /// Why the last health check failed, while it keeps failing.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl DaemonState {
    /// The service listening on a `SERVICES` key, if the daemon named it.
    pub fn service(&self, key: &ServiceKey) -> Option<&ServiceState> {
        let (vip, port) = (addr::ip(key.vip), u16::from_be(key.port));
        let proto = addr::proto_name(key.proto);
        self.services
            .iter()
            .find(|s| s.vip == IpAddr::V4(vip) && s.port == port && s.proto == proto)
    }

    /// A backend by id (unique across services) and address: a stale file whose ids were since
    /// reused for other backends yields nothing rather than another backend's weight.
    pub fn backend(
        &self,
        id: u32,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Option<(&ServiceState, &BackendState)> {
        let addr = addr.into();
        self.services.iter().find_map(|s| {
            let b = s.backends.iter().find(|b| b.id == id)?;
            (b.addr == addr && b.port == port).then_some((s, b))
        })
    }
}

impl ServiceState {
    /// The state of an installed service: ids, SNAT address and ring size from the reconciler,
    /// `up` and weights from the spec as applied (health included). `last_error` starts empty;
    /// the daemon fills it from its health checker. None if the service is not installed.
    pub fn installed(
        name: &str,
        hosts: &[String],
        spec: &ServiceSpec,
        reconciler: &Reconciler,
    ) -> Option<Self> {
        let key = spec.key();
        let svc = reconciler.service(key)?;
        let backends = spec
            .backends
            .iter()
            .filter_map(|b| {
                Some(BackendState {
                    addr: b.addr,
                    port: b.port,
                    id: reconciler.backend_id(key, b.addr, b.port)?,
                    weight: b.weight,
                    up: b.up,
                    last_error: None,
                })
            })
            .collect();
        Some(Self {
            name: name.to_string(),
            vip: spec.vip,
            port: spec.port,
            proto: spec.proto.name().to_string(),
            id: svc.id(),
            hosts: hosts.to_vec(),
            snat: svc.snat(),
            ring_size: svc.ring_size(),
            backends,
            maglev_digest: table_digest(spec, reconciler),
        })
    }
}

/// `observe::digest` of a service's installed table, in hex; empty if it is not installed.
pub fn table_digest(spec: &ServiceSpec, reconciler: &Reconciler) -> String {
    reconciler
        .table_digest(spec.key())
        .map(super::digest::hex)
        .unwrap_or_default()
}

/// Write `s` to `path` atomically: a temporary file in the same directory, fsynced, renamed over
/// the old one (rename within a filesystem is atomic, so readers never see half a file).
pub fn write_atomic(path: &Path, s: &DaemonState) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let result = (|| {
        // Serialized in memory first: straight into the file, serde_json makes one write
        // syscall per token (~1 s for 1000 services x 10 backends).
        let mut text = serde_json::to_vec_pretty(s)?;
        text.push(b'\n');
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        anyhow::Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Read the state file; `Ok(None)` when there is none (no daemon has run on this interface).
pub fn read(path: &Path) -> anyhow::Result<Option<DaemonState>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn sample() -> DaemonState {
        DaemonState {
            iface: "eth1".into(),
            pid: 42,
            generation: 3,
            updated_unix: 1_700_000_000,
            attach: Some("loaded_native".into()),
            xdp_mode: Some("native".into()),
            last_reload: Some(ReloadState {
                unix: 1_700_000_000,
                result: "applied".into(),
                ..Default::default()
            }),
            services: vec![ServiceState {
                name: "web/http".into(),
                vip: Ipv4Addr::new(10, 10, 1, 128).into(),
                port: 80,
                proto: "tcp".into(),
                id: 1,
                hosts: vec!["web.example.com".into()],
                snat: vec![Ipv4Addr::new(10, 10, 1, 125).into()],
                ring_size: 251,
                backends: vec![BackendState {
                    addr: Ipv4Addr::new(10, 10, 1, 2).into(),
                    port: 8080,
                    id: 7,
                    weight: 1,
                    up: false,
                    last_error: Some("connection refused".into()),
                }],
                maglev_digest: "00112233445566ff".into(),
            }],
            owned_vips: vec![Ipv4Addr::new(10, 10, 1, 128).into()],
            neighbours: vec![NeighbourState {
                backend: IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2)),
                next_hop: Some(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2))),
                route: "on-link".into(),
                state: "reachable".into(),
                mac: Some("02:00:0a:0a:01:02".into()),
                managed: true,
            }],
        }
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "eth1");
        assert_eq!(read(&path).unwrap(), None);
        let mut s = sample();
        write_atomic(&path, &s).unwrap();
        assert_eq!(read(&path).unwrap(), Some(s.clone()));
        s.generation = 4;
        write_atomic(&path, &s).unwrap();
        assert_eq!(read(&path).unwrap(), Some(s));
        // Only the state file is left behind, no temporary.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn lookups_by_key_and_backend_id() {
        let s = sample();
        let key = ServiceKey {
            vip: u32::from_ne_bytes([10, 10, 1, 128]),
            port: 80u16.to_be(),
            proto: vmlb_common::IPPROTO_TCP,
            _pad: 0,
        };
        assert_eq!(s.service(&key).unwrap().name, "web/http");
        assert!(s
            .service(&ServiceKey {
                proto: vmlb_common::IPPROTO_UDP,
                ..key
            })
            .is_none());
        let vm = Ipv4Addr::new(10, 10, 1, 2);
        assert_eq!(s.backend(7, vm, 8080).unwrap().0.name, "web/http");
        assert!(s.backend(8, vm, 8080).is_none());
        assert!(
            s.backend(7, vm, 8081).is_none(),
            "id reused for another backend"
        );
    }

    #[test]
    fn neighbours_name_the_route_state_and_mac() {
        use crate::neigh::NeighState;
        let vm = IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2));
        let gw = IpAddr::V4(Ipv4Addr::new(10, 10, 1, 1));
        let neigh = |resolution, state, mac| BackendNeigh {
            backend: vm,
            resolution,
            state,
            mac,
            managed: mac.is_some(),
        };
        let on_link = NeighbourState::from(&neigh(
            Resolution::NextHop(vm),
            NeighState::Reachable,
            Some([2, 0, 0x0a, 0x0a, 1, 2]),
        ));
        assert_eq!(on_link, sample().neighbours[0]);
        let routed = NeighbourState::from(&neigh(
            Resolution::NextHop(gw),
            NeighState::Incomplete,
            None,
        ));
        assert_eq!(
            (
                routed.next_hop,
                routed.route.as_str(),
                routed.state.as_str()
            ),
            (Some(gw), "gateway", "incomplete")
        );
        assert_eq!((routed.mac, routed.managed), (None, false));
        let cases = [
            (Resolution::Local, "local"),
            (Resolution::OtherInterface(9), "other-interface 9"),
            (
                Resolution::NoRoute("route type Unreachable".into()),
                "no-route: route type Unreachable",
            ),
        ];
        for (resolution, route) in cases {
            let n = NeighbourState::from(&neigh(resolution, NeighState::None, None));
            assert_eq!(
                (n.next_hop, n.route.as_str(), n.state.as_str()),
                (None, route, "none")
            );
        }
    }

    #[test]
    fn a_file_without_neighbours_still_parses() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("neighbours");
        let s: DaemonState = serde_json::from_value(v).unwrap();
        assert!(s.neighbours.is_empty());
    }

    #[test]
    fn a_garbled_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{").unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("state.json"), "{e}");
    }
}
