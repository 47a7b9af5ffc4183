//! `cargo xtask bench datapath`: ns/packet of the XDP program under BPF_PROG_TEST_RUN, and
//! Maglev build times. Prints a table and writes target/bench/datapath.json. Needs root.
//!
//! Method: each run uses a repeat count; the kernel reports the mean time per iteration. vmlb is
//! reached through `bench_restore` (copies the original headers back, then tail-calls), so every
//! iteration takes the path being measured; the wrapper's own cost is measured by tail-calling
//! the floor and subtracted: cost(path) = t(restore -> vmlb) - t(restore -> floor) + t(floor).
//! Counters and return values prove each iteration took the reported path. Each number is the
//! median of several runs, all taken in this one process, so ratios compare like with like.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use anyhow::{bail, ensure, Context as _};
use aya::{
    maps::{Array, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use serde_json::json;
use vmlb_common::{maglev, Counter, PROGRAM_NAME};
use vmlb_tests::{
    fixture::*,
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
};
use vmlb_user::{dataplane::loader, model::Proto};

const RUNS: usize = 9;

struct Bench {
    env: Env,
    obj: Ebpf,
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name)
        .unwrap_or_else(|| panic!("program {name}"))
        .try_into()
        .expect("XDP")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Bench {
    /// Mean ns per iteration of one run of `prog` over `repeat` iterations.
    fn time(&self, prog: &Xdp, input: &[u8], repeat: u32, want: u32) -> anyhow::Result<f64> {
        let md = [0u32, input.len() as u32, 0, self.env.ifindex, 0, 0];
        // SAFETY: plain u32s viewed as bytes.
        let ctx = unsafe { std::slice::from_raw_parts(md.as_ptr().cast::<u8>(), 24) };
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(ctx);
        opts.repeat = repeat;
        let r = prog.test_run(opts)?;
        ensure!(
            r.return_value == want,
            "returned {} instead of {want}",
            r.return_value
        );
        Ok(r.duration.as_nanos() as f64)
    }

    fn set_target(&mut self, prog_fd: &ProgramFd, input: &[u8]) -> anyhow::Result<()> {
        let mut saved = [0u64; 8];
        ensure!(input.len() >= 64, "bench packets carry at least 64 bytes");
        for (i, w) in saved.iter_mut().enumerate() {
            *w = u64::from_ne_bytes(input[i * 8..i * 8 + 8].try_into()?);
        }
        let mut pkt: Array<_, [u64; 8]> = self
            .obj
            .map_mut("BENCH_PKT")
            .context("BENCH_PKT")?
            .try_into()?;
        pkt.set(0, saved, 0)?;
        let mut progs: ProgramArray<_> = self
            .obj
            .map_mut("BENCH_PROG")
            .context("BENCH_PROG")?
            .try_into()?;
        progs.set(0, prog_fd, 0)?;
        Ok(())
    }

    fn vmlb_fd(&self) -> anyhow::Result<ProgramFd> {
        Ok(xdp(&self.env.ebpf, PROGRAM_NAME).fd()?.try_clone()?)
    }
}

fn expect_path(
    what: &str,
    got: &BTreeMap<Counter, u64>,
    want: &[(Counter, u64)],
) -> anyhow::Result<()> {
    let want: BTreeMap<Counter, u64> = want.iter().copied().collect();
    if *got != want {
        bail!("{what}: counters {got:?}, expected {want:?}: not every iteration took the path");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let repeat: u32 = std::env::var("VMLB_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // Bounded so the conntrack map stays well below capacity across all runs (2 entries per
    // flow): the number describes a new flow into a table with room, not LRU eviction.
    let new_repeat: u32 = std::env::var("VMLB_BENCH_NEW_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    let mut env = Env::new().context("bench environment (needs root)")?;
    // 3 VMs x 20 ports = 60 backends, so new-flow runs spread SNAT ports over 60 port spaces.
    let backends: Vec<_> = [VM1, VM2, VM3]
        .iter()
        .flat_map(|&a| (0..20).map(move |i| be(a, 8000 + i)))
        .collect();
    env.install(&[svc(80, Proto::Tcp, &backends)])?;
    let spec = env.services[0].clone();

    let mut obj = aya::EbpfLoader::new()
        .load(loader::TOOLS_OBJ)
        .context("loading bench object")?;
    for name in [
        "bench_floor",
        "bench_floor_lookup",
        "bench_restore",
        "bench_restore_new",
    ] {
        let p: &mut Xdp = obj.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut b = Bench { env, obj };

    // Packets of at least 64 bytes (the restore copies 64).
    let sport = 40000;
    let syn = Packet::tcp((CLIENT, sport), (VIP, 80), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .payload(&[0; 10])
        .build();
    let est = Packet::tcp((CLIENT, sport), (VIP, 80), TCP_ACK | TCP_PSH)
        .macs(CLIENT_MAC, NODE_MAC)
        .payload(&[0; 10])
        .build();
    // Create the flow once, then build its reply from what the program chose.
    let (action, out) = b.env.run(&syn);
    ensure!(action == XDP_TX, "setup SYN returned {action}");
    let backend = (
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        u16::from_be_bytes([out[36], out[37]]),
    );
    let snat_port = u16::from_be_bytes([out[34], out[35]]);
    let bmac = match backend.0 {
        a if a == VM1 => VM1_MAC,
        a if a == VM2 => VM2_MAC,
        _ => VM3_MAC,
    };
    let reply = Packet::tcp(backend, (SNAT, snat_port), TCP_ACK | TCP_PSH)
        .macs(bmac, NODE_MAC)
        .payload(&[0; 10])
        .build();

    let floor_fd = xdp(&b.obj, "bench_floor").fd()?.try_clone()?;
    let vmlb_fd = b.vmlb_fd()?;

    // The reference's entry: the established packet's 5-tuple, present.
    {
        let mut lru: aya::maps::HashMap<_, [u32; 4], [u64; 5]> = b
            .obj
            .map_mut("BENCH_LRU")
            .context("BENCH_LRU")?
            .try_into()?;
        let w = |o: usize| u32::from_ne_bytes(est[o..o + 4].try_into().expect("4 bytes"));
        lru.insert([w(26), w(30), w(34), 6], [0u64; 5], 0)?;
    }

    // Rounds: every path once per round, back to back, so a slow moment of this shared machine
    // hits a whole round rather than one path; costs and ratios are computed per round and the
    // medians reported.
    b.env.snapshot()?;
    let mut rounds: Vec<[f64; 5]> = Vec::new();
    let mut ratios: Vec<[f64; 5]> = Vec::new();
    let mut wrappers: Vec<(f64, f64)> = Vec::new();
    for _ in 0..RUNS {
        // (a) the floor, direct and through each wrapper; the floor + one LRU lookup.
        let floor = b.time(xdp(&b.obj, "bench_floor"), &est, repeat, XDP_TX)?;
        let floor_lookup = b.time(xdp(&b.obj, "bench_floor_lookup"), &est, repeat, XDP_TX)?;
        b.set_target(&floor_fd, &est)?;
        let wrap = b.time(xdp(&b.obj, "bench_restore"), &est, repeat, XDP_TX)?;
        let wrap_new = b.time(xdp(&b.obj, "bench_restore_new"), &syn, repeat, XDP_TX)?;
        // (b) established, (d) reply, (c) new flow (a new client address every iteration).
        b.set_target(&vmlb_fd, &est)?;
        let t_est = b.time(xdp(&b.obj, "bench_restore"), &est, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &reply)?;
        let t_reply = b.time(xdp(&b.obj, "bench_restore"), &reply, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &syn)?;
        let t_new = b.time(xdp(&b.obj, "bench_restore_new"), &syn, new_repeat, XDP_TX)?;
        let costs = [
            floor,
            floor_lookup,
            t_est - wrap + floor,
            t_new - wrap_new + floor,
            t_reply - wrap + floor,
        ];
        ratios.push(costs.map(|c| c / floor));
        rounds.push(costs);
        wrappers.push((wrap - floor, wrap_new - floor));
    }
    // Every iteration took the path reported, or the numbers are void.
    let mut d = b.env.delta();
    let (n, n_new) = (RUNS as u64 * repeat as u64, RUNS as u64 * new_repeat as u64);
    let collisions = d.remove(&Counter::SnatPortCollision).unwrap_or(0);
    expect_path(
        "established, reply and new-flow runs",
        &d,
        &[
            (Counter::FlowHit, n),
            (Counter::ReplyHit, n),
            (Counter::FlowNew, n_new),
            (Counter::TxSameIface, 2 * n + n_new),
        ],
    )?;
    let med = |i: usize, v: &[[f64; 5]]| median(v.iter().map(|r| r[i]).collect());
    let names = [
        "floor (parse, swap MACs, XDP_TX)",
        "reference: floor + one 5-tuple LRU lookup",
        "vmlb established TCP flow",
        "vmlb new flow (SYN: miss, Maglev, SNAT port)",
        "vmlb backend reply (reverse NAT)",
    ];
    let floor = med(0, &rounds);
    let wrap_floor = floor + median(wrappers.iter().map(|w| w.0).collect());
    let wrap_new_floor = floor + median(wrappers.iter().map(|w| w.1).collect());

    let machine = machine();
    println!(
        "\nvmlb data path, BPF_PROG_TEST_RUN, median of {RUNS} interleaved rounds ({machine})"
    );
    println!(
        "wrapper cost: restore {:.1} ns, restore+new address {:.1} ns (subtracted)",
        wrap_floor - floor,
        wrap_new_floor - floor
    );
    println!("{:<48} {:>12} {:>8}", "path", "ns/packet", "x floor");
    let mut json_rows = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (c, r) = (med(i, &rounds), med(i, &ratios));
        println!("{name:<48} {c:>12.1} {r:>8.2}");
        json_rows.push(json!({"path": name, "ns_per_packet": c, "ratio_to_floor": r}));
    }
    println!("(repeat {repeat}, new-flow repeat {new_repeat}; SNAT collisions during new-flow runs: {collisions})");

    // Maglev build times.
    println!("\n{:<10} {:>6} {:>12}", "Maglev M", "N", "build µs");
    let mut maglev_rows = Vec::new();
    for m in [16381u32, 65537] {
        for n in [10u32, 100, 1000] {
            let backends: Vec<_> = (1..=n)
                .map(|i| maglev::MaglevBackend {
                    id: i,
                    key: maglev::backend_key((0x0a00_0000 + i).to_be_bytes(), 80),
                    weight: 1,
                })
                .collect();
            let mut samples = Vec::new();
            for _ in 0..9 {
                let t = Instant::now();
                let table = maglev::build(&backends, m).map_err(|e| anyhow::anyhow!("{e}"))?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                ensure!(table.len() == m as usize);
            }
            let us = median(samples);
            println!("{m:<10} {n:>6} {us:>12.1}");
            maglev_rows.push(json!({"ring_size": m, "backends": n, "build_us": us}));
        }
    }

    let doc = json!({
        "machine": machine,
        "runs": RUNS,
        "repeat": repeat,
        "new_flow_repeat": new_repeat,
        "wrapper_ns": wrap_floor - floor,
        "wrapper_new_ns": wrap_new_floor - floor,
        "snat_collisions_new_flow": collisions,
        "datapath": json_rows,
        "maglev": maglev_rows,
        "services": spec.backends.len(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("datapath.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}
