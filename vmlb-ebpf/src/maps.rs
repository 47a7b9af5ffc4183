//! Every map of the data path. Names are `vmlb_common::map_names`; sizes here are defaults that
//! user space may change at load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
};
use vmlb_common::{
    index::index_buckets, Addr6, Backend, Backend6, Config, Config6, Counter, DnatEndpoint,
    DnatEndpoint6, EndpointKey, EndpointKey6, Flow, Flow6, FlowBucket, FlowKey6, Hop, RateBucket,
    Service, Service6, ServiceKey, ServiceKey6, TrafficStats, DEFAULT_FLOW6_ENTRIES,
    DEFAULT_FLOW_ENTRIES, DEFAULT_MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES, RATE_COUNT,
    SLOTS_PER_FLOW,
};

/// BPF_F_MMAPABLE: user space maps `FLOW_SLOTS` and `FLOW_INDEX` to sweep them, freeing slots
/// and entries with the same compare-and-swap the data path uses (a map update syscall could
/// not be atomic with it).
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every VIP address (value: `VIP_F_*` flags), to tell "VIP on a port we do not serve" (dropped)
/// from "not ours" (passed), and whether to answer ARP for it.
#[map]
pub static VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The backends of dnat services, by the source of their replies (see `DnatEndpoint`).
#[map]
pub static DNAT_ENDPOINTS: HashMap<EndpointKey, DnatEndpoint> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// All services' Maglev tables, each in its own range (see `Service::ring_base`). Mappable so
/// user space writes a table as memory: 1000 tables through batched update syscalls took ~2 s
/// of per-entry kernel copies. Packets read one aligned u32 entry, never a torn one.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_MAGLEV_ENTRIES, BPF_F_MMAPABLE);

/// The flow index: client 5-tuple -> its slot in `FLOW_SLOTS` (`vmlb_common::index`, index.rs).
/// Not an LRU: nothing is ever evicted behind our back (an LRU split a live flow's two
/// directions under pressure), and its capacity is global, whichever CPU creates a flow (a
/// per-CPU LRU gives each CPU max_entries / ncpus). Entries leave it through expiry only.
#[map]
pub static FLOW_INDEX: Array<FlowBucket> =
    Array::with_max_entries(index_buckets(DEFAULT_FLOW_ENTRIES), BPF_F_MMAPABLE);

/// The flows themselves, direct-mapped by SNAT tuple (see `vmlb_common::Flow`).
#[map]
pub static FLOW_SLOTS: Array<Flow> =
    Array::with_max_entries(DEFAULT_FLOW_ENTRIES * SLOTS_PER_FLOW, BPF_F_MMAPABLE);

/// Node-wide settings, one entry (see `vmlb_common::Config`).
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Each backend's next hop, per CPU (so a refresh never tears a MAC another CPU is reading).
#[map]
pub static HOPS: PerCpuArray<Hop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU token buckets: the flood guard's and ICMP echo's (`vmlb_common::RATE_*`).
#[map]
pub static RATE: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(RATE_COUNT, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
pub static SVC_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// The IPv6 program (`vmlb6`, at `JUMP_V6`), tail-called by `vmlb` for IPv6 frames: a stage
/// of its own with its own 512-byte stack. Inlined, the two paths' stack frames did not overlap
/// (IPv4 408 bytes + IPv6 424, measured with `-bpf-stack-size`), and as BPF-to-BPF calls they
/// would add up just the same; a tail call costs only IPv6 packets, once.
#[map]
pub static JUMP: ProgramArray = ProgramArray::with_max_entries(2, 0);

// IPv6 (vmlb_common::abi6): its own keys and values; MAGLEV, HOPS, RATE and the stats are
// shared by id with IPv4.

#[map]
pub static SERVICES6: HashMap<ServiceKey6, Service6> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every IPv6 VIP (value: `VIP_F_*` flags), as `VIPS`.
#[map]
pub static VIPS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The backends of IPv6 dnat services, by the source of their replies, as `DNAT_ENDPOINTS`.
#[map]
pub static DNAT_ENDPOINTS6: HashMap<EndpointKey6, DnatEndpoint6> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// As `FLOW_INDEX`, for IPv6 client 5-tuples.
#[map]
pub static FLOW_INDEX6: Array<FlowBucket> =
    Array::with_max_entries(index_buckets(DEFAULT_FLOW6_ENTRIES), BPF_F_MMAPABLE);

/// As `FLOW_SLOTS`, direct-mapped by IPv6 SNAT tuple (`hash::tuple_slot6`).
#[map]
pub static FLOW_SLOTS6: Array<Flow6> =
    Array::with_max_entries(DEFAULT_FLOW6_ENTRIES * SLOTS_PER_FLOW, BPF_F_MMAPABLE);

#[map]
pub static CONFIG6: Array<Config6> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space of the IPv6 programs: their flow keys and FIB parameters live here, not
/// on the stack (the ICMPv6 program's error translation did not fit the verifier's 512 bytes
/// otherwise). Used within one program run; XDP runs do not nest on a CPU.
#[map]
pub static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch6 {
    pub key: FlowKey6,
    pub fib: [u64; 8],
}
