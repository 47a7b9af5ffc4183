//! The one writer of the data path: configured services + health verdicts -> desired state ->
//! reconcile -> maps, then the state file and the metrics' view of it.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use tracing::{info, warn};

use crate::{
    dataplane::maps::BpfMaps,
    health::{HealthChecker, Target},
    model::{ConfiguredService, HealthSpec, ServiceSpec},
    observe::state::{self, BackendState, DaemonState, NeighbourState, ReloadState, ServiceState},
    reconcile::Reconciler,
};

/// The daemon's handles for applying a configuration.
pub struct Applier {
    pub iface: String,
    pub generation: u64,
    pub maps: Arc<Mutex<BpfMaps>>,
    pub shared_state: Arc<RwLock<DaemonState>>,
    pub state_path: PathBuf,
    /// The layer-2 task (backend neighbours, VIP announcements), told after every apply.
    pub l2: Option<tokio::sync::watch::Sender<super::l2::Wanted>>,
    /// `dataplane::attach::Origin`, as the state file spells it.
    pub attach: String,
    pub xdp_mode: Option<String>,
    /// The last configuration load, published with the next state.
    pub last_reload: Option<ReloadState>,
    /// The VIPs this node owns (Kubernetes source), kept across applies for the state file.
    pub owned_vips: Vec<std::net::IpAddr>,
    /// The backends' neighbours as the layer-2 task last read them, kept across applies.
    pub neighbours: Vec<NeighbourState>,
}

impl Applier {
    /// Desired services (configuration + current health) -> the maps, then publish the state.
    pub fn apply(
        &mut self,
        reconciler: &mut Reconciler,
        configured: &[ConfiguredService],
        health: &HealthChecker,
    ) -> anyhow::Result<()> {
        let desired = desired(configured, health);
        let summary = {
            let mut maps = self.maps.lock().expect("maps lock");
            reconciler.apply(&desired, &mut *maps)?
        };
        if summary != Default::default() {
            info!(?summary, "data path updated");
        }
        // Backends of both families: the keeper resolves IPv4 next hops with ARP and IPv6 ones
        // with NDP.
        let backends = desired
            .iter()
            .flat_map(|s| s.backends.iter())
            .map(|b| b.addr)
            .collect();
        self.publish_l2(Some(backends), reconciler);
        self.generation += 1;
        let st = daemon_state(&self.iface, configured, reconciler, health, &desired);
        self.publish(st);
        Ok(())
    }

    /// A new set of owned VIPs: into the state file and the metrics, nothing else changes.
    pub fn set_owned(&mut self, owned: Vec<std::net::IpAddr>) {
        self.owned_vips = owned;
        let st = self.shared_state.read().expect("state lock").clone();
        self.generation += 1;
        self.publish(st);
    }

    /// The backends' neighbours changed: into the state file and the metrics.
    pub fn set_neighbours(&mut self, neighbours: Vec<NeighbourState>) {
        self.neighbours = neighbours;
        let st = self.shared_state.read().expect("state lock").clone();
        self.generation += 1;
        self.publish(st);
    }

    fn publish(&mut self, mut st: DaemonState) {
        st.generation = self.generation;
        st.attach = Some(self.attach.clone());
        st.xdp_mode = self.xdp_mode.clone();
        st.last_reload = self.last_reload.clone();
        st.owned_vips = self.owned_vips.clone();
        st.neighbours = self.neighbours.clone();
        st.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(e) = state::write_atomic(&self.state_path, &st) {
            warn!("writing {}: {e:#}", self.state_path.display());
        }
        *self.shared_state.write().expect("state lock") = st;
    }

    /// Publish a reload that changed nothing in the maps (unchanged, or refused).
    pub fn note_reload(&mut self, reload: ReloadState) {
        self.last_reload = Some(reload);
        let st = self.shared_state.read().expect("state lock").clone();
        self.publish(st);
    }
}

impl Applier {
    /// Tell the layer-2 task what to keep resolved (`backends`, unchanged when `None`) and
    /// which VIPs to announce (the ones the reconciler marks owned, of both families).
    pub fn publish_l2(&self, backends: Option<BTreeSet<std::net::IpAddr>>, r: &Reconciler) {
        if let Some(l2) = &self.l2 {
            let owned: BTreeSet<std::net::IpAddr> = (r.owned_vips().into_iter().map(Into::into))
                .chain(r.owned_vips6().into_iter().map(Into::into))
                .collect();
            l2.send_if_modified(|w| {
                let before = w.clone();
                if let Some(b) = backends {
                    w.backends = b;
                }
                w.owned_vips = owned;
                *w != before
            });
        }
    }
}

fn desired(configured: &[ConfiguredService], health: &HealthChecker) -> Vec<ServiceSpec> {
    configured
        .iter()
        .map(|c| {
            let mut spec = c.spec.clone();
            for b in &mut spec.backends {
                b.up = health.is_up(&Target {
                    addr: b.addr,
                    port: b.port,
                });
            }
            spec
        })
        .collect()
}

/// One probe target per backend address:port (the first service's health settings win when
/// several services share an endpoint).
pub fn health_targets(configured: &[ConfiguredService]) -> Vec<(Target, HealthSpec)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for c in configured {
        for b in &c.spec.backends {
            let t = Target {
                addr: b.addr,
                port: b.port,
            };
            if seen.insert(t.clone()) {
                out.push((t, c.health.clone()));
            }
        }
    }
    out
}

fn daemon_state(
    iface: &str,
    configured: &[ConfiguredService],
    reconciler: &Reconciler,
    health: &HealthChecker,
    desired: &[ServiceSpec],
) -> DaemonState {
    // Every new table's digest at once, across threads, rather than one by one below.
    reconciler.compute_digests();
    // Each backend's last error by target: a scan per backend was quadratic in the backends.
    let last_errors: std::collections::HashMap<Target, Option<String>> = health
        .states()
        .into_iter()
        .map(|s| (s.target, s.last_error))
        .collect();
    let services = configured
        .iter()
        .zip(desired)
        .map(|(c, spec)| {
            let key = spec.key();
            let id = reconciler.service(key).map_or(0, |s| s.id());
            let maglev_digest = state::table_digest(spec, reconciler);
            ServiceState {
                maglev_digest,
                name: c.name.clone(),
                vip: spec.vip,
                port: spec.port,
                proto: spec.proto.name().to_string(),
                id,
                hosts: c.hosts.clone(),
                snat: spec.snat.clone(),
                ring_size: spec.ring_size,
                backends: spec
                    .backends
                    .iter()
                    .map(|b| BackendState {
                        addr: b.addr,
                        port: b.port,
                        id: reconciler.backend_id(key, b.addr, b.port).unwrap_or(0),
                        weight: b.weight,
                        up: b.up,
                        last_error: last_errors
                            .get(&Target {
                                addr: b.addr,
                                port: b.port,
                            })
                            .cloned()
                            .flatten(),
                    })
                    .collect(),
            }
        })
        .collect();
    DaemonState {
        iface: iface.to_string(),
        pid: std::process::id(),
        services,
        ..Default::default()
    }
}
