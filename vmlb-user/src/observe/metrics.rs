//! Prometheus metrics and health endpoints.
//!
//! Everything the data path counts is read from the maps at scrape time by a custom `Collector`
//! (no copy of the counters is kept in user space, so a restarted daemon or a second reader sees
//! the same numbers). The maps are reached through `StatsReader`, implemented for `BpfMaps` and,
//! in tests, for a fake. The daemon's state (`state::DaemonState`) only adds names and weights.
//!
//! Served over HTTP by axum: `GET /metrics` (OpenMetrics text), `/healthz` (the process is
//! alive) and `/readyz` (200 once the daemon says it is ready, else 503).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
};

use anyhow::Context as _;
use axum::{
    extract::State,
    http::{header::CONTENT_TYPE, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{
        counter::Counter as PromCounter, family::Family, gauge::Gauge, info::Info, MetricType,
    },
    registry::Registry,
};
use vmlb_common::{
    map_names, stats::CounterKind, Backend, Counter, Service, ServiceKey, TrafficStats, BE_F_UP,
};

use crate::{
    addr::{backend_addr, ip, proto_name, service_addr},
    dataplane::maps::BpfMaps,
    observe::state::DaemonState,
};

/// One map's occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// What metrics (and `vmlb inspect`) read from the data path.
pub trait StatsReader {
    /// Every `Counter`, summed over CPUs.
    fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>>;
    /// Every `SERVICES` entry.
    fn services(&self) -> anyhow::Result<Vec<(ServiceKey, Service)>>;
    /// Every non-empty `BACKENDS` slot (address set), with its id.
    fn backends(&self) -> anyhow::Result<Vec<(u32, Backend)>>;
    fn service_stats(&self, id: u32) -> anyhow::Result<TrafficStats>;
    fn backend_stats(&self, id: u32) -> anyhow::Result<TrafficStats>;
    /// Entries and capacity of each map.
    fn map_usage(&self) -> anyhow::Result<Vec<MapUsage>>;
}

/// Keys of a hash map, at most `max_entries` of them: a key deleted while we walk makes
/// get_next_key restart from the first key, so under churn (LRU conntrack) an unbounded walk
/// could go on forever.
pub fn capped_keys<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> anyhow::Result<Vec<K>> {
    let cap = map.map().info()?.max_entries() as usize;
    Ok(map.keys().take(cap).collect::<Result<Vec<_>, _>>()?)
}

/// Entries of a hash map, bounded as `capped_keys`; entries deleted meanwhile are skipped.
pub fn capped_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for k in capped_keys(map)? {
        match map.get(&k, 0) {
            Ok(v) => out.push((k, v)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

impl StatsReader for BpfMaps {
    fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        BpfMaps::counters(self)
    }

    fn services(&self) -> anyhow::Result<Vec<(ServiceKey, Service)>> {
        capped_entries(&self.services)
    }

    fn backends(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        // Id 0 is never assigned. One lookup per slot: MAX_BACKENDS syscalls, a few ms.
        let mut out = Vec::new();
        for id in 1..self.backends.len() {
            let b = self.backends.get(&id, 0)?;
            if b.addr != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    fn service_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        BpfMaps::service_stats(self, id)
    }

    fn backend_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        BpfMaps::backend_stats(self, id)
    }

    fn map_usage(&self) -> anyhow::Result<Vec<MapUsage>> {
        let hash = |name, keys: usize, map: &MapData| -> anyhow::Result<MapUsage> {
            Ok(MapUsage {
                map: name,
                entries: keys as u64,
                capacity: map.info()?.max_entries().into(),
            })
        };
        let services = StatsReader::services(self)?;
        Ok(vec![
            hash(map_names::SERVICES, services.len(), self.services.map())?,
            hash(
                map_names::VIPS,
                capped_keys(&self.vips)?.len(),
                self.vips.map(),
            )?,
            // Live flows (one slot each) against the flow capacity: concurrent flows,
            // whichever CPUs create them.
            MapUsage {
                map: map_names::FLOW_INDEX,
                entries: self.slots.live().count() as u64,
                capacity: self.flow_capacity()?.into(),
            },
            // The same for IPv6 flows, in their own tables.
            MapUsage {
                map: vmlb_common::map_names6::FLOW_INDEX6,
                entries: self.v6.slots.live().count() as u64,
                capacity: self.v6.flow_capacity()?.into(),
            },
            MapUsage {
                map: map_names::BACKENDS,
                entries: StatsReader::backends(self)?.len() as u64,
                capacity: self.backends.len().into(),
            },
            // Ring space held by the live tables (a table being replaced is not counted).
            MapUsage {
                map: map_names::MAGLEV,
                entries: services.iter().map(|(_, s)| u64::from(s.ring_size)).sum(),
                capacity: self.maglev.len().into(),
            },
        ])
    }
}

/// Everything one scrape reads from the maps, sorted by id.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub counters: Vec<(Counter, u64)>,
    pub services: Vec<(ServiceKey, Service, TrafficStats)>,
    pub backends: Vec<(u32, Backend, TrafficStats)>,
    pub maps: Vec<MapUsage>,
}

impl Snapshot {
    pub fn read(r: &(impl StatsReader + ?Sized)) -> anyhow::Result<Self> {
        let mut services = r
            .services()?
            .into_iter()
            .map(|(k, s)| Ok((k, s, r.service_stats(s.id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        services.sort_by_key(|(_, s, _)| s.id);
        let backends = r
            .backends()?
            .into_iter()
            .map(|(id, b)| Ok((id, b, r.backend_stats(id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            counters: r.counters()?,
            services,
            backends,
            maps: r.map_usage()?,
        })
    }
}

/// prometheus-client writes label values verbatim; names come from user YAML, so escape them as
/// the exposition format requires.
fn esc(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: a descriptor and its samples.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => s.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => s.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// A gauge without labels (an empty label set would print as `name{} v`).
fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// Encode a snapshot (None: the maps could not be read) with names from `state`.
pub fn encode_snapshot(
    enc: &mut DescriptorEncoder,
    snap: Option<&Snapshot>,
    state: &DaemonState,
    ready: bool,
) -> std::fmt::Result {
    gauge(
        enc,
        "vmlb_ready",
        "1 once the daemon has programmed the data path.",
        u64::from(ready),
    )?;
    gauge(
        enc,
        "vmlb_maps_readable",
        "1 if this scrape could read the data path's maps.",
        u64::from(snap.is_some()),
    )?;
    gauge(
        enc,
        "vmlb_state_generation",
        "Generation of the daemon's state (bumped on every reconcile).",
        state.generation,
    )?;
    // From the daemon, not the maps: shown even when the maps cannot be read.
    family(
        enc,
        "vmlb_backend_neighbour_state",
        "1 per backend address, labelled with the NUD state of its next hop's neighbour entry \
         (reachable, stale, delay, probe, incomplete, failed, permanent, noarp, none); \
         incomplete, failed and none mean new flows to it pass to the kernel (pass_no_neigh).",
        MetricType::Gauge,
        state.neighbours.iter().map(|n| {
            let labels = vec![("backend", n.backend.to_string()), ("state", esc(&n.state))];
            (labels, 1)
        }),
    )?;
    let Some(snap) = snap else { return Ok(()) };

    // Per service: labelled by name when the daemon named it, else by VIP:port/proto.
    let svc_label = |key: &ServiceKey| {
        state
            .service(key)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| service_addr(key))
    };
    let svc_labels: Vec<(Labels, TrafficStats)> = snap
        .services
        .iter()
        .map(|(k, _, t)| {
            let labels = vec![
                ("service", esc(&svc_label(k))),
                ("vip", ip(k.vip).to_string()),
                ("port", u16::from_be(k.port).to_string()),
                ("proto", proto_name(k.proto)),
            ];
            (labels, *t)
        })
        .collect();
    // A backend's service label comes from its service id (backends of a removed service are
    // cleared from the map, so the id always resolves while the backend is listed).
    let by_id: std::collections::HashMap<u32, String> = snap
        .services
        .iter()
        .map(|(k, s, _)| (s.id, svc_label(k)))
        .collect();
    let be_labels: Vec<(Labels, &Backend, u32, TrafficStats)> = snap
        .backends
        .iter()
        .map(|(id, b, t)| {
            let svc = by_id
                .get(&b.service_id)
                .cloned()
                .unwrap_or_else(|| format!("id {}", b.service_id));
            (
                vec![("service", esc(&svc)), ("backend", backend_addr(b))],
                b,
                *id,
                *t,
            )
        })
        .collect();

    type Field = fn(&TrafficStats) -> u64;
    let fields: [(&str, &str, Field); 4] = [
        ("packets", "Packets forwarded, both directions", |t| {
            t.packets
        }),
        ("bytes", "Bytes forwarded, both directions", |t| t.bytes),
        ("new_flows", "Flows created", |t| t.new_flows),
        (
            "reply_packets",
            "Reply packets reverse-NATed to clients",
            |t| t.reply_packets,
        ),
    ];
    for (field, help, get) in fields {
        family(
            enc,
            &format!("vmlb_service_{field}"),
            &format!("{help}, per service."),
            MetricType::Counter,
            svc_labels.iter().map(|(l, t)| (l.clone(), get(t))),
        )?;
        family(
            enc,
            &format!("vmlb_backend_{field}"),
            &format!("{help}, per backend."),
            MetricType::Counter,
            be_labels.iter().map(|(l, _, _, t)| (l.clone(), get(t))),
        )?;
    }
    family(
        enc,
        "vmlb_backend_up",
        "1 if the backend passes health checks (the data path's BE_F_UP flag).",
        MetricType::Gauge,
        be_labels
            .iter()
            .map(|(l, b, _, _)| (l.clone(), u64::from(b.flags & BE_F_UP != 0))),
    )?;
    family(
        enc,
        "vmlb_backend_weight",
        "Configured Maglev weight of the backend (0 drains); from the daemon.",
        MetricType::Gauge,
        be_labels.iter().filter_map(|(l, b, id, _)| {
            let (_, sb) = state.backend(*id, ip(b.addr), u16::from_be(b.port))?;
            Some((l.clone(), u64::from(sb.weight)))
        }),
    )?;
    // Every packet ends in exactly one verdict counter, so this family sums to the packets
    // seen; flow lookups and events are other meanings under other names.
    let of_kind = |kinds: &'static [CounterKind]| {
        snap.counters
            .iter()
            .filter(move |(c, _)| kinds.contains(&c.kind()))
    };
    family(
        enc,
        "vmlb_vip_owned",
        "1 for each VIP this node owns (answers ARP for), with the Kubernetes source.",
        MetricType::Gauge,
        state
            .owned_vips
            .iter()
            .map(|v| (vec![("vip", v.to_string())], 1)),
    )?;
    family(
        enc,
        "vmlb_maglev_table_info",
        "The installed Maglev table's digest (observe::digest; backend addresses by slot): nodes \
         with the same services show the same digest.",
        MetricType::Gauge,
        state
            .services
            .iter()
            .filter(|s| !s.maglev_digest.is_empty())
            .map(|s| {
                let labels = vec![
                    ("service", esc(&s.name)),
                    ("digest", s.maglev_digest.clone()),
                ];
                (labels, 1)
            }),
    )?;
    family(
        enc,
        "vmlb_datapath_packets",
        "Packets seen by the XDP program, by verdict (pass to the kernel, drop, tx: rewritten \
         and sent) and reason (see vmlb_common::Counter).",
        MetricType::Counter,
        of_kind(&[CounterKind::Pass, CounterKind::Drop, CounterKind::Tx]).map(|(c, v)| {
            let verdict = match c.kind() {
                CounterKind::Pass => "pass",
                CounterKind::Drop => "drop",
                _ => "tx",
            };
            let labels = vec![("verdict", verdict.into()), ("reason", c.reason().into())];
            (labels, *v)
        }),
    )?;
    family(
        enc,
        "vmlb_datapath_flow_lookups",
        "How conntrack resolved packets that went on: flow_new, flow_hit, flow_rebalanced \
         (backend down, moved), reply_hit.",
        MetricType::Counter,
        of_kind(&[CounterKind::Flow]).map(|(c, v)| (vec![("result", c.name().into())], *v)),
    )?;
    family(
        enc,
        "vmlb_datapath_events",
        "Events inside the XDP program, possibly several per packet (snat_port_collision: a \
         SNAT port candidate in use, one per retry).",
        MetricType::Counter,
        of_kind(&[CounterKind::Event]).map(|(c, v)| (vec![("event", c.name().into())], *v)),
    )?;
    family(
        enc,
        "vmlb_map_entries",
        "Entries in use per map (MAGLEV: slots of the live tables).",
        MetricType::Gauge,
        snap.maps
            .iter()
            .map(|m| (vec![("map", m.map.to_string())], m.entries)),
    )?;
    family(
        enc,
        "vmlb_map_capacity",
        "Maximum entries per map.",
        MetricType::Gauge,
        snap.maps
            .iter()
            .map(|m| (vec![("map", m.map.to_string())], m.capacity)),
    )
}

/// The maps behind a lock (the daemon writes through the same handle), shareable with metrics.
pub type SharedReader = Arc<Mutex<dyn StatsReader + Send>>;

/// Reads the maps on every scrape.
struct MapCollector {
    reader: SharedReader,
    state: Arc<RwLock<DaemonState>>,
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for MapCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapCollector")
    }
}

impl Collector for MapCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        // A poisoned lock only means another thread panicked mid-update; the data is plain.
        let snap = {
            let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
            Snapshot::read(&*reader)
        };
        let snap = snap
            .inspect_err(|e| tracing::warn!("metrics: reading the maps: {e:#}"))
            .ok();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        encode_snapshot(
            &mut enc,
            snap.as_ref(),
            &state,
            self.ready.load(Ordering::Relaxed),
        )
    }
}

/// How a configuration reload ended (the `result` label of `vmlb_config_reloads_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    /// A changed configuration was applied to the data path.
    Applied,
    /// Valid and identical to the running one: nothing to do.
    Unchanged,
    /// Refused: the files have errors (logged with file:line).
    Invalid,
    /// Valid, but the data path refused it (e.g. no Maglev space); the previous one serves.
    Failed,
}

impl ReloadResult {
    pub fn label(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Invalid => "invalid",
            ReloadResult::Failed => "failed",
        }
    }

    /// Whether the running configuration now is the one on disk.
    fn succeeded(self) -> bool {
        matches!(self, ReloadResult::Applied | ReloadResult::Unchanged)
    }
}

type LabelSet = Vec<(&'static str, &'static str)>;

/// The daemon's own metrics (reloads, probes); the data path's are read from the maps.
#[derive(Clone, Default)]
pub struct DaemonMetrics {
    reloads: Family<LabelSet, PromCounter>,
    last_reload_success: Gauge,
    last_reload_time: Gauge,
    last_success_time: Gauge,
    probes: Family<LabelSet, PromCounter>,
    transitions: Family<LabelSet, PromCounter>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl DaemonMetrics {
    fn register(&self, registry: &mut Registry) {
        let version = vec![("version", env!("CARGO_PKG_VERSION"))];
        registry.register(
            "vmlb_build",
            "vmlb's version (the value is always 1).",
            Info::new(version),
        );
        registry.register(
            "vmlb_config_reloads",
            "Configuration loads (the first one included) by result: applied, unchanged, \
             invalid (file errors), failed (refused by the data path).",
            self.reloads.clone(),
        );
        registry.register(
            "vmlb_config_last_reload_success",
            "1 if the last configuration load was applied or unchanged, 0 if it was refused.",
            self.last_reload_success.clone(),
        );
        registry.register(
            "vmlb_config_last_reload_timestamp_seconds",
            "Unix time of the last configuration load.",
            self.last_reload_time.clone(),
        );
        registry.register(
            "vmlb_config_last_success_timestamp_seconds",
            "Unix time of the last configuration load that was applied or unchanged.",
            self.last_success_time.clone(),
        );
        registry.register(
            "vmlb_health_probes",
            "Health probes run, by result (success, failure).",
            self.probes.clone(),
        );
        registry.register(
            "vmlb_health_transitions",
            "Backends going up or down (to: up, down) after rise/fall probes.",
            self.transitions.clone(),
        );
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&vec![("result", result.label())])
            .inc();
        let now = unix_now();
        self.last_reload_time.set(now);
        self.last_reload_success.set(i64::from(result.succeeded()));
        if result.succeeded() {
            self.last_success_time.set(now);
        }
    }

    pub fn probe(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.probes.get_or_create(&vec![("result", result)]).inc();
    }

    pub fn transition(&self, up: bool) {
        let to = if up { "up" } else { "down" };
        self.transitions.get_or_create(&vec![("to", to)]).inc();
    }
}

/// Where `/metrics` gets its numbers and `/readyz` its answer. Cheap to clone.
#[derive(Clone)]
pub struct MetricsSource {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    daemon: DaemonMetrics,
}

impl MetricsSource {
    pub fn new(reader: SharedReader, state: Arc<RwLock<DaemonState>>) -> Self {
        let mut registry = Registry::default();
        let ready = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(MapCollector {
            reader,
            state,
            ready: ready.clone(),
        }));
        let daemon = DaemonMetrics::default();
        daemon.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            ready,
            daemon,
        }
    }

    /// The daemon's own metrics, to record reloads and probes in.
    pub fn daemon(&self) -> &DaemonMetrics {
        &self.daemon
    }

    /// `/readyz` answers 200 from now on (or 503 again after `set_ready(false)`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text of one scrape (reads the maps: blocking syscalls).
    pub fn encode(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .context("encoding metrics")?;
        Ok(out)
    }
}

async fn metrics(State(source): State<MetricsSource>) -> Response {
    // Map reads are syscalls (the service and backend maps may take many): keep them off the async workers.
    match tokio::task::spawn_blocking(move || source.encode()).await {
        Ok(Ok(body)) => (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn readyz(State(source): State<MetricsSource>) -> (StatusCode, &'static str) {
    if source.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The HTTP routes.
pub fn router(source: MetricsSource) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(source)
}

/// Serve on a bound listener (tests bind port 0 and read the port back).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    source: MetricsSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(source))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}
