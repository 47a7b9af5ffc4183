//! The daemon: wires the stages together and owns the one loop that changes the data path.
//!
//! sources (ServiceEntry files, SIGHUP, health events) -> desired services -> reconcile ->
//! BPF maps. Startup either adopts a pinned program (a restart: nothing is reloaded, flows keep
//! going) or loads, attaches and pins a new one. A bad configuration is refused as a whole and
//! the previous one keeps serving.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::{
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode},
    Ebpf,
};
use notify::Watcher as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};
use vmlb_common::PROGRAM_NAME;

use crate::{
    cli::run::{RunArgs, XdpModeArg},
    config,
    health::{HealthChecker, HealthEvent, Target},
    loader::{self, Sizes, ALL_MAPS},
    maps::BpfMaps,
    metrics::{self, MetricsSource},
    model::{ConfiguredService, NodeConfig, ServiceSpec},
    pins::PinLayout,
    reconcile::Reconciler,
    state::{self, BackendState, DaemonState, ServiceState},
};

/// Wait this long after the last file event before reloading: editors write a file in several
/// steps (truncate, write, rename), and one reload should see the finished file.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// What keeps the program attached while the daemon runs.
enum Attachment {
    /// Loaded by this process; the link is pinned so it outlives us.
    Loaded { _ebpf: Ebpf, link: PinnedLink },
    /// Found pinned from an earlier daemon.
    Adopted { link: PinnedLink },
}

impl Attachment {
    fn into_link(self) -> PinnedLink {
        match self {
            Attachment::Loaded { link, .. } | Attachment::Adopted { link } => link,
        }
    }
}

pub fn init_tracing() {
    // aya-log (and any `log` user) records become tracing events.
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = node_config(&args)?;
    let layout = PinLayout::new(&args.pin_dir, &args.iface);
    // The configuration is read before anything is loaded: a daemon refused for a bad file
    // leaves no trace. With a pinned program to adopt it keeps serving the adopted state.
    let mut configured: Option<Vec<ConfiguredService>> = match config::load(&args.configs, &node) {
        Ok(c) => Some(c),
        Err(errors) => {
            for e in &errors.0 {
                error!("{e}");
            }
            if !layout.link().exists() {
                bail!(
                    "the configuration is invalid ({} error(s), listed above)",
                    errors.0.len()
                );
            }
            warn!("keeping the adopted data-path state until the configuration is fixed");
            None
        }
    };
    // Bound before attaching, so a taken port stops the daemon before it changes anything.
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?;
    let (attachment, mut maps) = attach_or_adopt(&args, &layout)?;
    let mac = iface_mac(&args.iface)?;
    maps.init_config(mac)?;
    maps.update_config(|c| {
        c.new_flow_rate = args.new_flow_rate;
        c.new_flow_burst = args.new_flow_burst;
    })?;
    forward_ebpf_logs(&layout);

    // Whatever the maps hold (a previous daemon's services, or nothing) is the starting point,
    // so applying the same configuration again writes nothing.
    let mut reconciler = adopt_state(&maps, args.maglev_entries)?;
    let maps = Arc::new(Mutex::new(maps));

    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(256);
    let mut health = HealthChecker::new(health_tx);
    let shared_state = Arc::new(RwLock::new(DaemonState {
        iface: args.iface.clone(),
        pid: std::process::id(),
        ..Default::default()
    }));
    let state_path = state::state_path(&args.run_dir, &args.iface);

    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    // Scrapes read through their own handles on the pinned maps: reads need no lock, and a
    // scrape walking FLOWS must not hold up a reconcile.
    let scrape_maps = Arc::new(Mutex::new(BpfMaps::from_pins(&layout)?));
    let source = MetricsSource::new(scrape_maps, shared_state.clone());
    let metrics_task = tokio::spawn(metrics::serve_on(listener, source.clone(), async {
        let _ = metrics_stopped.await;
    }));

    let sweeper = spawn_sweeper(&args, &layout, maps.clone())?;

    let mut ctx = Ctx {
        iface: args.iface.clone(),
        generation: 0,
        maps: maps.clone(),
        shared_state: shared_state.clone(),
        state_path,
    };
    if let Some(c) = &configured {
        health.update_with_initial(health_targets(c), &reconciler.down_backends());
        ctx.apply(&mut reconciler, c, &health)
            .context("applying the initial configuration")?;
    }
    source.set_ready(true);
    info!(iface = %args.iface, metrics = %args.metrics_addr, "vmlb is serving");

    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(16);
    let _watcher = watch_configs(&args.configs, reload_tx)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                reload(&args, &node, &mut configured, &mut health, &mut reconciler, &mut ctx);
            }
            Some(()) = reload_rx.recv() => {
                // Let the burst of events from one save settle, then reload once.
                tokio::time::sleep(RELOAD_DEBOUNCE).await;
                while reload_rx.try_recv().is_ok() {}
                info!("configuration changed on disk: reloading");
                reload(&args, &node, &mut configured, &mut health, &mut reconciler, &mut ctx);
            }
            Some(ev) = health_rx.recv() => {
                // health.rs logs the transition itself.
                tracing::debug!(target = %ev.target, up = ev.up, "applying a health change");
                if let Some(c) = &configured {
                    if let Err(e) = ctx.apply(&mut reconciler, c, &health) {
                        error!("applying a health change: {e:#}");
                    }
                }
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }

    source.set_ready(false);
    sweeper.stop();
    health.shutdown().await;
    let _ = stop_metrics.send(());
    let _ = metrics_task.await;
    let link = attachment.into_link();
    if args.detach_on_exit {
        let fd_link: FdLink = link.unpin().context("unpinning the XDP link")?;
        drop(fd_link);
        for name in ALL_MAPS {
            let _ = std::fs::remove_file(layout.map(name));
        }
        let _ = std::fs::remove_dir(layout.dir());
        let _ = std::fs::remove_file(&ctx.state_path);
        info!(iface = %args.iface, "detached; pinned state removed");
    } else {
        info!(iface = %args.iface, pins = %layout.dir().display(), "left attached: the program keeps forwarding and the next daemon adopts it");
    }
    Ok(())
}

/// The daemon's handles for applying a configuration.
struct Ctx {
    iface: String,
    generation: u64,
    maps: Arc<Mutex<BpfMaps>>,
    shared_state: Arc<RwLock<DaemonState>>,
    state_path: PathBuf,
}

impl Ctx {
    /// Desired services (configuration + current health) -> the maps, then publish the state.
    fn apply(
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
        self.generation += 1;
        let mut st = daemon_state(&self.iface, configured, reconciler, health, &desired);
        st.generation = self.generation;
        st.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(e) = state::write_atomic(&self.state_path, &st) {
            warn!("writing {}: {e:#}", self.state_path.display());
        }
        *self.shared_state.write().expect("state lock") = st;
        Ok(())
    }
}

/// Parse everything first; only a fully valid configuration replaces the running one.
fn reload(
    args: &RunArgs,
    node: &NodeConfig,
    configured: &mut Option<Vec<ConfiguredService>>,
    health: &mut HealthChecker,
    reconciler: &mut Reconciler,
    ctx: &mut Ctx,
) {
    match config::load(&args.configs, node) {
        Err(errors) => {
            for e in &errors.0 {
                error!("{e}");
            }
            error!(
                "configuration refused ({} error(s)); the previous configuration keeps serving",
                errors.0.len()
            );
        }
        Ok(c) => {
            if configured.as_ref() == Some(&c) {
                info!("configuration unchanged");
                return;
            }
            health.update(health_targets(&c));
            match ctx.apply(reconciler, &c, health) {
                Ok(()) => *configured = Some(c),
                Err(e) => error!("configuration refused by the data path: {e:#}"),
            }
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
fn health_targets(configured: &[ConfiguredService]) -> Vec<(Target, crate::model::HealthSpec)> {
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
    let states = health.states();
    let services = configured
        .iter()
        .zip(desired)
        .map(|(c, spec)| {
            let key = spec.key();
            let id = reconciler.service(&key).map_or(0, |s| s.id);
            ServiceState {
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
                        id: reconciler.backend_id(&key, b.addr, b.port).unwrap_or(0),
                        weight: b.weight,
                        up: b.up,
                        last_error: states
                            .iter()
                            .find(|s| s.target.addr == b.addr && s.target.port == b.port)
                            .and_then(|s| s.last_error.clone()),
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

fn adopt_state(maps: &BpfMaps, ring_entries: u32) -> anyhow::Result<Reconciler> {
    let services: Vec<_> = maps.services.iter().collect::<Result<_, _>>()?;
    let mut backends = Vec::new();
    for (id, b) in maps.backends.iter().enumerate() {
        let b = b?;
        if b.addr != 0 {
            backends.push((id as u32, b));
        }
    }
    let ring_entries = ring_entries.max(maps.maglev.len());
    let r = Reconciler::adopt(ring_entries, &services, &backends, |base, len| {
        (base..base + len)
            .map(|i| Ok(maps.maglev.get(&i, 0)?))
            .collect()
    })?;
    if !services.is_empty() {
        info!(
            services = services.len(),
            "adopted the services found in the pinned maps"
        );
    }
    Ok(r)
}

fn node_config(args: &RunArgs) -> anyhow::Result<NodeConfig> {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct File {
        snat_address: Option<Ipv4Addr>,
        vlan: Option<u16>,
    }
    let file: File = match &args.node_config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading node config {}", p.display()))?;
            serde_norway::from_str(&text).with_context(|| format!("node config {}", p.display()))?
        }
        None => File::default(),
    };
    Ok(NodeConfig {
        snat: args.snat_addr.or(file.snat_address),
        vlan: args.vlan.or(file.vlan),
    })
}

/// Turn the program's aya-log records (rare, actionable events such as SNAT exhaustion) into
/// tracing events. Works the same for a loaded and an adopted program: the logger is found
/// through the pinned link's program id.
fn forward_ebpf_logs(layout: &PinLayout) {
    let logger = PinnedLink::from_pin(layout.link())
        .map_err(anyhow::Error::from)
        .and_then(|l| Ok(FdLink::from(l).info()?.program_id()))
        .and_then(|id| Ok(aya_log::EbpfLogger::init_from_id(id)?));
    let logger = match logger {
        Ok(l) => l,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e:#}");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer fd for its whole life and always reports that
    // same fd; the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Adopt a pinned program if one is attached to this interface; otherwise load, attach and pin.
fn attach_or_adopt(args: &RunArgs, layout: &PinLayout) -> anyhow::Result<(Attachment, BpfMaps)> {
    if layout.link().exists() {
        return adopt_or_upgrade(args, layout);
    }

    if crate::pins::ensure_bpffs(&args.pin_dir)
        .with_context(|| format!("mounting a BPF filesystem for {}", args.pin_dir.display()))?
    {
        info!(pin_dir = %args.pin_dir.display(), "mounted a BPF filesystem for the pins");
    }
    std::fs::create_dir_all(layout.dir()).with_context(|| {
        format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf?)",
            layout.dir().display()
        )
    })?;
    let mut ebpf = loader::load(Sizes {
        flows: Some(args.flow_entries),
        maglev: Some(args.maglev_entries),
        pins: Some(layout.clone()),
    })?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    let link_id = match args.xdp_mode {
        XdpModeArg::Native => prog.attach(&args.iface, XdpMode::Driver).with_context(|| {
            format!(
                "attaching in native mode to {} (try --xdp-mode skb if the driver lacks XDP)",
                args.iface
            )
        })?,
        XdpModeArg::Skb => prog
            .attach(&args.iface, XdpMode::Skb)
            .with_context(|| format!("attaching in generic (skb) mode to {}", args.iface))?,
        XdpModeArg::Auto => match prog.attach(&args.iface, XdpMode::Driver) {
            Ok(id) => {
                info!(iface = %args.iface, "attached in native (driver) mode");
                id
            }
            Err(e) => {
                warn!(iface = %args.iface, "native XDP failed ({e}); falling back to generic (skb) mode");
                prog.attach(&args.iface, XdpMode::Skb).with_context(|| {
                    format!("attaching to {} in native and in generic mode (does the interface exist in this namespace?)", args.iface)
                })?
            }
        },
    };
    let link: FdLink = prog.take_link(link_id)?.try_into().context(
        "the kernel attached without a BPF link (netlink); vmlb needs bpf_link to pin it",
    )?;
    let link = link
        .pin(layout.link())
        .with_context(|| format!("pinning the link at {}", layout.link().display()))?;
    let maps = BpfMaps::from_ebpf(&mut ebpf)?;
    info!(iface = %args.iface, pins = %layout.dir().display(), "loaded, attached and pinned");
    Ok((Attachment::Loaded { _ebpf: ebpf, link }, maps))
}

/// A program is pinned on this interface. If it is this version's code (same kernel tag), adopt
/// it: nothing reloaded, flows keep going. Otherwise load this version against the same pinned
/// maps and swap it into the pinned link in one step (BPF_LINK_UPDATE): no packet goes
/// unprocessed and the conntrack entries stay. If this version cannot use the pinned maps
/// (their layout changed), keep the running program and say so.
fn adopt_or_upgrade(args: &RunArgs, layout: &PinLayout) -> anyhow::Result<(Attachment, BpfMaps)> {
    let open_link = || {
        PinnedLink::from_pin(layout.link())
            .with_context(|| format!("opening the pinned link {}", layout.link().display()))
    };
    let attached_id = FdLink::from(open_link()?).info()?.program_id();
    let attached_tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == attached_id)
        .map(|p| p.tag());

    let adopt = || -> anyhow::Result<(Attachment, BpfMaps)> {
        let maps = BpfMaps::from_pins(layout)?;
        info!(iface = %args.iface, "adopted the pinned XDP program: nothing reloaded, flows keep going");
        Ok((Attachment::Adopted { link: open_link()? }, maps))
    };
    let mut ebpf = match loader::load(Sizes {
        pins: Some(layout.clone()),
        ..Default::default()
    }) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            warn!("this version's program cannot use the pinned maps ({e:#}); keeping the running program (restart with --detach-on-exit once to replace it)");
            return adopt();
        }
    };
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    if Some(prog.info()?.tag()) == attached_tag {
        // Same code: the copy just loaded is dropped (the pinned maps stay).
        return adopt();
    }
    let link = XdpLink::try_from(FdLink::from(open_link()?))
        .context("the pinned link is not an XDP link")?;
    let id = prog
        .attach_to_link(link)
        .context("replacing the program in the pinned link")?;
    // The link stays pinned; keep it out of the program's own list so nothing detaches it.
    drop(prog.take_link(id)?);
    let maps = BpfMaps::from_ebpf(&mut ebpf)?;
    info!(iface = %args.iface, old_program = attached_id, "replaced the pinned program with this version's in place: flows keep going");
    Ok((
        Attachment::Loaded {
            _ebpf: ebpf,
            link: open_link()?,
        },
        maps,
    ))
}

/// Watch the configured files (through their directories: editors replace files by rename)
/// and the configured directories; a change to one of those files, or to a YAML file in one of
/// those directories, asks for a reload.
fn watch_configs(
    paths: &[PathBuf],
    tx: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let files: BTreeSet<PathBuf> = paths
        .iter()
        .filter(|p| !p.is_dir())
        .map(|p| absolute(p))
        .collect();
    let conf_dirs: BTreeSet<PathBuf> = paths
        .iter()
        .filter(|p| p.is_dir())
        .map(|p| absolute(p))
        .collect();
    let relevant = move |p: &Path| {
        files.contains(p)
            || (p.parent().is_some_and(|d| conf_dirs.contains(d))
                && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_))
                && ev.paths.iter().any(|p| relevant(p))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .context("starting the file watcher")?;
    let mut dirs = BTreeSet::new();
    for p in paths {
        let dir: &Path = if p.is_dir() {
            p
        } else {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        dirs.insert(dir.to_path_buf());
    }
    for d in dirs {
        watcher
            .watch(&d, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", d.display()))?;
    }
    Ok(watcher)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The interface's MAC address (the source of frames vmlb sends to clients).
fn iface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    anyhow::ensure!(parts.len() == 6, "{path}: not a MAC address: {text:?}");
    for (o, p) in mac.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).with_context(|| format!("{path}: bad MAC {text:?}"))?;
    }
    Ok(mac)
}

/// The flow sweeper: a thread that ends expired flows every `--flow-sweep-interval` and raises
/// or lowers the flood guard's pressure flag.
struct Sweeper {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_sweeper(
    args: &RunArgs,
    layout: &PinLayout,
    shared: Arc<Mutex<BpfMaps>>,
) -> anyhow::Result<Sweeper> {
    // Its own handles: a sweep walks every slot and must not hold up a reconcile.
    let mut own = BpfMaps::from_pins(layout)?;
    let timeouts = args.timeouts();
    let interval = args.flow_sweep_interval;
    let capacity = own.flow_capacity()? as u64;
    let threshold = capacity * args.flow_pressure_percent as u64 / 100;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("vmlb-sweep".into())
        .spawn(move || {
            let mut pressure = false;
            loop {
                let s = crate::conntrack::sweep(&own.slots, &mut own.flows, &timeouts, pressure);
                let now_pressure = s.live() >= threshold;
                if now_pressure != pressure {
                    pressure = now_pressure;
                    if pressure {
                        warn!(
                            live = s.live(),
                            capacity, "flow table under pressure: SYN-only flows now expire early"
                        );
                    } else {
                        info!(live = s.live(), capacity, "flow table pressure over");
                    }
                    let mut m = shared.lock().expect("maps lock");
                    if let Err(e) = m.update_config(|c| c.pressure = pressure as u32) {
                        error!("setting the flow pressure flag: {e:#}");
                    }
                }
                tracing::trace!(?s, "flow sweep");
                match stopped.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })?;
    Ok(Sweeper {
        stop,
        thread: Some(thread),
    })
}
