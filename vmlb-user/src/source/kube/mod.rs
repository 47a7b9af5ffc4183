//! The Kubernetes source: Services of vmlb's class (backends from their EndpointSlices), the
//! VM endpoint controller (VirtualMachineInstances -> EndpointSlices), opted-in Istio
//! ServiceEntries, VIP pools and VIP ownership.
//!
//! Pure parts: `index` (objects -> services, allocations, slices), `pools`, `vmi`, `ownership`.
//! The client side (watches, writes, Leases) is in `client`, `leases`.

pub mod client;
pub mod index;
pub mod leases;
pub mod merge;
pub mod ownership;
pub mod pools;
pub mod vmi;

/// `spec.loadBalancerClass` of the Services vmlb serves (MetalLB and cloud controllers leave
/// Services of another class alone).
pub const LB_CLASS: &str = "vmlb.io/vmlb";
/// Requested VIP, as MetalLB's `metallb.universe.tf/loadBalancerIPs`.
pub const LB_IPS: &str = "vmlb.io/loadBalancerIPs";
/// Pool to allocate from, as MetalLB's `metallb.universe.tf/address-pool`.
pub const ADDRESS_POOL: &str = "vmlb.io/address-pool";
/// ServiceEntries with this label set to "true" are served.
pub const SERVICE_ENTRY_LABEL: &str = "vmlb.io/serve";

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::model::{ConfiguredService, NodeConfig};

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name (the DaemonSet passes `spec.nodeName` in through the environment).
    pub node_name: String,
    /// Where the Leases live (the DaemonSet's namespace).
    pub namespace: String,
    /// Node Leases: how fast a VIP moves when its node dies.
    pub timing: ownership::Timing,
    /// The leader Lease: only the writer moves with it, so it can be slower.
    pub leader_timing: ownership::Timing,
    pub pools: Vec<pools::Pool>,
    pub node: NodeConfig,
}

impl Options {
    pub fn new(
        node_name: impl Into<String>,
        namespace: impl Into<String>,
        node: NodeConfig,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            namespace: namespace.into(),
            timing: ownership::Timing::default(),
            // client-go's leader election defaults.
            leader_timing: ownership::Timing {
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(2),
                renew_deadline: Duration::from_secs(10),
            },
            pools: Vec::new(),
            node,
        }
    }
}

/// The running source: what it publishes, and how to stop it.
pub struct KubeSource {
    /// The cluster's services; `None` until every kind has been listed once.
    pub services: watch::Receiver<Option<Vec<ConfiguredService>>>,
    /// The VIPs this node answers for (ARP or neighbour solicitations; gratuitous ARP or
    /// unsolicited neighbour advertisements on gain): for the data path.
    pub owned: watch::Receiver<BTreeSet<IpAddr>>,
    /// Until when this node may answer for them without another accepted Lease renewal: the
    /// data path stops answering ARP after it by itself (a dead daemon renews nothing).
    pub live_until: watch::Receiver<Option<std::time::Instant>>,
    /// Whether this node is the writer.
    pub leader: watch::Receiver<bool>,
    stop_owning: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    owning: JoinHandle<()>,
    /// Tasks that clean up when stopped (Lease release), then the rest.
    releasing: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

impl KubeSource {
    pub fn start(client: kube::Client, opts: Options) -> Self {
        let (services_tx, services) = watch::channel(None);
        let (work_tx, work) = watch::channel(client::LeaderWork::default());
        let (owned_tx, owned) = watch::channel(BTreeSet::new());
        let (until_tx, live_until) = watch::channel(None);
        let (leader_tx, leader) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let (stop_owning, stop_owning_rx) = watch::channel(false);
        let (renewed_tx, renewed_rx) = tokio::sync::mpsc::channel(16);
        let reporter = kube::runtime::events::Reporter {
            controller: "vmlb".into(),
            instance: Some(opts.node_name.clone()),
        };
        let membership = ownership::Membership::new(opts.node_name.clone(), opts.timing);
        let others = vec![
            tokio::spawn(client::run_index(
                client.clone(),
                opts.node.clone(),
                opts.pools.clone(),
                services_tx,
                work_tx,
            )),
            tokio::spawn(client::run_writer(
                client.clone(),
                reporter,
                leader.clone(),
                work,
                opts.leader_timing.renew_every,
            )),
        ];
        let owning = tokio::spawn(leases::run_ownership(
            client.clone(),
            opts.namespace.clone(),
            membership,
            renewed_rx,
            services.clone(),
            leases::OwnershipOut { owned_tx, until_tx },
            stop_owning_rx,
        ));
        let releasing = vec![
            tokio::spawn(leases::run_renewal(
                client.clone(),
                opts.namespace.clone(),
                opts.node_name.clone(),
                opts.timing,
                renewed_tx,
                stop_rx.clone(),
            )),
            tokio::spawn(leases::run_leader_election(
                client,
                opts.namespace,
                opts.node_name,
                opts.leader_timing,
                leader_tx,
                stop_rx,
            )),
        ];
        Self {
            services,
            owned,
            live_until,
            leader,
            stop_owning,
            stop,
            owning,
            releasing,
            others,
        }
    }

    /// Stops answering, releases this node's Leases (so others take over at once) and ends
    /// every task. Bounded: a dead API server does not hold up the shutdown.
    pub async fn shutdown(self) {
        // First own nothing, then release the Leases: never the other way round.
        let _ = self.stop_owning.send(true);
        let abort = self.owning.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), self.owning)
            .await
            .is_err()
        {
            abort.abort();
        }
        let _ = self.stop.send(true);
        for t in self.others {
            t.abort();
        }
        for t in self.releasing {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}
