//! Forward: next hop from the kernel's FIB, MAC rewrite, XDP_TX or redirect.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use vmlb_common::Counter;

use crate::{parse::Packet, stats::count};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

pub struct NextHop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

/// Route `src -> dst` as if forwarding the packet received on the ingress interface. Only done
/// when a flow is created; the result is kept in its conntrack entry.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, p: &Packet, src: u32, dst: u32) -> Result<NextHop, Counter> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (a plain C struct of integers and unions).
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = p.key.proto;
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `ip` was bounds-checked by parse(); writing plain union fields.
    unsafe {
        params.__bindgen_anon_1.tot_len = u16::from_be((*p.ip).tot_len);
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: params.ifindex,
            dst_mac: params.dmac,
            src_mac: params.smac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Counter::PassNoNeigh),
        _ => Err(Counter::PassFibFailed),
    }
}

/// Put the next hop's MACs on the frame and send it out of `ifindex`.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    p: &Packet,
    ifindex: u32,
    dst_mac: &[u8; 6],
    src_mac: &[u8; 6],
) -> u32 {
    // SAFETY: `eth` was bounds-checked by parse().
    unsafe {
        (*p.eth).dst = *dst_mac;
        (*p.eth).src = *src_mac;
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::TxSameIface);
        xdp_action::XDP_TX
    } else {
        count(Counter::TxRedirect);
        // SAFETY: plain helper call. With flags 0 it cannot fail: it returns XDP_REDIRECT.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}
