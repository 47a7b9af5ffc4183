//! Upgrading across a map layout change (issue 8): the real previous daemon (the last commit of
//! the previous layout, `vmlb_tests::prev_layout`, built from git) serves the seed's service in
//! the lab, on an IPv4 and an IPv6 VIP, with a keep-alive connection talking through each; this
//! version's daemon starts on the same pins. Checked: both connections keep working across the
//! upgrade (every request answered, by the same VM), this version's program runs in the pinned link on maps of its own
//! layout, the old layout's pins are gone, `inspect` reads the new pins and a new connection
//! works. Then a layout newer than this daemon's is refused with the message, and the running
//! program keeps serving. Needs root and the lab's tools (scripts/bootstrap.sh).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use vmlb_common::LAYOUT_VERSION;
use vmlb_tests::{
    daemon::{service_entry, service_entry6, vmlb_bin, LabDaemon},
    lab::{curl, HttpConn, Httpd, Lab, LabOptions, NODE_DEV, VIP, VIP6, VM1_ADDR, VM2_ADDR},
    prev_layout,
};
use vmlb_user::dataplane::{attach::pinned_program, migrate::live_version, pins::PinLayout};

// A bump of LAYOUT_VERSION moves `prev_layout` to the last commit of the version before it.
const _: () = assert!(
    prev_layout::VERSION + 1 == LAYOUT_VERSION,
    "vmlb_tests::prev_layout must name the layout version before this one"
);

/// The IPv6 SNAT address given to both daemons: the node's (`lab::NODE_ADDR6`).
const SNAT6: [&str; 2] = ["--snat-addr", "fd00:10:10:1::125"];

/// Requests on the kept-alive connection, one every this long.
const PACE: Duration = Duration::from_millis(50);

/// A keep-alive connection through the VIP asking every `PACE` until stopped.
struct Talker {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    answers: Arc<Mutex<BTreeMap<String, u64>>>,
    thread: Option<thread::JoinHandle<anyhow::Result<()>>>,
}

impl Talker {
    fn start(lab: &Lab, to: SocketAddr) -> anyhow::Result<Self> {
        let mut conn = HttpConn::open(&lab.client, to)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, o, a) = (stop.clone(), ok.clone(), answers.clone());
        let thread = thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let body = conn
                    .get(&format!("/?t=upgrade-{n}"))
                    .with_context(|| format!("request {n} on the kept-alive connection"))?;
                *a.lock()
                    .unwrap()
                    .entry(body.trim().to_string())
                    .or_default() += 1;
                o.fetch_add(1, Ordering::SeqCst);
                thread::sleep(PACE);
            }
            Ok(())
        });
        Ok(Self {
            stop,
            ok,
            answers,
            thread: Some(thread),
        })
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Wait until `more` further requests were answered (the connection works now).
    fn await_more(&mut self, more: u64, what: &str) -> anyhow::Result<()> {
        let want = self.ok() + more;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok() < want {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return self
                    .finish()
                    .and_then(|_| bail!("the connection ended {what}"));
            }
            ensure!(
                Instant::now() < deadline,
                "no answers on the kept-alive connection {what} ({} so far)",
                self.ok()
            );
            thread::sleep(PACE);
        }
        Ok(())
    }

    /// Stop; the first failure, if any, and the answers by VM.
    fn finish(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the talker panicked"))??;
        }
        Ok(self.answers.lock().unwrap().clone())
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The names in an interface's pin directory.
fn entries(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

#[test]
fn upgrade_from_the_previous_layout_keeps_connections() {
    // Built before the lab: the first build of the old source takes minutes.
    let prev = prev_layout::vmlb_bin();
    let current = vmlb_bin();
    let lab = Lab::with(LabOptions {
        ipv6: true,
        ..Default::default()
    })
    .expect("building the lab");
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start_vm(vm).expect("httpd"))
        .collect();
    let vms6: Vec<_> = lab.vms.iter().filter_map(|vm| vm.addr6).collect();
    let config = format!(
        "{}---\n{}",
        service_entry(&[VM1_ADDR, VM2_ADDR]),
        service_entry6(&vms6)
    );
    let mut d = LabDaemon::start_bin(&lab, prev, &config, &SNAT6).expect("the previous vmlb");
    let result = upgrade(&lab, &mut d, current);
    if let Err(e) = result {
        panic!("{e:#}\n{}\n{}", d.report(&lab), lab.describe());
    }
}

fn upgrade(lab: &Lab, d: &mut LabDaemon, current: &std::path::Path) -> anyhow::Result<()> {
    ensure!(SNAT6[1] == vmlb_tests::lab::NODE_ADDR6.to_string());
    let root = d.pins();
    let pins = PinLayout::new(&root, NODE_DEV);
    let old = pins.with_version(prev_layout::VERSION);
    ensure!(
        pins.versions_present() == BTreeSet::from([prev_layout::VERSION]),
        "the previous vmlb pinned {:?}: {:?}",
        entries(pins.iface_dir()),
        pins.versions_present()
    );
    let (old_prog, _) = pinned_program(&pins.link())?;
    // Serving once a request through the VIP is answered (the backends' first health checks).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !curl(&lab.client, &format!("http://{VIP}/"), 1).is_ok_and(|b| b.starts_with("vm")) {
        ensure!(
            Instant::now() < deadline,
            "the previous vmlb does not serve"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let mut talkers = [
        Talker::start(lab, SocketAddr::from((VIP, 80)))?,
        Talker::start(lab, SocketAddr::from((VIP6, 80)))?,
    ];
    for t in &mut talkers {
        t.await_more(5, "before the upgrade")?;
    }
    let started = Instant::now();
    d.restart_with(lab, current, &SNAT6)?;
    let took = started.elapsed();
    for (t, family) in talkers.iter_mut().zip(["IPv4", "IPv6"]) {
        t.await_more(10, &format!("after the upgrade ({family})"))?;
        let answers = t.finish()?;
        ensure!(
            answers.len() == 1,
            "one {family} connection, one VM; answers: {answers:?}"
        );
        println!(
            "upgrade v{} -> v{LAYOUT_VERSION}: ready {took:?} after the old daemon was told to \
             stop; the kept-alive {family} connection had {answers:?}",
            prev_layout::VERSION
        );
    }

    // This version's program runs in the link, on this version's maps.
    // (Its tag is the old one's when the data path did not change.)
    let (prog, _) = pinned_program(&pins.link())?;
    ensure!(
        prog != old_prog,
        "the program in the link is still the old one ({prog})"
    );
    ensure!(
        live_version(&pins, &pins.versions_present()) == Some(LAYOUT_VERSION),
        "the link's program does not use the maps under {}",
        pins.dir().display()
    );
    // The old pins are gone: the link and this version's directory are all that is left.
    let left = entries(pins.iface_dir());
    let want: BTreeSet<String> = ["link".to_string(), format!("v{LAYOUT_VERSION}")].into();
    ensure!(
        left == want,
        "pins left in {}: {left:?} (old ones in {})",
        pins.iface_dir().display(),
        old.dir().display()
    );
    let log = d.log();
    let migrated = log
        .lines()
        .find(|l| l.contains("migrated the pinned maps to this layout"))
        .context("no migration in the log")?;
    println!("{migrated}");
    let status = d.inspect(lab, &["-o", "json", "status"])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(status["attach"] == "migrated", "inspect status: {status}");

    // Both families' flows were carried over.
    for family in ["IPv4: ", "IPv6: "] {
        let carried = migrated
            .split(family)
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        ensure!(
            carried.is_some_and(|n| n >= 1),
            "no {family}flow carried over: {migrated}"
        );
    }

    // A new connection, each family.
    for url in [format!("http://{VIP}/"), format!("http://[{VIP6}]/")] {
        let body = curl(&lab.client, &url, 5)?;
        ensure!(
            body.starts_with("vm"),
            "a new connection to {url} after the upgrade: {body:?}"
        );
    }

    // A newer layout than this daemon's is refused, and the program keeps serving.
    let newer = pins.with_version(LAYOUT_VERSION + 1);
    std::fs::create_dir(newer.dir())?;
    let refused = d.restart_with(lab, current, &SNAT6);
    let _ = std::fs::remove_dir(newer.dir());
    let Err(e) = refused else {
        bail!("a daemon started on a newer layout's pins");
    };
    let msg = format!("{e:#}");
    ensure!(
        msg.contains(&format!(
            "layout v{}, newer than this vmlb's",
            LAYOUT_VERSION + 1
        )) && msg.contains("--detach-on-exit"),
        "the refusal does not say what and what to do:\n{msg}"
    );
    ensure!(d.exited().is_some(), "the refused daemon still runs");
    ensure!(
        pinned_program(&pins.link())?.0 == prog,
        "the refused daemon changed the program in the link"
    );
    let body = curl(&lab.client, &format!("http://{VIP}/"), 5)?;
    ensure!(
        body.starts_with("vm"),
        "serving after the refusal: {body:?}"
    );
    Ok(())
}
