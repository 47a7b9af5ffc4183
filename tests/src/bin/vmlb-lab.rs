//! `vmlb-lab`: the seed's lab in network namespaces that outlive this process, for people.
//!
//!     vmlb-lab up        build it (idempotent; a half-built lab is removed and rebuilt)
//!     vmlb-lab down      remove everything it (or a daemon run in it) created
//!     vmlb-lab status    what exists, and whether the VIP answers
//!     vmlb-lab demo --vmlb <binary> --config <file> [--duration <secs>]
//!                        up, run the daemon on the node, show traffic and counters, stop, down
//!
//! `cargo xtask lab ...` and `cargo xtask run` call it. Needs root. Every address lives in the
//! lab's namespaces; all traffic is sent from the client namespace to the VIP.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use vmlb_tests::lab::{
    curl,
    persistent::{self, CLIENT, METRICS_ADDR, NODE},
    stop_group, Ns, NODE_ADDR, NODE_DEV, VIP,
};

const USAGE: &str = "usage: vmlb-lab up | down | status | demo --vmlb <binary> --config <file> \
                     [--duration <secs>]";
/// The live view's period, and requests per period: a small, bounded burst.
const TICK: Duration = Duration::from_secs(2);
const BURST: usize = 10;
/// Without --duration the demo runs until Ctrl-C, but never longer than this.
const MAX_DEMO: Duration = Duration::from_secs(600);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static STOP: AtomicBool = AtomicBool::new(false);

/// println! that ignores a closed stdout (Ctrl-C on `cargo xtask run | tee log` kills the
/// reader first): the demo must still stop the daemon and take the lab down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("vmlb-lab creates network namespaces and XDP links: run it as root");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => {
            if persistent::up()? {
                println!("lab up:");
            } else {
                println!("lab already up:");
            }
            print!("{}", persistent::status());
            Ok(())
        }
        Some("down") => {
            let done = persistent::down()?;
            if done.is_empty() {
                println!("lab down: nothing to remove");
            }
            for d in done {
                println!("removed {d}");
            }
            Ok(())
        }
        Some("status") => {
            print!("{}", persistent::status());
            Ok(())
        }
        Some("demo") => demo(DemoArgs::parse(&args[1..])?),
        _ => bail!("{USAGE}"),
    }
}

struct DemoArgs {
    vmlb: PathBuf,
    config: PathBuf,
    duration: Option<Duration>,
}

impl DemoArgs {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let (mut vmlb, mut config, mut duration) = (None, None, None);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            match flag.as_str() {
                "--vmlb" => vmlb = Some(PathBuf::from(value)),
                "--config" => config = Some(PathBuf::from(value)),
                "--duration" => duration = Some(Duration::from_secs(value.parse()?)),
                _ => bail!("unknown flag {flag}\n{USAGE}"),
            }
        }
        Ok(Self {
            vmlb: vmlb.context(USAGE)?,
            config: config.context(USAGE)?,
            duration,
        })
    }
}

/// The daemon as a child in its own process group, so Ctrl-C reaches only us and we stop it in
/// order. Dropping it stops it (SIGTERM, SIGKILL after 10 s).
struct Daemon {
    child: Child,
}

impl Daemon {
    fn stop(&mut self) -> String {
        let child = &mut self.child;
        stop_group(child.id(), Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        match child.wait() {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
    if !args.vmlb.exists() {
        bail!("{} does not exist: build it first", args.vmlb.display());
    }
    if !args.config.exists() {
        bail!(
            "the example config {} does not exist",
            args.config.display()
        );
    }
    let _down = LabDown;
    say!(
        "{}",
        if persistent::up()? {
            "lab up"
        } else {
            "lab already up: using it"
        }
    );
    // Say what failed before the lab (and the daemon's log in it) goes away.
    show(&args).map_err(|e| {
        esay!("{e:#}");
        anyhow::anyhow!("the lab demo failed (above)")
    })
}

/// Takes the lab down when the demo ends in any way: success, error, Ctrl-C, or a panic.
struct LabDown;

impl Drop for LabDown {
    fn drop(&mut self) {
        match persistent::down() {
            Ok(done) => say!("lab down ({} things removed)", done.len()),
            Err(e) => esay!("lab down failed: {e:#}; run `cargo xtask lab down`"),
        }
    }
}

fn daemon_log() -> String {
    fs::read_to_string(persistent::daemon_log()).unwrap_or_default()
}

fn show(args: &DemoArgs) -> anyhow::Result<()> {
    let node = Ns::named(NODE);
    let client = Ns::named(CLIENT);
    fs::create_dir_all(persistent::daemon_run_dir())?;
    // Made here, on the lab's bpffs: the daemon mounts a bpffs of its own at a pin dir that is
    // not on one yet, and under `ip netns exec` that mount (and its pins) would die with it.
    fs::create_dir_all(persistent::daemon_pin_dir())?;
    let log = fs::File::create(persistent::daemon_log())?;
    let mut cmd = node.command(&args.vmlb);
    cmd.args(["run", "--iface", NODE_DEV, "--config"])
        .arg(&args.config)
        .args(["--snat-addr", &NODE_ADDR.to_string(), "--pin-dir"])
        .arg(persistent::daemon_pin_dir())
        .arg("--run-dir")
        .arg(persistent::daemon_run_dir())
        .args(["--metrics-addr", METRICS_ADDR])
        .env("NO_COLOR", "1")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    say!("starting in {NODE}: {cmd:?}");
    let mut daemon = Daemon {
        child: cmd.spawn().context("spawning vmlb run")?,
    };
    fs::write(persistent::daemon_pid_file(), daemon.child.id().to_string())?;
    wait_ready(&node, &mut daemon)?;
    say!(
        "vmlb is ready (pid {}, log {})",
        daemon.child.id(),
        persistent::daemon_log().display()
    );

    let url = format!("http://{VIP}/");
    say!("a few requests to {url} from {CLIENT}:");
    for i in 1..=6 {
        match curl(&client, &url, 2) {
            Ok(body) => say!("  #{i} answered by {}", body.trim()),
            Err(e) => say!("  #{i} failed: {}", short(&e)),
        }
    }

    let limit = args.duration.unwrap_or(MAX_DEMO).min(MAX_DEMO);
    match args.duration {
        Some(_) => say!("live view every {TICK:?} for {limit:?}:"),
        None => say!("live view every {TICK:?}, Ctrl-C to stop (at most {limit:?}):"),
    }
    let start = Instant::now();
    let mut before = stats(&node, args).unwrap_or_default();
    while !STOP.load(Ordering::Relaxed) && start.elapsed() < limit {
        let tick_end = Instant::now() + TICK;
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..BURST {
            let who = curl(&client, &url, 1).map_or("failed".into(), |b| b.trim().to_string());
            *answers.entry(who).or_default() += 1;
        }
        let answered: Vec<String> = answers.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let counters = match stats(&node, args) {
            Ok(now) => {
                let line = deltas(&before, &now);
                before = now;
                line
            }
            Err(e) => format!("inspect stats: {}", short(&e)),
        };
        say!(
            "[{:>4}s] {} | {counters}",
            start.elapsed().as_secs(),
            answered.join("  ")
        );
        if let Some(status) = daemon.child.try_wait()? {
            bail!("vmlb exited ({status}):\n{}", daemon_log());
        }
        while Instant::now() < tick_end && !STOP.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
        }
    }
    say!("stopping vmlb (SIGTERM): {}", daemon.stop());
    Ok(())
}

/// Poll /readyz inside the node namespace; fail with the daemon's output if it exits first.
fn wait_ready(node: &Ns, daemon: &mut Daemon) -> anyhow::Result<()> {
    let url = format!("http://{METRICS_ADDR}/readyz");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = daemon.child.try_wait()? {
            bail!(
                "vmlb run exited ({status}) before it was ready; its output:\n{}",
                daemon_log()
            );
        }
        if node.exec(&["curl", "-sf", "--max-time", "1", &url]).is_ok() {
            return Ok(());
        }
        if STOP.load(Ordering::Relaxed) {
            bail!("interrupted while waiting for {url}");
        }
        if Instant::now() > deadline {
            bail!(
                "{url} not ready after {READY_TIMEOUT:?}; vmlb's output:\n{}",
                daemon_log()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `vmlb inspect stats -o json` in the node namespace: every data-path counter by name, and
/// each backend's new flows as "<addr>:<port> flows".
fn stats(node: &Ns, args: &DemoArgs) -> anyhow::Result<BTreeMap<String, u64>> {
    let pins = persistent::daemon_pin_dir();
    let run = persistent::daemon_run_dir();
    let out = node.exec(&[
        &args.vmlb.to_string_lossy(),
        "inspect",
        "--pin-dir",
        &pins.to_string_lossy(),
        "--run-dir",
        &run.to_string_lossy(),
        "--iface",
        NODE_DEV,
        "stats",
        "-o",
        "json",
    ])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("stats JSON")?;
    let list = |key: &str| json[key].as_array().cloned().unwrap_or_default();
    let mut all = BTreeMap::new();
    for c in list("counters") {
        if let (Some(name), Some(v)) = (c["name"].as_str(), c["value"].as_u64()) {
            all.insert(name.to_string(), v);
        }
    }
    for b in list("backends") {
        if let (Some(addr), Some(n)) = (b["addr"].as_str(), b["stats"]["new_flows"].as_u64()) {
            all.insert(format!("{addr}:{} flows", b["port"]), n);
        }
    }
    Ok(all)
}

/// What moved since the last tick, "name +delta".
fn deltas(before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> String {
    let moved: Vec<String> = now
        .iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d != 0).then(|| format!("{k} +{d}"))
        })
        .collect();
    if moved.is_empty() {
        "no counter moved".into()
    } else {
        moved.join("  ")
    }
}

/// A failed command's own message, without the `ip netns exec ...` command line before it.
fn short(e: &anyhow::Error) -> String {
    let e = format!("{e:#}");
    e.rsplit("failed: ").next().unwrap_or(&e).trim().to_string()
}
