//! `cargo xtask bench datapath`: ns/packet of the XDP program under BPF_PROG_TEST_RUN, and
//! Maglev build times. Prints a table and writes target/bench/datapath.json. Needs root.
//!
//! Method: each run uses a repeat count; the kernel reports the mean time per iteration. vmlb is
//! reached through `bench_restore` (copies the original headers back, then tail-calls), so every
//! iteration takes the path being measured; the wrapper's own cost is measured by tail-calling
//! the floor and subtracted: cost(path) = t(restore -> vmlb) - t(restore -> floor) + t(floor).
//! New-flow runs, vmlb's and the two insert references', go through `bench_restore_new` (a new
//! client address every iteration) the same way. Counters, map contents and return values prove
//! each iteration took the reported path. Each number is the median over interleaved rounds,
//! all taken in this one process, so ratios compare like with like.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use aya::{
    maps::{Array, HashMap, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use serde_json::json;
use vmlb_common::{maglev, Counter, DEFAULT_FLOW_ENTRIES, PROGRAM_NAME, SLOTS_PER_FLOW};
use vmlb_tests::{
    fixture::*,
    fixture6::svc6,
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
    packet6::Packet6,
};
use vmlb_user::{
    conntrack::{self, Timeouts},
    dataplane::loader,
    model::Proto,
};

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

    fn fd(&self, name: &str) -> anyhow::Result<ProgramFd> {
        Ok(xdp(&self.obj, name).fd()?.try_clone()?)
    }

    /// Empty a reference map; returns how many entries it held.
    fn drain<V: Pod>(&mut self, name: &str) -> anyhow::Result<usize> {
        self.drain_keyed::<[u32; 4], V>(name)
    }

    fn drain_keyed<K: Pod, V: Pod>(&mut self, name: &str) -> anyhow::Result<usize> {
        let mut m: HashMap<_, K, V> = self
            .obj
            .map_mut(name)
            .context(name.to_string())?
            .try_into()?;
        let keys = m.keys().collect::<Result<Vec<_>, _>>()?;
        for k in &keys {
            m.remove(k)?;
        }
        Ok(keys.len())
    }

    /// Open the established flow: its SYN, then one backend reply (so it is ESTABLISHED, as a
    /// busy flow is). Returns the reply packet, built from the SNAT tuple the program chose.
    fn open_flow(&self, syn: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (action, out) = self.env.run(syn);
        ensure!(action == XDP_TX, "setup SYN returned {action}");
        ensure!(out[26..30] == SNAT.octets(), "setup SYN was not SNATed");
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
        let (action, _) = self.env.run(&reply);
        ensure!(action == XDP_TX, "setup reply returned {action}");
        Ok(reply)
    }

    /// The IPv6 `open_flow`.
    fn open_flow6(&self, syn: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (action, out) = self.env.run(syn);
        ensure!(action == XDP_TX, "setup IPv6 SYN returned {action}");
        let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&out[o..o + 16]).expect("16"));
        ensure!(addr(22) == SNAT6, "setup IPv6 SYN was not SNATed");
        let backend = (addr(38), u16::from_be_bytes([out[56], out[57]]));
        let snat_port = u16::from_be_bytes([out[54], out[55]]);
        let bmac = if backend.0 == VM1_6 { VM1_MAC } else { VM2_MAC };
        let reply = Packet6::tcp(backend, (SNAT6, snat_port), TCP_ACK | TCP_PSH)
            .macs(bmac, NODE_MAC)
            .payload(&[0; 10])
            .build();
        let (action, _) = self.env.run(&reply);
        ensure!(action == XDP_TX, "setup IPv6 reply returned {action}");
        Ok(reply)
    }

    /// Live flows: (slots in use, index entries).
    fn live(&self) -> (usize, usize) {
        let m = &self.env.maps;
        (m.slots.live().count(), m.index.len())
    }

    /// Live IPv6 flows: (slots in use, index entries).
    fn live6(&self) -> (usize, usize) {
        let m = &self.env.maps.v6;
        (m.slots.live().count(), m.index.len())
    }

    /// End every flow, with the daemon's own expiry (`conntrack::sweep`) at zero timeouts: each
    /// slot is freed at once (no TIME_WAIT hold) and its index entry deleted, so every round
    /// starts from the same empty table. Returns how many flows it ended.
    fn clear_flows(&mut self) -> anyhow::Result<u64> {
        let zero = Timeouts {
            syn: Duration::ZERO,
            syn_pressure: Duration::ZERO,
            established: Duration::ZERO,
            closing: Duration::ZERO,
            udp: Duration::ZERO,
            time_wait: Duration::ZERO,
        };
        let m = &mut self.env.maps;
        let s = conntrack::sweep(&m.slots, &m.index, &zero, false);
        let s6 = conntrack::sweep(&m.v6.slots, &m.v6.index, &zero, false);
        ensure!(
            s.live() == 0
                && s.held == 0
                && s6.live() == 0
                && s6.held == 0
                && self.live() == (0, 0)
                && self.live6() == (0, 0),
            "flows left after a zero-timeout sweep: {s:?} {s6:?}"
        );
        Ok(s.expired.iter().sum::<u64>() + s6.expired.iter().sum::<u64>())
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

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rows of the table, in the order of a round's cost array.
const NAMES: [&str; 14] = [
    "floor (parse, swap MACs, XDP_TX)",
    "ref: floor + one LRU lookup (5-tuple)",
    "ref: floor + one common-LRU insert",
    "ref: floor + one plain-HASH insert (prealloc)",
    "ref: floor + one bpf_fib_lookup",
    "vmlb established TCP flow",
    "vmlb backend reply (reverse NAT)",
    "vmlb new flow (SYN from a new client)",
    "vmlb IPv6 established TCP flow",
    "vmlb IPv6 backend reply (reverse NAT)",
    "vmlb IPv6 new flow (SYN from a new client)",
    "ref IPv6: floor6 (parse Ethernet/IPv6/TCP, swap MACs)",
    "ref IPv6: floor6 + one LRU lookup (40-byte key)",
    "ref IPv6: floor6 + one common-LRU insert (40+112 B)",
];
const LOOKUP: usize = 1;
const LRU_INSERT: usize = 2;
const EST: usize = 5;
const NEW: usize = 7;
const EST6: usize = 8;
const NEW6: usize = 10;
const LOOKUP6: usize = 12;
const LRU_INSERT6: usize = 13;

fn main() -> anyhow::Result<()> {
    let repeat = env_u32("VMLB_BENCH_REPEAT", 1_000_000);
    // New flows per run: 100k, as issue 6's side-by-side with Katran. A new flow's cost can grow
    // with the working set (the LRU design's did, 1.0 -> 1.7 us from 10k to 100k), so a small
    // run can flatter it.
    let new_repeat = env_u32("VMLB_BENCH_NEW_REPEAT", 100_000);
    // The daemon's default table: 262,144 concurrent flows (FLOW_SLOTS 4x that), so a run's
    // flows occupy 38% of it. The insert references get the same capacity.
    let capacity = env_u32("VMLB_BENCH_FLOWS", DEFAULT_FLOW_ENTRIES);
    ensure!(
        new_repeat < capacity,
        "{new_repeat} new flows per run do not fit {capacity}"
    );

    let mut env = Env::with_sizes(loader::Sizes {
        flows: Some(capacity),
        flows6: Some(capacity),
        ..Default::default()
    })
    .context("bench environment (needs root)")?;
    // 3 VMs x 20 ports = 60 backends, so a run's 100k flows spread over 60 SNAT port spaces of
    // 31,741 ports each (one backend port cannot hold 100k flows with one SNAT address).
    let backends: Vec<_> = [VM1, VM2, VM3]
        .iter()
        .flat_map(|&a| (0..20).map(move |i| be(a, 8000 + i)))
        .collect();
    // The IPv6 service: the same shape over the fixture's two IPv6 VMs (40 backends).
    let backends6: Vec<(Ipv6Addr, u16)> = [VM1_6, VM2_6]
        .iter()
        .flat_map(|&a| (0..20).map(move |i| (a, 8000 + i)))
        .collect();
    env.install(&[
        svc(80, Proto::Tcp, &backends),
        svc6(80, Proto::Tcp, &backends6),
    ])?;
    let spec = env.services[0].clone();

    let mut obj = EbpfLoader::new()
        .map_max_entries("BENCH_LRU_NEW", capacity)
        .map_max_entries("BENCH_HASH_NEW", capacity)
        .map_max_entries("BENCH_LRU_NEW6", capacity)
        .load(loader::TOOLS_OBJ)
        .context("loading bench object")?;
    for name in [
        "bench_floor",
        "bench_floor_lookup",
        "bench_floor_lru_insert",
        "bench_floor_hash_insert",
        "bench_floor_fib",
        "bench_floor6",
        "bench_floor_lookup6",
        "bench_floor_lru_insert6",
        "bench_restore",
        "bench_restore_new",
    ] {
        let p: &mut Xdp = obj.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut b = Bench { env, obj };

    // Packets of at least 64 bytes (the restore copies 64).
    let sport = 40000;
    let tcp = |dst: (Ipv4Addr, u16), flags| {
        Packet::tcp((CLIENT, sport), dst, flags)
            .macs(CLIENT_MAC, NODE_MAC)
            .payload(&[0; 10])
            .build()
    };
    let syn = tcp((VIP, 80), TCP_SYN);
    let est = tcp((VIP, 80), TCP_ACK | TCP_PSH);
    let tcp6 = |flags| {
        Packet6::tcp((CLIENT6, sport), (VIP6, 80), flags)
            .macs(CLIENT_MAC, NODE_MAC)
            .payload(&[0; 10])
            .build()
    };
    let syn6 = tcp6(TCP_SYN);
    let est6 = tcp6(TCP_ACK | TCP_PSH);
    // For the FIB reference: a packet to a VM, whose route and neighbour the namespace has.
    let fwd = tcp((VM1, 8000), TCP_ACK | TCP_PSH);

    let floor_fd = b.fd("bench_floor")?;
    let vmlb_fd = b.vmlb_fd()?;

    // VMLB_BENCH_PROFILE=new (or =est): nothing but vmlb's new-flow runs, from empty tables
    // (or established runs), for a profiler attached to the process (`perf record -e cpu-clock
    // -a -g`); no table.
    if let Ok(what) = std::env::var("VMLB_BENCH_PROFILE") {
        for _ in 0..RUNS {
            let t = if what == "est" {
                b.open_flow(&syn)?;
                b.set_target(&vmlb_fd, &est)?;
                b.time(xdp(&b.obj, "bench_restore"), &est, repeat, XDP_TX)?
            } else {
                b.set_target(&vmlb_fd, &syn)?;
                b.time(xdp(&b.obj, "bench_restore_new"), &syn, new_repeat, XDP_TX)?
            };
            b.clear_flows()?;
            println!("{what}: {t:.0} ns per packet with the wrapper");
        }
        return Ok(());
    }

    // The lookup reference's entry: the established packet's 5-tuple, present.
    {
        let mut lru: HashMap<_, [u32; 4], [u64; 5]> = b
            .obj
            .map_mut("BENCH_LRU")
            .context("BENCH_LRU")?
            .try_into()?;
        let w = |o: usize| u32::from_ne_bytes(est[o..o + 4].try_into().expect("4 bytes"));
        lru.insert([w(26), w(30), w(34), 6], [0u64; 5], 0)?;
    }

    // The IPv6 lookup reference's entry: the IPv6 established packet's 5-tuple (FlowKey6's
    // layout: addresses, ports, protocol).
    {
        let mut lru: HashMap<_, [u32; 10], [u64; 5]> = b
            .obj
            .map_mut("BENCH_LRU6")
            .context("BENCH_LRU6")?
            .try_into()?;
        let w = |o: usize| u32::from_ne_bytes(est6[o..o + 4].try_into().expect("4 bytes"));
        let key = [
            w(22),
            w(26),
            w(30),
            w(34),
            w(38),
            w(42),
            w(46),
            w(50),
            w(54),
            6,
        ];
        lru.insert(key, [0u64; 5], 0)?;
    }

    // Rounds: every path once per round, back to back, so a slow moment of this shared machine
    // hits a whole round rather than one path; costs and ratios are computed per round and the
    // medians reported. Each round starts from empty tables (vmlb's flows ended by a
    // zero-timeout sweep, the insert references drained) plus the one established flow, so
    // every round's new flows meet the same occupancy.
    let mut rounds: Vec<[f64; 14]> = Vec::new();
    let mut ratios: Vec<[f64; 14]> = Vec::new();
    let mut targets6_own: Vec<(f64, f64)> = Vec::new();
    let mut targets: Vec<(f64, f64)> = Vec::new();
    let mut targets6: Vec<(f64, f64)> = Vec::new();
    let mut wrappers: Vec<(f64, f64)> = Vec::new();
    let mut collisions = 0;
    let mut collisions6 = 0;
    // Index tags shared by two 5-tuples (equal 32-bit hashes): expected about n^2 / 2^33 per
    // run of n new flows, each a `FlowStale` event, not another path.
    let mut tags = 0;
    let (n, n_new) = (repeat as u64, new_repeat as u64);
    let n_new_usize = new_repeat as usize;
    for round in 0..RUNS {
        let reply = b.open_flow(&syn)?;
        b.env.snapshot()?;
        // The floor and the stateless references, direct.
        let floor = b.time(xdp(&b.obj, "bench_floor"), &est, repeat, XDP_TX)?;
        let lookup = b.time(xdp(&b.obj, "bench_floor_lookup"), &est, repeat, XDP_TX)?;
        let fib = b.time(xdp(&b.obj, "bench_floor_fib"), &fwd, repeat, XDP_TX)?;
        // The wrappers around the floor.
        b.set_target(&floor_fd, &est)?;
        let wrap = b.time(xdp(&b.obj, "bench_restore"), &est, repeat, XDP_TX)?;
        b.set_target(&floor_fd, &syn)?;
        let wrap_new = b.time(xdp(&b.obj, "bench_restore_new"), &syn, repeat, XDP_TX)?;
        // The insert references: each iteration must have added exactly one entry.
        let insert = |b: &mut Bench, prog: &str| -> anyhow::Result<f64> {
            let fd = b.fd(prog)?;
            b.set_target(&fd, &syn)?;
            let t = b.time(xdp(&b.obj, "bench_restore_new"), &syn, new_repeat, XDP_TX)?;
            Ok(t)
        };
        let t_lru = insert(&mut b, "bench_floor_lru_insert")?;
        let held = b.drain::<[u64; 8]>("BENCH_LRU_NEW")?;
        ensure!(
            held == n_new_usize,
            "common LRU holds {held} entries after {new_repeat} inserts"
        );
        let t_hash = insert(&mut b, "bench_floor_hash_insert")?;
        let held = b.drain::<[u32; 2]>("BENCH_HASH_NEW")?;
        ensure!(
            held == n_new_usize,
            "plain hash holds {held} entries after {new_repeat} inserts"
        );
        // vmlb: established, reply, new flow (a new client address every iteration).
        b.set_target(&vmlb_fd, &est)?;
        let t_est = b.time(xdp(&b.obj, "bench_restore"), &est, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &reply)?;
        let t_reply = b.time(xdp(&b.obj, "bench_restore"), &reply, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &syn)?;
        let t_new = b.time(xdp(&b.obj, "bench_restore_new"), &syn, new_repeat, XDP_TX)?;

        // Every iteration took the path reported, or the numbers are void. `hop_lookup` (the
        // per-CPU next-hop cache's refreshes) is left out by `delta`: how many a run needs
        // depends on which CPUs the thread ran on. SNAT port collisions are reported.
        let mut d = b.env.delta();
        collisions += d.remove(&Counter::SnatPortCollision).unwrap_or(0);
        tags += d.remove(&Counter::FlowStale).unwrap_or(0);
        expect_path(
            &format!("round {round}: established, reply and new-flow runs"),
            &d,
            &[
                (Counter::FlowHit, n),
                (Counter::ReplyHit, n),
                (Counter::FlowNew, n_new),
                (Counter::TxSameIface, 2 * n + n_new),
            ],
        )?;
        // Occupancy: every new flow of the run is still live, in both structures.
        let live = b.live();
        ensure!(
            live == (n_new_usize + 1, n_new_usize + 1),
            "round {round}: {live:?} live flows (slots, index) after {new_repeat} new flows + 1"
        );
        let ended = b.clear_flows()?;
        ensure!(
            ended == n_new + 1,
            "round {round}: the sweep ended {ended} flows"
        );

        // The IPv6 references.
        let floor6 = b.time(xdp(&b.obj, "bench_floor6"), &est6, repeat, XDP_TX)?;
        let lookup6 = b.time(xdp(&b.obj, "bench_floor_lookup6"), &est6, repeat, XDP_TX)?;
        let fd = b.fd("bench_floor_lru_insert6")?;
        b.set_target(&fd, &syn6)?;
        let t_lru6 = b.time(xdp(&b.obj, "bench_restore_new"), &syn6, new_repeat, XDP_TX)?;
        let held = b.drain_keyed::<[u32; 10], [u64; 14]>("BENCH_LRU_NEW6")?;
        ensure!(
            held == n_new_usize,
            "the IPv6 common LRU holds {held} entries after {new_repeat} inserts"
        );

        // IPv6, the same three paths (vmlb tail-calls vmlb6 for them), from empty tables.
        let reply6 = b.open_flow6(&syn6)?;
        b.env.snapshot()?;
        b.set_target(&vmlb_fd, &est6)?;
        let t_est6 = b.time(xdp(&b.obj, "bench_restore"), &est6, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &reply6)?;
        let t_reply6 = b.time(xdp(&b.obj, "bench_restore"), &reply6, repeat, XDP_TX)?;
        b.set_target(&vmlb_fd, &syn6)?;
        let t_new6 = b.time(xdp(&b.obj, "bench_restore_new"), &syn6, new_repeat, XDP_TX)?;
        let mut d = b.env.delta();
        collisions6 += d.remove(&Counter::SnatPortCollision).unwrap_or(0);
        tags += d.remove(&Counter::FlowStale).unwrap_or(0);
        expect_path(
            &format!("round {round}: IPv6 established, reply and new-flow runs"),
            &d,
            &[
                (Counter::FlowHit, n),
                (Counter::ReplyHit, n),
                (Counter::FlowNew, n_new),
                (Counter::TxSameIface, 2 * n + n_new),
            ],
        )?;
        let live6 = b.live6();
        ensure!(
            live6 == (n_new_usize + 1, n_new_usize + 1),
            "round {round}: {live6:?} live IPv6 flows after {new_repeat} new flows + 1"
        );
        let ended = b.clear_flows()?;
        ensure!(
            ended == n_new + 1,
            "round {round}: the sweep ended {ended} IPv6 flows"
        );

        let costs = [
            floor,
            lookup,
            t_lru - wrap_new + floor,
            t_hash - wrap_new + floor,
            fib,
            t_est - wrap + floor,
            t_reply - wrap + floor,
            t_new - wrap_new + floor,
            t_est6 - wrap + floor,
            t_reply6 - wrap + floor,
            t_new6 - wrap_new + floor,
            floor6,
            lookup6,
            t_lru6 - wrap_new + floor,
        ];
        ratios.push(costs.map(|c| c / floor));
        targets.push((costs[NEW] / costs[LRU_INSERT], costs[EST] / costs[LOOKUP]));
        targets6.push((costs[NEW6] / costs[LRU_INSERT], costs[EST6] / costs[LOOKUP]));
        targets6_own.push((
            costs[NEW6] / costs[LRU_INSERT6],
            costs[EST6] / costs[LOOKUP6],
        ));
        rounds.push(costs);
        wrappers.push((wrap - floor, wrap_new - floor));
    }
    let med = |i: usize, v: &[[f64; 14]]| median(v.iter().map(|r| r[i]).collect());
    let floor = med(0, &rounds);
    let wrap_cost = median(wrappers.iter().map(|w| w.0).collect());
    let wrap_new_cost = median(wrappers.iter().map(|w| w.1).collect());
    let new_vs_lru = median(targets.iter().map(|t| t.0).collect());
    let est_vs_lookup = median(targets.iter().map(|t| t.1).collect());
    let new6_vs_lru = median(targets6.iter().map(|t| t.0).collect());
    let est6_vs_lookup = median(targets6.iter().map(|t| t.1).collect());
    let new6_vs_lru6 = median(targets6_own.iter().map(|t| t.0).collect());
    let est6_vs_lookup6 = median(targets6_own.iter().map(|t| t.1).collect());
    let live = new_repeat + 1;
    let slots = capacity as u64 * SLOTS_PER_FLOW as u64;

    let machine = machine();
    println!(
        "\nvmlb data path, BPF_PROG_TEST_RUN, median of {RUNS} interleaved rounds ({machine})"
    );
    println!(
        "wrapper cost: restore {wrap_cost:.1} ns, restore+new address {wrap_new_cost:.1} ns (subtracted)"
    );
    println!(
        "{:<48} {:>10} {:>8} {:>10}",
        "path", "ns/packet", "x floor", "x ref"
    );
    let mut json_rows = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let (c, r) = (med(i, &rounds), med(i, &ratios));
        let vs = match i {
            NEW => format!("{new_vs_lru:.2} (a)"),
            EST => format!("{est_vs_lookup:.2} (b)"),
            NEW6 => format!("{new6_vs_lru:.2} (a6)"),
            EST6 => format!("{est6_vs_lookup:.2} (b6)"),
            _ => String::new(),
        };
        println!("{name:<48} {c:>10.1} {r:>8.2} {vs:>10}");
        json_rows.push(json!({"path": name, "ns_per_packet": c, "ratio_to_floor": r}));
    }
    let verdict = |r: f64, max: f64| if r <= max { "met" } else { "NOT met" };
    println!(
        "(a) new flow / (floor + common-LRU insert) = {new_vs_lru:.2}, target <= 1.1: {}",
        verdict(new_vs_lru, 1.1)
    );
    println!(
        "(b) established / (floor + LRU lookup) = {est_vs_lookup:.2}, target <= 1.3: {}",
        verdict(est_vs_lookup, 1.3)
    );
    println!(
        "(a6) IPv6 new flow / (floor + common-LRU insert) = {new6_vs_lru:.2}, target <= 1.1: {}",
        verdict(new6_vs_lru, 1.1)
    );
    println!(
        "(b6) IPv6 established / (floor + LRU lookup) = {est6_vs_lookup:.2}, target <= 1.3: {}",
        verdict(est6_vs_lookup, 1.3)
    );
    println!(
        "(the references of (a6)/(b6) are IPv4's: 16-byte keys. Against the IPv6-keyed ones: new \
         flow {new6_vs_lru6:.2} x floor6 + common-LRU insert (40+112 B), established \
         {est6_vs_lookup6:.2} x floor6 + LRU lookup (40-byte key). IPv6 SNAT port collisions: \
         {:.3} per new flow)",
        collisions6 as f64 / (RUNS as f64 * n_new as f64)
    );
    println!(
        "occupancy after each new-flow run: {live} live flows of {capacity} ({:.1}%), \
         {live} of {slots} slots ({:.1}%); SNAT port collisions: {:.3} per new flow; index tag \
         collisions (both families, all rounds): {tags}",
        100.0 * live as f64 / capacity as f64,
        100.0 * live as f64 / slots as f64,
        collisions as f64 / (RUNS as f64 * n_new as f64),
    );
    println!("(repeat {repeat}, new-flow repeat {new_repeat}; medians of per-round ratios)");

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
        "wrapper_ns": wrap_cost,
        "wrapper_new_ns": wrap_new_cost,
        "floor_ns": floor,
        "snat_collisions_new_flow": collisions,
        "index_tag_collisions": tags,
        "flow_capacity": capacity,
        "flow_slots": slots,
        "live_flows_after_new_flow_run": live,
        "occupancy": live as f64 / capacity as f64,
        "targets": {
            "new_flow_vs_common_lru_insert": new_vs_lru,
            "new_flow_vs_common_lru_insert_max": 1.1,
            "established_vs_lru_lookup": est_vs_lookup,
            "established_vs_lru_lookup_max": 1.3,
            "ipv6_new_flow_vs_common_lru_insert": new6_vs_lru,
            "ipv6_established_vs_lru_lookup": est6_vs_lookup,
            "ipv6_new_flow_vs_ipv6_common_lru_insert": new6_vs_lru6,
            "ipv6_established_vs_ipv6_lru_lookup": est6_vs_lookup6,
        },
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
