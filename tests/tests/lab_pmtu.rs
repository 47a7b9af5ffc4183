//! ICMP through the VIP in the lab: ping to the VIP, and path-MTU discovery through it
//! (`LabOptions::pmtu`: a far client behind a 1280-byte link, `lab::Far` explains the design).
//!
//! `the_pmtu_path_needs_discovery_and_works_without_vmlb` checks the topology itself: a VM
//! fetched directly learns the 1280 path MTU from the router. `pmtu_through_the_vip` and
//! `ping_to_the_vip` need vmlb's ICMP data path (echo answered in XDP; fragmentation-needed
//! addressed to the VIP translated for the backend).
//!
//! Needs root, apache2, curl, ping and ethtool.

use vmlb_tests::{
    daemon::{service_entry, LabDaemon},
    lab::{
        curl, Httpd, Lab, LabOptions, Ns, FAR_CLIENT_ADDR, NARROW_MTU, NODE_ADDR, VIP, VM1_ADDR,
        VM2_ADDR,
    },
};

/// An 8 KiB text page: six full-sized segments at MSS 1460, each too big for the narrow link.
fn big_page() -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < 8192 - 64 {
        s += &format!("line {i:05} of the page that needs path-MTU discovery ..........\n");
        i += 1;
    }
    s
}

fn pmtu_lab() -> Lab {
    Lab::with(LabOptions {
        pmtu: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the PMTU lab: {e:#}"))
}

fn serve_big_page(lab: &Lab) -> Vec<Httpd> {
    lab.vms
        .iter()
        .map(|vm| {
            let h = Httpd::start(&vm.ns, vm.name, vm.addr).expect("httpd");
            h.write_doc("big.txt", big_page().as_bytes())
                .expect("writing the big page");
            h
        })
        .collect()
}

/// The path MTU `ns` has cached towards `to` (`ip route get`), if any.
fn cached_mtu(ns: &Ns, to: std::net::Ipv4Addr) -> Option<u32> {
    let out = ns.ip(&["route", "get", &to.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

#[test]
fn the_pmtu_path_needs_discovery_and_works_without_vmlb() {
    let lab = pmtu_lab();
    let _servers = serve_big_page(&lab);
    let far = lab.far.as_ref().expect("a PMTU lab");
    assert_eq!(cached_mtu(&lab.vms[0].ns, FAR_CLIENT_ADDR), None);
    // vm1 answers the far client directly, from its own address: the router's
    // fragmentation-needed reaches vm1 itself, which lowers its path MTU and resends.
    let body = curl(&far.client, &format!("http://{VM1_ADDR}/big.txt"), 5)
        .unwrap_or_else(|e| panic!("direct fetch: {e:#}\n{}", lab.describe()));
    assert!(
        body == big_page(),
        "a different body of {} bytes",
        body.len()
    );
    assert_eq!(
        cached_mtu(&lab.vms[0].ns, FAR_CLIENT_ADDR),
        Some(NARROW_MTU),
        "vm1 never learned the narrow link's MTU: the path did not need discovery\n{}",
        lab.describe()
    );
}

#[test]
fn pmtu_through_the_vip() {
    let lab = pmtu_lab();
    let _servers = serve_big_page(&lab);
    let far = lab.far.as_ref().expect("a PMTU lab");
    let daemon = LabDaemon::start(&lab, &service_entry(&[VM1_ADDR, VM2_ADDR]), &[])
        .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()));
    // The node reaches the far client through the VLAN's router (and so knows the router's
    // MAC, as a node that routes anything does).
    lab.node
        .exec(&["ping", "-c", "1", "-W", "1", &FAR_CLIENT_ADDR.to_string()])
        .unwrap_or_else(|e| panic!("node -> far client: {e:#}\n{}", lab.describe()));

    // Through the VIP the router's ICMP goes to the VIP; only its translation for the VM lets
    // the VM lower its path MTU towards the SNAT address. Four new connections, so both VMs
    // are likely to answer one.
    for i in 0..4 {
        match curl(&far.client, &format!("http://{VIP}/big.txt?t=pmtu-{i}"), 5) {
            Ok(body) if body == big_page() => {}
            Ok(body) => panic!("fetch {i}: a different body of {} bytes", body.len()),
            Err(e) => panic!(
                "fetch {i} through the VIP: {e:#}\n{}{}",
                daemon.report(&lab),
                lab.describe()
            ),
        }
    }
    let learned: Vec<_> = lab
        .vms
        .iter()
        .map(|vm| (vm.name, cached_mtu(&vm.ns, NODE_ADDR)))
        .collect();
    assert!(
        learned.iter().any(|(_, m)| *m == Some(NARROW_MTU)),
        "no VM learned the path MTU towards the SNAT address: {learned:?}"
    );
}

#[test]
fn ping_to_the_vip() {
    let lab = Lab::new().expect("the lab");
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).expect("httpd"))
        .collect();
    let daemon = LabDaemon::start(&lab, &service_entry(&[VM1_ADDR, VM2_ADDR]), &[])
        .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()));
    match lab
        .client
        .exec(&["ping", "-c", "3", "-W", "1", "-i", "0.2", &VIP.to_string()])
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("3 received"), "{text}");
        }
        Err(e) => panic!(
            "ping {VIP}: {e:#}\n{}{}",
            daemon.report(&lab),
            lab.describe()
        ),
    }
}
