//! httpflow: HTTP/1.x from socket data. Syscall tracepoints (and OpenSSL uprobes for
//! `httpflow-tls`) copy the first [`CAPTURE`] bytes of each read and write on a TCP socket the
//! kernel has classified as HTTP, with the call's full length, into a ring buffer; the daemon
//! pairs requests with responses. Sockets whose first bytes are not HTTP are marked in a state
//! map and cost one lookup per call afterwards, with nothing sent to userspace.
//!
//! Kernel struct offsets come from the running kernel's BTF ([`HttpOffsets`]), as for netflow.

/// Name of the ring buffer carrying [`HttpEvent`] records.
pub const EVENTS_MAP: &str = "HTTPFLOW_EVENTS";
/// Name of the per-CPU counter array (`HTTP_STAT_*` indices).
pub const STATS_MAP: &str = "HTTPFLOW_STATS";
/// Name of the per-socket classification map (LRU, keyed by socket address, | 1 for TLS).
pub const SOCKS_MAP: &str = "HTTPFLOW_SOCKS";
/// Name of the read-only global holding [`HttpOffsets`].
pub const OFFSETS_GLOBAL: &str = "HTTP_OFFSETS";
/// Name of the read-only global holding [`IterOffsets`] (fentry tier).
pub const ITER_OFFSETS_GLOBAL: &str = "HTTP_ITER_OFFSETS";
/// Name of the read-only u32 global: the daemon's own tgid (its I/O is never captured).
pub const OWN_PID_GLOBAL: &str = "HTTP_OWN_PID";

/// Bytes copied from the start of each read or write: enough for the request line and the
/// usual headers. Longer heads are reported `truncated`.
pub const CAPTURE: usize = 1024;
/// Calls on a socket whose first bytes are not HTTP before it is ignored for good.
pub const MAX_ATTEMPTS: u8 = 4;
/// Sockets tracked in the classification map (LRU).
pub const MAX_SOCKS: u32 = 65_536;

/// An event could not be queued: the ring buffer was full.
pub const HTTP_STAT_RINGBUF_FULL: u32 = 0;
/// A kernel or user memory read failed (the call was skipped).
pub const HTTP_STAT_READ_FAILED: u32 = 1;
/// OpenSSL plain text whose socket was not known (no socket call seen inside the SSL call,
/// none remembered for that SSL object): not captured.
pub const HTTP_STAT_TLS_NO_SOCKET: u32 = 2;
/// An SSL_read/SSL_write return whose thread's record was of the other kind of call (the entry
/// or return of another call was not seen): not captured.
pub const HTTP_STAT_TLS_MISMATCH: u32 = 3;
/// Number of counters.
pub const HTTP_STAT_COUNT: u32 = 4;

/// [`HttpEvent::kind`]: bytes read or written.
pub const KIND_DATA: u32 = 0;
/// [`HttpEvent::kind`]: the connection reached TCP CLOSE (no data).
pub const KIND_CLOSE: u32 = 1;

/// [`HttpEvent::direction`]: the process read the bytes.
pub const DIR_READ: u32 = 0;
/// [`HttpEvent::direction`]: the process wrote the bytes.
pub const DIR_WRITE: u32 = 1;

/// [`HttpEvent::flags`]: plain text from OpenSSL (`SSL_read`/`SSL_write`), not the socket.
pub const FLAG_TLS: u32 = 1;

/// [`SockState`] values.
pub const SOCK_UNKNOWN: u8 = 0;
pub const SOCK_HTTP: u8 = 1;
pub const SOCK_OTHER: u8 = 2;

/// Byte offsets of the kernel fields the programs read, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpOffsets {
    /// `struct task_struct`: `files` (struct files_struct *)
    pub task_files: u32,
    /// `struct files_struct`: `fdt` (struct fdtable *)
    pub files_fdt: u32,
    /// `struct fdtable`: `max_fds` (unsigned int)
    pub fdt_max_fds: u32,
    /// `struct fdtable`: `fd` (struct file **)
    pub fdt_fd: u32,
    /// `struct file`: `f_inode` (struct inode *)
    pub file_inode: u32,
    /// `struct file`: `private_data` (a `struct socket *` for sockets)
    pub file_private_data: u32,
    /// `struct inode`: `i_mode` (umode_t)
    pub inode_mode: u32,
    /// `struct socket`: `sk` (struct sock *)
    pub socket_sk: u32,
    /// `struct sock_common` fields, read through a `struct sock *`.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    /// `struct sock`: `sk_protocol`, `sk_type` (u16)
    pub sk_protocol: u32,
    pub sk_type: u32,
    /// `struct net`: `ns.inum`
    pub net_ns_inum: u32,
    pub _pad: u32,
}

crate::assert_size!(HttpOffsets, 80);

/// Where the fentry tier finds the user buffer of a `struct msghdr` (from BTF: the layout of
/// `struct iov_iter` changed in 5.14, 6.0 and 6.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterOffsets {
    /// `struct msghdr`: `msg_iter` (struct iov_iter)
    pub msghdr_msg_iter: u32,
    /// `struct iov_iter`: `iter_type` (u8)
    pub iter_type: u32,
    /// `struct iov_iter`: `iov_offset` (size_t), bytes already consumed of the current segment
    pub iter_iov_offset: u32,
    /// `struct iov_iter`: `ubuf` (void __user *) of an ITER_UBUF iterator
    pub iter_ubuf: u32,
    /// `struct iov_iter`: `__iov` (6.4+) or `iov` (const struct iovec *) of an ITER_IOVEC one
    pub iter_iov: u32,
    /// Values of `enum iter_type`: ITER_UBUF (u32::MAX when the kernel has none) and ITER_IOVEC.
    pub type_ubuf: u32,
    pub type_iovec: u32,
    pub _pad: u32,
}

crate::assert_size!(IterOffsets, 32);

/// Classification of one socket (value of [`SOCKS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// `SOCK_*`.
    pub state: u8,
    /// Calls seen while `SOCK_UNKNOWN`.
    pub attempts: u8,
    pub _pad: [u8; 6],
}

crate::assert_size!(SockState, 8);

/// One read or write (or a close) on an HTTP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpEvent {
    /// Connection id: the socket's address, with bit 0 set for TLS plain text.
    pub conn: u64,
    /// `bpf_ktime_get_ns()` when the call returned.
    pub ts_ns: u64,
    /// Bytes the call read or wrote (its return value).
    pub total: u64,
    /// tgid and thread id of the caller.
    pub pid: u32,
    pub tid: u32,
    /// `KIND_*`, `DIR_*`, `FLAG_*`.
    pub kind: u32,
    pub direction: u32,
    pub flags: u32,
    /// Bytes of `data` that are valid (at most [`CAPTURE`], at most `total`).
    pub captured: u32,
    /// Local and remote address (IPv4 stored IPv4-mapped), ports in host order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
    /// Network namespace inode number.
    pub netns: u32,
    pub _pad2: u32,
    /// `comm` of the calling thread.
    pub comm: [u8; 16],
    pub data: [u8; CAPTURE],
}

crate::assert_size!(HttpEvent, 112 + CAPTURE);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain repr(C) data without padding holes.
    unsafe impl aya::Pod for super::HttpOffsets {}
    unsafe impl aya::Pod for super::IterOffsets {}
    unsafe impl aya::Pod for super::SockState {}
}
