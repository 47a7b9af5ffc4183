//! `vmlb config check`: parse and validate ServiceEntry files without touching the data path.

use std::{fmt::Write as _, path::PathBuf};

use serde_json::json;

use super::{
    exit,
    output::{table, write_doc, Output},
    ExitError,
};
use crate::{
    model::{ConfiguredService, HealthKind},
    source::{self, file as config},
};

#[derive(clap::Args, Debug)]
#[command(after_long_help = after_help())]
pub struct CheckArgs {
    /// ServiceEntry files, or directories whose *.yaml and *.yml files are read (sorted, not
    /// recursive). Documents of other kinds are skipped with a warning.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Warnings fail the check too (exit status 4): documents of other kinds, empty files
    /// and directories, services whose traffic would be dropped, tight Maglev space.
    #[arg(long)]
    pub strict: bool,
    /// The node's address on the VLAN, used as SNAT source by services without a
    /// vmlb.io/snat-address annotation (as `vmlb run --snat-addr`): once per family.
    #[arg(long, value_name = "IP")]
    pub snat_addr: Vec<std::net::IpAddr>,
    /// A node config file (`snatAddress:`, `vlan:`), as `vmlb run --node-config`; flags win.
    #[arg(long, value_name = "FILE")]
    pub node_config: Option<PathBuf>,
    /// Entries of the MAGLEV array to check the tables against (as `vmlb run`).
    #[arg(long, default_value_t = vmlb_common::DEFAULT_MAGLEV_ENTRIES)]
    pub maglev_entries: u32,
    /// Service ids to check against (as `vmlb run`).
    #[arg(long, default_value_t = vmlb_common::MAX_SERVICES)]
    pub max_services: u32,
    /// Backend ids to check against (as `vmlb run`).
    #[arg(long, default_value_t = vmlb_common::MAX_BACKENDS)]
    pub max_backends: u32,
    /// How to print the result: the files and services as tables, or one JSON / YAML document
    /// (`{"files", "services", "warnings", "errors"}`).
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// What `--help` adds below the flags: how services are derived, and the annotations.
fn after_help() -> String {
    let mut help = String::from(
        "Each (VIP, port) of a ServiceEntry is one service: VIPs from spec.addresses, backends \
         from spec.endpoints (IPv4, resolution: STATIC), backend port = the endpoint's \
         ports.<port name>, else the port's targetPort, else its number. Endpoints of weight 0 \
         are draining. A service is named <namespace>/<name>/<port name or number> (without \
         metadata.namespace: <name>/<port>). vmlb's options are metadata.annotations:\n",
    );
    for (name, meaning) in config::ANNOTATIONS {
        let _ = writeln!(help, "  {name:<24} {meaning}");
    }
    help.push_str(
        "\nEvery file read is listed with what it contributed. Errors and warnings are printed \
         to stderr as FILE:LINE: FIELD: MESSAGE. Exit status: 0 valid, 3 errors, 4 warnings \
         with --strict.",
    );
    help
}

/// The machine-readable result.
#[derive(serde::Serialize)]
struct Doc {
    files: Vec<config::FileReport>,
    services: Vec<serde_json::Value>,
    warnings: Vec<String>,
    errors: Vec<String>,
}

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    check_to(
        &args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// `check`, writing the result to `out` and the diagnostics to `err` (tests capture both).
pub fn check_to(
    args: &CheckArgs,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let node = source::node::load(args.node_config.as_deref(), &args.snat_addr, None)?;
    let capacity = config::Capacity {
        ring_entries: args.maglev_entries,
        services: args.max_services,
        backends: args.max_backends,
    };
    let report = config::read(&args.paths, &node, capacity);
    for w in &report.warnings {
        writeln!(err, "warning: {w}")?;
    }
    for e in &report.errors {
        writeln!(err, "error: {e}")?;
    }
    let services: &[ConfiguredService] = if report.errors.is_empty() {
        &report.services
    } else {
        &[]
    };
    if args.output.is_table() {
        write_tables(out, &report.files, services)?;
    } else {
        let doc = Doc {
            files: report.files.clone(),
            services: services.iter().map(to_json).collect(),
            warnings: report.warnings.iter().map(ToString::to_string).collect(),
            errors: report.errors.iter().map(ToString::to_string).collect(),
        };
        write_doc(out, args.output, &doc)?;
    }
    let files = report.files.len();
    let (errors, warnings) = (report.errors.len(), report.warnings.len());
    if errors > 0 {
        return Err(ExitError::error(
            exit::CONFIG_INVALID,
            format!("{errors} error(s), {warnings} warning(s) in the configuration"),
        ));
    }
    if warnings > 0 && args.strict {
        return Err(ExitError::error(
            exit::CONFIG_WARNINGS,
            format!("{warnings} warning(s) in the configuration (--strict)"),
        ));
    }
    let note = if warnings > 0 {
        format!("ok, {warnings} warning(s)")
    } else {
        "ok".into()
    };
    if args.output.is_table() {
        writeln!(
            out,
            "{} service(s) from {files} file(s): {note}",
            services.len()
        )?;
    }
    Ok(())
}

fn write_tables(
    out: &mut dyn std::io::Write,
    files: &[config::FileReport],
    services: &[ConfiguredService],
) -> anyhow::Result<()> {
    let cells: Vec<Vec<String>> = files
        .iter()
        .map(|f| {
            vec![
                f.file.display().to_string(),
                f.documents.to_string(),
                f.service_entries.to_string(),
                f.services.to_string(),
                f.skipped.to_string(),
                f.errors.to_string(),
                f.warnings.to_string(),
            ]
        })
        .collect();
    let head = [
        "FILE",
        "DOCUMENTS",
        "SERVICEENTRIES",
        "SERVICES",
        "SKIPPED",
        "ERRORS",
        "WARNINGS",
    ];
    table(out, &head, &cells)?;
    if !services.is_empty() {
        writeln!(out)?;
        write!(out, "{}", services_table(services))?;
    }
    Ok(())
}

fn vip(s: &ConfiguredService) -> String {
    let proto = s.spec.proto.name();
    format!("{}:{}/{proto}", s.spec.vip, s.spec.port)
}

fn health(s: &ConfiguredService) -> String {
    let h = &s.health;
    let kind = match &h.kind {
        HealthKind::None => return "none".into(),
        HealthKind::Tcp => "tcp".to_string(),
        HealthKind::Http { path } => format!("http {path}"),
    };
    let (every, timeout) = (
        humantime::format_duration(h.interval),
        humantime::format_duration(h.timeout),
    );
    format!(
        "{kind} every {every} timeout {timeout} rise {} fall {}",
        h.rise, h.fall
    )
}

fn services_table(services: &[ConfiguredService]) -> String {
    let header = ["SERVICE", "VIP", "BACKENDS", "SNAT", "MAGLEV", "HEALTH"].map(String::from);
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            let backends: Vec<_> = s
                .spec
                .backends
                .iter()
                .map(|b| format!("{}:{} w{}", b.addr, b.port, b.weight))
                .collect();
            [
                s.name.clone(),
                vip(s),
                if backends.is_empty() {
                    "-".into()
                } else {
                    backends.join(", ")
                },
                match s.spec.mode {
                    crate::model::Mode::Dnat => "dnat".to_string(),
                    crate::model::Mode::Snat => s
                        .spec
                        .snat
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                },
                s.spec.ring_size.to_string(),
                health(s),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[c].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<_> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn to_json(s: &ConfiguredService) -> serde_json::Value {
    let h = &s.health;
    let (check, path) = match &h.kind {
        HealthKind::None => ("none", None),
        HealthKind::Tcp => ("tcp", None),
        HealthKind::Http { path } => ("http", Some(path)),
    };
    json!({
        "name": s.name,
        "vip": s.spec.vip,
        "port": s.spec.port,
        "proto": s.spec.proto.name(),
        "mode": s.spec.mode.name(),
        "snat": s.spec.snat,
        "maglev_size": s.spec.ring_size,
        "backends": s.spec.backends.iter().map(|b| json!({
            "addr": b.addr, "port": b.port, "weight": b.weight,
        })).collect::<Vec<_>>(),
        "health": {
            "check": check,
            "path": path,
            "interval_ms": h.interval.as_millis() as u64,
            "timeout_ms": h.timeout.as_millis() as u64,
            "rise": h.rise,
            "fall": h.fall,
        },
        "hosts": s.hosts,
        "location": s.location,
        "file": s.file,
        "line": s.line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_service_with_its_backends() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/serviceentry-vms.yaml"
        ))
        .unwrap();
        let node = crate::model::NodeConfig {
            snat: Some("10.10.1.125".parse().unwrap()),
            ..Default::default()
        };
        let services = config::parse_str(&text, "vms.yaml".as_ref(), &node).unwrap();
        let out = services_table(&services);
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("SERVICE"), "{out}");
        assert!(lines[2].starts_with("vms/http "), "{out}");
        for part in [
            "10.10.1.128:80/tcp",
            "10.10.1.2:80 w1, 10.10.1.3:80 w1",
            "10.10.1.125",
            "16381",
        ] {
            assert!(lines[2].contains(part), "{part} missing in {out}");
        }
        assert!(
            lines[2].ends_with("tcp every 2s timeout 1s rise 2 fall 3"),
            "{out}"
        );
        let json = to_json(&services[0]);
        assert_eq!(json["backends"][1]["addr"], "10.10.1.3");
        assert_eq!(json["port"], 443);
    }

    const SE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  \
                      name: web\nspec:\n  addresses: [10.0.0.1]\n  ports: [{number: 80, name: \
                      http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.1.1}]\n";

    /// Run `config check` on files written into a temporary directory: (exit status, stdout,
    /// stderr).
    fn check_files(files: &[(&str, &str)], extra: &[&str]) -> (u8, String, String) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut argv = vec!["vmlb", "config", "check", "--snat-addr", "10.0.0.9"];
        argv.extend_from_slice(extra);
        let d = dir.path().to_str().unwrap().to_string();
        argv.push(&d);
        let args = match <crate::cli::Cli as clap::Parser>::parse_from(argv).command {
            crate::cli::Command::Config {
                command: crate::cli::ConfigCommand::Check(a),
            } => a,
            o => panic!("{o:?}"),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = match check_to(&args, &mut out, &mut err) {
            Ok(()) => 0,
            Err(e) => e.downcast_ref::<ExitError>().expect("an exit status").code,
        };
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap().replace(&d, "D");
        (code, text(out), text(err))
    }

    #[test]
    fn unknown_kinds_empty_files_and_empty_directories_are_warned_about() {
        let typo = SE.replace("kind: ServiceEntry", "kind: ServiceEntri");
        let (code, out, err) = check_files(&[("a.yaml", &typo), ("b.yaml", "# nothing\n")], &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            err.contains("warning: D/a.yaml:2: kind: kind \"ServiceEntri\" is not read by vmlb"),
            "{err}"
        );
        assert!(
            err.contains("warning: D/b.yaml: no YAML documents"),
            "{err}"
        );
        assert!(
            out.ends_with("0 service(s) from 2 file(s): ok, 2 warning(s)\n"),
            "{out}"
        );
        let (code, _, _) = check_files(&[("a.yaml", &typo)], &["--strict"]);
        assert_eq!(code, exit::CONFIG_WARNINGS);
        let (code, _, err) = check_files(&[], &["--strict"]);
        assert_eq!(code, exit::CONFIG_WARNINGS);
        assert!(
            err.contains("no *.yaml or *.yml files in this directory"),
            "{err}"
        );
        let (code, out, _) = check_files(&[("a.yaml", SE)], &["--strict"]);
        assert_eq!(code, 0, "{out}");
    }

    #[test]
    fn every_file_is_listed_with_what_it_contributed() {
        let no_endpoints = SE
            .replace("name: web", "name: idle")
            .replace("10.0.0.1]", "10.0.0.2]")
            .replace("  endpoints: [{address: 10.0.1.1}]\n", "");
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n";
        let mixed = format!("{other}{SE}");
        let files = [
            ("a.yaml", mixed.as_str()),
            ("b.yml", &no_endpoints),
            ("c.txt", SE),
        ];
        let (code, out, err) = check_files(&files, &["-o", "json"]);
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let f = &v["files"];
        assert_eq!(f.as_array().unwrap().len(), 2, "c.txt is not read: {v}");
        assert_eq!(
            (
                &f[0]["documents"],
                &f[0]["service_entries"],
                &f[0]["services"],
                &f[0]["skipped"]
            ),
            (&2.into(), &1.into(), &1.into(), &1.into())
        );
        assert_eq!(
            (&f[1]["services"], &f[1]["warnings"]),
            (&1.into(), &1.into())
        );
        // The daemon's warning, now shown by the check.
        assert!(
            err.contains("D/b.yml:5: spec.endpoints: no endpoints: traffic"),
            "{err}"
        );
        assert_eq!(v["services"].as_array().unwrap().len(), 2);
        assert_eq!(v["warnings"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn namespaces_are_part_of_the_identity() {
        let ns = |n: &str, vip: &str| {
            SE.replace("  name: web\n", &format!("  name: web\n  namespace: {n}\n"))
                .replace("10.0.0.1]", &format!("{vip}]"))
        };
        let (a, b) = (ns("team-a", "10.0.0.1"), ns("team-b", "10.0.0.2"));
        let (code, out, err) = check_files(&[("a.yaml", &a), ("b.yaml", &b)], &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("team-a/web/http") && out.contains("team-b/web/http"),
            "{out}"
        );
        // Same namespace and name: still a duplicate.
        let (code, _, err) = check_files(&[("a.yaml", &a), ("b.yaml", &a)], &[]);
        assert_eq!(code, exit::CONFIG_INVALID);
        assert!(err.contains("is defined twice"), "{err}");
    }

    #[test]
    fn capacity_is_checked_with_the_numbers() {
        // 2000 services over 40 ServiceEntries of 50 ports.
        let ports: String = (0..50)
            .map(|p| format!("{{number: {}, name: p{p}}},", 1000 + p))
            .collect();
        let files: Vec<(String, String)> = (0..40)
            .map(|i| {
                let se = SE
                    .replace("name: web", &format!("name: web{i}"))
                    .replace("10.0.0.1]", &format!("10.0.{}.1]", 1 + i))
                    .replace("[{number: 80, name: http}]", &format!("[{ports}]"));
                (format!("s{i:02}.yaml"), se)
            })
            .collect();
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let (code, _, err) = check_files(&refs, &[]);
        assert_eq!(code, exit::CONFIG_INVALID);
        assert!(
            err.contains("2000 services in all; the data path holds at most 1023"),
            "{err}"
        );
        assert!(
            err.contains(
                "the Maglev tables need 32762000 entries in all; the MAGLEV array has 2096768"
            ),
            "{err}"
        );
        // One ServiceEntry that multiplies out: refused before it is expanded.
        let vips: String = (0..100).map(|i| format!("10.1.0.{i},")).collect();
        let big = SE
            .replace("[10.0.0.1]", &format!("[{vips}]"))
            .replace("[{number: 80, name: http}]", &format!("[{ports}]"));
        let (code, _, err) = check_files(&[("big.yaml", &big)], &[]);
        assert_eq!(code, exit::CONFIG_INVALID);
        assert!(
            err.contains("100 VIP(s) x 50 port(s) = 5000 services"),
            "{err}"
        );
        // Small ring space: a warning with the numbers.
        let (code, _, err) = check_files(&[("a.yaml", SE)], &["--maglev-entries", "20000"]);
        assert_eq!(code, 0);
        assert!(
            err.contains("the Maglev tables use 16381 of 20000 entries"),
            "{err}"
        );
    }

    #[test]
    fn node_config_and_invalid_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.yaml");
        std::fs::write(&node, "snatAddress: 10.0.0.7\n").unwrap();
        let bad = format!("{SE}# caf\u{e9}\n");
        let mut bytes = bad.into_bytes();
        let n = bytes.len();
        bytes[n - 3] = 0xff;
        let se = dir.path().join("se.yaml");
        std::fs::write(&se, &bytes).unwrap();
        let args = CheckArgs {
            paths: vec![se.clone()],
            strict: true,
            snat_addr: Vec::new(),
            node_config: Some(node),
            maglev_entries: vmlb_common::DEFAULT_MAGLEV_ENTRIES,
            max_services: vmlb_common::MAX_SERVICES,
            max_backends: vmlb_common::MAX_BACKENDS,
            output: Output::Table,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = check_to(&args, &mut out, &mut err).unwrap_err();
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains(&format!("{}:10: not valid UTF-8", se.display())),
            "{e} {err}"
        );
        std::fs::write(&se, SE).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        check_to(&args, &mut out, &mut err).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("10.0.0.7"));
    }
}
