//! `cargo xtask bench scale`: vmlb at size. Loads the program with room for 4096 services,
//! 65,536 backends and 1,048,576 flows, installs 4096 services of 16 backends each through the
//! reconciler, then opens 1,000,000 TCP flows (a SYN each from a new client, through
//! BPF_PROG_TEST_RUN) that all stay live, and reports the kernel's memory for every map
//! (`bpftool map show`: bytes_memlock). Prints a table and writes target/bench/scale.json. Root.
//!
//! Environment: VMLB_SCALE_SERVICES (4096), VMLB_SCALE_BACKENDS (65536), VMLB_SCALE_FLOWS
//! (1000000), VMLB_SCALE_FLOW_ENTRIES (1048576), VMLB_SCALE_RING (1021).

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};
use vmlb_common::Counter;
use vmlb_tests::{
    bench::{self, env_or},
    fixture::*,
    netns::run,
    packet::{Packet, TCP_SYN},
};
use vmlb_user::{dataplane::loader, model::Proto};

/// Every map of the loaded programs (each once): (name, type, max_entries, bytes_memlock).
fn maps_of(prog_ids: &[u32]) -> anyhow::Result<Vec<(String, String, u64, u64)>> {
    let mut ids = std::collections::BTreeSet::new();
    for prog_id in prog_ids {
        let out = run(
            "bpftool",
            &["prog", "show", "id", &prog_id.to_string(), "-j"],
        )?;
        let prog: Value = serde_json::from_slice(&out.stdout)?;
        let of_prog = prog["map_ids"].as_array().context("no map_ids")?;
        ids.extend(of_prog.iter().filter_map(Value::as_u64));
    }
    let mut maps = Vec::new();
    for id in ids {
        let out = run("bpftool", &["map", "show", "id", &id.to_string(), "-j"])?;
        let m: Value = serde_json::from_slice(&out.stdout)?;
        maps.push((
            m["name"].as_str().unwrap_or("?").to_string(),
            m["type"].as_str().unwrap_or("?").to_string(),
            m["max_entries"].as_u64().unwrap_or(0),
            m["bytes_memlock"].as_u64().unwrap_or(0),
        ));
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.3));
    Ok(maps)
}

fn main() -> anyhow::Result<()> {
    let n_services: u32 = env_or("VMLB_SCALE_SERVICES", 4096u32).clamp(1, 60_000);
    let n_backends: u32 = env_or("VMLB_SCALE_BACKENDS", 65_536u32).max(n_services);
    let n_flows: u32 = env_or("VMLB_SCALE_FLOWS", 1_000_000u32);
    let flow_entries: u32 = env_or("VMLB_SCALE_FLOW_ENTRIES", 1_048_576u32).max(n_flows);
    let ring: u32 = env_or("VMLB_SCALE_RING", 1021u32);
    let machine = bench::machine();

    let sizes = loader::Sizes {
        flows: Some(flow_entries),
        flows6: None,
        maglev: Some(n_services * ring),
        // Id 0 is never used.
        services: Some(n_services + 1),
        backends: Some(n_backends + 1),
        pins: None,
        ..Default::default()
    };
    let t = Instant::now();
    let mut e = Env::with_sizes(sizes).context("loading at size (needs root)")?;
    let load_s = t.elapsed().as_secs_f64();

    // Service k: VIP port 1 + k; backends k, k + S, k + 2S, ... spread over the fixture's three
    // resolved VM addresses with distinct ports, so every (address, port) is a new backend.
    let per = n_backends / n_services;
    let vms = [VM1, VM2, VM3];
    let specs: Vec<_> = (0..n_services)
        .map(|k| {
            let bes: Vec<_> = (0..per)
                .map(|j| {
                    let b = k + j * n_services;
                    be(vms[(b % 3) as usize], 1024 + (b / 3) as u16)
                })
                .collect();
            let mut s = svc(1 + k as u16, Proto::Tcp, &bes);
            s.ring_size = ring;
            s
        })
        .collect();
    let t = Instant::now();
    e.install(&specs).context("installing the services")?;
    let install_s = t.elapsed().as_secs_f64();
    eprintln!(
        "loaded in {load_s:.2} s; {n_services} services x {per} backends installed in {install_s:.2} s"
    );

    // Flows: client 10.64.0.0 + i, source port 40000, to service i % S.
    let mut pkt = Packet::tcp((Ipv4Addr::new(10, 64, 0, 0), 40000), (VIP, 1), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    let t = Instant::now();
    let mut refused = 0u64;
    for i in 0..n_flows {
        pkt[26..30].copy_from_slice(&(0x0a40_0000u32 + i).to_be_bytes());
        pkt[36..38].copy_from_slice(&(1 + (i % n_services) as u16).to_be_bytes());
        if e.run(&pkt).0 != XDP_TX {
            refused += 1;
        }
    }
    let insert_s = t.elapsed().as_secs_f64();
    let d = e.delta();
    let count = |c: Counter| d.get(&c).copied().unwrap_or(0);
    let live = e.maps.live_flows().len();
    // The entry point's maps and the IPv6 programs' (tail-called; their tables have the
    // default IPv6 size, `--flow6-entries` 65,536 flows).
    let mut prog_ids = Vec::new();
    for name in [
        vmlb_common::PROGRAM_NAME,
        vmlb_common::PROGRAM6_NAME,
        vmlb_common::PROGRAM6_ICMP_NAME,
    ] {
        prog_ids.push(e.ebpf.program(name).context(name)?.info()?.id());
    }
    let maps = maps_of(&prog_ids)?;
    let total: u64 = maps.iter().map(|m| m.3).sum();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);

    println!(
        "\nvmlb at size ({}): {n_services} services, {} backends, {live} live flows\n",
        bench::machine_line(&machine),
        per * n_services
    );
    println!("| map | type | max_entries | memory (MiB) |");
    println!("|---|---|---|---|");
    for (name, ty, max, bytes) in &maps {
        println!("| {name} | {ty} | {max} | {:.1} |", mib(*bytes));
    }
    println!("| **all maps** | | | **{:.1}** |", mib(total));
    println!(
        "\n{n_flows} SYNs in {insert_s:.1} s ({:.2} µs each through BPF_PROG_TEST_RUN, syscall \
         included); {refused} refused; flow_new {}, drop_flow_table_full {}, drop_snat_exhausted {}",
        insert_s * 1e6 / n_flows as f64,
        count(Counter::FlowNew),
        count(Counter::DropFlowTableFull),
        count(Counter::DropSnatExhausted),
    );
    println!(
        "target: all maps ≤ 256 MiB with 1M flows: {:.1} MiB, {}",
        mib(total),
        if mib(total) <= 256.0 { "met" } else { "MISSED" }
    );
    let doc = json!({
        "machine": machine,
        "services": n_services,
        "backends": per * n_services,
        "ring_size": ring,
        "flow_entries": flow_entries,
        "flows_opened": n_flows,
        "flows_live": live,
        "refused": refused,
        "counters": {
            "flow_new": count(Counter::FlowNew),
            "drop_flow_table_full": count(Counter::DropFlowTableFull),
            "drop_snat_exhausted": count(Counter::DropSnatExhausted),
        },
        "load_s": load_s,
        "install_s": install_s,
        "insert_s": insert_s,
        "maps": maps.iter().map(|(n, t, m, b)| json!({"name": n, "type": t,
            "max_entries": m, "bytes_memlock": b})).collect::<Vec<_>>(),
        "total_bytes_memlock": total,
        "target_total_mib_max": 256,
    });
    let path = bench::write_json(&bench::out_dir(), "scale.json", &doc)?;
    println!("wrote {}", path.display());
    ensure!(
        live as u64 == u64::from(n_flows) && refused == 0,
        "{live} of {n_flows} flows live, {refused} refused"
    );
    Ok(())
}
