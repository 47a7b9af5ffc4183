//! `inspect status`: the program on the interface and the daemon that keeps it, in one view.

use std::{io::Write, path::Path, time::UNIX_EPOCH};

use serde::Serialize;

use super::View;
use crate::{
    cli::output::{write_doc, Output},
    dataplane::{attach::pinned_program, pins::PinLayout},
    observe::{
        metrics::{MapUsage, StatsReader},
        state::ReloadState,
    },
};

#[derive(Serialize)]
struct Status<'a> {
    iface: &'a str,
    program: Option<Program>,
    /// How the running daemon got the program there (loaded_native, loaded_skb, adopted,
    /// upgraded) and the XDP mode it was attached in (native, skb) when known.
    attach: Option<&'a str>,
    xdp_mode: Option<&'a str>,
    daemon: Option<Daemon>,
    last_reload: Option<&'a ReloadState>,
    maps: Vec<MapUsage>,
}

#[derive(Serialize)]
struct Program {
    id: u32,
    /// The kernel's tag of the program (hex), which tells versions apart; null when programs
    /// cannot be looked up by id (without CAP_SYS_ADMIN).
    tag: Option<String>,
}

#[derive(Serialize)]
struct Daemon {
    pid: u32,
    /// Whether that process exists now.
    running: bool,
    /// Configuration generation (bumped on every apply) and when the state was last written.
    generation: u64,
    updated_unix: u64,
}

fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(unix)).to_string()
}

impl View {
    pub(super) fn status(
        &self,
        layout: &PinLayout,
        fmt: Output,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let program = pinned_program(&layout.link())
            .ok()
            .map(|(id, tag)| Program {
                id,
                tag: tag.map(|t| format!("{t:016x}")),
            });
        let st = &self.state;
        let daemon = (st.pid != 0).then(|| Daemon {
            pid: st.pid,
            running: Path::new(&format!("/proc/{}", st.pid)).exists(),
            generation: st.generation,
            updated_unix: st.updated_unix,
        });
        let status = Status {
            iface: &self.iface,
            program,
            attach: st.attach.as_deref(),
            xdp_mode: st.xdp_mode.as_deref(),
            daemon,
            last_reload: st.last_reload.as_ref(),
            maps: StatsReader::map_usage(&self.maps)?,
        };
        if !fmt.is_table() {
            return write_doc(out, fmt, &status);
        }
        let row = |out: &mut dyn Write, k: &str, v: String| writeln!(out, "{k:<12} {v}");
        row(out, "interface", status.iface.to_string())?;
        row(
            out,
            "program",
            match &status.program {
                Some(p) => format!(
                    "id {}, tag {}",
                    p.id,
                    p.tag.as_deref().unwrap_or("unknown (needs CAP_SYS_ADMIN)")
                ),
                None => "no program in the pinned link".into(),
            },
        )?;
        row(
            out,
            "attached",
            match (status.attach, status.xdp_mode) {
                (Some(a), Some(m)) => format!("{a}, XDP mode {m}"),
                (Some(a), None) => format!("{a}, XDP mode unknown"),
                _ => "unknown (no state file)".into(),
            },
        )?;
        row(
            out,
            "daemon",
            match &status.daemon {
                Some(d) => format!(
                    "pid {} ({}), generation {}, state written {}",
                    d.pid,
                    if d.running { "running" } else { "not running" },
                    d.generation,
                    time(d.updated_unix)
                ),
                None => "none has written state".into(),
            },
        )?;
        row(
            out,
            "last reload",
            match status.last_reload {
                Some(r) => format!(
                    "{} at {}, {} error(s), {} warning(s)",
                    r.result,
                    time(r.unix),
                    r.errors.len(),
                    r.warnings.len()
                ),
                None => "-".into(),
            },
        )?;
        let maps: Vec<String> = status
            .maps
            .iter()
            .map(|m| format!("{} {}/{}", m.map, m.entries, m.capacity))
            .collect();
        row(out, "maps", maps.join(", "))?;
        Ok(())
    }
}
