//! `inspect neighbours`: each backend address's next hop and the kernel's neighbour entry for it,
//! as the daemon last read them (`state::DaemonState::neighbours`). XDP cannot resolve a
//! neighbour, so a backend whose entry is not usable gets no new flows from the fast path (they
//! pass to the kernel, `pass_no_neigh`); this view says which and why.

use std::io::Write;

use super::View;
use crate::{
    cli::output::{table, write_doc, Output},
    observe::state::NeighbourState,
};

/// The table's rows, one per backend address (pure, so the rendering is tested without a
/// daemon).
pub fn rows(neighbours: &[NeighbourState]) -> Vec<Vec<String>> {
    let dash = || "-".to_string();
    neighbours
        .iter()
        .map(|n| {
            vec![
                n.backend.to_string(),
                n.next_hop.map_or_else(dash, |a| a.to_string()),
                n.route.clone(),
                n.state.clone(),
                n.mac.clone().unwrap_or_else(dash),
                if n.managed { "vmlb" } else { "no" }.to_string(),
            ]
        })
        .collect()
}

pub const HEADER: [&str; 6] = ["BACKEND", "NEXT HOP", "ROUTE", "STATE", "MAC", "MANAGED"];

impl View {
    pub(super) fn neighbours(&self, fmt: Output, out: &mut dyn Write) -> anyhow::Result<()> {
        let st = &self.state;
        if !fmt.is_table() {
            return write_doc(
                out,
                fmt,
                &serde_json::json!({
                    "iface": self.iface,
                    "updated_unix": st.updated_unix,
                    "neighbours": st.neighbours,
                }),
            );
        }
        if st.pid == 0 {
            writeln!(
                out,
                "no daemon has written state for {}: neighbours unknown",
                self.iface
            )?;
            return Ok(());
        }
        table(out, &HEADER, &rows(&st.neighbours))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 10, 1, last))
    }

    #[test]
    fn a_table_row_per_backend_with_dashes_for_the_unknown() {
        let neighbours = [
            NeighbourState {
                backend: v4(2),
                next_hop: Some(v4(2)),
                route: "on-link".into(),
                state: "reachable".into(),
                mac: Some("02:00:0a:0a:01:02".into()),
                managed: true,
            },
            NeighbourState {
                backend: IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5)),
                next_hop: Some(v4(1)),
                route: "gateway".into(),
                state: "permanent".into(),
                mac: Some("02:00:0a:0a:01:01".into()),
                managed: false,
            },
            NeighbourState {
                backend: v4(125),
                next_hop: None,
                route: "local".into(),
                state: "none".into(),
                mac: None,
                managed: false,
            },
        ];
        let mut out = Vec::new();
        table(&mut out, &HEADER, &rows(&neighbours)).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\
BACKEND      NEXT HOP   ROUTE    STATE      MAC                MANAGED
10.10.1.2    10.10.1.2  on-link  reachable  02:00:0a:0a:01:02  vmlb
10.20.0.5    10.10.1.1  gateway  permanent  02:00:0a:0a:01:01  no
10.10.1.125  -          local    none       -                  no
"
        );
    }
}
