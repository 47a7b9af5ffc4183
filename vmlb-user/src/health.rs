//! Health checks of backends, run from the node: one tokio task per endpoint probes it (TCP
//! connect or an HTTP/1.1 GET), a rise/fall [`Tracker`] debounces the results, and every up/down
//! transition goes to the daemon as a [`HealthEvent`].
//!
//! State lives in one `Arc<Mutex<..>>` map shared by the tasks, the [`HealthChecker`] and any
//! number of [`HealthView`]s (metrics, CLI), so it can be read from other tasks at any time.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

use crate::model::{HealthKind, HealthSpec};

/// An endpoint to probe: a backend's address and target port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))
    }
}

/// Serialized as `"addr:port"`, the form logs and the CLI show.
impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A target went up or down. Sent only on transitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub target: Target,
    pub up: bool,
    pub reason: String,
}

/// A snapshot of one target's health, for metrics and the CLI.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TargetState {
    pub target: Target,
    pub up: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// The most recent failure, kept after recovery so a flapping endpoint can be diagnosed.
    pub last_error: Option<String>,
    /// Probes completed since the target (with this spec) was added.
    pub checks: u64,
}

/// Pure rise/fall state machine. Starts UP, so a restarted daemon keeps serving until probes
/// prove otherwise; `fall` consecutive failures take it down, then `rise` consecutive successes
/// bring it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    ok: u32,
    fail: u32,
}

impl Tracker {
    /// `rise`/`fall` of 0 act as 1: a threshold that never triggers would pin the state.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            ok: 0,
            fail: 0,
        }
    }

    /// Records one probe result; returns `Some(new_up)` when this result changes the state.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok = self.ok.saturating_add(1);
            self.fail = 0;
        } else {
            self.fail = self.fail.saturating_add(1);
            self.ok = 0;
        }
        let next = if self.up {
            self.fail < self.fall
        } else {
            self.ok >= self.rise
        };
        (next != self.up).then(|| {
            self.up = next;
            next
        })
    }

    /// Like `new`, but starting down: a target a previous daemon had marked down stays out
    /// of the tables until `rise` probes pass.
    pub fn new_down(rise: u32, fall: u32) -> Self {
        Self {
            up: false,
            ..Self::new(rise, fall)
        }
    }

    pub fn up(&self) -> bool {
        self.up
    }

    pub fn consecutive_ok(&self) -> u32 {
        self.ok
    }

    pub fn consecutive_fail(&self) -> u32 {
        self.fail
    }
}

/// Lower bound on the probe interval, so a zero from a config cannot make a task spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest HTTP status line accepted; the read is bounded by this and by the timeout.
const MAX_STATUS_LINE: u64 = 1024;

/// One target's entry in the shared map. `generation` identifies the task that owns it: a task
/// whose target was removed or re-added with another spec finds a different (or no) entry and
/// stops without touching it.
#[derive(Debug)]
struct Slot {
    generation: u64,
    tracker: Tracker,
    last_error: Option<String>,
    checks: u64,
}

type Shared = Arc<Mutex<BTreeMap<Target, Slot>>>;

fn lock(shared: &Shared) -> MutexGuard<'_, BTreeMap<Target, Slot>> {
    // A panicking probe task cannot leave a slot half-updated in a way that matters here.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cheap, cloneable read handle on the checker's state, for tasks that do not own the checker.
#[derive(Clone, Debug)]
pub struct HealthView(Shared);

impl HealthView {
    /// Current state; `true` for a target that is not checked (unknown endpoints keep serving).
    pub fn is_up(&self, t: &Target) -> bool {
        lock(&self.0).get(t).is_none_or(|s| s.tracker.up())
    }

    /// All targets, sorted by target.
    pub fn states(&self) -> Vec<TargetState> {
        lock(&self.0)
            .iter()
            .map(|(t, s)| TargetState {
                target: t.clone(),
                up: s.tracker.up(),
                consecutive_ok: s.tracker.consecutive_ok(),
                consecutive_fail: s.tracker.consecutive_fail(),
                last_error: s.last_error.clone(),
                checks: s.checks,
            })
            .collect()
    }
}

struct Running {
    spec: HealthSpec,
    /// `None` for `HealthKind::None`: nothing to probe.
    task: Option<JoinHandle<()>>,
}

/// Owns one tokio task per probed target. Dropping it aborts the tasks; [`Self::shutdown`] also
/// waits for them.
pub struct HealthChecker {
    events: mpsc::Sender<HealthEvent>,
    shared: Shared,
    running: BTreeMap<Target, Running>,
    next_generation: u64,
    observer: Option<ProbeObserver>,
}

/// Called with every probe's result (`true`: success), e.g. to count probes in metrics.
pub type ProbeObserver = Arc<dyn Fn(bool) + Send + Sync>;

impl HealthChecker {
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        Self {
            events,
            shared: Shared::default(),
            running: BTreeMap::new(),
            next_generation: 0,
            observer: None,
        }
    }

    /// Report every probe's result to `observer` (probes started from now on).
    pub fn observe_probes(&mut self, observer: ProbeObserver) {
        self.observer = Some(observer);
    }

    /// Replaces the target set. Unchanged targets (same target, same spec) keep their state and
    /// schedule; removed ones stop; new or changed ones start UP. If a target appears twice, the
    /// last spec wins. Must be called inside a tokio runtime (it spawns the probe tasks).
    pub fn update(&mut self, targets: Vec<(Target, HealthSpec)>) {
        self.update_with_initial(targets, &std::collections::BTreeSet::new());
    }

    /// `update`, with new probed targets listed in `initially_down` starting down (used after
    /// adopting pinned state, so a restart does not put dead backends back into the tables).
    pub fn update_with_initial(
        &mut self,
        targets: Vec<(Target, HealthSpec)>,
        initially_down: &std::collections::BTreeSet<Target>,
    ) {
        let mut want: BTreeMap<Target, HealthSpec> = targets.into_iter().collect();
        // One lock over the whole change, so readers never see a half-applied update and a
        // retiring task cannot record (or send an event) once this returns.
        let mut shared = lock(&self.shared);
        self.running.retain(|t, r| {
            if want.get(t) == Some(&r.spec) {
                want.remove(t);
                return true;
            }
            if let Some(task) = &r.task {
                task.abort();
            }
            shared.remove(t);
            tracing::debug!(target = %t, "health check stopped");
            false
        });
        for (target, spec) in want {
            self.next_generation += 1;
            let generation = self.next_generation;
            shared.insert(
                target.clone(),
                Slot {
                    generation,
                    tracker: if spec.kind != HealthKind::None && initially_down.contains(&target) {
                        Tracker::new_down(spec.rise, spec.fall)
                    } else {
                        Tracker::new(spec.rise, spec.fall)
                    },
                    last_error: None,
                    checks: 0,
                },
            );
            let task = (spec.kind != HealthKind::None).then(|| {
                let probe = ProbeTask {
                    target: target.clone(),
                    spec: spec.clone(),
                    generation,
                    shared: self.shared.clone(),
                    events: self.events.clone(),
                    observer: self.observer.clone(),
                };
                tokio::spawn(probe.run())
            });
            tracing::debug!(target = %target, ?spec.kind, "health check started");
            self.running.insert(target, Running { spec, task });
        }
    }

    /// Current state (`true` if the target is unknown).
    pub fn is_up(&self, t: &Target) -> bool {
        self.view().is_up(t)
    }

    /// All targets, sorted by target.
    pub fn states(&self) -> Vec<TargetState> {
        self.view().states()
    }

    /// A read handle that stays valid while the checker lives (and shows the last state after).
    pub fn view(&self) -> HealthView {
        HealthView(self.shared.clone())
    }

    /// Stops all tasks and waits until they are gone.
    pub async fn shutdown(mut self) {
        let tasks: Vec<_> = std::mem::take(&mut self.running)
            .into_values()
            .filter_map(|r| r.task)
            .collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancelled is the expected outcome; a panic was already reported by tokio.
            let _ = task.await;
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for task in self.running.values().filter_map(|r| r.task.as_ref()) {
            task.abort();
        }
    }
}

struct ProbeTask {
    target: Target,
    spec: HealthSpec,
    generation: u64,
    shared: Shared,
    events: mpsc::Sender<HealthEvent>,
    observer: Option<ProbeObserver>,
}

impl ProbeTask {
    /// Probes forever (until aborted or retired). Probes never overlap: the next one starts
    /// `interval` after the previous started, or at once if that one took longer.
    async fn run(self) {
        let interval = self.spec.interval.max(MIN_INTERVAL);
        let mut next = Instant::now() + first_delay(&self.target, interval);
        loop {
            tokio::time::sleep_until(next).await;
            let started = Instant::now();
            let result = probe(&self.target, &self.spec).await;
            if let Some(observe) = &self.observer {
                observe(result.is_ok());
            }
            next = started + interval;
            if !self.record(result).await {
                return;
            }
        }
    }

    /// Feeds one result to the tracker; `false` when this task has been retired by `update`.
    async fn record(&self, result: Result<(), String>) -> bool {
        let ok = result.is_ok();
        // Only this task changes its tracker, so a transition can be predicted, channel space
        // reserved without holding the lock, and the result committed under the lock afterwards.
        // Committing and sending under the lock means an `update` that retired this task in
        // between also suppresses its event: no stale up/down can follow the update.
        let transition = match lock(&self.shared).get(&self.target) {
            Some(s) if s.generation == self.generation => s.tracker.clone().record(ok).is_some(),
            _ => return false,
        };
        // A closed channel (daemon going away) still lets the state be recorded.
        let permit = if transition {
            self.events.reserve().await.ok()
        } else {
            None
        };
        let mut shared = lock(&self.shared);
        let Some(slot) = shared
            .get_mut(&self.target)
            .filter(|s| s.generation == self.generation)
        else {
            return false;
        };
        slot.checks += 1;
        let Some(up) = slot.tracker.record(ok) else {
            if let Err(e) = result {
                slot.last_error = Some(e);
            }
            return true;
        };
        let reason = match result {
            Ok(()) => format!("{} consecutive checks passed", slot.tracker.rise),
            Err(e) => {
                slot.last_error = Some(e.clone());
                e
            }
        };
        let state = if up { "up" } else { "down" };
        tracing::info!(target = %self.target, state, reason = %reason, "backend health changed");
        if let Some(permit) = permit {
            permit.send(HealthEvent {
                target: self.target.clone(),
                up,
                reason,
            });
        }
        true
    }
}

/// Deterministic per-target delay before the first probe, in `[0, interval)`, so targets added
/// together (a daemon start) do not all fire at once. Fibonacci hashing spreads neighbouring
/// addresses and ports; the same target always gets the same offset.
fn first_delay(t: &Target, interval: Duration) -> Duration {
    let addr = match t.addr {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let a = u128::from(a);
            (a as u64) ^ ((a >> 64) as u64)
        }
    };
    let key = (addr << 16) | u64::from(t.port);
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // Top 53 bits as a fraction in [0, 1): exact in an f64.
    interval.mul_f64((h >> 11) as f64 / (1u64 << 53) as f64)
}

/// One probe. `HealthKind::None` always passes. The whole probe (connect, request, status line)
/// is bounded by `spec.timeout`.
pub async fn probe(target: &Target, spec: &HealthSpec) -> Result<(), String> {
    let addr = SocketAddr::new(target.addr, target.port);
    let attempt = async {
        match &spec.kind {
            HealthKind::None => Ok(()),
            HealthKind::Tcp => connect(addr).await.map(drop),
            HealthKind::Http { path } => http_get(addr, path).await,
        }
    };
    tokio::time::timeout(spec.timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "timeout after {}",
                humantime::format_duration(spec.timeout)
            ))
        })
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", io_message(&e)))
}

/// A deliberately minimal HTTP/1.1 client: one request with `Connection: close`, then only the
/// status line is read and judged; headers and body are never parsed. Enough for a health
/// check, and no HTTP client crate in the daemon.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    // A path with whitespace or CR/LF would break (or inject into) the request line.
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("invalid HTTP path {path:?}"));
    }
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = connect(addr).await?;
    // An IPv6 host goes in brackets (RFC 9110 7.2, RFC 3986 3.2.2).
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vmlb-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {}", io_message(&e)))?;
    let mut line = Vec::new();
    BufReader::new((&mut stream).take(MAX_STATUS_LINE))
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("read: {}", io_message(&e)))?;
    if line.is_empty() {
        return Err("connection closed before the status line".into());
    }
    if line.last() != Some(&b'\n') && line.len() as u64 == MAX_STATUS_LINE {
        return Err("malformed response: status line too long".into());
    }
    // Dropping the stream with the rest of the response unread may reset the connection;
    // harmless for a probe, and it frees the server's side at once.
    check_status_line(&String::from_utf8_lossy(&line))
}

/// `HTTP/1.x NNN reason`: 2xx and 3xx pass, other codes fail as `HTTP NNN`, anything else is
/// malformed.
fn check_status_line(line: &str) -> Result<(), String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let valid = version.starts_with("HTTP/1.")
        && code.len() == 3
        && code.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        let shown: String = line.chars().take(64).collect();
        return Err(format!("malformed status line {shown:?}"));
    }
    match code.as_bytes()[0] {
        b'2' | b'3' => Ok(()),
        _ => Err(format!("HTTP {code}")),
    }
}

/// `io::Error`'s message without the " (os error N)" suffix: "Connection refused".
fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_starts_up() {
        let t = Tracker::new(2, 3);
        assert!(t.up());
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (0, 0));
    }

    #[test]
    fn tracker_falls_at_exactly_fall_failures() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert!(t.up());
        assert_eq!(t.record(false), Some(false));
        assert!(!t.up());
        // Further failures are not transitions.
        assert_eq!(t.record(false), None);
        assert_eq!(t.consecutive_fail(), 4);
    }

    #[test]
    fn tracker_rises_at_exactly_rise_successes() {
        let mut t = Tracker::new(3, 1);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), None);
        assert!(!t.up());
        assert_eq!(t.record(true), Some(true));
        assert!(t.up());
        assert_eq!(t.record(true), None);
    }

    #[test]
    fn tracker_interleaved_results_reset_counters() {
        let mut t = Tracker::new(2, 2);
        // ok/fail alternating never reaches either threshold from up...
        for _ in 0..10 {
            assert_eq!(t.record(false), None);
            assert_eq!(t.record(true), None);
        }
        assert!(t.up());
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (1, 0));
        // ...nor from down.
        t.record(false);
        assert_eq!(t.record(false), Some(false));
        for _ in 0..10 {
            assert_eq!(t.record(true), None);
            assert_eq!(t.record(false), None);
        }
        assert!(!t.up());
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (0, 1));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
    }

    #[test]
    fn tracker_zero_thresholds_act_as_one() {
        let mut t = Tracker::new(0, 0);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(true), Some(true));
    }

    #[test]
    fn status_lines() {
        assert_eq!(check_status_line("HTTP/1.1 200 OK\r\n"), Ok(()));
        assert_eq!(check_status_line("HTTP/1.0 302 Found\r\n"), Ok(()));
        assert_eq!(check_status_line("HTTP/1.1 204\r\n"), Ok(()));
        assert_eq!(
            check_status_line("HTTP/1.1 503 Service Unavailable\r\n"),
            Err("HTTP 503".into())
        );
        assert_eq!(
            check_status_line("HTTP/1.1 404 Not Found"),
            Err("HTTP 404".into())
        );
        assert_eq!(
            check_status_line("HTTP/1.1 199 Odd"),
            Err("HTTP 199".into())
        );
        for bad in [
            "",
            "garbage\r\n",
            "HTTP/1.1 20 OK",
            "HTTP/2 200 OK",
            "HTTP/1.1 2x0 OK",
        ] {
            let e = check_status_line(bad).unwrap_err();
            assert!(e.starts_with("malformed status line"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn first_delay_is_deterministic_spread_and_within_interval() {
        let interval = Duration::from_secs(2);
        let delays: Vec<_> = (0..64u16)
            .map(|i| {
                let t = Target {
                    addr: std::net::Ipv4Addr::new(10, 0, 0, (i % 8) as u8 + 1).into(),
                    port: 8080 + i / 8,
                };
                let d = first_delay(&t, interval);
                assert_eq!(d, first_delay(&t, interval));
                assert!(d < interval);
                d
            })
            .collect();
        // Neighbouring targets land in many different tenths of the interval.
        let mut tenths: Vec<_> = delays.iter().map(|d| d.as_millis() / 200).collect();
        tenths.sort_unstable();
        tenths.dedup();
        assert!(tenths.len() >= 8, "{tenths:?}");
    }

    /// The guard against stale events: a task retired by `update` (its slot replaced or removed)
    /// neither records nor sends, even if its probe finished after the update.
    #[tokio::test]
    async fn retired_task_records_and_sends_nothing() {
        let target = Target {
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 9,
        };
        let spec = HealthSpec {
            fall: 1,
            ..HealthSpec::default()
        };
        let (events, mut rx) = mpsc::channel(4);
        let shared = Shared::default();
        let slot = |generation| Slot {
            generation,
            tracker: Tracker::new(1, 1),
            last_error: None,
            checks: 0,
        };
        let task = ProbeTask {
            target: target.clone(),
            spec,
            generation: 1,
            shared: shared.clone(),
            events,
            observer: None,
        };

        lock(&shared).insert(target.clone(), slot(2));
        assert!(!task.record(Err("late".into())).await);
        assert!(lock(&shared)[&target].tracker.up());
        assert_eq!(lock(&shared)[&target].checks, 0);
        lock(&shared).clear();
        assert!(!task.record(Err("late".into())).await);
        assert!(lock(&shared).is_empty());
        assert!(rx.try_recv().is_err());

        // The live owner does record and send.
        lock(&shared).insert(target.clone(), slot(1));
        assert!(task.record(Err("refused".into())).await);
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.up, ev.reason.as_str()), (false, "refused"));
        assert_eq!(lock(&shared)[&target].checks, 1);
    }

    #[test]
    fn io_message_drops_os_error_suffix() {
        let e = std::io::Error::from_raw_os_error(nix::errno::Errno::ECONNREFUSED as i32);
        assert_eq!(io_message(&e), "Connection refused");
    }
}
