//! dnat mode in the lab: a far client (behind the VLAN's router, `LabOptions::pmtu`'s topology)
//! fetches through the VIP of a `vmlb.io/mode: dnat` service, and the VMs' access logs show the
//! client's own address. The VMs route the clients' network through the node, as dnat needs
//! (README, "dnat or snat"); in the full-NAT control they would see the node's SNAT address.
//!
//! The same on the IPv6 lab (`LabOptions::ipv6`): the far client's own IPv6 address in the logs.
//!
//! Needs root, apache2 and curl.

use vmlb_tests::{
    daemon::{service_entry6, LabDaemon},
    lab::{
        assert_logged_from, until_both_answer, Httpd, Lab, LabOptions, FAR_CLIENT_ADDR,
        FAR_CLIENT_ADDR6, FAR_NET, FAR_NET6, NODE_ADDR, NODE_ADDR6, VIP, VIP6,
    },
};

fn dnat_entry(lab: &Lab) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: vms\n  \
         annotations:\n    vmlb.io/mode: dnat\nspec:\n  hosts:\n  - vms.vlan-1512.org\n  \
         addresses:\n  - {VIP}\n  ports:\n  - number: 80\n    name: http\n    protocol: TCP\n  \
         resolution: STATIC\n  endpoints:\n"
    );
    for vm in &lab.vms {
        y += &format!("  - address: \"{}\"\n", vm.addr);
    }
    y
}

#[test]
fn dnat_service_shows_the_client_address_to_the_vms() {
    let lab = Lab::with(LabOptions {
        pmtu: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the lab: {e:#}"));
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr).expect("httpd"))
        .collect();
    // dnat: the VMs' route to the clients is the node.
    for vm in &lab.vms {
        vm.ns
            .ip(&["route", "replace", FAR_NET, "via", &NODE_ADDR.to_string()])
            .expect("routing the clients through the node");
    }
    let far = lab.far.as_ref().expect("the far client");
    let daemon = LabDaemon::start(&lab, &dnat_entry(&lab), &[])
        .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()));

    let answers = until_both_answer(
        &far.client,
        |i| format!("http://{VIP}/?t=dnat-{i}"),
        || format!("{}{}", daemon.report(&lab), lab.describe()),
    );
    // Each answer came back from the VIP: the client's curl would not take a SYN-ACK from a
    // VM's address, so every reply was translated on its way through the node.
    assert_eq!(answers.len(), 2, "both VMs answer: {answers:?}");
    assert_logged_from(&servers, "t=dnat-", FAR_CLIENT_ADDR);
}

/// The seed's ServiceEntry on the IPv6 VIP in dnat mode, over the VMs' IPv6 addresses.
fn dnat_entry6(lab: &Lab) -> String {
    let vms: Vec<_> = lab
        .vms
        .iter()
        .map(|vm| vm.addr6.expect("an IPv6 lab VM"))
        .collect();
    let y = service_entry6(&vms);
    let named = "  name: vms6\n";
    assert!(y.contains(named), "{y}");
    y.replacen(
        named,
        "  name: vms6\n  annotations:\n    vmlb.io/mode: dnat\n",
        1,
    )
}

#[test]
fn dnat_ipv6_service_shows_the_client_address_to_the_vms() {
    let lab = Lab::with(LabOptions {
        ipv6: true,
        pmtu: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the IPv6 lab: {e:#}"));
    let servers: Vec<Httpd> = lab
        .vms
        .iter()
        .map(|vm| Httpd::start_vm(vm).expect("httpd"))
        .collect();
    // dnat: the VMs' route to the clients is the node (their default is the VLAN's router).
    for vm in &lab.vms {
        vm.ns
            .ip(&[
                "-6",
                "route",
                "replace",
                FAR_NET6,
                "via",
                &NODE_ADDR6.to_string(),
            ])
            .expect("routing the clients through the node");
    }
    let far = lab.far.as_ref().expect("the far client");
    // No SNAT address: a dnat service needs none.
    let daemon = LabDaemon::start(&lab, &dnat_entry6(&lab), &[])
        .unwrap_or_else(|e| panic!("starting vmlb: {e:#}\n{}", lab.describe()));

    let answers = until_both_answer(
        &far.client,
        |i| format!("http://[{VIP6}]/?t=dnat6-{i}"),
        || format!("{}{}", daemon.report(&lab), lab.describe()),
    );
    // Every reply came back from the VIP (curl takes no SYN-ACK from a VM's address).
    assert_eq!(answers.len(), 2, "both VMs answer: {answers:?}");
    assert_logged_from(&servers, "t=dnat6-", FAR_CLIENT_ADDR6);
}
