//! The Kubernetes source: Services of vmlb's class (backends from their EndpointSlices), the
//! VM endpoint controller (VirtualMachineInstances -> EndpointSlices), opted-in Istio
//! ServiceEntries, VIP pools and VIP ownership.
//!
//! Pure parts: `index` (objects -> services, allocations, slices), `pools`, `vmi`, `ownership`.
//! The client side (watches, writes, Leases) is in `client`, `leases`.

pub mod index;
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
