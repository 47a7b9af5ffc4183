//! The trunk variant of the lab (`LabOptions::trunk_vlan`): the wire between the segment and the
//! node carries 802.1Q-tagged frames, built from tc BPF (`lab::Trunk` explains the stand-ins).
//!
//! The first two tests check the plumbing without vmlb: an XDP program on the node's interface
//! (`xdp_vlan_census`, where vmlb's program would sit) counts the tags in the frame bytes while
//! the node's own stack pings and fetches from a VM across the trunk; and the plain lab, as a
//! control, shows no tag. The third runs the daemon with `--vlan 1512` on the trunk and expects
//! the VIP to be served; it needs vmlb's 802.1Q data path.
//!
//! Needs root, apache2, curl and ethtool.

use std::collections::BTreeMap;

use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use vmlb_tests::{
    daemon::{service_entry, LabDaemon},
    lab::{
        curl, tools_with_vid, trunk_stat, trunk_stat::*, Httpd, Lab, LabOptions, NODE_ADDR,
        NODE_DEV, VIP, VM1_ADDR, VM2_ADDR,
    },
};

const VID: u16 = 1512;

fn trunk_lab() -> Lab {
    Lab::with(LabOptions {
        trunk_vlan: Some(VID),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the trunk lab: {e:#}"))
}

/// Frames the trunk ports dropped so far. The tests count from when the lab is built: the
/// namespaces' own early frames (IPv6 DAD, MLD) may race the trunk's set-up.
fn trunk_drops(lab: &Lab) -> u64 {
    let trunk = lab.trunk.as_ref().expect("a trunk lab");
    trunk.stat(DROPPED).expect("trunk counters")
}

/// `xdp_vlan_census` on the node's interface, in native mode as vmlb attaches; dropping the
/// object detaches it.
fn census_on_node(lab: &Lab) -> Ebpf {
    let mut obj = tools_with_vid(VID).expect("tools object");
    let prog: &mut Xdp = obj
        .program_mut("xdp_vlan_census")
        .expect("xdp_vlan_census")
        .try_into()
        .unwrap();
    prog.load().expect("loading xdp_vlan_census");
    let _in_node = lab.node.enter().expect("entering the node");
    prog.attach(NODE_DEV, XdpMode::Driver)
        .expect("attaching xdp_vlan_census");
    obj
}

fn census(obj: &Ebpf) -> BTreeMap<&'static str, u64> {
    [
        ("trunk_vid", CENSUS_TRUNK_VID),
        ("other_tag", CENSUS_OTHER_TAG),
        ("untagged", CENSUS_UNTAGGED),
    ]
    .into_iter()
    .map(|(name, i)| (name, trunk_stat(obj, i).expect("reading TRUNK_STATS")))
    .collect()
}

/// The node's own traffic across the trunk: ARP, ping and HTTP from its VLAN address, as its
/// neighbour resolution and health checks do.
fn node_talks_to_vm1(lab: &Lab) {
    let ping = lab.node.exec(&[
        "ping",
        "-c",
        "3",
        "-W",
        "1",
        "-i",
        "0.2",
        &VM1_ADDR.to_string(),
    ]);
    if let Err(e) = ping {
        panic!("the node cannot ping vm1: {e:#}\n{}", lab.describe());
    }
    let body = curl(&lab.node, &format!("http://{VM1_ADDR}/"), 2)
        .unwrap_or_else(|e| panic!("the node cannot fetch from vm1: {e:#}\n{}", lab.describe()));
    assert_eq!(body.trim(), "vm1");
}

#[test]
fn the_trunk_carries_tagged_frames_and_the_node_stack_still_works() {
    let lab = trunk_lab();
    let dropped_before = trunk_drops(&lab);
    let obj = census_on_node(&lab);
    let _vm1 = Httpd::start(&lab.vms[0].ns, "vm1", VM1_ADDR).expect("httpd on vm1");

    node_talks_to_vm1(&lab);
    // The client, on the untagged side of the segment, reaches the node across the trunk too.
    lab.client
        .exec(&["ping", "-c", "1", "-W", "1", &NODE_ADDR.to_string()])
        .unwrap_or_else(|e| panic!("client -> node: {e:#}\n{}", lab.describe()));

    // Every frame the node's XDP hook saw carried the trunk's tag in its bytes: ARP replies,
    // ICMP echo replies and TCP from vm1 (at least 3 + 1 + 3), and the client's ping.
    let seen = census(&obj);
    assert!(seen["trunk_vid"] >= 7, "{seen:?}\n{}", lab.describe());
    assert_eq!(
        (seen["other_tag"], seen["untagged"]),
        (0, 0),
        "{seen:?}\n{}",
        lab.describe()
    );
    let trunk = lab.trunk.as_ref().expect("a trunk lab");
    let stat = |i| trunk.stat(i).expect("reading the trunk's counters");
    assert!(
        stat(PUSHED) >= seen["trunk_vid"] && stat(POPPED) > 0,
        "pushed {} popped {}",
        stat(PUSHED),
        stat(POPPED)
    );
    assert_eq!(stat(DROPPED) - dropped_before, 0, "{}", lab.describe());
}

/// The control: without the trunk the same hook sees no tag, so the census above counts what
/// the trunk did.
#[test]
fn without_the_trunk_the_node_sees_untagged_frames() {
    let lab = Lab::new().expect("the lab");
    let obj = census_on_node(&lab);
    let _vm1 = Httpd::start(&lab.vms[0].ns, "vm1", VM1_ADDR).expect("httpd on vm1");
    node_talks_to_vm1(&lab);
    let seen = census(&obj);
    assert!(seen["untagged"] >= 7, "{seen:?}");
    assert_eq!((seen["trunk_vid"], seen["other_tag"]), (0, 0), "{seen:?}");
}

/// vmlb on a trunk, serving VLAN 1512: the client's ARP for the VIP and its connections arrive
/// tagged; replies and the NATed frames towards the VMs must leave with the tag (the segment's
/// trunk port drops untagged frames and counts them, `dropped`).
#[test]
fn trunk_lab_serves_the_vip_on_its_vlan() {
    let lab = trunk_lab();
    let dropped_before = trunk_drops(&lab);
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).expect("httpd"))
        .collect();
    let daemon = LabDaemon::start(
        &lab,
        &service_entry(&[VM1_ADDR, VM2_ADDR]),
        &["--vlan", &VID.to_string()],
    )
    .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()));

    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    // New connections until both VMs have answered: 2^-19 that 20 miss one of two equal VMs.
    for i in 0..20 {
        match curl(&lab.client, &format!("http://{VIP}/?t=trunk-{i}"), 2) {
            Ok(body) => *answers.entry(body.trim().to_string()).or_default() += 1,
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
        if failures.len() == 3 || answers.len() == 2 {
            break;
        }
    }
    let dropped = trunk_drops(&lab) - dropped_before;
    if !failures.is_empty() || answers.len() != 2 || dropped != 0 {
        panic!(
            "answers {answers:?}, failures {failures:#?}, untagged/other-VLAN frames dropped by \
             the trunk ports: {dropped}\n{}{}",
            daemon.report(&lab),
            lab.describe()
        );
    }
    assert!(answers.contains_key("vm1") && answers.contains_key("vm2"));
}
