//! The daemon: wires the stages together and owns the one loop that changes the data path.
//!
//! sources (ServiceEntry files, SIGHUP, health events) -> desired services -> reconcile ->
//! BPF maps. Startup either adopts a pinned program (a restart: nothing is reloaded, flows keep
//! going) or loads, attaches and pins a new one (`dataplane::attach`). A bad configuration is
//! refused as a whole and the previous one keeps serving. Each stage lives in its own module;
//! this one only connects them: `options` (what to do), `telemetry` (logs), `apply` (the one
//! writer of the maps).

mod apply;
mod l2;
pub mod options;
mod sweep;
pub mod telemetry;

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

pub use options::Options;

use crate::{
    cli::{exit, ExitError},
    dataplane::{
        attach::{self, AttachSpec},
        maps::BpfMaps,
        pins::PinLayout,
    },
    health::{HealthChecker, HealthEvent},
    model::ConfiguredService,
    observe::{
        metrics::{self, DaemonMetrics, MetricsSource, ReloadResult},
        state::{self, DaemonState, ReloadState},
    },
    reconcile::Reconciler,
    source::{self, file::Capacity},
};
use apply::{health_targets, Applier};

/// Wait this long after a file event before reloading when the file may be being written in
/// place (truncate, write, write): one reload should see the finished file. A file renamed
/// into place (editors, `kubectl`, the lab's writer) is whole when it appears and is read at
/// once.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Set up logging and a small runtime, then run the daemon until SIGTERM/SIGINT.
pub fn main(opts: Options) -> anyhow::Result<()> {
    telemetry::init(opts.log_format);
    // Two workers: the daemon's work is a few timers, probes and map writes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let layout = PinLayout::new(&opts.pin_dir, &opts.iface);
    let capacity = Capacity {
        ring_entries: opts.maglev_entries,
        services: opts.max_services,
        backends: opts.max_backends,
    };
    // The configuration is read before anything is loaded: a daemon refused for a bad file
    // leaves no trace. With a pinned program to adopt it keeps serving the adopted state.
    let first = source::file::read(&opts.configs, &opts.node, capacity);
    let first_reload = log_report(&first);
    let mut configured: Option<Vec<ConfiguredService>> = match first.into_result() {
        Ok(c) => Some(c),
        Err(errors) => {
            if !layout.link().exists() {
                return Err(ExitError::error(
                    exit::CONFIG_INVALID,
                    format!(
                        "the configuration is invalid ({} error(s), listed above)",
                        errors.0.len()
                    ),
                ));
            }
            warn!("keeping the adopted data-path state until the configuration is fixed");
            None
        }
    };
    // Credentials are read before attaching too (nothing is contacted yet).
    let kube_client = match &opts.kubernetes {
        Some(_) => Some(kube::Client::try_default().await.context(
            "reading Kubernetes credentials (KUBECONFIG, ~/.kube/config or the pod's service account)",
        )?),
        None => None,
    };
    // Bound before attaching, so a taken port stops the daemon before it changes anything.
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", opts.metrics_addr))?;
    let (mut attachment, mut maps, mut migration) = attach::attach_or_adopt(&AttachSpec {
        iface: opts.iface.clone(),
        mode: opts.xdp_mode,
        pin_root: opts.pin_dir.clone(),
        flow_entries: opts.flow_entries,
        flow6_entries: opts.flow6_entries,
        maglev_entries: opts.maglev_entries,
        max_services: opts.max_services,
        max_backends: opts.max_backends,
        upgrade_drops_flows: opts.upgrade_drops_flows,
    })?;
    if migration.is_some() && configured.is_none() {
        // Dropping the migration removes this version's unused pins.
        return Err(ExitError::error(
            exit::CONFIG_INVALID,
            "the configuration is invalid (errors listed above), and the pinned maps are of an \
             older layout: this version needs a valid configuration to take over. The running \
             program keeps serving.",
        ));
    }
    telemetry::forward_ebpf_logs(&mut attachment);
    let ifindex = nix::net::if_::if_nametoindex(opts.iface.as_str())
        .with_context(|| format!("no interface {}", opts.iface))?;
    maps.init_config(ifindex, attach::iface_mac(&opts.iface)?)?;
    // The device that carries the served VLAN's routes: its 802.1Q sub-interface, or the
    // interface itself when the VLAN is not split off in the kernel (the lab's trunk).
    let vlan = match opts.node.vlan {
        Some(vid) => {
            let dev = attach::vlan_device(&opts.iface, vid)?;
            tracing::info!(vid, dev, "serving 802.1Q-tagged frames of VLAN {vid}");
            Some((vid, dev.unwrap_or(ifindex)))
        }
        None => None,
    };
    maps.update_config(|c| {
        c.new_flow_rate = opts.flows.new_flow_rate;
        c.new_flow_burst = opts.flows.new_flow_burst;
        c.icmp_echo_rate = opts.icmp_echo_rate;
        c.icmp_echo_burst = opts.icmp_echo_burst;
        c.vlan_count = 0;
        if let Some((vid, dev)) = vlan {
            c.vlan_ids[0] = vid;
            c.vlan_ifindex[0] = dev;
            c.vlan_count = 1;
        }
    })?;

    // Whatever the maps hold (a previous daemon's services, or nothing) is the starting point,
    // so applying the same configuration again writes nothing.
    let mut reconciler = attach::adopt_reconciler(&maps, opts.maglev_entries)?;
    let maps = Arc::new(Mutex::new(maps));

    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(256);
    let mut health = HealthChecker::new(health_tx);
    let shared_state = Arc::new(RwLock::new(DaemonState {
        iface: opts.iface.clone(),
        pid: std::process::id(),
        ..Default::default()
    }));

    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    // Scrapes read through their own handles on the pinned maps: reads need no lock, and a
    // scrape walking the flow slots must not hold up a reconcile.
    let scrape_maps = Arc::new(Mutex::new(BpfMaps::from_pins(&layout)?));
    let metrics_source = MetricsSource::new(scrape_maps, shared_state.clone());
    let daemon_metrics = metrics_source.daemon().clone();
    let probes = daemon_metrics.clone();
    health.observe_probes(Arc::new(move |ok| probes.probe(ok)));
    let metrics_task = tokio::spawn(metrics::serve_on(listener, metrics_source.clone(), async {
        let _ = metrics_stopped.await;
    }));

    let sweeper = sweep::Sweeper::spawn(&opts.flows, &layout, maps.clone())?;
    let l2 = l2::spawn(&opts.iface, opts.node.vlan)?;
    let mut neighbours_rx = l2.neighbours;

    let mut applier = Applier {
        iface: opts.iface.clone(),
        generation: 0,
        maps: maps.clone(),
        shared_state: shared_state.clone(),
        state_path: state::state_path(&opts.run_dir, &opts.iface),
        l2: Some(l2.wanted),
        attach: attachment.origin.label().to_string(),
        xdp_mode: attachment
            .origin
            .xdp_mode()
            .map(str::to_string)
            .or_else(|| {
                // Adopted or upgraded: the mode the previous daemon attached in.
                let path = state::state_path(&opts.run_dir, &opts.iface);
                state::read(&path).ok().flatten().and_then(|s| s.xdp_mode)
            }),
        last_reload: None,
        owned_vips: Vec::new(),
        neighbours: Vec::new(),
    };
    // With the cluster as a source, nothing is applied before it has been read once: the
    // adopted state (a restart) keeps serving meanwhile, and readiness waits for it.
    let kube = match (kube_client, opts.kubernetes.clone()) {
        (Some(client), Some(k)) => Some(source::kube::KubeSource::start(client, k)),
        _ => None,
    };
    if kube.is_some() {
        // With the cluster, a VIP is answered only by its elected node: own none until then,
        // and only until the deadline each Lease renewal moves on.
        let mut m = maps.lock().expect("maps lock");
        reconciler.set_ownership(
            Some(std::collections::BTreeSet::<std::net::IpAddr>::new()),
            &mut *m,
        )?;
        m.update_config(|c| c.owned_until = owned_until(None))?;
    } else {
        maps.lock()
            .expect("maps lock")
            .update_config(|c| c.owned_until = 0)?;
    }
    match (&configured, &kube) {
        (Some(c), None) => {
            health.update_with_initial(health_targets(c), &reconciler.down_backends());
            applier.last_reload = Some(first_reload.with_result(ReloadResult::Applied));
            applier
                .apply(&mut reconciler, c, &health)
                .context("applying the initial configuration")?;
            if let Some(m) = migration.take() {
                let mut m_maps = maps.lock().expect("maps lock");
                attachment.finish_migration(m, &mut m_maps)?;
            }
            daemon_metrics.reload(ReloadResult::Applied);
            metrics_source.set_ready(true);
            info!(iface = %opts.iface, metrics = %opts.metrics_addr, "vmlb is serving");
        }
        // Applied with the cluster's services once they are read.
        (Some(_), Some(_)) => {
            applier.last_reload = Some(first_reload.with_result(ReloadResult::Applied))
        }
        (None, _) => {
            applier.note_reload(first_reload.with_result(ReloadResult::Invalid));
            daemon_metrics.reload(ReloadResult::Invalid);
        }
    }

    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(16);
    let in_place = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _watcher = source::file::watch::watch(&opts.configs, reload_tx, in_place.clone())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // The Kubernetes source's outputs, watched by the loop.
    let mut cluster_rx = kube.as_ref().map(|k| k.services.clone());
    let mut owned_rx = kube.as_ref().map(|k| k.owned.clone());
    let mut until_rx = kube.as_ref().map(|k| k.live_until.clone());
    let mut stages = Stages {
        opts: &opts,
        capacity,
        metrics: &daemon_metrics,
        configured: &mut configured,
        cluster: None,
        started: kube.is_none(),
        health: &mut health,
        reconciler: &mut reconciler,
        applier: &mut applier,
        attachment: &mut attachment,
        migration,
        fatal: None,
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                stages.reload().await;
            }
            Some(()) = reload_rx.recv() => {
                // Only renames since the last reload: the files are whole, read them now.
                // Otherwise let the burst of events from one save settle, then reload once.
                while reload_rx.try_recv().is_ok() {}
                if in_place.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(RELOAD_DEBOUNCE).await;
                    // Cleared before the drain: a write after it still debounces its reload.
                    in_place.store(false, std::sync::atomic::Ordering::SeqCst);
                    while reload_rx.try_recv().is_ok() {}
                }
                info!("configuration changed on disk: reloading");
                stages.reload().await;
            }
            Some(services) = cluster_changed(cluster_rx.as_mut()) => {
                stages.cluster_changed(services);
                if stages.started && !metrics_source.is_ready() {
                    metrics_source.set_ready(true);
                    info!(iface = %opts.iface, metrics = %opts.metrics_addr, "vmlb is serving (files and cluster)");
                }
            }
            Some(until) = owned_changed(until_rx.as_mut()) => {
                // Every accepted renewal moves the data path's ownership deadline forward.
                let at = owned_until(until);
                if let Err(e) = stages.applier.maps.lock().expect("maps lock").update_config(|c| c.owned_until = at) {
                    error!("moving the ownership deadline: {e:#}");
                }
            }
            Some(owned) = owned_changed(owned_rx.as_mut()) => {
                // Into the data path (ARP answers, announcements), the state file and metrics.
                stages.ownership_changed(owned);
            }
            Some(neighbours) = neighbours_changed(&mut neighbours_rx) => {
                // Only the state file and the metrics: the kernel's table is what XDP reads.
                stages.applier.set_neighbours(neighbours);
            }
            Some(ev) = health_rx.recv() => {
                // health.rs logs the transition itself.
                tracing::debug!(target = %ev.target, up = ev.up, "applying a health change");
                daemon_metrics.transition(ev.up);
                stages.health_changed();
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
        if stages.fatal.is_some() {
            break;
        }
    }
    let fatal = stages.fatal.take();

    metrics_source.set_ready(false);
    sweeper.stop();
    if let Some(k) = kube {
        // Let go of the VIPs and release the Leases, so other nodes take over at once.
        k.shutdown().await;
    }
    health.shutdown().await;
    let _ = stop_metrics.send(());
    let _ = metrics_task.await;
    if let Some(e) = fatal {
        // A migration that failed before its swap: the old program still serves.
        return Err(e);
    }
    if opts.detach_on_exit {
        attachment.detach()?;
        let _ = std::fs::remove_file(&applier.state_path);
        info!(iface = %opts.iface, "detached; pinned state removed");
    } else {
        info!(iface = %opts.iface, pins = %layout.dir().display(), "left attached: the program keeps forwarding and the next daemon adopts it");
    }
    Ok(())
}

/// Log a load's warnings and errors; what to publish about it (result filled in later).
fn log_report(report: &source::file::Report) -> ReloadState {
    for w in &report.warnings {
        warn!("{w}");
    }
    for e in &report.errors {
        error!("{e}");
    }
    ReloadState {
        unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        result: String::new(),
        errors: report.errors.iter().map(ToString::to_string).collect(),
        warnings: report.warnings.iter().map(ToString::to_string).collect(),
    }
}

trait WithResult {
    fn with_result(self, r: ReloadResult) -> Self;
}

impl WithResult for ReloadState {
    fn with_result(mut self, r: ReloadResult) -> Self {
        self.result = r.label().to_string();
        self
    }
}

/// The loop's mutable state, so each event is one call.
struct Stages<'a> {
    opts: &'a Options,
    capacity: Capacity,
    metrics: &'a DaemonMetrics,
    /// The files' services (`None`: invalid since start, the adopted state serves).
    configured: &'a mut Option<Vec<ConfiguredService>>,
    /// The cluster's services, once read.
    cluster: Option<Vec<ConfiguredService>>,
    /// Whether anything has been applied yet (with the cluster: once it has been read).
    started: bool,
    health: &'a mut HealthChecker,
    reconciler: &'a mut Reconciler,
    applier: &'a mut Applier,
    attachment: &'a mut attach::Attachment,
    /// A layout migration waiting for the first apply (with the cluster as a source).
    migration: Option<crate::dataplane::migrate::Migration>,
    /// Stops the loop: a migration failed.
    fatal: Option<anyhow::Error>,
}

/// The next value of an ownership channel (the VIPs this node owns, or until when), or never
/// without the Kubernetes source.
async fn owned_changed<T: Clone>(rx: Option<&mut tokio::sync::watch::Receiver<T>>) -> Option<T> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    rx.changed().await.ok()?;
    Some(rx.borrow_and_update().clone())
}

/// The backends' neighbours when they change; never once the layer-2 task has ended.
async fn neighbours_changed(
    rx: &mut tokio::sync::watch::Receiver<Vec<state::NeighbourState>>,
) -> Option<Vec<state::NeighbourState>> {
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    Some(rx.borrow_and_update().clone())
}

/// The cluster's next services, or never without the Kubernetes source.
async fn cluster_changed(
    rx: Option<&mut tokio::sync::watch::Receiver<Option<Vec<ConfiguredService>>>>,
) -> Option<Vec<ConfiguredService>> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        rx.changed().await.ok()?;
        if let Some(s) = rx.borrow_and_update().clone() {
            return Some(s);
        }
    }
}

impl Stages<'_> {
    /// Parse everything first; only a fully valid configuration replaces the running one.
    async fn reload(&mut self) {
        let read = || source::file::read(&self.opts.configs, &self.opts.node, self.capacity);
        let mut report = read();
        // An empty file is what a reader sees between an in-place writer's truncate and its
        // first write, and it parses as "no services". Look again once such a writer has had
        // time to finish; only a file still empty then is taken as meant.
        if self.configured.is_some()
            && report
                .files
                .iter()
                .any(|f| f.documents == 0 && f.errors == 0)
        {
            tokio::time::sleep(RELOAD_DEBOUNCE).await;
            report = read();
        }
        let reload = log_report(&report);
        let result = match report.into_result() {
            Err(errors) => {
                error!(
                    "configuration refused ({} error(s)); the previous configuration keeps serving",
                    errors.0.len()
                );
                self.applier
                    .note_reload(reload.with_result(ReloadResult::Invalid));
                ReloadResult::Invalid
            }
            Ok(c) if self.configured.as_ref() == Some(&c) => {
                info!("configuration unchanged");
                self.applier
                    .note_reload(reload.with_result(ReloadResult::Unchanged));
                ReloadResult::Unchanged
            }
            Ok(c) => {
                self.applier.last_reload = Some(reload.clone().with_result(ReloadResult::Applied));
                let previous = self.configured.replace(c);
                match self.apply_all() {
                    Ok(()) => ReloadResult::Applied,
                    Err(e) => {
                        error!("configuration refused by the data path: {e:#}");
                        *self.configured = previous;
                        let mut reload = reload.with_result(ReloadResult::Failed);
                        reload.errors.push(format!("{e:#}"));
                        self.applier.note_reload(reload);
                        ReloadResult::Failed
                    }
                }
            }
        };
        self.metrics.reload(result);
    }

    fn cluster_changed(&mut self, services: Vec<ConfiguredService>) {
        let first = !self.started && self.cluster.is_none();
        self.cluster = Some(services);
        if first {
            // The first time: adopt the pinned maps' health verdicts, as a file start does.
            if let Some(all) = self.all() {
                self.health
                    .update_with_initial(health_targets(&all), &self.reconciler.down_backends());
            }
        }
        if let Err(e) = self.apply_all() {
            error!("applying the cluster's services: {e:#}");
        }
    }

    /// The data path answers ARP for exactly the owned VIPs, and the VIPs taken are announced.
    fn ownership_changed(&mut self, owned: std::collections::BTreeSet<std::net::IpAddr>) {
        let changed = {
            let mut maps = self.applier.maps.lock().expect("maps lock");
            self.reconciler.set_ownership(Some(owned), &mut *maps)
        };
        match changed {
            Ok(c) => {
                for (vip, taken) in c {
                    info!(%vip, taken, "VIP ownership applied to the data path");
                }
            }
            Err(e) => error!("applying VIP ownership: {e:#}"),
        }
        let owned = (self.reconciler.owned_vips().into_iter().map(Into::into))
            .chain(self.reconciler.owned_vips6().into_iter().map(Into::into))
            .collect();
        self.applier.set_owned(owned);
        self.applier.publish_l2(None, self.reconciler);
    }

    fn health_changed(&mut self) {
        if let Err(e) = self.apply_all() {
            error!("applying a health change: {e:#}");
        }
    }

    /// Files and cluster together; `None` until both can be applied.
    fn all(&self) -> Option<Vec<ConfiguredService>> {
        let file = self.configured.as_ref()?;
        if self.opts.kubernetes.is_none() {
            return Some(file.clone());
        }
        let (all, left_out) = source::kube::merge::merge(file, self.cluster.as_ref()?);
        for m in left_out {
            warn!("{m}");
        }
        Some(all)
    }

    /// The one desired state, from every source, into the data path.
    fn apply_all(&mut self) -> anyhow::Result<()> {
        let Some(all) = self.all() else {
            return Ok(());
        };
        self.health.update(health_targets(&all));
        self.applier.apply(self.reconciler, &all, self.health)?;
        self.started = true;
        if let Some(m) = self.migration.take() {
            let mut maps = self.applier.maps.lock().expect("maps lock");
            if let Err(e) = self.attachment.finish_migration(m, &mut maps) {
                error!("migrating the pinned maps: {e:#}");
                self.fatal = Some(e);
            }
        }
        Ok(())
    }
}

/// `Config::owned_until` for a node live until `until` (`None`: not live): the data path's
/// clock at that instant, a little early rather than late (the coarse clock lags by up to a
/// tick); never 0, which would mean "no deadline".
fn owned_until(until: Option<std::time::Instant>) -> u32 {
    let now = crate::conntrack::now();
    let left = until.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(std::time::Instant::now())
    });
    let units = vmlb_common::clock_units_from_ms(left.as_millis() as u64);
    // One unit (about 1 ms) of margin for the coarse clock's lag.
    now.wrapping_add(units.saturating_sub(1)).max(1)
}
