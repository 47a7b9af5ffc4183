//! What the benchmark binaries share: the machine they ran on, whole-machine CPU time from
//! /proc/stat, wrk's summary, medians, and the JSON files under target/bench/. Pure parsing is
//! unit-tested here, so a cheap check covers the benchmarks without running them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{json, Value};

/// CPU model, CPU count and kernel: what a reader needs to compare numbers across machines.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel.trim(),
    })
}

/// "<cpu>, <n> CPUs, kernel <k>" for a table's heading.
pub fn machine_line(m: &Value) -> String {
    format!(
        "{}, {} CPUs, kernel {}",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?")
    )
}

/// Whole-machine CPU time from the aggregate `cpu` line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq: time this machine's CPUs spent working. Guest time
    /// is already inside user; steal (another tenant of the host) is left out.
    pub busy: u64,
    /// busy + idle + iowait + steal.
    pub total: u64,
}

impl CpuTimes {
    pub fn parse(stat: &str) -> anyhow::Result<Self> {
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no aggregate cpu line in /proc/stat")?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("a /proc/stat field is not a number")?;
        anyhow::ensure!(f.len() >= 8, "short cpu line: {line:?}");
        // user nice system idle iowait irq softirq steal [guest guest_nice]
        let busy = f[0] + f[1] + f[2] + f[5] + f[6];
        Ok(Self {
            busy,
            total: busy + f[3] + f[4] + f[7],
        })
    }

    pub fn now() -> anyhow::Result<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    /// Busy CPU seconds between `self` (earlier) and `later`.
    pub fn busy_secs_until(&self, later: &Self) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / clock_ticks_per_sec()
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// A wrk Lua script: thread i connects to the i-th address of `VMLB_WRK_TARGETS` (comma
/// separated, in turn; the URL's host when unset), and `done` prints one line that
/// [`WrkSummary::parse`] reads, with exact percentiles from wrk's own histogram.
pub const WRK_SCRIPT: &str = r#"
local targets = {}
local threads = 0
function setup(thread)
  local list = os.getenv("VMLB_WRK_TARGETS")
  if list and #targets == 0 then
    for host in string.gmatch(list, "[^,]+") do
      table.insert(targets, wrk.lookup(host, os.getenv("VMLB_WRK_PORT") or "80")[1])
    end
  end
  if #targets > 0 then
    thread.addr = targets[threads % #targets + 1]
  end
  threads = threads + 1
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "VMLB_WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50.0), latency:percentile(99.0), latency.max))
end
"#;

/// One wrk run's totals, from the line `WRK_SCRIPT` prints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkSummary {
    pub requests: u64,
    pub duration_s: f64,
    /// connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Answers that were not 2xx or 3xx.
    pub non_2xx: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl WrkSummary {
    pub fn parse(out: &str) -> anyhow::Result<Self> {
        let line = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("VMLB_WRK "))
            .context("wrk printed no VMLB_WRK line (was the script loaded?)")?;
        let fields: BTreeMap<&str, f64> = line
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .with_context(|| format!("no {k} in {line:?}"))
        };
        Ok(Self {
            requests: get("requests")? as u64,
            duration_s: get("duration_us")? / 1e6,
            socket_errors: (get("connect")? + get("read")? + get("write")? + get("timeout")?)
                as u64,
            non_2xx: get("status")? as u64,
            p50_us: get("p50_us")?,
            p99_us: get("p99_us")?,
            max_us: get("max_us")?,
        })
    }

    pub fn rate(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.requests as f64 / self.duration_s
        } else {
            0.0
        }
    }
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// target/bench/ of the workspace.
pub fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// Write `doc` pretty-printed to `<dir>/<name>`; returns the path.
pub fn write_json(dir: &Path, name: &str, doc: &Value) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A `u32`/`u64`/`f64` from the environment, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_count_work_not_idle_or_steal() {
        let stat = "cpu  100 5 50 1000 7 3 2 40 9 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n";
        let t = CpuTimes::parse(stat).unwrap();
        assert_eq!(t.busy, 100 + 5 + 50 + 3 + 2);
        assert_eq!(t.total, t.busy + 1000 + 7 + 40);
        assert!(CpuTimes::parse("intr 1\n").is_err());
        assert!(CpuTimes::parse("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn wrk_summary_line_is_read_and_errors_are_summed() {
        let out = "Running 4s test @ http://10.10.1.128/\n  2 threads and 8 connections\n\
                   VMLB_WRK requests=20000 duration_us=4000000 connect=1 read=2 write=3 status=4 \
                   timeout=5 p50_us=350 p99_us=1200 max_us=9000\n";
        let s = WrkSummary::parse(out).unwrap();
        assert_eq!(s.requests, 20000);
        assert_eq!(s.socket_errors, 11);
        assert_eq!(s.non_2xx, 4);
        assert_eq!(s.rate(), 5000.0);
        assert_eq!((s.p50_us, s.p99_us, s.max_us), (350.0, 1200.0, 9000.0));
        assert!(WrkSummary::parse("Running 4s test\n").is_err());
        assert!(WrkSummary::parse("VMLB_WRK requests=1\n").is_err());
    }

    #[test]
    fn median_and_json_writer() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
        let dir = std::env::temp_dir().join(format!("vmlb-bench-json-{}", std::process::id()));
        let path = write_json(&dir, "x.json", &json!({"a": 1})).unwrap();
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back["a"], 1);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(machine()["cpus"].as_u64().unwrap() >= 1);
    }
}
