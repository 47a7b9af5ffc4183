//! The node's own settings: its SNAT addresses on the VLAN (one IPv4, one IPv6) and the VLAN id,
//! from flags and a small YAML file (`snatAddress:` one address or a list of one per family,
//! `vlan:`); flags win over the file, family by family.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context as _;

use crate::model::NodeConfig;

/// The node config file's fields; anything else is an error so a typo is not silently ignored.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    snat_address: Option<Addresses>,
    vlan: Option<u16>,
}

/// `snatAddress: 10.0.0.1` or `snatAddress: [10.0.0.1, "fd00::1"]`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Addresses {
    One(IpAddr),
    List(Vec<IpAddr>),
}

/// At most one address per family: (IPv4, IPv6).
fn per_family(
    addrs: &[IpAddr],
    from: &str,
) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for a in addrs {
        let twice = match a {
            IpAddr::V4(a) => v4.replace(*a).is_some(),
            IpAddr::V6(a) => v6.replace(*a).is_some(),
        };
        if twice {
            let family = if a.is_ipv4() { "IPv4" } else { "IPv6" };
            anyhow::bail!("{from}: more than one {family} address (one per family)");
        }
    }
    Ok((v4, v6))
}

/// Flags first, then the file (if any), for each setting.
pub fn load(
    file: Option<&Path>,
    snat_flags: &[IpAddr],
    vlan_flag: Option<u16>,
) -> anyhow::Result<NodeConfig> {
    let file_path = file;
    let file: File = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading node config {}", p.display()))?;
            parse(&text).with_context(|| format!("node config {}", p.display()))?
        }
        None => File::default(),
    };
    let vlan = vlan_flag.or(file.vlan);
    if let Some(v) = vlan.filter(|v| !(1..=4094).contains(v)) {
        let from = file_path.map_or("--vlan".into(), |p| format!("node config {}", p.display()));
        anyhow::bail!("{from}: vlan: {v} is not a VLAN id (1-4094)");
    }
    let (flag4, flag6) = per_family(snat_flags, "--snat-addr")?;
    let file_snat = match file.snat_address {
        None => Vec::new(),
        Some(Addresses::One(a)) => vec![a],
        Some(Addresses::List(l)) => l,
    };
    let from = file_path.map_or(String::new(), |p| format!("node config {}", p.display()));
    let (file4, file6) = per_family(&file_snat, &format!("{from}: snatAddress"))?;
    Ok(NodeConfig {
        snat: flag4.or(file4),
        snat6: flag6.or(file6),
        vlan,
    })
}

fn parse(text: &str) -> anyhow::Result<File> {
    // An empty file is a file with no settings (serde_norway calls it an error).
    if text.trim().is_empty() {
        return Ok(File::default());
    }
    Ok(serde_norway::from_str(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.yaml");
        std::fs::write(&p, "snatAddress: 10.0.0.1\nvlan: 1512\n").unwrap();
        let n = load(Some(&p), &[], Some(7)).unwrap();
        assert_eq!(n.snat, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(n.vlan, Some(7));
        std::fs::write(&p, "snatAdress: 10.0.0.1\n").unwrap();
        let e = format!("{:#}", load(Some(&p), &[], None).unwrap_err());
        assert!(e.contains("node.yaml") && e.contains("snatAdress"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert_eq!(load(Some(&p), &[], None).unwrap(), NodeConfig::default());
        std::fs::write(&p, "vlan: 4095\n").unwrap();
        let e = format!("{:#}", load(Some(&p), &[], None).unwrap_err());
        assert!(e.contains("node.yaml") && e.contains("vlan: 4095"), "{e}");
    }

    #[test]
    fn one_snat_address_per_family_and_flags_win_family_by_family() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.yaml");
        std::fs::write(&p, "snatAddress: [10.0.0.1, \"fd00::1\"]\n").unwrap();
        let v6: IpAddr = "fd00::9".parse().unwrap();
        let n = load(Some(&p), &[v6], None).unwrap();
        assert_eq!(n.snat, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(n.snat6, Some("fd00::9".parse().unwrap()));
        std::fs::write(&p, "snatAddress: \"fd00::1\"\n").unwrap();
        let n = load(Some(&p), &[], None).unwrap();
        assert_eq!((n.snat, n.snat6), (None, Some("fd00::1".parse().unwrap())));
        std::fs::write(&p, "snatAddress: [10.0.0.1, 10.0.0.2]\n").unwrap();
        let e = format!("{:#}", load(Some(&p), &[], None).unwrap_err());
        assert!(
            e.contains("node.yaml") && e.contains("more than one IPv4"),
            "{e}"
        );
        let e = format!("{:#}", load(None, &[v6, v6], None).unwrap_err());
        assert!(
            e.contains("--snat-addr") && e.contains("more than one IPv6"),
            "{e}"
        );
    }
}
