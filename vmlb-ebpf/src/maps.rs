//! Every map of the data path. Names are `vmlb_common::map_names`; sizes here are defaults that
//! user space may change at load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use vmlb_common::{
    Backend, Counter, FlowEntry, FlowKey, Service, ServiceKey, TrafficStats, DEFAULT_FLOW_ENTRIES,
    DEFAULT_MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every VIP address, to tell "VIP on a port we do not serve" (dropped) from "not ours" (passed).
#[map]
pub static VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// All services' Maglev tables, each in its own range (see `Service::ring_base`).
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_MAGLEV_ENTRIES, 0);

/// Conntrack, both directions (see `FlowEntry`). LRU: idle flows age out under pressure.
/// BPF_F_NO_COMMON_LRU: each CPU keeps its own LRU list, so creating a flow takes no global
/// lock (measured ~20% cheaper per new flow); both entries of a flow are created on one CPU.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
pub static SVC_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
