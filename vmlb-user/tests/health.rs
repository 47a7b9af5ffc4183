//! Health probes and the checker against 127.0.0.1 listeners opened by the tests themselves.
//! Every wait is on a channel and bounded by `tokio::time::timeout`; no sleeps synchronise.

use std::{net::Ipv4Addr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket},
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::timeout,
};
use vmlb_user::{
    health::{probe, HealthChecker, HealthEvent, Target, TargetState},
    model::{HealthKind, HealthSpec},
};

/// Upper bound for anything a test waits for; far above what any step needs.
const WAIT: Duration = Duration::from_secs(5);

fn target(port: u16) -> Target {
    Target {
        addr: Ipv4Addr::LOCALHOST.into(),
        port,
    }
}

fn spec(kind: HealthKind, timeout_ms: u64) -> HealthSpec {
    HealthSpec {
        kind,
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(timeout_ms),
        rise: 2,
        fall: 2,
    }
}

fn http(path: &str) -> HealthKind {
    HealthKind::Http { path: path.into() }
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// A port that was just free: bound, then closed again.
async fn closed_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    l.local_addr().unwrap().port()
}

/// Listens on `port` (0: any), accepts and drops connections, and reports each accept.
/// SO_REUSEADDR lets a test reopen a port whose old connections are in TIME_WAIT.
fn counting_listener(port: u16) -> (u16, JoinHandle<()>, mpsc::UnboundedReceiver<()>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind((Ipv4Addr::LOCALHOST, port).into()).unwrap();
    let listener = socket.listen(128).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        for _ in 0..100_000 {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            drop(conn);
            let _ = tx.send(());
        }
    });
    (port, task, rx)
}

/// Stops a `counting_listener`; once this returns the port refuses connections.
async fn close(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// Serves one HTTP connection: reads the request head, hands it to the test, answers `response`.
async fn http_server(response: &'static str) -> (u16, oneshot::Receiver<String>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let request = read_head(&mut conn).await;
        conn.write_all(response.as_bytes()).await.unwrap();
        let _ = tx.send(request);
    });
    (port, rx)
}

/// Reads until the blank line ending a request head (bounded in size).
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 8192 {
        let n = conn.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).unwrap()
}

async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
    bounded("health event", rx.recv())
        .await
        .expect("event channel closed")
}

fn state_of(checker: &HealthChecker, t: &Target) -> TargetState {
    let states = checker.states();
    states
        .iter()
        .find(|s| &s.target == t)
        .cloned()
        .unwrap_or_else(|| panic!("no state for {t:?} in {states:?}"))
}

// --- probe -----------------------------------------------------------------------------------

#[tokio::test]
async fn tcp_probe_up_on_listening_port() {
    let (port, _server, _accepts) = counting_listener(0);
    let r = bounded("probe", probe(&target(port), &spec(HealthKind::Tcp, 1000))).await;
    assert_eq!(r, Ok(()));
}

#[tokio::test]
async fn tcp_probe_down_on_closed_port() {
    let port = closed_port().await;
    let r = bounded("probe", probe(&target(port), &spec(HealthKind::Tcp, 1000))).await;
    assert_eq!(r, Err("connect: Connection refused".to_string()));
}

#[tokio::test]
async fn none_probe_always_passes() {
    let port = closed_port().await;
    let r = bounded("probe", probe(&target(port), &spec(HealthKind::None, 1000))).await;
    assert_eq!(r, Ok(()));
}

#[tokio::test]
async fn http_probe_200_is_up_and_sends_the_documented_request() {
    let (port, request) = http_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let r = bounded("probe", probe(&target(port), &spec(http("/healthz"), 1000))).await;
    assert_eq!(r, Ok(()));
    assert_eq!(
        bounded("request", request).await.unwrap(),
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: vmlb-health\r\n\
         Connection: close\r\n\r\n"
    );
}

#[tokio::test]
async fn http_probe_503_is_down_with_the_status() {
    let (port, _request) = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
    let r = bounded("probe", probe(&target(port), &spec(http("/"), 1000))).await;
    assert_eq!(r, Err("HTTP 503".to_string()));
}

#[tokio::test]
async fn http_probe_judges_status_classes_and_malformed_responses() {
    let cases: [(&'static str, Result<(), &str>); 6] = [
        ("HTTP/1.1 204 No Content\r\n\r\n", Ok(())),
        ("HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n", Ok(())),
        ("HTTP/1.1 404 Not Found\r\n\r\n", Err("HTTP 404")),
        ("HTTP/1.1 500 Oops\r\n\r\n", Err("HTTP 500")),
        ("SSH-2.0-OpenSSH_9.2\r\n", Err("malformed status line")),
        ("", Err("connection closed before the status line")),
    ];
    for (response, want) in cases {
        let (port, _request) = http_server(response).await;
        let got = bounded("probe", probe(&target(port), &spec(http("/"), 1000))).await;
        match (want, got) {
            (Ok(()), Ok(())) => {}
            (Err(w), Err(g)) if g.starts_with(w) => {}
            (w, g) => panic!("{response:?}: want {w:?}, got {g:?}"),
        }
    }
}

#[tokio::test]
async fn http_probe_times_out_on_a_silent_server() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (release, released) = oneshot::channel::<()>();
    // Accepts and holds the connection without answering until the test ends.
    let server = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let _ = released.await;
        drop(conn);
    });
    let r = bounded("probe", probe(&target(port), &spec(http("/"), 200))).await;
    assert_eq!(r, Err("timeout after 200ms".to_string()));
    drop(release);
    bounded("server", server).await.unwrap();
}

// --- checker ---------------------------------------------------------------------------------

#[tokio::test]
async fn checker_goes_down_and_up_and_update_keeps_unchanged_state() {
    let (port, server, mut accepts) = counting_listener(0);
    let t = target(port);
    let s = spec(HealthKind::Tcp, 500);
    let (tx, mut events) = mpsc::channel(16);
    let mut checker = HealthChecker::new(tx);
    checker.update(vec![(t.clone(), s.clone())]);
    assert!(checker.is_up(&t), "new targets start up");

    // Two probes reached the server: at least the first has been recorded, without an event.
    for _ in 0..2 {
        bounded("probe accepted", accepts.recv()).await.unwrap();
    }
    assert!(state_of(&checker, &t).checks >= 1);
    assert!(events.try_recv().is_err(), "up -> up is not a transition");

    close(server).await;
    let down = next_event(&mut events).await;
    assert_eq!((&down.target, down.up), (&t, false));
    assert_eq!(down.reason, "connect: Connection refused");
    assert!(!checker.is_up(&t));
    let at_down = state_of(&checker, &t);
    assert!(!at_down.up && at_down.consecutive_fail >= 2, "{at_down:?}");
    assert_eq!(
        at_down.last_error.as_deref(),
        Some("connect: Connection refused")
    );

    // Same target, same spec: state and counters survive the update.
    checker.update(vec![(t.clone(), s.clone())]);
    let after = state_of(&checker, &t);
    assert!(!after.up, "{after:?}");
    assert!(
        after.consecutive_fail >= at_down.consecutive_fail,
        "{after:?}"
    );
    assert!(after.checks >= at_down.checks, "{after:?}");

    // Reopened: the kept down state rises again (a reset-to-up state would send nothing).
    let (_, _server, _accepts) = counting_listener(port);
    let up = next_event(&mut events).await;
    assert_eq!((&up.target, up.up), (&t, true));
    assert_eq!(up.reason, "2 consecutive checks passed");
    let at_up = state_of(&checker, &t);
    assert!(at_up.up && at_up.consecutive_ok >= 2, "{at_up:?}");
    assert_eq!(at_up.consecutive_fail, 0);
    assert!(
        at_up.checks >= at_down.checks + 2,
        "{at_up:?} vs {at_down:?}"
    );
    // The old failure stays visible for diagnosis.
    assert_eq!(
        at_up.last_error.as_deref(),
        Some("connect: Connection refused")
    );

    bounded("shutdown", checker.shutdown()).await;
}

#[tokio::test]
async fn checker_restarts_a_target_whose_spec_changed() {
    let port = closed_port().await;
    let t = target(port);
    let (tx, mut events) = mpsc::channel(16);
    let mut checker = HealthChecker::new(tx);
    checker.update(vec![(t.clone(), spec(HealthKind::Tcp, 500))]);
    assert!(!next_event(&mut events).await.up);

    let mut changed = spec(HealthKind::Tcp, 500);
    changed.interval = Duration::from_millis(60);
    checker.update(vec![(t.clone(), changed)]);
    let fresh = state_of(&checker, &t);
    assert!(
        fresh.up && fresh.checks == 0 && fresh.last_error.is_none(),
        "{fresh:?}"
    );
    // The new task probes from scratch: down again after `fall` failures.
    let again = next_event(&mut events).await;
    assert_eq!((&again.target, again.up), (&t, false));

    bounded("shutdown", checker.shutdown()).await;
}

#[tokio::test]
async fn checker_removing_a_target_stops_its_probes() {
    let (port_a, _server_a, mut accepts_a) = counting_listener(0);
    let (port_b, _server_b, mut accepts_b) = counting_listener(0);
    let (a, b) = (target(port_a), target(port_b));
    let s = spec(HealthKind::Tcp, 500);
    let (tx, mut events) = mpsc::channel(16);
    let mut checker = HealthChecker::new(tx);
    checker.update(vec![(a.clone(), s.clone()), (b.clone(), s.clone())]);
    bounded("a probed", accepts_a.recv()).await.unwrap();
    bounded("b probed", accepts_b.recv()).await.unwrap();
    let targets: Vec<_> = checker.states().into_iter().map(|s| s.target).collect();
    let mut sorted = vec![a.clone(), b.clone()];
    sorted.sort();
    assert_eq!(targets, sorted, "sorted by target");

    while accepts_a.try_recv().is_ok() {}
    checker.update(vec![(b.clone(), s.clone())]);
    let targets: Vec<_> = checker.states().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, std::slice::from_ref(&b));
    assert!(checker.is_up(&a), "unknown targets count as up");

    // Four more probes of b span three intervals; a running `a` task would probe about as often.
    for _ in 0..4 {
        bounded("b probed", accepts_b.recv()).await.unwrap();
    }
    let mut late_a = 0;
    while accepts_a.try_recv().is_ok() {
        late_a += 1;
    }
    // At most the probe that was already connecting when `a` was removed.
    assert!(late_a <= 1, "{late_a} probes of a removed target");
    assert!(events.try_recv().is_err());

    bounded("shutdown", checker.shutdown()).await;
}

#[tokio::test]
async fn checker_does_not_probe_none_targets() {
    let (port_none, _server_none, mut accepts_none) = counting_listener(0);
    let (port_tcp, _server_tcp, mut accepts_tcp) = counting_listener(0);
    let dead = target(closed_port().await);
    let (tx, mut events) = mpsc::channel(16);
    let mut checker = HealthChecker::new(tx);
    checker.update(vec![
        (target(port_none), spec(HealthKind::None, 500)),
        (dead.clone(), spec(HealthKind::None, 500)),
        (target(port_tcp), spec(HealthKind::Tcp, 500)),
    ]);
    for _ in 0..4 {
        bounded("tcp target probed", accepts_tcp.recv())
            .await
            .unwrap();
    }
    assert!(accepts_none.try_recv().is_err(), "a None target was probed");
    for s in checker.states() {
        assert!(s.up, "{s:?}");
    }
    let dead_state = state_of(&checker, &dead);
    assert_eq!(dead_state.checks, 0);
    assert!(checker.is_up(&dead));
    assert!(events.try_recv().is_err());

    bounded("shutdown", checker.shutdown()).await;
}

#[test]
fn target_state_serializes_target_as_addr_port() {
    let state = TargetState {
        target: target(8080),
        up: false,
        consecutive_ok: 0,
        consecutive_fail: 3,
        last_error: Some("HTTP 503".into()),
        checks: 7,
    };
    assert_eq!(
        serde_json::to_value(&state).unwrap(),
        serde_json::json!({
            "target": "127.0.0.1:8080", "up": false, "consecutive_ok": 0,
            "consecutive_fail": 3, "last_error": "HTTP 503", "checks": 7
        })
    );
}
