//! netflow: per-connection counters kept in a kernel hash map keyed by the socket's address,
//! and the final counters of closed connections sent through a ring buffer.
//!
//! Struct field offsets are not compiled in: the daemon reads them from the running kernel's BTF
//! and hands them to the programs as [`NetOffsets`] (a read-only global), because Rust eBPF gets
//! no CO-RE relocations.

/// Name of the connection map (`HashMap<u64 socket address, ConnInfo>`).
pub const CONNS_MAP: &str = "NETFLOW_CONNS";
/// Name of the map of unconnected UDP flows (`HashMap<UdpFlowKey, ConnInfo>`): a socket that
/// talks to several peers has one entry per peer.
pub const UDP_FLOWS_MAP: &str = "NETFLOW_UDP";
/// Name of the map of final entries that had to make room while the ring or perf buffer was
/// full (`HashMap<RetiredKey, ConnInfo>`); the daemon empties it each sweep.
pub const RETIRED_MAP: &str = "NETFLOW_RETIRED";
/// Its size: 8,192 entries of about 200 bytes.
pub const RETIRED_MAX_ENTRIES: u32 = 8_192;
/// Name of the ring buffer carrying [`ClosedConn`] records.
pub const CLOSED_MAP: &str = "NETFLOW_CLOSED";
/// Name of the per-CPU counter array (`NETFLOW_STAT_*` indices).
pub const STATS_MAP: &str = "NETFLOW_STATS";
/// Name of the read-only u32 global: how unconnected UDP sockets' peers are learnt, one of
/// [`UDP_PEERS_OFF`], [`UDP_PEERS_SYSCALLS`], [`UDP_PEERS_CGROUP`]; off, the probes drop such
/// sockets after two reads.
pub const UDP_UNCONNECTED_GLOBAL: &str = "NETFLOW_UDP_UNCONNECTED";
/// Unconnected UDP is not counted (`--netflow-udp-unconnected-disabled`, or no mechanism).
pub const UDP_PEERS_OFF: u32 = 0;
/// Peers from the `sendto`/`sendmsg`/`recvfrom`/`recvmsg` syscall tracepoints (every send and
/// receive call of every socket pays for them).
pub const UDP_PEERS_SYSCALLS: u32 = 1;
/// Peers from cgroup `sendmsg4/6` and `recvmsg4/6` programs on the cgroup v2 root, which run
/// only for UDP calls that carry an address.
pub const UDP_PEERS_CGROUP: u32 = 2;
/// Name of the read-only global holding [`NetOffsets`].
pub const OFFSETS_GLOBAL: &str = "NET_OFFSETS";
/// Default number of tracked connections; each costs `size_of::<ConnInfo>() + 8` bytes of map
/// value and key plus the kernel's per-element overhead (about 200 bytes in all).
pub const DEFAULT_MAX_CONNS: u32 = 65_536;

/// A new connection could not be tracked: the map was full.
pub const NETFLOW_STAT_MAP_FULL: u32 = 0;
/// A closed connection's record could not be queued: the ring buffer was full. The entry stays
/// in the map flagged [`CONN_F_CLOSED`] and the daemon collects it at the next sweep.
pub const NETFLOW_STAT_RINGBUF_FULL: u32 = 1;
/// A kernel memory read failed (the event was skipped).
pub const NETFLOW_STAT_READ_FAILED: u32 = 2;
/// An event skipped: our programs were nested deeper on one CPU than they have scratch room for.
pub const NETFLOW_STAT_NESTED: u32 = 3;
/// A stale entry (a socket gone without its final record leaving, its memory now another
/// socket's) could not be handed over before the new socket replaced it, the ring or perf buffer
/// and the retired map being full: its last counts are lost.
pub const NETFLOW_STAT_STALE_LOST: u32 = 4;
/// Number of counters.
pub const NETFLOW_STAT_COUNT: u32 = 5;

/// Seen going SYN_SENT → ESTABLISHED (we connected).
pub const CONN_F_OUTGOING: u32 = 1 << 0;
/// Seen going SYN_RECV → ESTABLISHED (we accepted).
pub const CONN_F_INCOMING: u32 = 1 << 1;
/// The connection was established while the probes were attached (not a pre-existing one).
pub const CONN_F_ESTABLISHED: u32 = 1 << 2;
/// The connection reached CLOSE. Its socket may still be read (what arrived before a reset or
/// the peer's FIN), so the entry stays until the socket is destroyed.
pub const CONN_F_CLOSED: u32 = 1 << 3;
/// The entry is final: its socket was destroyed (or its memory went to another socket). Set on
/// every [`ClosedConn`] record, and on an entry left in the map because its record could not
/// be queued (the daemon's sweep collects it).
pub const CONN_F_FINAL: u32 = 1 << 4;
/// Seen in SYN_SENT (we called connect()); without [`CONN_F_ESTABLISHED`] at the end, the
/// attempt failed (refused, timed out) and no connection was closed.
pub const CONN_F_CONNECTING: u32 = 1 << 5;

/// How often a busy connection's `last_ns`, RTT and retransmits are refreshed on send/receive:
/// 25 jiffies (100 ms at HZ=250; 25 to 250 ms for other HZ). A jiffies read costs a load; a
/// clock read and three socket reads per call do not pay for themselves at interval scale.
pub const REFRESH_JIFFIES: u64 = 25;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

/// Byte offsets of the kernel fields the programs read, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOffsets {
    /// `struct sock_common`: `skc_daddr` (__be32)
    pub skc_daddr: u32,
    /// `skc_rcv_saddr` (__be32)
    pub skc_rcv_saddr: u32,
    /// `skc_dport` (__be16)
    pub skc_dport: u32,
    /// `skc_num` (u16, host order: the local port)
    pub skc_num: u32,
    /// `skc_family` (unsigned short)
    pub skc_family: u32,
    /// `skc_v6_daddr` (struct in6_addr)
    pub skc_v6_daddr: u32,
    /// `skc_v6_rcv_saddr` (struct in6_addr)
    pub skc_v6_rcv_saddr: u32,
    /// `skc_net` (possible_net_t: a `struct net *`)
    pub skc_net: u32,
    /// `struct sock`: `sk_protocol` (u16; a plain field since kernel 5.6)
    pub sk_protocol: u32,
    /// `struct sock`: `sk_type` (u16)
    pub sk_type: u32,
    /// `struct tcp_sock`: `srtt_us` (u32, smoothed RTT << 3)
    pub tcp_srtt_us: u32,
    /// `struct tcp_sock`: `mdev_us` (u32, RTT mean deviation << 2)
    pub tcp_mdev_us: u32,
    /// `struct tcp_sock`: `total_retrans` (u32, what TCP_INFO reports as tcpi_total_retrans)
    pub tcp_total_retrans: u32,
    /// `struct net`: `ns.inum` (u32, the network namespace's inode number)
    pub net_ns_inum: u32,
    /// `struct socket`: `sk` (the `struct sock *` behind a BSD socket; kprobe and fentry tiers)
    pub socket_sk: u32,
}

crate::assert_size!(NetOffsets, 60);

/// Name of the read-only global holding [`TracepointOffsets`] (kprobe and classic-tracepoint tiers).
pub const TP_OFFSETS_GLOBAL: &str = "NET_TP_OFFSETS";

/// Byte offsets of the classic tracepoints' fields, from their `format` files in tracefs. The
/// kprobe and classic-tracepoint tiers use them (not tp_btf): they also run on kernels whose BTF is
/// only available as a file (`--btf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `sock:inet_sock_set_state`: `skaddr`, `oldstate`, `newstate`
    pub state_skaddr: u32,
    pub state_oldstate: u32,
    pub state_newstate: u32,
    /// `tcp:tcp_retransmit_skb`: `skaddr`
    pub retransmit_skaddr: u32,
    /// `tcp:tcp_destroy_sock`: `skaddr`
    pub destroy_skaddr: u32,
}

crate::assert_size!(TracepointOffsets, 20);

/// Offsets of `sk`, `ret` and `flags` in the records of `sock:sock_send_length` and
/// `sock:sock_recv_length` on every kernel since they exist (6.3; after the 8-byte common
/// header: `sk` 8, `family` 16, `protocol` 18, `ret` 20, `flags` 24). The classic-tracepoint
/// tier loads them at these constant offsets (the verifier allows only constant offsets into a
/// tracepoint's record), and the daemon offers the tier only when tracefs gives this layout.
pub const CLASSIC_IO_LAYOUT: [u32; 3] = [8, 20, 24];

/// One tracked connection. Addresses are 16 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// Local address.
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6` (as the socket was created; v4-mapped v6 is reported as IPv4).
    pub family: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u16,
    /// tgid of the first process seen doing I/O (or connecting) on the socket; 0 if none yet.
    pub pid: u32,
    /// Network namespace inode number.
    pub netns: u32,
    /// `comm` of that process, NUL-padded.
    pub comm: [u8; 16],
    /// `bpf_ktime_get_ns()` when tracking began: with the map key it identifies one connection
    /// even when the kernel reuses the socket's memory.
    pub start_ns: u64,
    /// `bpf_ktime_get_ns()` of the last refresh (at most [`REFRESH_JIFFIES`] old while the
    /// connection is active).
    pub last_ns: u64,
    /// `bpf_jiffies64()` of the last refresh: on the hot path, `last_ns`, RTT and retransmits
    /// are refreshed at most every [`REFRESH_JIFFIES`] (and RTT and retransmits always at close).
    pub refresh_jiffies: u64,
    /// Bytes sent and received (cumulative since tracking began).
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    /// `tcp_sock.total_retrans` as last read (cumulative, as TCP_INFO reports it).
    pub retransmits: u32,
    /// Smoothed RTT and its mean deviation, µs, as last read.
    pub srtt_us: u32,
    pub rtt_var_us: u32,
    /// `CONN_F_*` bits.
    pub flags: u32,
}

crate::assert_size!(ConnInfo, 120);

/// The final counters of a connection whose socket was destroyed (or of a stale entry whose
/// memory went to another socket), sent through the ring buffer or perf event array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedConn {
    /// The map key (socket address); with `udp_flow`, the socket of the [`UdpFlowKey`].
    pub sock: u64,
    pub info: ConnInfo,
    /// Unconnected UDP flows (`udp_flow` = 1): the rest of the flow's [`UdpFlowKey`].
    pub peer: [u8; 16],
    pub peer_port: u16,
    pub udp_flow: u16,
    pub _pad: [u8; 4],
}

crate::assert_size!(ClosedConn, 152);

impl ClosedConn {
    /// The unconnected UDP flow this record ends, if it is one.
    pub fn udp_flow_key(&self) -> Option<UdpFlowKey> {
        (self.udp_flow != 0).then_some(UdpFlowKey {
            sock: self.sock,
            peer: self.peer,
            port: self.peer_port,
            _pad: [0; 6],
        })
    }
}

/// Key of a final entry in the retired map: the socket and when its tracking began (its
/// identity in the daemon), and for an unconnected UDP flow the rest of its [`UdpFlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RetiredKey {
    pub sock: u64,
    pub start_ns: u64,
    pub peer: [u8; 16],
    pub peer_port: u16,
    pub udp_flow: u16,
    pub _pad: [u8; 4],
}

crate::assert_size!(RetiredKey, 40);

impl RetiredKey {
    /// The record this entry stands for.
    pub fn record(&self, info: ConnInfo) -> ClosedConn {
        ClosedConn {
            sock: self.sock,
            info,
            peer: self.peer,
            peer_port: self.peer_port,
            udp_flow: self.udp_flow,
            _pad: [0; 4],
        }
    }
}

/// Key of an unconnected UDP flow: the socket and the peer of the datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    pub sock: u64,
    /// Peer address (IPv4 stored IPv4-mapped).
    pub peer: [u8; 16],
    /// Peer port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

crate::assert_size!(UdpFlowKey, 32);

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::RetiredKey {}
    // SAFETY: plain repr(C) data without padding holes.
    unsafe impl aya::Pod for super::NetOffsets {}
    unsafe impl aya::Pod for super::TracepointOffsets {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::ClosedConn {}
}
