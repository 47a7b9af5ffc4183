//! ServiceEntry YAML -> services: what is accepted, and that every error names file, line, field.

use std::{net::IpAddr, path::Path, time::Duration};

use vmlb_user::{
    model::{
        BackendSpec, ConfiguredService, HealthKind, HealthSpec, Mode, NodeConfig, Proto,
        ServiceSpec,
    },
    source::file::{self as config, ConfigError},
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node() -> NodeConfig {
    NodeConfig {
        snat: Some("10.10.1.125".parse().unwrap()),
        ..Default::default()
    }
}

fn be(addr: &str, port: u16, weight: u32) -> BackendSpec {
    BackendSpec {
        addr: ip(addr),
        port,
        weight,
        up: true,
    }
}

/// Inline YAML written indented in the test: drops the first newline and the common indent, so
/// line 1 is the first line after `r#"`.
fn yaml(s: &str) -> String {
    let s = s.strip_prefix('\n').unwrap_or(s);
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect()
}

fn parse(text: &str) -> Result<Vec<ConfiguredService>, Vec<String>> {
    config::parse_str(text, Path::new("t.yaml"), &node())
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

/// Line numbers in the comments are what the error tests below rely on.
fn base() -> String {
    yaml(
        r#"
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: web
          annotations:
            example.com/owner: team-a
        spec:
          hosts: [web.example]
          addresses: [10.0.0.1]
          ports:
          - number: 80
            name: http
            protocol: HTTP
          - number: 443
            name: https
            protocol: TLS
            targetPort: 8443
          resolution: STATIC
          location: MESH_EXTERNAL
          endpoints:
          - address: 10.0.1.1
          - address: 10.0.1.2
            ports: {https: 9443}
            weight: 0
            labels: {app: web}
        "#,
    )
}
// Lines: 1 apiVersion, 3 metadata, 6 annotation, 7 spec, 9 addresses, 11 ports[0], 13 its
// protocol, 18 resolution, 21 endpoints[0], 22 endpoints[1], 23 its ports, 24 its weight.

/// `base()` with one exact line replaced (so the line numbers stay).
fn with(from: &str, to: &str) -> String {
    let b = base();
    assert!(b.contains(from), "{from:?} not in base");
    b.replacen(from, to, 1)
}

#[test]
fn base_parses_with_target_ports_overrides_and_draining_endpoint() {
    let services = parse(&base()).unwrap();
    let [http, https] = &services[..] else {
        panic!("{services:#?}")
    };
    assert_eq!(
        *http,
        ConfiguredService {
            spec: ServiceSpec {
                vip: ip("10.0.0.1"),
                port: 80,
                proto: Proto::Tcp,
                mode: Default::default(),
                snat: vec![ip("10.10.1.125")],
                snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
                ring_size: vmlb_common::maglev::DEFAULT_RING_SIZE,
                backends: vec![be("10.0.1.1", 80, 1), be("10.0.1.2", 80, 0)],
            },
            name: "web/http".into(),
            hosts: vec!["web.example".into()],
            location: Some("MESH_EXTERNAL".into()),
            file: "t.yaml".into(),
            line: 11,
            health: HealthSpec::default(),
        }
    );
    // targetPort for the first endpoint, its own `ports.https` for the second; weight 0 kept.
    assert_eq!(
        https.spec.backends,
        vec![be("10.0.1.1", 8443, 1), be("10.0.1.2", 9443, 0)]
    );
    assert_eq!(
        (https.name.as_str(), https.spec.port, https.line),
        ("web/https", 443, 14)
    );
    // Windows line ends change nothing.
    assert_eq!(parse(&base().replace('\n', "\r\n")).unwrap(), services);
}

#[test]
fn deploy_example_is_the_seed_with_a_vip() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/serviceentry-vms.yaml");
    let services = config::load(&[path], &node()).unwrap();
    let summary: Vec<_> = services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.spec.vip,
                s.spec.port,
                s.spec.proto,
                s.spec.snat[0],
            )
        })
        .collect();
    let vip = ip("10.10.1.128");
    let snat = ip("10.10.1.125");
    assert_eq!(
        summary,
        [
            ("vms/https", vip, 443, Proto::Tcp, snat),
            ("vms/http", vip, 80, Proto::Tcp, snat)
        ]
    );
    assert_eq!(
        services[1].spec.backends,
        vec![be("10.10.1.2", 80, 1), be("10.10.1.3", 80, 1)]
    );
    assert_eq!(services[0].hosts, ["vms.vlan-1512.org"]);
    assert_eq!(services[0].location.as_deref(), Some("MESH_EXTERNAL"));
}

#[test]
fn multi_document_file_skips_other_kinds_and_reads_every_version() {
    let text = yaml(
        r#"
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: vms}
        spec:
          hosts: ["vms.vlan-1512.org"]
          http: [{route: [{destination: {host: vms.vlan-1512.org, port: {number: 80}}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: a}
        spec:
          addresses: [10.0.0.1/32]
          ports: [{number: 53, protocol: UDP, name: dns}, {number: 8080, protocol: TCP}]
          resolution: STATIC
          endpoints: [{address: 10.0.1.1}]
        ---
        # an empty document
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: b}
        spec:
          addresses: [10.0.0.2, 10.0.0.3]
          ports: [{number: 80, protocol: http}]
          resolution: STATIC
          endpoints: [{address: 10.0.1.2}]
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.istio.io/v1alpha3
          kind: ServiceEntry
          metadata: {name: c}
          spec:
            addresses: [10.0.0.4]
            ports: [{number: 80, protocol: HTTP, name: http}]
            resolution: STATIC
            endpoints: [{address: 10.0.1.3}]
        "#,
    );
    let services = parse(&text).unwrap();
    let got: Vec<_> = services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.spec.vip.to_string(),
                s.spec.port,
                s.spec.proto,
                s.line,
            )
        })
        .collect();
    let want = [
        ("a/dns", "10.0.0.1".to_string(), 53, Proto::Udp, 13),
        ("a/8080", "10.0.0.1".to_string(), 8080, Proto::Tcp, 13),
        ("b/80@10.0.0.2", "10.0.0.2".to_string(), 80, Proto::Tcp, 24),
        ("b/80@10.0.0.3", "10.0.0.3".to_string(), 80, Proto::Tcp, 24),
        ("c/http", "10.0.0.4".to_string(), 80, Proto::Tcp, 36),
    ];
    assert_eq!(got, want);
}

#[test]
fn annotations_override_the_defaults() {
    let text = with(
        "    example.com/owner: team-a\n",
        concat!(
            "    {vmlb.io/snat-address: 10.10.1.126, vmlb.io/mode: snat, vmlb.io/maglev-size: '251',",
            " vmlb.io/health-check: http, vmlb.io/health-path: /healthz, vmlb.io/health-interval: 5s,",
            " vmlb.io/health-timeout: 500ms, vmlb.io/health-rise: 1, vmlb.io/health-fall: '4'}\n",
        ),
    )
    .replace("  annotations:\n    {", "  annotations: {");
    let services = config::parse_str(&text, Path::new("t.yaml"), &NodeConfig::default()).unwrap();
    let s = &services[0];
    assert_eq!(
        (s.spec.snat.clone(), s.spec.ring_size),
        (vec![ip("10.10.1.126")], 251)
    );
    let health = HealthSpec {
        kind: HealthKind::Http {
            path: "/healthz".into(),
        },
        interval: Duration::from_secs(5),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 4,
    };
    assert_eq!(s.health, health);
    let none = with("example.com/owner: team-a", "vmlb.io/health-check: none");
    assert_eq!(parse(&none).unwrap()[0].health.kind, HealthKind::None);
}

/// Each error class: (line to replace, replacement, expected Display).
#[test]
fn every_error_names_file_line_and_field() {
    let ann = "    example.com/owner: team-a";
    let cases = [
        ("apiVersion: networking.istio.io/v1\n", "apiVersion: networking.istio.io/v2\n",
         r#"t.yaml:1: apiVersion: "networking.istio.io/v2" is not a ServiceEntry version vmlb reads (networking.istio.io/v1 or v1beta1)"#),
        ("  addresses: [10.0.0.1]", "  exportTo: ['.']",
         "t.yaml:7: spec.addresses: vmlb needs at least one VIP address to answer for (e.g. addresses: [10.10.1.128])"),
        ("  addresses: [10.0.0.1]", "  addresses: []",
         "t.yaml:9: spec.addresses: vmlb needs at least one VIP address to answer for (e.g. addresses: [10.10.1.128])"),
        ("  addresses: [10.0.0.1]", "  addresses: ['fd00::/64']",
         r#"t.yaml:9: spec.addresses[0]: "fd00::/64": a VIP is a single address (/128), not a range"#),
        ("  addresses: [10.0.0.1]", "  addresses: ['fe80::1']",
         "t.yaml:9: spec.addresses[0]: fe80::1 cannot be a VIP"),
        ("  - address: 10.0.1.2", "  - address: 'fd00::2'",
         "t.yaml:22: spec.endpoints[1].address: IPv6 endpoint fd00::2 has no IPv6 VIP in spec.addresses to serve: a VIP is served only by endpoints of its own address family"),
        ("  addresses: [10.0.0.1]", "  addresses: [10.0.0.0/24]",
         r#"t.yaml:9: spec.addresses[0]: "10.0.0.0/24": a VIP is a single address (/32), not a range"#),
        ("    protocol: HTTP\n", "    protocol: SCTP\n",
         "t.yaml:13: spec.ports[0].protocol: protocol SCTP is not supported (HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, MONGO or UDP)"),
        ("  - number: 80", "  - number: eighty",
         "t.yaml:11: spec.ports[0].number: expected a number from 1 to 65535, found eighty"),
        ("    targetPort: 8443", "    targetPort: [8443]",
         "t.yaml:17: spec.ports[1].targetPort: expected a number from 1 to 65535, found a list"),
        ("    name: http\n", "    name: https\n",
         r#"t.yaml:15: spec.ports[1].name: port name "https" is already used by spec.ports[0].name"#),
        ("  resolution: STATIC", "  resolution: DNS",
         "t.yaml:18: spec.resolution: resolution DNS is not supported: vmlb balances over static endpoint addresses; use STATIC"),
        ("  resolution: STATIC", "  # no resolution",
         "t.yaml:7: spec.resolution: resolution NONE (the default) is not supported: vmlb balances over static endpoint addresses; use STATIC"),
        ("  - address: 10.0.1.2", "  - address: 10.10.1.300",
         r#"t.yaml:22: spec.endpoints[1].address: invalid IP address "10.10.1.300""#),
        ("  - address: 10.0.1.2", "  - address: vm2.example.org",
         r#"t.yaml:22: spec.endpoints[1].address: "vm2.example.org" is not an IP address: with resolution STATIC, vmlb needs the VM's address, not a name"#),
        ("  - address: 10.0.1.1", "  - 10.0.1.1",
         "t.yaml:21: spec.endpoints[0]: expected a mapping, found 10.0.1.1"),
        ("  - address: 10.0.1.2", "  - network: n1",
         "t.yaml:22: spec.endpoints[1].address: required field is missing"),
        ("    ports: {https: 9443}", "    ports: {htps: 9443}",
         r#"t.yaml:23: spec.endpoints[1].ports.htps: no port named "htps" in spec.ports (http, https)"#),
        ("    weight: 0", "    weight: -1",
         "t.yaml:24: spec.endpoints[1].weight: expected a number from 0 to 4294967295, found -1"),
        ("  - address: 10.0.1.2\n    ports: {https: 9443}", "  - address: 10.0.1.1\n    ports: {https: 9443}",
         "t.yaml:22: spec.endpoints[1]: 10.0.1.1:80 is listed twice (also spec.endpoints[0])"),
        ("  location: MESH_EXTERNAL", "  ports: []",
         "t.yaml:19: spec.ports: duplicate key"),
        (ann, "    vmlb.io/maglev-szie: '251'",
         r#"t.yaml:6: metadata.annotations."vmlb.io/maglev-szie": unknown vmlb annotation; known: vmlb.io/snat-address, vmlb.io/snat-ports, vmlb.io/mode, vmlb.io/maglev-size, vmlb.io/health-check, vmlb.io/health-path, vmlb.io/health-interval, vmlb.io/health-timeout, vmlb.io/health-rise, vmlb.io/health-fall"#),
        (ann, "    vmlb.io/maglev-size: '1000'",
         r#"t.yaml:6: metadata.annotations."vmlb.io/maglev-size": Maglev size 1000 is not allowed (one of [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 65537, 131071])"#),
        (ann, "    vmlb.io/mode: bridge",
         r#"t.yaml:6: metadata.annotations."vmlb.io/mode": unknown mode "bridge" (snat or dnat)"#),
        (ann, "    vmlb.io/snat-address: 10.10.1",
         r#"t.yaml:6: metadata.annotations."vmlb.io/snat-address": invalid IP address "10.10.1""#),
        (ann, "    vmlb.io/health-check: icmp",
         r#"t.yaml:6: metadata.annotations."vmlb.io/health-check": unknown health check "icmp" (tcp, http or none)"#),
        (ann, "    vmlb.io/health-path: /healthz",
         r#"t.yaml:6: metadata.annotations."vmlb.io/health-path": only used with vmlb.io/health-check: http"#),
        (ann, "    vmlb.io/health-interval: soon",
         r#"t.yaml:6: metadata.annotations."vmlb.io/health-interval": invalid duration "soon" (e.g. 2s, 500ms): expected number at 0"#),
        (ann, "    vmlb.io/health-timeout: 0s",
         r#"t.yaml:6: metadata.annotations."vmlb.io/health-timeout": must be longer than 0"#),
        (ann, "    vmlb.io/health-fall: '0'",
         r#"t.yaml:6: metadata.annotations."vmlb.io/health-fall": expected a number from 1 to 4294967295, found string "0""#),
        ("  hosts: [web.example]", "  hosts: [web.example",
         "t.yaml:9: invalid YAML: illegal placement of ':' indicator"),
    ];
    let mut failures = Vec::new();
    for (from, to, want) in cases {
        let got = parse(&with(from, to)).expect_err(to);
        if got != [want] {
            failures.push(format!("{to:?}:\n  want {want}\n  got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dnat_mode_keeps_no_snat_and_needs_no_snat_address() {
    let text = with("    example.com/owner: team-a", "    vmlb.io/mode: dnat");
    let no_snat = NodeConfig::default();
    let services = config::parse_str(&text, Path::new("t.yaml"), &no_snat).unwrap();
    for s in &services {
        assert_eq!(s.spec.mode, Mode::Dnat, "{}", s.name);
        assert!(s.spec.snat.is_empty(), "{}", s.name);
    }
    // A SNAT setting on a dnat service is a mistake, named at its line.
    let text = with(
        "    example.com/owner: team-a",
        "    vmlb.io/mode: dnat\n    vmlb.io/snat-address: 10.10.1.125",
    );
    assert_eq!(
        parse(&text).unwrap_err(),
        [
            r#"t.yaml:7: metadata.annotations."vmlb.io/snat-address": not used with vmlb.io/mode: dnat (the VMs see the client's address)"#
        ]
    );
}

/// Replies of a dnat service are recognised by their source: one endpoint, one dnat service.
#[test]
fn an_endpoint_shared_by_two_dnat_services_is_refused_at_the_second() {
    let second = base()
        .replace("name: web", "name: web2")
        .replace("10.0.0.1", "10.0.0.2");
    let text = format!(
        "{}---\n{}",
        with("    example.com/owner: team-a", "    vmlb.io/mode: dnat"),
        second.replace("example.com/owner: team-a", "vmlb.io/mode: dnat")
    );
    let errs = parse(&text).unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("t.yaml:38: spec.ports[0]: endpoint 10.0.1.1:80/tcp already serves the dnat service web/http (t.yaml:11)"),
        "{errs:#?}"
    );
    // The same endpoints in a snat and a dnat service are fine: their replies differ.
    let text = format!(
        "{}---\n{}",
        with("    example.com/owner: team-a", "    vmlb.io/mode: dnat"),
        second
    );
    assert_eq!(parse(&text).unwrap().len(), 4);
}

#[test]
fn a_service_entry_without_a_spec_mapping_is_one_error() {
    let head = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\n";
    let err = parse(&format!("{head}spec: 5\n")).unwrap_err();
    assert_eq!(err, ["t.yaml:4: spec: expected a mapping, found 5"]);
    let err = parse(&format!("{head}# no spec\n")).unwrap_err();
    assert_eq!(err, ["t.yaml:1: spec: required field is missing"]);
}

#[test]
fn missing_snat_points_at_the_annotation_to_set() {
    let text = base();
    let err = config::parse_str(&text, Path::new("t.yaml"), &NodeConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"t.yaml:5: metadata.annotations."vmlb.io/snat-address": no IPv4 SNAT address for the IPv4 VIPs: pass --snat-addr (the node's IPv4 address on the VLAN) or list one in this annotation"#
    );
}

#[test]
fn all_errors_of_a_document_are_collected_in_line_order() {
    let text = with("    protocol: HTTP\n", "    protocol: SCTP\n")
        .replace("  - address: 10.0.1.2", "  - address: 10.0.1.x")
        .replace("example.com/owner: team-a", "vmlb.io/mode: bridge");
    let lines: Vec<_> = parse(&text)
        .unwrap_err()
        .iter()
        .map(|e| e.split(':').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(lines, ["6", "13", "22"]);
}

#[test]
fn the_same_vip_port_in_two_files_names_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&a, base()).unwrap();
    // Another name, same 10.0.0.1:80/TCP.
    std::fs::write(&b, base().replace("name: web", "name: web2")).unwrap();
    let err = config::load(&[a.clone(), b.clone()], &node()).unwrap_err();
    let [e1, e2] = &err.0[..] else {
        panic!("{err}")
    };
    let want = |port: u16, line: usize, name: &str| ConfigError {
        file: b.clone(),
        line: Some(line),
        field: format!("spec.ports[{}]", (port == 443) as u8),
        message: format!(
            "10.0.0.1:{port}/tcp is defined twice: also by {name} at {}:{line}",
            a.display()
        ),
    };
    assert_eq!(
        (e1, e2),
        (&want(80, 11, "web/http"), &want(443, 14, "web/https"))
    );
    // Same name for a different VIP is also ambiguous (logs, metrics).
    std::fs::write(&b, base().replace("10.0.0.1", "10.0.0.9")).unwrap();
    let err = config::load(&[a.clone(), b], &node())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("service name web/http is defined twice: also by web/http at"),
        "{err}"
    );
}

#[test]
fn errors_of_every_file_are_reported_including_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, with("  resolution: STATIC", "  resolution: DNS")).unwrap();
    let missing = dir.path().join("nope.yaml");
    let err = config::load(&[missing.clone(), a.clone()], &node()).unwrap_err();
    let got: Vec<_> = err
        .0
        .iter()
        .map(|e| (e.file.clone(), e.line, e.field.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (missing.clone(), None, String::new()),
            (a, Some(18), "spec.resolution".into())
        ]
    );
    assert_eq!(
        err.0[0].to_string(),
        format!("{}: no such file or directory", missing.display())
    );
    assert!(config::expand_paths(&[missing]).is_err());
}

#[test]
fn directories_give_their_yaml_files_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two = base()
        .replace("10.0.0.1", "10.0.0.2")
        .replace("name: web", "name: two");
    for (name, text) in [
        ("b.yml", two.as_str()),
        ("a.yaml", &base()),
        ("c.txt", "bad: ["),
        (".x.yaml", "bad: ["),
    ] {
        std::fs::write(d.join(name), text).unwrap();
    }
    std::fs::create_dir(d.join("sub.yaml")).unwrap();
    std::fs::write(d.join("sub.yaml/d.yaml"), "bad: [").unwrap();
    let files = config::expand_paths(&[d.to_path_buf()]).unwrap();
    assert_eq!(files, [d.join("a.yaml"), d.join("b.yml")]);
    // A file named twice (directly and through its directory) is read once.
    let services = config::load(&[d.join("a.yaml"), d.to_path_buf()], &node()).unwrap();
    let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web/http", "web/https", "two/http", "two/https"]);
    assert_eq!(services[2].file, d.join("b.yml"));
}

#[test]
fn snat_pool_and_port_range_annotations() {
    let text = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: pool
  annotations:
    vmlb.io/snat-address: 10.10.1.125, 10.10.1.126
    vmlb.io/snat-ports: 1024-65535
spec:
  addresses: [10.10.1.128]
  ports: [{number: 80, name: http, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.10.1.2}]
"#;
    let s = &parse(text).expect("valid")[0];
    assert_eq!(s.spec.snat, vec![ip("10.10.1.125"), ip("10.10.1.126")]);
    assert_eq!(s.spec.snat_ports, (1024, 65535));
    for (bad, want) in [
        ("vmlb.io/snat-ports: 80-90", "must start at 1024"),
        ("vmlb.io/snat-ports: 2000", "not a range"),
        (
            "vmlb.io/snat-address: 10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5",
            "at most 4 per service",
        ),
        (
            "vmlb.io/snat-address: 10.0.0.1,nope",
            "invalid IP address \"nope\"",
        ),
    ] {
        let t = text.replace(
            "    vmlb.io/snat-address: 10.10.1.125, 10.10.1.126\n    vmlb.io/snat-ports: 1024-65535",
            &format!("    {bad}"),
        );
        let e = parse(&t).expect_err(bad).join("\n");
        assert!(e.contains(want), "{bad}: {e}");
    }
}

/// `base()` with a second VIP and endpoint of the other family. Lines as in `base()`.
fn dual_stack() -> String {
    with(
        "  addresses: [10.0.0.1]",
        "  addresses: [10.0.0.1, 'fd00::1']",
    )
    .replacen("  - address: 10.0.1.2\n", "  - address: 'fd00:1::2'\n", 1)
}

fn node6() -> NodeConfig {
    NodeConfig {
        snat6: Some("fd00::125".parse().unwrap()),
        ..node()
    }
}

fn parse6(text: &str) -> Result<Vec<ConfiguredService>, Vec<String>> {
    config::parse_str(text, Path::new("t.yaml"), &node6())
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

/// The family rule: each VIP is served by its own family's endpoints, with its own family's
/// SNAT address.
#[test]
fn a_dual_stack_entry_serves_each_vip_with_its_own_family() {
    let services = parse6(&dual_stack()).expect("valid");
    assert_eq!(services.len(), 4, "2 VIPs x 2 ports");
    for s in &services {
        let v4 = s.spec.vip.is_ipv4();
        assert!(!s.spec.backends.is_empty(), "{}", s.name);
        assert!(
            s.spec.backends.iter().all(|b| b.addr.is_ipv4() == v4),
            "{}: {:?}",
            s.name,
            s.spec.backends
        );
        let want: IpAddr = if v4 { "10.10.1.125" } else { "fd00::125" }
            .parse()
            .unwrap();
        assert_eq!(s.spec.snat, vec![want], "{}", s.name);
    }
    let https6 = services
        .iter()
        .find(|s| s.spec.vip == ip("fd00::1") && s.spec.port == 443)
        .unwrap();
    assert_eq!(https6.name, "web/https@fd00::1");
    // The endpoint's per-port override and weight apply in its own family.
    assert_eq!(https6.spec.backends, [be("fd00:1::2", 9443, 0)]);
}

#[test]
fn a_vip_without_an_endpoint_of_its_family_is_refused_at_the_vip() {
    // Both endpoints IPv6 under an IPv4 and an IPv6 VIP: the IPv4 VIP could only drop.
    let text = with(
        "  addresses: [10.0.0.1]",
        "  addresses: [10.0.0.1, 'fd00::1']",
    )
    .replacen("  - address: 10.0.1.1\n", "  - address: 'fd00:1::1'\n", 1)
    .replacen("  - address: 10.0.1.2\n", "  - address: 'fd00:1::2'\n", 1);
    assert_eq!(
        parse6(&text).unwrap_err(),
        ["t.yaml:9: spec.addresses[0]: IPv4 VIP 10.0.0.1 has no IPv4 endpoint: a VIP is served only by endpoints of its own address family"]
    );
}

#[test]
fn an_ipv6_vip_needs_an_ipv6_snat_address() {
    let e = parse(&dual_stack()).unwrap_err();
    assert_eq!(
        e,
        [
            r#"t.yaml:5: metadata.annotations."vmlb.io/snat-address": no IPv6 SNAT address for the IPv6 VIPs: pass --snat-addr with the node's IPv6 address on the VLAN or list one in this annotation"#
        ]
    );
    // The annotation may name one of each family; each VIP takes its own.
    let text = dual_stack().replacen(
        "    example.com/owner: team-a",
        "    vmlb.io/snat-address: 10.10.1.126, fd00::126",
        1,
    );
    for s in parse(&text).expect("valid") {
        let want = if s.spec.vip.is_ipv4() {
            "10.10.1.126"
        } else {
            "fd00::126"
        };
        assert_eq!(s.spec.snat, vec![ip(want)], "{}", s.name);
    }
}

#[test]
fn dnat_on_an_ipv6_vip_follows_the_ipv4_rules() {
    let text = dual_stack().replacen("    example.com/owner: team-a", "    vmlb.io/mode: dnat", 1);
    let services = parse6(&text).expect("valid");
    assert_eq!(services.len(), 4, "2 VIPs x 2 ports");
    for s in &services {
        assert_eq!(s.spec.mode, Mode::Dnat, "{}", s.name);
        assert!(s.spec.snat.is_empty(), "{}", s.name);
    }
    // A SNAT setting on a dnat service is a mistake, named at its line.
    let text = dual_stack().replacen(
        "    example.com/owner: team-a",
        "    vmlb.io/mode: dnat\n    vmlb.io/snat-address: fd00::126",
        1,
    );
    assert_eq!(
        parse6(&text).unwrap_err(),
        [
            r#"t.yaml:7: metadata.annotations."vmlb.io/snat-address": not used with vmlb.io/mode: dnat (the VMs see the client's address)"#
        ]
    );
    // One IPv6 endpoint, one dnat service: refused at the second, as IPv4's.
    let first = dual_stack().replacen("    example.com/owner: team-a", "    vmlb.io/mode: dnat", 1);
    let second = first
        .replace("name: web", "name: web2")
        .replace("10.0.0.1", "10.0.0.2")
        .replace("'fd00::1'", "'fd00::2'")
        .replace("10.0.1.1", "10.0.1.9");
    let errs = parse6(&format!("{first}---\n{second}")).unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("t.yaml:38: spec.ports[0]: endpoint [fd00:1::2]:80/tcp already serves the dnat service web/http@fd00::1 (t.yaml:11)"),
        "{errs:#?}"
    );
}
