//! The `netflow_perf` object: the programs of `netflow/programs.rs`, handing closed connections
//! to userspace through a perf event array (one buffer per CPU), for kernels without the BPF
//! ring buffer (before 5.8) or when forced (`--netflow-closed-events perf-event-array`).
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

    use aya_ebpf::{
        bindings::BPF_F_CURRENT_CPU,
        helpers::generated::bpf_perf_event_output,
        macros::map,
        maps::{PerCpuArray, PerfEventArray},
    };
    use ebpf_common::netflow::{ClosedConn, ConnInfo};

    use super::programs::{NEST_LEVELS, Nest, Peer};

    /// Closed connections, into this CPU's perf buffer (sized by the daemon).
    #[map]
    static NETFLOW_CLOSED: PerfEventArray<ClosedConn> = PerfEventArray::new(0);

    /// Per-CPU room for the record, one per nesting level: it does not fit the BPF stack beside
    /// the callers' frames.
    #[map]
    static CLOSED_SCRATCH: PerCpuArray<ClosedConn> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);

    /// Hands a connection's final counters over (`peer`: of an unconnected UDP flow); false
    /// when this CPU's buffer is full.
    #[inline(always)]
    pub(crate) fn submit(
        ctx: *mut c_void,
        nest: &Nest,
        sock: u64,
        info: &ConnInfo,
        peer: Option<&Peer>,
    ) -> bool {
        let Some(record) = CLOSED_SCRATCH.get_ptr_mut(nest.level()) else {
            return false;
        };
        // SAFETY: this CPU's slot for this nesting level, used by no other run.
        let record = unsafe { &mut *record };
        record.sock = sock;
        record.info = *info;
        match peer {
            Some(p) => {
                record.peer = p.addr;
                record.peer_port = p.port;
                record.udp_flow = 1;
            }
            None => {
                record.peer = [0; 16];
                record.peer_port = 0;
                record.udp_flow = 0;
            }
        }
        // aya-ebpf's `PerfEventArray::output` drops the helper's result, and a full buffer must
        // leave the connection in the map (the daemon's sweep collects it), so the helper is
        // called directly. The map's address is the static's: `PerfEventArray` is a
        // `repr(transparent)` map definition.
        // SAFETY: `ctx` is the running program's context; the record is `size_of` bytes.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx,
                core::ptr::from_ref(&NETFLOW_CLOSED).cast_mut().cast(),
                BPF_F_CURRENT_CPU,
                core::ptr::from_mut(record).cast(),
                size_of::<ClosedConn>() as u64,
            )
        };
        ret == 0
    }
}
