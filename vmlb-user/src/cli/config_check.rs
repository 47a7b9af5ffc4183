//! `vmlb config check`: parse and validate ServiceEntry files without touching the data path.

use std::{fmt::Write as _, io::Write as _, net::Ipv4Addr, path::PathBuf};

use serde_json::json;

use super::Output;
use crate::{
    model::{ConfiguredService, HealthKind, NodeConfig},
    source::file as config,
};

#[derive(clap::Args, Debug)]
#[command(after_long_help = after_help())]
pub struct CheckArgs {
    /// ServiceEntry files, or directories whose *.yaml and *.yml files are read (sorted, not
    /// recursive). Documents of other kinds are skipped.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The node's address on the VLAN, used as SNAT source by services without a
    /// vmlb.io/snat-address annotation (as `vmlb run --snat-addr`).
    #[arg(long, value_name = "IP")]
    pub snat_addr: Option<Ipv4Addr>,
    /// How to print the services.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// What `--help` adds below the flags: how services are derived, and the annotations.
fn after_help() -> String {
    let mut help = String::from(
        "Each (VIP, port) of a ServiceEntry is one service: VIPs from spec.addresses, backends \
         from spec.endpoints (IPv4, resolution: STATIC), backend port = the endpoint's \
         ports.<port name>, else the port's targetPort, else its number. Endpoints of weight 0 \
         are draining. vmlb's options are metadata.annotations:\n",
    );
    for (name, meaning) in config::ANNOTATIONS {
        let _ = writeln!(help, "  {name:<24} {meaning}");
    }
    help.push_str(
        "\nOn success the services are printed; otherwise every error is printed to stderr as \
         FILE:LINE: FIELD: MESSAGE and the exit status is non-zero.",
    );
    help
}

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let node = NodeConfig {
        snat: args.snat_addr,
        vlan: None,
    };
    let services = match config::load(&args.paths, &node) {
        Ok(services) => services,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return Err(super::ExitError::error(
                super::exit::CONFIG_INVALID,
                format!("{} error(s) in the configuration", errors.0.len()),
            ));
        }
    };
    let mut out = std::io::stdout().lock();
    if args.output.is_table() {
        write!(out, "{}", table(&services))?;
    } else {
        let list: Vec<_> = services.iter().map(to_json).collect();
        super::output::write_doc(&mut out, args.output, &list)?;
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

fn table(services: &[ConfiguredService]) -> String {
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
                s.spec.snat.to_string(),
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
    let files: std::collections::BTreeSet<_> = services.iter().map(|s| &s.file).collect();
    let _ = writeln!(
        out,
        "{} service(s) from {} file(s): ok",
        services.len(),
        files.len()
    );
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
        let node = NodeConfig {
            snat: Some("10.10.1.125".parse().unwrap()),
            vlan: None,
        };
        let services = config::parse_str(&text, "vms.yaml".as_ref(), &node).unwrap();
        let out = table(&services);
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
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
}
