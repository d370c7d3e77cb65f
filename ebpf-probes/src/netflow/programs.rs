//! netflow: per-connection counters, fed by one of four attach tiers that count the same calls.
//!
//! Sends and receives (bytes and the process doing them):
//! - tracepoint tier: the BTF-typed tracepoints (`tp_btf`) `sock_send_length` / `sock_recv_length`
//!   (kernel 6.3+), which need neither kprobes nor BPF trampolines (this project's CI kernel has
//!   neither); the classic-tracepoint tier takes the same events as classic tracepoints, which
//!   run with preemption off;
//! - fentry tier: fexit on `inet_sendmsg`/`inet6_sendmsg`/`inet_recvmsg`/`inet6_recvmsg`, the
//!   INET socket layer that `sock_sendmsg`/`sock_recvmsg` call for every TCP and UDP socket, with
//!   the return value (the byte count) in the same program;
//! - kprobe tier: sends through a kprobe (the socket, kept per thread) and a kretprobe (the byte
//!   count) on the same send functions; receives where TCP and UDP consume them
//!   (`tcp_cleanup_rbuf`, `skb_consume_udp`), by plain kprobes, because a kretprobe on a receive
//!   that sleeps holds one of the kernel's few return slots for as long as it sleeps.
//!
//! The others (tp_btf in the tracepoint and fentry tiers, classic tracepoints in the kprobe tier,
//! which then needs no kernel BTF beyond a `--btf` file):
//! - `inet_sock_set_state`: the TCP state machine: direction (SYN_SENT→ESTABLISHED is ours,
//!   SYN_RECV→ESTABLISHED is accepted), connections established while we watch, a new socket
//!   (SYN_SENT, or an accepted one) starting a fresh entry, and CLOSE (RTT and retransmits read).
//! - `tcp_destroy_sock`: the socket is freed, so nothing more can be read from it (a socket in
//!   CLOSE still can: what arrived before a reset or the peer's FIN): the final counters go to
//!   userspace (`closed_events`) and the map entry is freed.
//! - `tcp_retransmit_skb`: refreshes the retransmit counter of a connection that is not sending.
//! - the peer address of datagrams on unconnected UDP sockets (which hold no peer), remembered
//!   per thread for the duration of the call and used to count bytes per (socket, peer) flow,
//!   from one of two sources ([`NETFLOW_UDP_UNCONNECTED`]):
//!   - cgroup `sendmsg4`/`sendmsg6`/`recvmsg4`/`recvmsg6` programs on the cgroup v2 root, which
//!     the kernel runs inside `udp_sendmsg`/`udp_recvmsg` only for calls that carry an address
//!     (the default: other sockets pay nothing);
//!   - `syscalls:sys_{enter,exit}_{sendto,sendmsg,recvfrom,recvmsg}`, which run on every send
//!     and receive call of every socket (the fallback where cgroup programs cannot attach).
//!
//! Counters live in a hash map keyed by the socket's address; userspace reads it each interval.
//! Nothing is sent to userspace per packet or per syscall. A connection's final counters go to
//! userspace when it closes, through `super::closed_events`: the BPF ring buffer in the
//! `netflow` object, a perf event array in `netflow_perf` (for kernels without a ring buffer).

use aya_ebpf::helpers::generated::bpf_jiffies64;
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_user,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, cgroup_sock_addr, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{
        BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext, SockAddrContext,
        TracePointContext,
    },
};
use ebpf_common::netflow::{
    AF_INET, AF_INET6, CLASSIC_IO_LAYOUT, CONN_F_CLOSED, CONN_F_CONNECTING, CONN_F_ESTABLISHED,
    CONN_F_FINAL, CONN_F_INCOMING, CONN_F_OUTGOING, ConnInfo, DEFAULT_MAX_CONNS, IPPROTO_TCP,
    IPPROTO_UDP, NETFLOW_STAT_COUNT, NETFLOW_STAT_MAP_FULL, NETFLOW_STAT_NESTED,
    NETFLOW_STAT_READ_FAILED, NETFLOW_STAT_RINGBUF_FULL, NETFLOW_STAT_STALE_LOST, NetOffsets,
    REFRESH_JIFFIES, RETIRED_MAX_ENTRIES, RetiredKey, TracepointOffsets, UDP_PEERS_CGROUP,
    UDP_PEERS_OFF, UdpFlowKey,
};

/// Filled in by the daemon from the running kernel's BTF before loading.
#[unsafe(no_mangle)]
static NET_OFFSETS: NetOffsets = NetOffsets {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    sk_protocol: 0,
    sk_type: 0,
    tcp_srtt_us: 0,
    tcp_mdev_us: 0,
    tcp_total_retrans: 0,
    net_ns_inum: 0,
    socket_sk: 0,
};

/// Filled in by the daemon from tracefs (the kprobe and classic tiers' tracepoints).
#[unsafe(no_mangle)]
static NET_TP_OFFSETS: TracepointOffsets = TracepointOffsets {
    state_skaddr: 0,
    state_oldstate: 0,
    state_newstate: 0,
    retransmit_skaddr: 0,
    destroy_skaddr: 0,
};

/// Set by the daemon: how unconnected UDP sockets' peers are learnt (`UDP_PEERS_*`: off, from
/// syscall tracepoints, or from cgroup programs).
#[unsafe(no_mangle)]
static NETFLOW_UDP_UNCONNECTED: u32 = 0;

fn udp_peers() -> u32 {
    // SAFETY: our own read-only global; volatile so the loader's value is read.
    unsafe { core::ptr::read_volatile(&NETFLOW_UDP_UNCONNECTED) }
}

/// Resized by the daemon (`--netflow-max-conns`).
#[map]
static NETFLOW_CONNS: HashMap<u64, ConnInfo> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// Final entries replaced while the ring or perf buffer was full, for the daemon's next sweep.
#[map]
static NETFLOW_RETIRED: HashMap<RetiredKey, ConnInfo> =
    HashMap::with_max_entries(RETIRED_MAX_ENTRIES, 0);

/// Unconnected UDP flows, one per (socket, peer). Resized with NETFLOW_CONNS.
#[map]
static NETFLOW_UDP: HashMap<UdpFlowKey, ConnInfo> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// The peer a thread is sending to (sendto/sendmsg with an address), until its send is seen.
#[map]
static UDP_SEND_PEER: LruHashMap<u64, PeerCall> = LruHashMap::with_max_entries(16_384, 0);

/// The source of the datagram a thread is receiving with its address asked for (cgroup
/// `recvmsg4/6`, which runs in `udp_recvmsg` before the byte count is seen), until it is counted.
#[map]
static UDP_RECV_PEER: LruHashMap<u64, PeerCall> = LruHashMap::with_max_entries(16_384, 0);

/// A thread's pending recvfrom/recvmsg: where the peer address will be written, and what
/// the receive tracepoint saw, until the syscall returns.
#[map]
static UDP_RECV: LruHashMap<u64, RecvCall> = LruHashMap::with_max_entries(16_384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) addr: [u8; 16],
    pub(crate) port: u16,
    _pad: [u8; 6],
}

/// A thread's peer for one call, and the socket it is for (0: any; the syscall tracepoints
/// see file descriptors, not sockets).
#[repr(C)]
#[derive(Clone, Copy)]
struct PeerCall {
    sk: u64,
    peer: Peer,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RecvCall {
    /// recvfrom: the `struct sockaddr *`; recvmsg: the `struct user_msghdr *`.
    user_ptr: u64,
    is_msghdr: u64,
    sock: u64,
    bytes: u64,
}

/// Per-CPU room to build records in: BPF stacks are 512 bytes for a whole call chain, and
/// records copied on the stack in nested calls exceed it on stricter verifiers (6.12).
/// Two slots per nesting level (see [`Nest`]): `describe`, then new UDP flows.
#[map]
static SCRATCH: PerCpuArray<ConnInfo> = PerCpuArray::with_max_entries(2 * NEST_LEVELS, 0);

/// How deep our programs are nested on this CPU: a program in process context can be
/// interrupted by one in softirq context (a TCP state change on packet receipt) on the same
/// CPU, and each level must build its records in scratch slots of its own, or the outer
/// program inserts the inner one's connection under its own key.
#[map]
static NEST: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

pub(crate) const NEST_LEVELS: u32 = 4;

/// One level of nesting, held for a program's run; dropping it restores the depth.
pub(crate) struct Nest(u32);

impl Nest {
    /// Enters a level on this CPU; None (counted) when nested deeper than NEST_LEVELS.
    #[inline(always)]
    fn enter() -> Option<Nest> {
        let depth = NEST.get_ptr_mut(0)?;
        // SAFETY: this CPU's counter; nested runs restore it before we resume.
        let level = unsafe { *depth };
        if level >= NEST_LEVELS {
            count(NETFLOW_STAT_NESTED);
            return None;
        }
        unsafe { *depth = level + 1 };
        Some(Nest(level))
    }

    /// This run's nesting level, below NEST_LEVELS.
    #[inline(always)]
    pub(crate) fn level(&self) -> u32 {
        self.0 & (NEST_LEVELS - 1)
    }

    /// Scratch slot `which` (0 or 1) of this level.
    #[inline(always)]
    fn scratch(&self, which: u32) -> Option<&'static mut ConnInfo> {
        let slot = SCRATCH.get_ptr_mut(self.level() * 2 + which)?;
        // SAFETY: this CPU's slot for this nesting level, used by no other run.
        Some(unsafe { &mut *slot })
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        if let Some(depth) = NEST.get_ptr_mut(0) {
            // SAFETY: this CPU's counter.
            unsafe { *depth = self.0 };
        }
    }
}

#[map]
static NETFLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NETFLOW_STAT_COUNT, 0);

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const MSG_PEEK: i32 = 2;

fn offsets() -> NetOffsets {
    // SAFETY: a read of our own read-only global; volatile so the loader's value is used,
    // not the zeroes the compiler sees.
    unsafe { core::ptr::read_volatile(&NET_OFFSETS) }
}

fn count(index: u32) {
    if let Some(counter) = NETFLOW_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
}

/// Reads a `T` at `base + offset` in kernel memory.
fn read<T>(base: *const u8, offset: u32) -> Result<T, ()> {
    // SAFETY: the helper checks the address; a failure is an error, never a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }.map_err(|_| ())
}

// `sock_send_length(sk, ret, flags)` and `sock_recv_length(sk, ret, flags)`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn netflow_send(ctx: BtfTracePointContext) -> u32 {
    on_length(ctx.as_ptr(), ctx.arg(0), ctx.arg(1), 0, true);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn netflow_recv(ctx: BtfTracePointContext) -> u32 {
    on_length(ctx.as_ptr(), ctx.arg(0), ctx.arg(1), ctx.arg(2), false);
    0
}

/// An event of the `sock_msg_length` class (tracepoint and classic-tracepoint tiers): `ret`
/// is the byte count, or a negative error.
#[inline(always)]
fn on_length(ctx: *mut c_void, sk: *const u8, ret: i32, flags: i32, send: bool) {
    if ret <= 0 {
        return;
    }
    if send {
        on_io(ctx, sk, ret as u64, 0);
    } else if flags & MSG_PEEK == 0 {
        // A peek leaves the data in the socket: it is counted when really read.
        on_io(ctx, sk, 0, ret as u64);
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn netflow_state(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if on_state(ctx.as_ptr(), sk, old, new).is_err() {
        count(NETFLOW_STAT_READ_FAILED);
    }
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn netflow_retransmit(ctx: BtfTracePointContext) -> u32 {
    on_retransmit(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn netflow_destroy(ctx: BtfTracePointContext) -> u32 {
    on_destroy(ctx.as_ptr(), ctx.arg(0));
    0
}

// ---- fentry tier: fexit on the INET socket layer ----
// `int inet_sendmsg(struct socket *, struct msghdr *, size_t)` and
// `int inet_recvmsg(struct socket *, struct msghdr *, size_t, int flags)` (same for inet6_*,
// unchanged since 4.x). An fexit context holds the arguments, then the return value.

#[fexit(function = "inet_sendmsg")]
pub fn netflow_fexit_inet_send(ctx: FExitContext) -> u32 {
    fexit_send(&ctx)
}

#[fexit(function = "inet6_sendmsg")]
pub fn netflow_fexit_inet6_send(ctx: FExitContext) -> u32 {
    fexit_send(&ctx)
}

#[fexit(function = "inet_recvmsg")]
pub fn netflow_fexit_inet_recv(ctx: FExitContext) -> u32 {
    fexit_recv(&ctx)
}

#[fexit(function = "inet6_recvmsg")]
pub fn netflow_fexit_inet6_recv(ctx: FExitContext) -> u32 {
    fexit_recv(&ctx)
}

#[inline(always)]
fn fexit_send(ctx: &FExitContext) -> u32 {
    // Read as u64 slots: `ctx.ret()` needs bpf_get_func_ret (5.17+); the slot works from 5.5.
    let ret = ctx.arg::<u64>(3) as i32;
    on_socket_io(ctx.as_ptr(), ctx.arg(0), ret, 0, false);
    0
}

#[inline(always)]
fn fexit_recv(ctx: &FExitContext) -> u32 {
    let flags = ctx.arg::<u64>(3) as i32;
    let ret = ctx.arg::<u64>(4) as i32;
    on_socket_io(ctx.as_ptr(), ctx.arg(0), 0, ret, flags & MSG_PEEK != 0);
    0
}

/// A send (`sent` > 0) or receive (`received` > 0) returned by the INET layer on `sock`
/// (a `struct socket *`). Errors and zero-length calls are negative or zero.
#[inline(always)]
fn on_socket_io(ctx: *mut c_void, sock: *const u8, sent: i32, received: i32, peek: bool) {
    if peek || (sent <= 0 && received <= 0) {
        return;
    }
    let Ok(sk) = read::<*const u8>(sock, offsets().socket_sk) else {
        count(NETFLOW_STAT_READ_FAILED);
        return;
    };
    on_io(ctx, sk, sent.max(0) as u64, received.max(0) as u64);
}

// ---- kprobe tier ----
// Sends: kprobe + kretprobe on inet_sendmsg/inet6_sendmsg (the byte count is the return
// value). Receives: a kretprobe would hold one of the kernel's few return slots (max(10,
// 2 x CPUs)) for as long as a thread sleeps in recv, and returns beyond that are lost, so
// receives are counted where they are consumed instead, by plain kprobes:
// `tcp_cleanup_rbuf(sk, copied)` (TCP; `copied` so far in this recvmsg, possibly called
// again with a larger total before the call sleeps for more) and
// `skb_consume_udp(sk, skb, len)` (UDP; `len` is what recvmsg returns, negative when peeking).

/// The socket of a thread's pending inet_sendmsg, for its kretprobe.
#[map]
static INET_SENDS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16_384, 0);

/// A thread's pending inet_recvmsg: its sock, flags, and the bytes already counted.
#[map]
static INET_RECVS: LruHashMap<u64, InetRecv> = LruHashMap::with_max_entries(16_384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct InetRecv {
    sk: u64,
    flags: u64,
    counted: u64,
}

#[kprobe]
pub fn netflow_kprobe_send(ctx: ProbeContext) -> u32 {
    let sock = ctx.arg::<u64>(0).unwrap_or(0);
    if sock != 0 {
        let _ = INET_SENDS.insert(&bpf_get_current_pid_tgid(), &sock, 0);
    }
    0
}

#[kretprobe]
pub fn netflow_kretprobe_send(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: a copy out of this thread's entry.
    if let Some(sock) = unsafe { INET_SENDS.get(&thread) }.copied() {
        let _ = INET_SENDS.remove(&thread);
        on_socket_io(
            ctx.as_ptr(),
            sock as *const u8,
            ctx.ret::<u64>() as i32,
            0,
            false,
        );
    }
    0
}

/// inet_recvmsg/inet6_recvmsg entry: starts this thread's count for the call.
#[kprobe]
pub fn netflow_kprobe_recv(ctx: ProbeContext) -> u32 {
    let sock = ctx.arg::<u64>(0).unwrap_or(0) as *const u8;
    let flags = ctx.arg::<u64>(3).unwrap_or(0);
    if let Ok(sk) = read::<u64>(sock, offsets().socket_sk) {
        let call = InetRecv {
            sk,
            flags,
            counted: 0,
        };
        let _ = INET_RECVS.insert(&bpf_get_current_pid_tgid(), &call, 0);
    }
    0
}

/// `void tcp_cleanup_rbuf(struct sock *sk, int copied)`.
#[kprobe]
pub fn netflow_kprobe_tcp_recv(ctx: ProbeContext) -> u32 {
    let sk = ctx.arg::<u64>(0).unwrap_or(0);
    let copied = ctx.arg::<u64>(1).unwrap_or(0) as i32;
    if sk == 0 || copied <= 0 {
        return 0;
    }
    let copied = copied as u64;
    let thread = bpf_get_current_pid_tgid();
    let new = match INET_RECVS.get_ptr_mut(&thread) {
        // SAFETY: this thread's own entry.
        Some(call) if unsafe { (*call).sk } == sk => unsafe {
            // A peek leaves the data in the socket: it is counted when really read.
            if (*call).flags as i32 & MSG_PEEK != 0 || copied <= (*call).counted {
                return 0;
            }
            let new = copied - (*call).counted;
            (*call).counted = copied;
            new
        },
        // Not inside a recvmsg on this socket (splice, kernel readers): all of it is new.
        _ => copied,
    };
    on_io(ctx.as_ptr(), sk as *const u8, 0, new);
    0
}

/// `void skb_consume_udp(struct sock *sk, struct sk_buff *skb, int len)`.
#[kprobe]
pub fn netflow_kprobe_udp_recv(ctx: ProbeContext) -> u32 {
    let sk = ctx.arg::<u64>(0).unwrap_or(0);
    let len = ctx.arg::<u64>(2).unwrap_or(0) as i32;
    if sk != 0 && len > 0 {
        on_io(ctx.as_ptr(), sk as *const u8, 0, len as u64);
    }
    0
}

/// `sock:inet_sock_set_state`, classic tracepoint (kprobe and classic tiers).
#[tracepoint]
pub fn netflow_tp_state(ctx: TracePointContext) -> u32 {
    // SAFETY: a read of our own read-only global; volatile so the loader's value is used.
    let off = unsafe { core::ptr::read_volatile(&NET_TP_OFFSETS) };
    // SAFETY: offsets from this tracepoint's format file; reads are bounds-checked.
    let fields = unsafe {
        (
            ctx.read_at::<u64>(off.state_skaddr as usize),
            ctx.read_at::<i32>(off.state_oldstate as usize),
            ctx.read_at::<i32>(off.state_newstate as usize),
        )
    };
    match fields {
        (Ok(sk), Ok(old), Ok(new)) => {
            if on_state(ctx.as_ptr(), sk as *const u8, old, new).is_err() {
                count(NETFLOW_STAT_READ_FAILED);
            }
        }
        _ => count(NETFLOW_STAT_READ_FAILED),
    }
    0
}

/// `sock:sock_send_length` and `sock:sock_recv_length`, classic tracepoints (classic tier).
#[tracepoint]
pub fn netflow_tp_send(ctx: TracePointContext) -> u32 {
    classic_io(&ctx, true);
    0
}

#[tracepoint]
pub fn netflow_tp_recv(ctx: TracePointContext) -> u32 {
    classic_io(&ctx, false);
    0
}

/// A send or receive from the `sock_msg_length` event class (`sk`, `ret`, `flags`), loaded from
/// the record at the constant offsets of CLASSIC_IO_LAYOUT: the daemon attaches this tier only
/// when tracefs gives that layout.
#[inline(always)]
fn classic_io(ctx: &TracePointContext, send: bool) {
    let [sk, ret, flags] = CLASSIC_IO_LAYOUT;
    let base = ctx.as_ptr() as *const u8;
    // SAFETY: constant, aligned offsets inside the record (tracefs says so); the verifier
    // checks context loads against the tracepoint's record size.
    let (sk, ret, flags) = unsafe {
        (
            *(base.add(sk as usize) as *const u64),
            *(base.add(ret as usize) as *const i32),
            *(base.add(flags as usize) as *const i32),
        )
    };
    on_length(ctx.as_ptr(), sk as *const u8, ret, flags, send);
}

/// `tcp:tcp_retransmit_skb`, classic tracepoint (kprobe and classic tiers).
#[tracepoint]
pub fn netflow_tp_retransmit(ctx: TracePointContext) -> u32 {
    // SAFETY: as in netflow_tp_state.
    let off = unsafe { core::ptr::read_volatile(&NET_TP_OFFSETS) };
    match unsafe { ctx.read_at::<u64>(off.retransmit_skaddr as usize) } {
        Ok(sk) => on_retransmit(sk as *const u8),
        Err(_) => count(NETFLOW_STAT_READ_FAILED),
    }
    0
}

/// `tcp:tcp_destroy_sock`, classic tracepoint (kprobe and classic tiers).
#[tracepoint]
pub fn netflow_tp_destroy(ctx: TracePointContext) -> u32 {
    // SAFETY: as in netflow_tp_state.
    let off = unsafe { core::ptr::read_volatile(&NET_TP_OFFSETS) };
    match unsafe { ctx.read_at::<u64>(off.destroy_skaddr as usize) } {
        Ok(sk) => on_destroy(ctx.as_ptr(), sk as *const u8),
        Err(_) => count(NETFLOW_STAT_READ_FAILED),
    }
    0
}

fn on_retransmit(sk: *const u8) {
    let key = sk as u64;
    if let Some(info) = NETFLOW_CONNS.get_ptr_mut(&key) {
        // This fires before the kernel adds this retransmission to total_retrans (and, on
        // newer kernels, for failed attempts too): record what is there; the reads at the
        // next I/O and at close bring it up to date, exactly.
        if let Ok(total) = read::<u32>(sk, offsets().tcp_total_retrans) {
            // SAFETY: `info` points into the map value.
            unsafe { raise(&mut (*info).retransmits, total) };
        }
    }
}

/// Adds to a counter that several CPUs may update at once (two threads on one socket).
/// Adding zero is skipped: LLVM turns an atomic add of a known 0 into an atomic OR, which
/// kernels before 5.12 reject ("BPF_STX uses reserved fields").
#[inline(always)]
fn add(field: &mut u64, n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: an aligned u64 inside a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

/// Raises a counter that only grows; a lost race is corrected by the next read.
fn raise(field: &mut u32, value: u32) {
    if value > *field {
        *field = value;
    }
}

/// A send or receive by the current process.
fn on_io(ctx: *mut c_void, sk: *const u8, sent: u64, recv: u64) {
    let key = sk as u64;
    let info = match NETFLOW_CONNS
        .get_ptr_mut(&key)
        .filter(|&info| still_ours(ctx, sk, info))
    {
        Some(info) => info,
        None => {
            let Some(nest) = Nest::enter() else {
                return;
            };
            let Some(new) = describe(sk, &nest) else {
                return;
            };
            // An unconnected UDP socket has no peer: the syscall tracepoints know it.
            if new.dport == 0 {
                if new.protocol == IPPROTO_UDP {
                    unconnected_udp(ctx, key, new, sent, recv, &nest);
                }
                return;
            }
            if !track(key, new) {
                return;
            }
            match NETFLOW_CONNS.get_ptr_mut(&key) {
                Some(info) => info,
                None => return,
            }
        }
    };
    // SAFETY: `info` points into the map value for this socket.
    unsafe {
        if sent > 0 {
            add(&mut (*info).bytes_sent, sent);
        }
        if recv > 0 {
            add(&mut (*info).bytes_recv, recv);
        }
        if (*info).pid == 0 {
            set_process(&mut *info);
        }
        // Hot path: a clock read and three socket reads per call add up, and values at
        // most REFRESH_JIFFIES old serve an interval of seconds (close always reads).
        let now = bpf_jiffies64();
        if now.wrapping_sub((*info).refresh_jiffies) >= REFRESH_JIFFIES {
            (*info).refresh_jiffies = now;
            (*info).last_ns = bpf_ktime_get_ns();
            if (*info).protocol == IPPROTO_TCP {
                read_tcp(sk, &mut *info);
            }
        }
    }
}

/// A TCP state change; `ctx` is the program's context (a perf event array's output needs it).
fn on_state(ctx: *mut c_void, sk: *const u8, old: i32, new: i32) -> Result<(), ()> {
    let key = sk as u64;
    let Some(nest) = Nest::enter() else {
        return Ok(());
    };
    match new {
        TCP_SYN_SENT => {
            // connect(): the only state change made in the connecting process's context. A
            // new connection: whatever the map holds for this address is a stale entry.
            if let Some(info) = describe(sk, &nest) {
                set_process(info);
                info.flags = CONN_F_CONNECTING;
                if let Some(old) = NETFLOW_CONNS.get_ptr_mut(&key) {
                    // SAFETY: map value of this address.
                    retire(ctx, &nest, key, unsafe { &mut *old });
                }
                replace(key, info);
            }
        }
        TCP_ESTABLISHED => {
            let direction = match old {
                TCP_SYN_SENT => CONN_F_OUTGOING,
                TCP_SYN_RECV => CONN_F_INCOMING,
                _ => 0,
            };
            let Some(fresh) = describe(sk, &nest) else {
                return Ok(());
            };
            // An accepted socket is new: an entry with a past (another socket's, whose memory
            // this is) is retired. One without (I/O during SYN_RECV: TCP Fast Open) is its own.
            let stale = |info: *mut ConnInfo| {
                // SAFETY: map value of this address.
                let flags = unsafe { (*info).flags };
                direction == CONN_F_INCOMING
                    && flags
                        & (CONN_F_ESTABLISHED | CONN_F_CLOSED | CONN_F_FINAL | CONN_F_CONNECTING)
                        != 0
            };
            let current = match NETFLOW_CONNS.get_ptr_mut(&key) {
                Some(old) if stale(old) => {
                    // SAFETY: map value of this address.
                    retire(ctx, &nest, key, unsafe { &mut *old });
                    None
                }
                found => found,
            };
            match current {
                // The tuple is complete only now (the source port is picked after SYN_SENT).
                // SAFETY: map value of this socket.
                Some(info) => unsafe {
                    (*info).saddr = fresh.saddr;
                    (*info).daddr = fresh.daddr;
                    (*info).sport = fresh.sport;
                    (*info).dport = fresh.dport;
                    (*info).flags |= CONN_F_ESTABLISHED | direction;
                    (*info).last_ns = bpf_ktime_get_ns();
                },
                None => {
                    fresh.flags |= CONN_F_ESTABLISHED | direction;
                    if direction == CONN_F_INCOMING {
                        replace(key, fresh);
                    } else {
                        track(key, fresh);
                    }
                }
            }
        }
        TCP_CLOSE => {
            // Not the end: the socket can still be read until it is destroyed.
            if let Some(info) = NETFLOW_CONNS.get_ptr_mut(&key) {
                // SAFETY: map value of this socket.
                unsafe {
                    read_tcp(sk, &mut *info);
                    (*info).flags |= CONN_F_CLOSED;
                    (*info).last_ns = bpf_ktime_get_ns();
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A TCP socket is freed: its entry is final.
fn on_destroy(ctx: *mut c_void, sk: *const u8) {
    let key = sk as u64;
    let Some(info) = NETFLOW_CONNS.get_ptr_mut(&key) else {
        return;
    };
    let Some(nest) = Nest::enter() else {
        return;
    };
    // SAFETY: map value of this socket, still allocated.
    let info = unsafe { &mut *info };
    read_tcp(sk, info);
    info.flags |= CONN_F_FINAL;
    info.last_ns = unsafe { bpf_ktime_get_ns() };
    if super::closed_events::submit(ctx, &nest, key, info, None) {
        let _ = NETFLOW_CONNS.remove(&key);
        return;
    }
    count(NETFLOW_STAT_RINGBUF_FULL);
    // Deferred to the daemon's next sweep, in the retired map: its key (socket and start) is
    // this connection's alone, so the daemon's delete there can never hit a newer socket's
    // entry, as a delete in the connection map could once the address is reused.
    if to_retired(key, info, None) {
        let _ = NETFLOW_CONNS.remove(&key);
    }
    // Else left in the connection map flagged final, for the sweep.
}

/// Hands a stale entry (its socket gone, the address now another socket's) over as final, so
/// that its last counts are reported; the caller replaces it.
#[inline(always)]
fn retire(ctx: *mut c_void, nest: &Nest, key: u64, old: &mut ConnInfo) {
    old.flags |= CONN_F_FINAL;
    hand_over(ctx, nest, key, old, None);
}

/// Sends a final entry that is about to be replaced to userspace: through the ring or perf
/// buffer, else (full: the daemon is behind) into NETFLOW_RETIRED for its next sweep; lost,
/// and counted, only when both are full. `peer`: the rest of an unconnected UDP flow's key.
#[inline(always)]
fn hand_over(ctx: *mut c_void, nest: &Nest, sock: u64, info: &ConnInfo, peer: Option<&Peer>) {
    if !super::closed_events::submit(ctx, nest, sock, info, peer) && !to_retired(sock, info, peer) {
        count(NETFLOW_STAT_STALE_LOST);
    }
}

/// Puts a final entry in NETFLOW_RETIRED for the daemon's next sweep; false when it is full.
#[inline(always)]
fn to_retired(sock: u64, info: &ConnInfo, peer: Option<&Peer>) -> bool {
    let mut key = RetiredKey {
        sock,
        start_ns: info.start_ns,
        ..RetiredKey::default()
    };
    if let Some(peer) = peer {
        key.peer = peer.addr;
        key.peer_port = peer.port;
        key.udp_flow = 1;
    }
    NETFLOW_RETIRED.insert(&key, info, 0).is_ok()
}

/// Whether the entry found for `sk` still belongs to the socket doing I/O there. TCP entries
/// are renewed by the state changes; a final one left for the sweep, or a connected UDP one
/// (UDP has no event when a socket is freed) whose ports are no longer the socket's, belongs
/// to a socket that is gone: it is retired and removed, and the caller starts a fresh entry.
#[inline(always)]
fn still_ours(ctx: *mut c_void, sk: *const u8, info: *mut ConnInfo) -> bool {
    // SAFETY: map value of this address.
    let info = unsafe { &mut *info };
    let stale = if info.flags & CONN_F_FINAL != 0 {
        true
    } else if info.protocol == IPPROTO_UDP {
        // `skc_dport` (network order) and `skc_num` are adjacent (`skc_portpair`; the daemon
        // checks it): one read.
        match read::<[u8; 4]>(sk, offsets().skc_dport) {
            Ok(pair) => {
                let dport = u16::from_be_bytes([pair[0], pair[1]]);
                let sport = u16::from_ne_bytes([pair[2], pair[3]]);
                dport != info.dport || sport != info.sport
            }
            Err(_) => false,
        }
    } else {
        false
    };
    if !stale {
        return true;
    }
    if let Some(nest) = Nest::enter() {
        if info.flags & CONN_F_FINAL == 0 {
            retire(ctx, &nest, sk as u64, info);
        } else {
            hand_over(ctx, &nest, sk as u64, info, None);
        }
    }
    let _ = NETFLOW_CONNS.remove(&(sk as u64));
    false
}

/// A datagram on an unconnected UDP socket. Sends are counted now, with the peer recorded
/// before (cgroup `sendmsg4/6`, or at syscall entry). Receives too with the cgroup programs
/// (`recvmsg4/6` ran in this same call, before the count); with the syscall tracepoints, when
/// the syscall returns, once the peer address is written.
fn unconnected_udp(
    ctx: *mut c_void,
    sock: u64,
    template: &ConnInfo,
    sent: u64,
    recv: u64,
    nest: &Nest,
) {
    let thread = bpf_get_current_pid_tgid();
    // The peer and its socket are copied out field by field, not as a whole PeerCall: these
    // programs' stack is tight on some verifiers (see SCRATCH).
    if sent > 0 {
        if let Some(call) = UDP_SEND_PEER.get_ptr(&thread) {
            // SAFETY: copies out of this thread's entry.
            let (sk, peer) = unsafe { ((*call).sk, (*call).peer) };
            let _ = UDP_SEND_PEER.remove(&thread);
            // A peer recorded for another socket is left from a call that failed after it.
            if sk == 0 || sk == sock {
                udp_flow(ctx, sock, template, &peer, sent, 0, nest);
            }
        }
    } else if udp_peers() == UDP_PEERS_CGROUP {
        if let Some(call) = UDP_RECV_PEER.get_ptr(&thread) {
            // SAFETY: copies out of this thread's entry.
            let (sk, peer) = unsafe { ((*call).sk, (*call).peer) };
            let _ = UDP_RECV_PEER.remove(&thread);
            // Another socket's: left from a receive that was not counted (a peek, an empty
            // datagram). A receive without the address asked for has no peer: not counted.
            if sk == sock {
                udp_flow(ctx, sock, template, &peer, 0, recv, nest);
            }
        }
    } else if let Some(call) = UDP_RECV.get_ptr_mut(&thread) {
        // SAFETY: this thread's own entry.
        unsafe {
            (*call).sock = sock;
            (*call).bytes = recv;
        }
    }
}

/// Adds to the (socket, peer) flow, creating it: a flow begun by a receive is incoming.
// Inlined: BPF calls take at most five arguments.
#[inline(always)]
fn udp_flow(
    ctx: *mut c_void,
    sock: u64,
    template: &ConnInfo,
    peer: &Peer,
    sent: u64,
    recv: u64,
    nest: &Nest,
) {
    let key = UdpFlowKey {
        sock,
        peer: peer.addr,
        port: peer.port,
        _pad: [0; 6],
    };
    if let Some(info) = NETFLOW_UDP.get_ptr_mut(&key) {
        // SAFETY: map value of this flow.
        let info = unsafe { &mut *info };
        // The same local port and address: this socket's flow. Otherwise the socket that had
        // this memory is gone (UDP has no event for it): its flow is handed over as final.
        if info.sport == template.sport && info.saddr == template.saddr {
            add(&mut info.bytes_sent, sent);
            add(&mut info.bytes_recv, recv);
            info.last_ns = unsafe { bpf_ktime_get_ns() };
            return;
        }
        info.flags |= CONN_F_FINAL;
        hand_over(ctx, nest, sock, info, Some(peer));
        let _ = NETFLOW_UDP.remove(&key);
    }
    // Slot 1 of this level (slot 0 may hold `template`).
    let Some(info) = nest.scratch(1) else {
        return;
    };
    *info = *template;
    info.daddr = peer.addr;
    info.dport = peer.port;
    info.bytes_sent = sent;
    info.bytes_recv = recv;
    info.flags = if recv > 0 {
        CONN_F_INCOMING
    } else {
        CONN_F_OUTGOING
    };
    set_process(info);
    match NETFLOW_UDP.insert(&key, info, BPF_NOEXIST as u64) {
        Ok(()) | Err(-17) => {}
        Err(_) => count(NETFLOW_STAT_MAP_FULL),
    }
}

/// A user-space `struct sockaddr` (AF_INET or AF_INET6) as a peer.
fn read_sockaddr(ptr: u64) -> Option<Peer> {
    if ptr == 0 {
        return None;
    }
    let base = ptr as *const u8;
    // SAFETY: checked user-memory reads.
    let family: u16 = unsafe { bpf_probe_read_user(base as *const u16) }.ok()?;
    let port: u16 = unsafe { bpf_probe_read_user(base.wrapping_add(2) as *const u16) }.ok()?;
    let addr = match family {
        AF_INET => {
            v4_mapped(unsafe { bpf_probe_read_user(base.wrapping_add(4) as *const [u8; 4]) }.ok()?)
        }
        AF_INET6 => unsafe { bpf_probe_read_user(base.wrapping_add(8) as *const [u8; 16]) }.ok()?,
        _ => return None,
    };
    Some(Peer {
        addr,
        port: u16::from_be(port),
        _pad: [0; 6],
    })
}

/// Syscall tracepoint argument `n` (they follow the 8-byte header and `__syscall_nr`).
fn syscall_arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoints carry six 8-byte arguments from offset 16.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

fn send_peer(peer: Peer) {
    let call = PeerCall { sk: 0, peer };
    let _ = UDP_SEND_PEER.insert(&bpf_get_current_pid_tgid(), &call, 0);
}

#[tracepoint]
pub fn netflow_sendto(ctx: TracePointContext) -> u32 {
    if let Some(peer) = read_sockaddr(syscall_arg(&ctx, 4)) {
        send_peer(peer);
    }
    0
}

#[tracepoint]
pub fn netflow_sendmsg(ctx: TracePointContext) -> u32 {
    let msg = syscall_arg(&ctx, 1);
    // SAFETY: checked user-memory read of user_msghdr.msg_name (its first field).
    let name = unsafe { bpf_probe_read_user(msg as *const u64) }.unwrap_or(0);
    if let Some(peer) = read_sockaddr(name) {
        send_peer(peer);
    }
    0
}

fn recv_enter(user_ptr: u64, is_msghdr: u64) {
    if user_ptr != 0 {
        let call = RecvCall {
            user_ptr,
            is_msghdr,
            sock: 0,
            bytes: 0,
        };
        let _ = UDP_RECV.insert(&bpf_get_current_pid_tgid(), &call, 0);
    }
}

#[tracepoint]
pub fn netflow_recvfrom(ctx: TracePointContext) -> u32 {
    recv_enter(syscall_arg(&ctx, 4), 0);
    0
}

#[tracepoint]
pub fn netflow_recvmsg(ctx: TracePointContext) -> u32 {
    recv_enter(syscall_arg(&ctx, 1), 1);
    0
}

#[tracepoint]
pub fn netflow_recv_exit(ctx: TracePointContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: a copy out of the map value.
    let Some(call) = (unsafe { UDP_RECV.get(&thread) }).copied() else {
        return 0;
    };
    let _ = UDP_RECV.remove(&thread);
    // `ret` of a syscall exit tracepoint is at offset 16.
    let ret = syscall_arg(&ctx, 0) as i64;
    if ret <= 0 || call.sock == 0 {
        return 0;
    }
    let name = if call.is_msghdr != 0 {
        // SAFETY: checked user-memory read of user_msghdr.msg_name.
        unsafe { bpf_probe_read_user(call.user_ptr as *const u64) }.unwrap_or(0)
    } else {
        call.user_ptr
    };
    let Some(peer) = read_sockaddr(name) else {
        return 0;
    };
    let Some(nest) = Nest::enter() else {
        return 0;
    };
    if let Some(template) = describe(call.sock as *const u8, &nest) {
        udp_flow(
            ctx.as_ptr(),
            call.sock,
            template,
            &peer,
            0,
            call.bytes,
            &nest,
        );
    }
    0
}

// ---- cgroup programs: the peers of unconnected UDP sockets ----
// Attached to the cgroup v2 root (every socket of the host). The kernel runs `cgroup/sendmsg4`
// and `sendmsg6` in `udp_sendmsg`/`udpv6_sendmsg` only when the call carries an address
// (`sendto`, `sendmsg` with a name; an IPv6 socket sending to an IPv4-mapped address runs
// `sendmsg4`), before the send is counted; `cgroup/recvmsg4` and `recvmsg6` (5.2+) in
// `udp_recvmsg`/`udpv6_recvmsg` once a datagram is copied and the caller asked for its source
// (`recvfrom`, `recvmsg` with a name), before the receive is counted (tracepoint
// `sock_recv_length`, fexit `inet_recvmsg`, kprobe `skb_consume_udp`). Each `recvmmsg` or
// `sendmmsg` datagram is its own call there, so batches are attributed too. These programs
// only look: they always allow (1) and never write the address.

#[cgroup_sock_addr(sendmsg4)]
pub fn netflow_cg_sendmsg4(ctx: SockAddrContext) -> i32 {
    let call = sock_addr_peer(&ctx, false);
    let _ = UDP_SEND_PEER.insert(&bpf_get_current_pid_tgid(), &call, 0);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn netflow_cg_sendmsg6(ctx: SockAddrContext) -> i32 {
    let call = sock_addr_peer(&ctx, true);
    let _ = UDP_SEND_PEER.insert(&bpf_get_current_pid_tgid(), &call, 0);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn netflow_cg_recvmsg4(ctx: SockAddrContext) -> i32 {
    let call = sock_addr_peer(&ctx, false);
    let _ = UDP_RECV_PEER.insert(&bpf_get_current_pid_tgid(), &call, 0);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn netflow_cg_recvmsg6(ctx: SockAddrContext) -> i32 {
    let call = sock_addr_peer(&ctx, true);
    let _ = UDP_RECV_PEER.insert(&bpf_get_current_pid_tgid(), &call, 0);
    1
}

/// The address (`user_ip4`, IPv4-mapped, or `user_ip6`, network order) and port (`user_port`,
/// network order in the low 16 bits) of a sock_addr context, and its socket (`sk`, the
/// `struct sock *` the counting programs see; storing it needs CAP_PERFMON, as our reads of
/// kernel memory do).
#[inline(always)]
fn sock_addr_peer(ctx: &SockAddrContext, v6: bool) -> PeerCall {
    let sa = ctx.sock_addr;
    // SAFETY: context fields, read at the sizes the verifier allows (4 bytes, `sk` 8); it
    // rewrites them into reads of the call's `struct sockaddr` and socket.
    unsafe {
        let addr = if v6 {
            let mut addr = [0u8; 16];
            let words = [
                core::ptr::read_volatile(&(*sa).user_ip6[0]),
                core::ptr::read_volatile(&(*sa).user_ip6[1]),
                core::ptr::read_volatile(&(*sa).user_ip6[2]),
                core::ptr::read_volatile(&(*sa).user_ip6[3]),
            ];
            for (i, word) in words.iter().enumerate() {
                addr[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            addr
        } else {
            v4_mapped(core::ptr::read_volatile(&(*sa).user_ip4).to_ne_bytes())
        };
        let port = core::ptr::read_volatile(&(*sa).user_port) as u16;
        let sk = core::ptr::read_volatile(&(*sa).__bindgen_anon_1.sk) as u64;
        PeerCall {
            sk,
            peer: Peer {
                addr,
                port: u16::from_be(port),
                _pad: [0; 6],
            },
        }
    }
}

/// Inserts a new entry over whatever the map holds for `key`; counts a full map.
fn replace(key: u64, info: &ConnInfo) {
    if NETFLOW_CONNS.insert(&key, info, 0).is_err() {
        count(NETFLOW_STAT_MAP_FULL);
    }
}

/// Inserts a new entry; counts a full map.
fn track(key: u64, info: &ConnInfo) -> bool {
    match NETFLOW_CONNS.insert(&key, info, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // -EEXIST: another CPU inserted it first; use theirs.
        Err(-17) => true,
        Err(_) => {
            count(NETFLOW_STAT_MAP_FULL);
            false
        }
    }
}

fn set_process(info: &mut ConnInfo) {
    info.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Ok(comm) = bpf_get_current_comm() {
        info.comm = comm;
    }
}

/// RTT and retransmits as TCP_INFO reports them (srtt >> 3, mdev >> 2, total_retrans).
fn read_tcp(sk: *const u8, info: &mut ConnInfo) {
    let off = offsets();
    if let (Ok(srtt), Ok(mdev), Ok(retrans)) = (
        read::<u32>(sk, off.tcp_srtt_us),
        read::<u32>(sk, off.tcp_mdev_us),
        read::<u32>(sk, off.tcp_total_retrans),
    ) {
        info.srtt_us = srtt >> 3;
        info.rtt_var_us = mdev >> 2;
        raise(&mut info.retransmits, retrans);
    }
}

/// A new record for an INET TCP or UDP socket, built in this CPU's scratch slot 0 (valid
/// until the program returns); None for any other socket, or when a read fails (counted).
/// A plain Option: it comes back in a register, where verifiers keep the pointer's type.
#[inline(always)]
fn describe(sk: *const u8, nest: &Nest) -> Option<&'static mut ConnInfo> {
    match describe_into(sk, nest) {
        Ok(found) => found,
        Err(()) => {
            count(NETFLOW_STAT_READ_FAILED);
            None
        }
    }
}

#[inline(always)]
fn describe_into(sk: *const u8, nest: &Nest) -> Result<Option<&'static mut ConnInfo>, ()> {
    let off = offsets();
    let family: u16 = read(sk, off.skc_family)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let protocol: u16 = read(sk, off.sk_protocol)?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(None);
    }
    let dport = u16::from_be(read(sk, off.skc_dport)?);
    // An unconnected UDP socket is only of use when its peers are tracked; stop here
    // otherwise, before the address reads (every datagram of a DNS server comes here).
    if protocol == IPPROTO_UDP && dport == 0 && udp_peers() == UDP_PEERS_OFF {
        return Ok(None);
    }
    let info = nest.scratch(0).ok_or(())?;
    *info = ConnInfo::default();
    info.family = family;
    info.protocol = protocol;
    info.start_ns = unsafe { bpf_ktime_get_ns() };
    info.last_ns = info.start_ns;
    info.sport = read(sk, off.skc_num)?;
    info.dport = dport;
    if family == AF_INET {
        let saddr: [u8; 4] = read(sk, off.skc_rcv_saddr)?;
        let daddr: [u8; 4] = read(sk, off.skc_daddr)?;
        info.saddr = v4_mapped(saddr);
        info.daddr = v4_mapped(daddr);
    } else {
        info.saddr = read(sk, off.skc_v6_rcv_saddr)?;
        info.daddr = read(sk, off.skc_v6_daddr)?;
    }
    let net: *const u8 = read(sk, off.skc_net)?;
    info.netns = read(net, off.net_ns_inum)?;
    Ok(Some(info))
}

fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
