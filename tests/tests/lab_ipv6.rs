//! IPv6 through the VIP in the lab's IPv6 variant (`LabOptions::ipv6`: ULA addresses on the
//! same topology): `curl -6` to the IPv6 VIP answered by both VMs, which see the node's IPv6
//! SNAT address; no static neighbour entry anywhere (the client learns the VIP's MAC from vmlb's
//! neighbour advertisement, the node the VMs' through real NDP); ping6 to the VIP; and path-MTU
//! discovery at IPv6's minimum MTU of 1280 through the VIP.
//!
//! Needs root, apache2, curl, ping and ethtool.

use vmlb_tests::{
    daemon::{service_entry6, LabDaemon},
    lab::{
        assert_logged_from, curl, until_both_answer, Httpd, Lab, LabOptions, Ns, FAR_CLIENT_ADDR6,
        NARROW_MTU, NODE_ADDR6, VIP6,
    },
};

fn v6_lab(pmtu: bool) -> Lab {
    Lab::with(LabOptions {
        ipv6: true,
        pmtu,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the IPv6 lab: {e:#}"))
}

/// The seed's ServiceEntry on the IPv6 VIP, over the VMs' IPv6 addresses.
fn entry6(lab: &Lab) -> String {
    let vms: Vec<_> = lab
        .vms
        .iter()
        .map(|vm| vm.addr6.expect("an IPv6 lab VM"))
        .collect();
    service_entry6(&vms)
}

fn start(lab: &Lab) -> LabDaemon {
    LabDaemon::start(lab, &entry6(lab), &["--snat-addr", &NODE_ADDR6.to_string()])
        .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()))
}

/// `ip -6 neigh` of a namespace: no entry may be permanent (nothing faked).
fn no_static_neighbours(ns: &Ns) {
    let out = ns.ip(&["-6", "neigh", "show"]).expect("ip -6 neigh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("PERMANENT"), "{}: {text}", ns.name());
}

fn url(path: &str) -> String {
    format!("http://[{VIP6}]{path}")
}

#[test]
fn curl_6_through_the_vip_reaches_both_vms_from_the_snat_address() {
    let lab = v6_lab(false);
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start_vm(vm).expect("httpd"))
        .collect();
    let daemon = start(&lab);
    let answers = until_both_answer(
        &lab.client,
        |i| url(&format!("/?t=v6-{i}")),
        || format!("{}{}", daemon.report(&lab), lab.describe()),
    );
    assert_eq!(answers.len(), 2, "both VMs answer: {answers:?}");
    assert_logged_from(&servers, "t=v6-", NODE_ADDR6);
    // The client learned the VIP through neighbour discovery, answered by vmlb.
    let out = lab
        .client
        .ip(&["-6", "neigh", "show", &VIP6.to_string()])
        .expect("ip -6 neigh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(vmlb_tests::lab::NODE_MAC),
        "the client's neighbour entry for the VIP: {text:?}"
    );
    for ns in [&lab.client, &lab.node] {
        no_static_neighbours(ns);
    }
}

#[test]
fn ping6_to_the_vip() {
    let lab = v6_lab(false);
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start_vm(vm).expect("httpd"))
        .collect();
    let daemon = start(&lab);
    let vip = VIP6.to_string();
    match lab
        .client
        .exec(&["ping", "-6", "-c", "3", "-W", "1", "-i", "0.2", &vip])
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("3 received"), "{text}");
        }
        Err(e) => panic!(
            "ping -6 {vip}: {e:#}\n{}{}",
            daemon.report(&lab),
            lab.describe()
        ),
    }
}

/// An 8 KiB text page: full-sized segments, each too big for the 1280-byte link.
fn big_page() -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < 8192 - 64 {
        s += &format!("line {i:05} of the page that needs path-MTU discovery ..........\n");
        i += 1;
    }
    s
}

/// The path MTU `ns` has cached towards `to` (`ip -6 route get`), if any.
fn cached_mtu6(ns: &Ns, to: std::net::Ipv6Addr) -> Option<u32> {
    let out = ns.ip(&["-6", "route", "get", &to.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// The far client behind the 1280-byte link fetches a page whose segments do not fit: the
/// router's packet-too-big goes to the VIP, and only vmlb's translation lets the VM lower its
/// path MTU towards the SNAT address to IPv6's minimum.
#[test]
fn pmtu_at_the_ipv6_minimum_through_the_vip() {
    let lab = v6_lab(true);
    let _servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| {
            let h = Httpd::start_vm(vm).expect("httpd");
            h.write_doc("big.txt", big_page().as_bytes())
                .expect("writing the big page");
            h
        })
        .collect();
    let far = lab.far.as_ref().expect("the PMTU path");
    let daemon = start(&lab);
    for i in 0..4 {
        match curl(&far.client, &url(&format!("/big.txt?t=pmtu6-{i}")), 5) {
            Ok(body) if body == big_page() => {}
            Ok(body) => panic!("fetch {i}: a different body of {} bytes", body.len()),
            Err(e) => panic!(
                "fetch {i} through the VIP from {FAR_CLIENT_ADDR6}: {e:#}\n{}{}",
                daemon.report(&lab),
                lab.describe()
            ),
        }
    }
    let learned: Vec<_> = lab
        .vms
        .iter()
        .map(|vm| (vm.name, cached_mtu6(&vm.ns, NODE_ADDR6)))
        .collect();
    assert!(
        learned.iter().any(|(_, m)| *m == Some(NARROW_MTU)),
        "no VM learned the 1280-byte path MTU towards the SNAT address: {learned:?}\n{}",
        daemon.report(&lab)
    );
}
