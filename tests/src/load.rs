//! A bounded `Connection: close` HTTP load from many client addresses, run from inside a
//! namespace: every request is a new TCP connection that the server closes first, so each one
//! leaves the server holding (its address and port, the client's address and port) in
//! TIME_WAIT, the case that limits a full NAT's connection rate. wrk cannot bind source
//! addresses, hence this small generator. Bounded in requests and time; it stops by itself.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

pub struct CloseLoad {
    /// Client source addresses, used in turn (they must exist in the namespace).
    pub sources: Vec<Ipv4Addr>,
    pub to: SocketAddrV4,
    /// Requests per second, paced evenly.
    pub rate: u32,
    pub duration: Duration,
    pub workers: usize,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the report.
    pub failures: Vec<String>,
    /// Answers by body (the VM's name).
    pub answers: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// The slowest request (connect to last byte).
    pub max_latency: Duration,
}

fn one(src: Ipv4Addr, to: SocketAddrV4, i: u64) -> anyhow::Result<String> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::from((src, 0)).into())
        .with_context(|| format!("binding {src}"))?;
    s.connect_timeout(&SocketAddr::V4(to).into(), Duration::from_secs(3))
        .with_context(|| format!("connecting from {src}"))?;
    let mut stream: std::net::TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /?t=close-{i} HTTP/1.0\r\nHost: vms.vlan-1512.org\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .with_context(|| format!("reading the answer from {src}"))?;
    anyhow::ensure!(
        text.starts_with("HTTP/1.1 200"),
        "status {:?}",
        text.lines().next()
    );
    Ok(text.lines().last().unwrap_or_default().trim().to_string())
}

/// Run the load from inside `ns`; returns when every scheduled request has finished.
pub fn run(ns: &Netns, load: &CloseLoad) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!load.sources.is_empty() && load.rate > 0 && load.workers > 0);
    let total = load.rate as u64 * load.duration.as_secs().max(1);
    let interval = Duration::from_secs_f64(1.0 / load.rate as f64);
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let start = Instant::now();
    thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for w in 0..load.workers {
            let report = report.clone();
            let name = ns.name().to_string();
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let ns = Netns::named(&name);
                let _in_ns = ns.enter()?;
                let mut i = w as u64;
                while i < total {
                    // Pacing: request i is due at start + i / rate.
                    let due = start + interval.mul_f64(i as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let src = load.sources[i as usize % load.sources.len()];
                    let t0 = Instant::now();
                    let r = one(src, load.to, i);
                    let took = t0.elapsed();
                    let mut rep = report.lock().expect("report lock");
                    rep.requests += 1;
                    rep.max_latency = rep.max_latency.max(took);
                    match r {
                        Ok(body) => {
                            rep.ok += 1;
                            *rep.answers.entry(body).or_default() += 1;
                        }
                        Err(e) => {
                            rep.failed += 1;
                            if rep.failures.len() < 10 {
                                rep.failures.push(format!("request {i}: {e:#}"));
                            }
                        }
                    }
                    drop(rep);
                    i += load.workers as u64;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join().expect("load worker panicked")?;
        }
        Ok(())
    })?;
    let mut r = Arc::try_unwrap(report)
        .expect("workers are done")
        .into_inner()
        .expect("report lock");
    r.elapsed = start.elapsed();
    Ok(r)
}

/// A namespace's TCP extended counters (/proc/net/netstat's TcpExt line), by name.
pub fn tcp_ext(ns: &Netns) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = ns.exec(&["cat", "/proc/net/netstat"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (
        lines.next().context("no TcpExt names")?,
        lines.next().context("no TcpExt values")?,
    );
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect())
}
