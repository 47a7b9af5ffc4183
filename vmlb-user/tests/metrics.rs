//! Metrics encoding against a fake data path, and the HTTP endpoints on 127.0.0.1.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vmlb_common::{
    stats::CounterKind, Backend, Counter, Service, ServiceKey, TrafficStats, BE_F_UP, IPPROTO_TCP,
};
use vmlb_user::observe::{
    metrics::{serve_on, MapUsage, MetricsSource, ReloadResult, SharedReader, StatsReader},
    state::{BackendState, DaemonState, NeighbourState, ServiceState},
};

fn n(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// Two services (id 1 named by the daemon, id 2 not) and two backends of service 1, one down.
#[derive(Default)]
struct Fake {
    fail: bool,
}

fn key(port: u16) -> ServiceKey {
    ServiceKey {
        vip: n([10, 10, 1, 128]),
        port: port.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

fn traffic(base: u64) -> TrafficStats {
    TrafficStats {
        packets: base,
        bytes: base * 100,
        new_flows: base / 10,
        reply_packets: base / 2,
    }
}

impl StatsReader for Fake {
    fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        if self.fail {
            anyhow::bail!("permission denied");
        }
        Ok(Counter::ALL.iter().map(|&c| (c, c as u64 * 10)).collect())
    }
    fn services(&self) -> anyhow::Result<Vec<(ServiceKey, Service)>> {
        let svc = |id, ring_base| Service {
            id,
            flags: 1,
            snat_addrs: [n([10, 10, 1, 125]), 0, 0, 0],
            snat_count: 1,
            ring_base,
            ring_size: 251,
            port_min: 1024,
            port_range: 31741,
        };
        // Out of id order: the output is sorted.
        Ok(vec![(key(443), svc(2, 251)), (key(80), svc(1, 0))])
    }
    fn backends(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        let be = |last, flags| Backend {
            addr: n([10, 10, 1, last]),
            port: 8080u16.to_be(),
            _pad: 0,
            flags,
            service_id: 1,
        };
        Ok(vec![(3, be(2, BE_F_UP)), (4, be(3, 0))])
    }
    fn service_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        Ok(traffic(u64::from(id) * 1000))
    }
    fn backend_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        Ok(traffic(u64::from(id) * 10))
    }
    fn map_usage(&self) -> anyhow::Result<Vec<MapUsage>> {
        Ok(vec![MapUsage {
            map: "FLOW_INDEX",
            entries: 6,
            capacity: 524_288,
        }])
    }
}

fn state() -> DaemonState {
    DaemonState {
        iface: "eth1".into(),
        pid: 1,
        generation: 7,
        updated_unix: 0,
        attach: None,
        xdp_mode: None,
        last_reload: None,
        services: vec![ServiceState {
            name: "web/http".into(),
            vip: Ipv4Addr::new(10, 10, 1, 128).into(),
            port: 80,
            proto: "tcp".into(),
            id: 1,
            hosts: vec![],
            snat: vec![Ipv4Addr::new(10, 10, 1, 125).into()],
            ring_size: 251,
            backends: vec![BackendState {
                addr: Ipv4Addr::new(10, 10, 1, 2).into(),
                port: 8080,
                id: 3,
                weight: 2,
                up: true,
                last_error: None,
            }],
            maglev_digest: "0123456789abcdef".into(),
        }],
        owned_vips: vec![Ipv4Addr::new(10, 10, 1, 128).into()],
        neighbours: vec![
            NeighbourState {
                backend: IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2)),
                next_hop: Some(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2))),
                route: "on-link".into(),
                state: "reachable".into(),
                mac: Some("02:00:0a:0a:01:02".into()),
                managed: true,
            },
            NeighbourState {
                backend: IpAddr::V4(Ipv4Addr::new(10, 10, 1, 3)),
                next_hop: Some(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 3))),
                route: "on-link".into(),
                state: "failed".into(),
                mac: None,
                managed: true,
            },
        ],
    }
}

fn source(fake: Fake) -> MetricsSource {
    let reader: SharedReader = Arc::new(Mutex::new(fake));
    MetricsSource::new(reader, Arc::new(RwLock::new(state())))
}

#[track_caller]
fn assert_lines(text: &str, want: &[&str]) {
    for w in want {
        assert!(
            text.lines().any(|l| l == *w),
            "missing line {w:?} in:\n{text}"
        );
    }
}

#[test]
fn encodes_maps_with_daemon_names() {
    let s = source(Fake::default());
    s.set_ready(true);
    let text = s.encode().unwrap();
    let svc1 = r#"service="web/http",vip="10.10.1.128",port="80",proto="tcp""#;
    let svc2 = r#"service="10.10.1.128:443/tcp",vip="10.10.1.128",port="443",proto="tcp""#;
    let be3 = r#"service="web/http",backend="10.10.1.2:8080""#;
    let be4 = r#"service="web/http",backend="10.10.1.3:8080""#;
    assert_lines(
        &text,
        &[
            "# TYPE vmlb_service_packets counter",
            r#"vmlb_maglev_table_info{service="web/http",digest="0123456789abcdef"} 1"#,
            r#"vmlb_vip_owned{vip="10.10.1.128"} 1"#,
            r#"vmlb_backend_neighbour_state{backend="10.10.1.2",state="reachable"} 1"#,
            r#"vmlb_backend_neighbour_state{backend="10.10.1.3",state="failed"} 1"#,
            &format!("vmlb_service_packets_total{{{svc1}}} 1000"),
            &format!("vmlb_service_bytes_total{{{svc1}}} 100000"),
            &format!("vmlb_service_new_flows_total{{{svc1}}} 100"),
            &format!("vmlb_service_reply_packets_total{{{svc1}}} 500"),
            &format!("vmlb_service_packets_total{{{svc2}}} 2000"),
            &format!("vmlb_backend_packets_total{{{be3}}} 30"),
            &format!("vmlb_backend_new_flows_total{{{be4}}} 4"),
            &format!("vmlb_backend_reply_packets_total{{{be4}}} 20"),
            &format!("vmlb_backend_up{{{be3}}} 1"),
            &format!("vmlb_backend_up{{{be4}}} 0"),
            // Weight only where the daemon knows it.
            &format!("vmlb_backend_weight{{{be3}}} 2"),
            r#"vmlb_datapath_flow_lookups_total{result="flow_hit"} 130"#,
            r#"vmlb_datapath_packets_total{verdict="pass",reason="not_ipv4"} 0"#,
            r#"vmlb_datapath_packets_total{verdict="drop",reason="no_backend"} 70"#,
            r#"vmlb_datapath_packets_total{verdict="drop",reason="snat_exhausted"} 80"#,
            r#"vmlb_datapath_events_total{event="snat_port_collision"} 160"#,
            r#"vmlb_build_info{version="0.1.0"} 1"#,
            r#"vmlb_map_entries{map="FLOW_INDEX"} 6"#,
            r#"vmlb_map_capacity{map="FLOW_INDEX"} 524288"#,
            "vmlb_ready 1",
            "vmlb_maps_readable 1",
            "vmlb_state_generation 7",
            "# EOF",
        ],
    );
    assert!(!text.contains(&format!("vmlb_backend_weight{{{be4}}}")));
    // One name per meaning: every counter exactly once, verdicts apart from lookups and events.
    for c in Counter::ALL {
        let label = match c.kind() {
            CounterKind::Pass => format!(r#"{{verdict="pass",reason="{}"}}"#, c.reason()),
            CounterKind::Drop => format!(r#"{{verdict="drop",reason="{}"}}"#, c.reason()),
            CounterKind::Tx => format!(r#"{{verdict="tx",reason="{}"}}"#, c.reason()),
            CounterKind::Flow => format!(r#"{{result="{}"}}"#, c.name()),
            CounterKind::Event => format!(r#"{{event="{}"}}"#, c.name()),
        };
        let found = text.lines().filter(|l| l.contains(&label)).count();
        assert_eq!(found, 1, "{c:?} {label}");
    }
    assert!(!text.contains(r#"reason="flow_hit""#));
    assert!(!text.contains("vmlb_drops_total"));
    // Services in id order.
    let p1 = text
        .find(&format!("vmlb_service_packets_total{{{svc1}}}"))
        .unwrap();
    let p2 = text
        .find(&format!("vmlb_service_packets_total{{{svc2}}}"))
        .unwrap();
    assert!(p1 < p2);
}

#[test]
fn unreadable_maps_still_give_health_gauges() {
    let text = source(Fake { fail: true }).encode().unwrap();
    assert_lines(
        &text,
        &[
            "vmlb_ready 0",
            "vmlb_maps_readable 0",
            // The neighbours come from the daemon, not the maps.
            r#"vmlb_backend_neighbour_state{backend="10.10.1.2",state="reachable"} 1"#,
            "# EOF",
        ],
    );
    assert!(!text.contains("vmlb_datapath_packets_total"));
}

#[test]
fn reloads_and_probes_are_counted() {
    let s = source(Fake::default());
    let d = s.daemon();
    d.reload(ReloadResult::Applied);
    d.reload(ReloadResult::Invalid);
    d.reload(ReloadResult::Invalid);
    d.probe(true);
    d.probe(false);
    d.transition(false);
    let text = s.encode().unwrap();
    assert_lines(
        &text,
        &[
            r#"vmlb_config_reloads_total{result="applied"} 1"#,
            r#"vmlb_config_reloads_total{result="invalid"} 2"#,
            "vmlb_config_last_reload_success 0",
            r#"vmlb_health_probes_total{result="success"} 1"#,
            r#"vmlb_health_probes_total{result="failure"} 1"#,
            r#"vmlb_health_transitions_total{to="down"} 1"#,
        ],
    );
    let stamp = |name: &str| -> i64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // The last success is the applied one, no later than the failed load.
    let (last, ok) = (
        stamp("vmlb_config_last_reload_timestamp_seconds "),
        stamp("vmlb_config_last_success_timestamp_seconds "),
    );
    assert!(ok > 1_700_000_000 && ok <= last, "{ok} {last}");
}

/// One HTTP/1.1 GET to 127.0.0.1; returns (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[tokio::test]
async fn http_endpoints() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = source(Fake::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, s.clone(), async {
        let _ = stopped.await;
    }));

    assert_eq!(get(port, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(port, "/readyz").await.0, 503);
    s.set_ready(true);
    assert_eq!(get(port, "/readyz").await.0, 200);
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert_lines(
        &body,
        &[
            "vmlb_ready 1",
            r#"vmlb_datapath_packets_total{verdict="drop",reason="no_backend"} 70"#,
        ],
    );
    assert_eq!(get(port, "/nope").await.0, 404);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops on shutdown")
        .unwrap()
        .unwrap();
}
