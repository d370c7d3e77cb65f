//! The `netflow` object: the programs of `netflow/programs.rs`, handing closed connections to
//! userspace through the BPF ring buffer (kernel 5.8+). `netflow_perf.rs` is the same programs
//! with a perf event array, for kernels without one.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target's core atomics have no read-modify-write; the intrinsic compiles to BPF's
// atomic add. The eBPF crate is always built with nightly.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[path = "netflow/programs.rs"]
mod programs;

#[cfg(target_arch = "bpf")]
mod closed_events {
    use core::ffi::c_void;

    use aya_ebpf::{macros::map, maps::RingBuf};
    use ebpf_common::netflow::{ClosedConn, ConnInfo};

    use super::programs::{Nest, Peer};

    /// Closed connections; 1 MiB holds about 6,500 records between two reads (a burst of
    /// short connections while the daemon waits for a CPU).
    #[map]
    static NETFLOW_CLOSED: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

    /// Hands a connection's final counters over (`peer`: of an unconnected UDP flow); false
    /// when the ring buffer is full.
    #[inline(always)]
    pub(crate) fn submit(
        _ctx: *mut c_void,
        _nest: &Nest,
        sock: u64,
        info: &ConnInfo,
        peer: Option<&Peer>,
    ) -> bool {
        match NETFLOW_CLOSED.reserve::<ClosedConn>(0) {
            Some(mut entry) => {
                let (peer, peer_port, udp_flow) = match peer {
                    Some(p) => (p.addr, p.port, 1),
                    None => ([0; 16], 0, 0),
                };
                entry.write(ClosedConn {
                    sock,
                    info: *info,
                    peer,
                    peer_port,
                    udp_flow,
                    _pad: [0; 4],
                });
                entry.submit(0);
                true
            }
            None => false,
        }
    }
}
