//! The node's own settings: its SNAT address on the VLAN and the VLAN id, from flags and a small
//! YAML file (`snatAddress:`, `vlan:`); flags win over the file.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;

use crate::model::NodeConfig;

/// The node config file's fields; anything else is an error so a typo is not silently ignored.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    snat_address: Option<Ipv4Addr>,
    vlan: Option<u16>,
}

/// Flags first, then the file (if any), for each setting.
pub fn load(
    file: Option<&Path>,
    snat_flag: Option<Ipv4Addr>,
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
    Ok(NodeConfig {
        snat: snat_flag.or(file.snat_address),
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
        let n = load(Some(&p), None, Some(7)).unwrap();
        assert_eq!(n.snat, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(n.vlan, Some(7));
        std::fs::write(&p, "snatAdress: 10.0.0.1\n").unwrap();
        let e = format!("{:#}", load(Some(&p), None, None).unwrap_err());
        assert!(e.contains("node.yaml") && e.contains("snatAdress"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert_eq!(load(Some(&p), None, None).unwrap(), NodeConfig::default());
        std::fs::write(&p, "vlan: 4095\n").unwrap();
        let e = format!("{:#}", load(Some(&p), None, None).unwrap_err());
        assert!(e.contains("node.yaml") && e.contains("vlan: 4095"), "{e}");
    }
}
