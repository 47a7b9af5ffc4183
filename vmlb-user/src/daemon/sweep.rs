//! The flow sweeper: a thread that ends expired flows every `sweep_interval` (through
//! `conntrack::sweep`, IPv4's `FLOW_SLOTS` then IPv6's `FLOW_SLOTS6`) and raises or lowers the
//! flood guard's pressure flag in `CONFIG` (one flag for both: either table above its
//! threshold raises it).

use std::sync::{mpsc, Arc, Mutex};

use tracing::{error, info, warn};

use super::options::FlowOptions;
use crate::dataplane::{maps::BpfMaps, pins::PinLayout};

/// How often the live backends' cached next hops are invalidated.
const HOP_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Sweeper {
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    /// `shared`: the daemon's own map handles, locked only to flip the pressure flag (CONFIG is
    /// read-modify-written, and the reconciler writes it too).
    pub fn spawn(
        opts: &FlowOptions,
        layout: &PinLayout,
        shared: Arc<Mutex<BpfMaps>>,
    ) -> anyhow::Result<Self> {
        // Its own handles: a sweep walks every slot and must not hold up a reconcile.
        let mut own = BpfMaps::from_pins(layout)?;
        let timeouts = opts.timeouts;
        let interval = opts.sweep_interval;
        let capacity = u64::from(own.flow_capacity()?);
        let threshold = capacity * u64::from(opts.pressure_percent) / 100;
        let capacity6 = u64::from(own.v6.flow_capacity()?);
        let threshold6 = capacity6 * u64::from(opts.pressure_percent) / 100;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vmlb-sweep".into())
            .spawn(move || {
                let mut pressure = false;
                let mut last_hops = std::time::Instant::now();
                loop {
                    // Next hops: every CPU re-resolves the live backends' hops every couple
                    // of seconds, so a MAC or route change reaches established flows.
                    if last_hops.elapsed() >= HOP_REFRESH {
                        last_hops = std::time::Instant::now();
                        let mut live = crate::conntrack::live_backends(&own.slots);
                        live.extend(crate::conntrack::live_backends(&own.v6.slots));
                        for id in live {
                            if let Err(e) = own.invalidate_hop(id) {
                                tracing::debug!("invalidating the next hop of backend {id}: {e:#}");
                            }
                        }
                    }
                    let s = crate::conntrack::sweep(&own.slots, &own.index, &timeouts, pressure);
                    let s6 =
                        crate::conntrack::sweep(&own.v6.slots, &own.v6.index, &timeouts, pressure);
                    let now_pressure = s.live() >= threshold || s6.live() >= threshold6;
                    if now_pressure != pressure {
                        pressure = now_pressure;
                        if pressure {
                            warn!(
                                live = s.live(),
                                capacity,
                                live6 = s6.live(),
                                capacity6,
                                "flow table under pressure: SYN-only flows now expire early"
                            );
                        } else {
                            info!(
                                live = s.live(),
                                live6 = s6.live(),
                                "flow table pressure over"
                            );
                        }
                        let mut m = shared.lock().expect("maps lock");
                        if let Err(e) = m.update_config(|c| c.pressure = u32::from(pressure)) {
                            error!("setting the flow pressure flag: {e:#}");
                        }
                    }
                    tracing::trace!(?s, ?s6, "flow sweep");
                    match stopped.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
