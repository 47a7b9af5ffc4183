//! The daemon's own logs: tracing to stderr (text, coloured only on a terminal, or JSON lines),
//! `log` records (aya-log) bridged into it, and the XDP program's aya-log records forwarded.

use std::io::IsTerminal as _;

use aya::programs::links::{FdLink, PinnedLink};
use tracing::warn;

use crate::dataplane::attach::Attachment;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log collectors.
    Json,
}

/// Install the global subscriber (once; later calls are no-ops). Filtered by `RUST_LOG`,
/// default `info`.
pub fn init(format: LogFormat) {
    // aya-log (and any `log` user) records become tracing events.
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Turn the program's aya-log records (rare, actionable events such as SNAT exhaustion) into
/// tracing events: from this daemon's own object when it loaded the program, else found through
/// the pinned link's program id (which takes CAP_SYS_ADMIN).
pub fn forward_ebpf_logs(attachment: &mut Attachment) {
    let layout = attachment.layout().clone();
    let logger = match attachment.ebpf_mut() {
        Some(ebpf) => aya_log::EbpfLogger::init(ebpf).map_err(anyhow::Error::from),
        None => PinnedLink::from_pin(layout.link())
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(FdLink::from(l).info()?.program_id()))
            .and_then(|id| Ok(aya_log::EbpfLogger::init_from_id(id)?)),
    };
    let logger = match logger {
        Ok(l) => l,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e:#}");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer fd for its whole life and always reports that
    // same fd; the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
