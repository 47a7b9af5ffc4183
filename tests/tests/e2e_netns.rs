//! End to end: curl from a client namespace to the VIP, through the real vmlb XDP program attached
//! in native mode to the node's VLAN-side veth, to two VMs running Apache httpd. Checks the
//! balancing, the SNAT as the VMs see it, and that the program's counters tell the same story.
//! Needs root, apache2, curl and ethtool (scripts/bootstrap.sh installs them).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use vmlb_common::{Counter, DEFAULT_MAGLEV_ENTRIES, PROGRAM_NAME, SNAT_PORT_MAX, SNAT_PORT_MIN};
use vmlb_user::{
    dataplane::{loader, maps::BpfMaps},
    model::{BackendSpec, Proto, ServiceSpec},
    reconcile::Reconciler,
};

use vmlb_tests::lab::{curl, Httpd, Lab, NODE_ADDR, NODE_DEV, VIP};

const REQUESTS: usize = 40;
/// With 40 connections split by Maglev over two equal backends, fewer than 5 on one side has a
/// probability around 1e-7.
const MIN_SHARE: usize = 5;

#[test]
fn curl_through_vip_reaches_both_vms_with_snat_source() {
    let lab = Lab::new().expect("building the lab namespaces");
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr))
        .collect::<anyhow::Result<_>>()
        .expect("starting apache2 in the VM namespaces");

    let mut ebpf = loader::load(Default::default()).expect("loading vmlb");
    let mut maps = BpfMaps::from_ebpf(&mut ebpf).expect("taking the maps");
    let node_mac: Vec<u8> = vmlb_tests::lab::NODE_MAC
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let node_ifindex = lab.node.ifindex(vmlb_tests::lab::NODE_DEV).unwrap();
    maps.init_config(node_ifindex, node_mac.try_into().unwrap())
        .expect("writing CONFIG");
    let spec = ServiceSpec {
        vip: VIP.into(),
        port: 80,
        proto: Proto::Tcp,
        mode: Default::default(),
        snat: vec![NODE_ADDR.into()],
        snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
        ring_size: 16381,
        backends: lab
            .vms
            .iter()
            .map(|vm| BackendSpec {
                addr: vm.addr.into(),
                port: 80,
                weight: 1,
                up: true,
            })
            .collect(),
    };
    let mut reconciler = Reconciler::new(DEFAULT_MAGLEV_ENTRIES);
    reconciler
        .apply(std::slice::from_ref(&spec), &mut maps)
        .expect("installing the service");
    attach_native(&mut ebpf, &lab).expect("attaching vmlb in native (driver) mode");
    // What the daemon does: managed neighbour entries for the backends, so the node resolves
    // the VMs itself (the lab has no static entries).
    resolve_backends(&lab).expect("resolving the VMs from the node");

    if let Err(e) = check(&lab, &servers, &maps, &reconciler, &spec) {
        eprintln!("{}", report(&lab, &servers, &maps, &reconciler, &spec));
        panic!("{e:#}");
    }
    // `ebpf` (the XDP link), the servers, then the namespaces are dropped here, in that order.
}

/// Attach while this thread is inside the node namespace: aya resolves the interface name there.
fn attach_native(ebpf: &mut Ebpf, lab: &Lab) -> anyhow::Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program missing")?
        .try_into()?;
    let _in_node = lab.node.enter()?;
    prog.attach(NODE_DEV, XdpMode::Driver)
        .context("native XDP on the node's veth")?;
    Ok(())
}

fn check(
    lab: &Lab,
    servers: &[Httpd],
    maps: &BpfMaps,
    reconciler: &Reconciler,
    spec: &ServiceSpec,
) -> anyhow::Result<()> {
    // Sequential curls: each is a new connection from a new ephemeral port, so a new flow.
    let url = format!("http://{VIP}/");
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..REQUESTS {
        match curl(&lab.client, &url, 3) {
            Ok(body) => *answers.entry(body.trim().to_string()).or_default() += 1,
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
        // A broken path would otherwise cost 3 s per remaining request.
        if failures.len() == 3 {
            break;
        }
    }
    println!("answers: {answers:?}");
    ensure!(
        failures.is_empty(),
        "requests failed:\n{}",
        failures.join("\n")
    );
    for s in servers {
        let n = answers.get(&s.name).copied().unwrap_or(0);
        ensure!(
            n >= MIN_SHARE,
            "{} answered {n} of {REQUESTS} requests: {answers:?}",
            s.name
        );
    }
    ensure!(
        answers.values().sum::<usize>() == REQUESTS && answers.len() == servers.len(),
        "unexpected bodies: {answers:?}"
    );

    // Apache logs after sending the response: wait (bounded) until every request is logged.
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = || {
        servers
            .iter()
            .map(|s| s.access_lines().len())
            .sum::<usize>()
    };
    while logged() < REQUESTS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let snat_ports = SNAT_PORT_MIN..=SNAT_PORT_MAX;
    for s in servers {
        let lines = s.access_lines();
        ensure!(
            lines.len() == answers[&s.name],
            "{} logged {} requests but answered {}",
            s.name,
            lines.len(),
            answers[&s.name]
        );
        for line in &lines {
            let mut fields = line.split(' ');
            let addr: Option<Ipv4Addr> = fields.next().and_then(|a| a.parse().ok());
            let port: Option<u16> = fields.next().and_then(|p| p.parse().ok());
            ensure!(
                addr == Some(NODE_ADDR) && port.is_some_and(|p| snat_ports.contains(&p)),
                "{} saw a client other than {NODE_ADDR}:{snat_ports:?}: {line}",
                s.name
            );
        }
    }

    // The program's view: one new flow per connection, replies reverse-NATed, nothing dropped
    // or left to the kernel, and per-backend flows matching what each VM answered.
    let counters: BTreeMap<Counter, u64> = maps.counters()?.into_iter().collect();
    let unbalanced =
        |c: Counter| c.is_drop() || matches!(c, Counter::PassNoNeigh | Counter::PassFibFailed);
    ensure!(
        counters[&Counter::FlowNew] == REQUESTS as u64
            && counters[&Counter::FlowHit] > 0
            && counters[&Counter::ReplyHit] > 0
            && counters.iter().all(|(&c, &n)| n == 0 || !unbalanced(c)),
        "want flow_new = {REQUESTS}, flow_hit and reply_hit > 0, no drop or pass_no_neigh / \
         pass_fib_failed"
    );
    let key = spec.key();
    let svc = reconciler.service(key).context("service not installed")?;
    let st = maps.service_stats(svc.id())?;
    ensure!(
        st.packets > 0 && st.reply_packets > 0 && st.new_flows == REQUESTS as u64,
        "service stats: {st:?}"
    );
    for (vm, s) in lab.vms.iter().zip(servers) {
        let id = reconciler
            .backend_id(key, vm.addr, 80)
            .context("backend id")?;
        let be = maps.backend_stats(id)?;
        ensure!(
            be.new_flows == answers[&s.name] as u64,
            "{} backend stats {be:?}",
            vm.name
        );
    }
    Ok(())
}

fn report(
    lab: &Lab,
    servers: &[Httpd],
    maps: &BpfMaps,
    reconciler: &Reconciler,
    spec: &ServiceSpec,
) -> String {
    let mut out = String::from("=== vmlb counters\n");
    match maps.counters() {
        Ok(cs) => {
            for (c, v) in cs.into_iter().filter(|(_, v)| *v != 0) {
                out += &format!("{} = {v}\n", c.name());
            }
        }
        Err(e) => out += &format!("{e:#}\n"),
    }
    let key = spec.key();
    if let Some(svc) = reconciler.service(key) {
        out += &format!("service {svc:?}: {:?}\n", maps.service_stats(svc.id()));
    }
    for vm in &lab.vms {
        if let Some(id) = reconciler.backend_id(key, vm.addr, 80) {
            out += &format!("backend {} ({id}): {:?}\n", vm.name, maps.backend_stats(id));
        }
    }
    out += &format!("flows: {}\n", maps.live_flows().len());
    out += &lab.describe();
    for s in servers {
        out += &s.logs();
    }
    out
}

/// Keep managed neighbour entries for the VMs on the node's interface and wait until the kernel
/// has resolved them (at most 5 s).
fn resolve_backends(lab: &Lab) -> anyhow::Result<()> {
    let _in_node = lab.node.enter()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut keeper = vmlb_user::neigh::NeighKeeper::for_interface(NODE_DEV).await?;
        let vms: Vec<std::net::IpAddr> = lab.vms.iter().map(|v| v.addr.into()).collect();
        keeper.sync(vms.clone()).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = keeper.status().await?;
            if st.iter().all(|b| b.state.is_usable()) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "VMs not resolved: {st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
