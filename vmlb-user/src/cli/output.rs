//! Output for every subcommand: aligned tables for people, JSON or YAML documents for scripts
//! (the same serde structs, so the two machine formats always carry the same fields).

use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// Pretty-printed JSON (a stable shape: fields are only ever added).
    Json,
    /// YAML, the same document as JSON.
    Yaml,
}

impl Output {
    pub fn is_table(self) -> bool {
        self == Output::Table
    }
}

/// Write `doc` as JSON or YAML, or call `table` for table output.
pub fn render(
    out: &mut dyn Write,
    format: Output,
    doc: &impl Serialize,
    table: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match format {
        Output::Table => table(out),
        Output::Json => write_json(out, doc),
        Output::Yaml => write_yaml(out, doc),
    }
}

/// Write `doc` as JSON or YAML (`format` must not be `Table`: the caller draws its own table).
pub fn write_doc(out: &mut dyn Write, format: Output, doc: &impl Serialize) -> anyhow::Result<()> {
    match format {
        Output::Yaml => write_yaml(out, doc),
        Output::Json | Output::Table => write_json(out, doc),
    }
}

pub fn write_json(out: &mut dyn Write, v: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

pub fn write_yaml(out: &mut dyn Write, v: &impl Serialize) -> anyhow::Result<()> {
    // Through serde_json's Value so both formats see the same document (flattened fields and
    // tagged enums come out the same way).
    let value = serde_json::to_value(v)?;
    serde_norway::to_writer(&mut *out, &value)?;
    Ok(())
}

/// Aligned columns, two spaces apart; columns whose cells are all numbers are right-aligned.
pub fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if numeric[i] {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for r in rows {
        writeln!(out, "{}", line(&mut r.iter().map(String::as_str)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["ID", "NAME", "PACKETS"],
            &[
                vec!["1".into(), "web".into(), "12345".into()],
                vec!["10".into(), "mail-long".into(), "7".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID  NAME       PACKETS\n 1  web          12345\n10  mail-long        7\n"
        );
    }

    #[test]
    fn json_and_yaml_carry_the_same_document() {
        #[derive(Serialize)]
        struct Doc {
            iface: &'static str,
            n: u32,
            list: Vec<&'static str>,
        }
        let doc = Doc {
            iface: "eth1",
            n: 3,
            list: vec!["a", "b"],
        };
        let (mut j, mut y) = (Vec::new(), Vec::new());
        render(&mut j, Output::Json, &doc, |_| unreachable!()).unwrap();
        render(&mut y, Output::Yaml, &doc, |_| unreachable!()).unwrap();
        let from_json: serde_json::Value = serde_json::from_slice(&j).unwrap();
        let from_yaml: serde_json::Value = serde_norway::from_slice(&y).unwrap();
        assert_eq!(from_json, from_yaml);
        assert_eq!(from_yaml["list"][1], "b");
        let mut t = Vec::new();
        render(&mut t, Output::Table, &doc, |o| Ok(writeln!(o, "table")?)).unwrap();
        assert_eq!(t, b"table\n");
    }
}
