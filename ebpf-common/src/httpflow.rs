//! httpflow: HTTP/1.x from socket data, parsed in the kernel. Syscall tracepoints (or
//! fentry/fexit on inet_sendmsg/inet_recvmsg, and OpenSSL uprobes for `httpflow-tls`) see each
//! read and write on a TCP socket; a per-connection state machine ([`HttpConn`]) classifies the
//! socket, parses each message head (method, path prefix, status, head length, Content-Length),
//! counts the bytes of every call, pairs each request with its response and hands userspace one
//! [`HttpExchange`] per completed exchange. Body bytes never leave the kernel.
//!
//! A connection whose traffic the kernel cannot frame exactly (pipelined requests) falls back to
//! the old path for that connection only, counted: its calls' first [`CAPTURE`] bytes go to
//! userspace as [`HttpEvent`]s and the daemon frames them.
//!
//! Kernel struct offsets come from the running kernel's BTF ([`HttpOffsets`]), as for netflow.

/// Name of the ring buffer carrying [`HttpExchange`] records.
pub const EXCHANGES_MAP: &str = "HTTPFLOW_EXCHANGES";
/// Name of the ring buffer carrying [`HttpEvent`] records (connections in fallback).
pub const EVENTS_MAP: &str = "HTTPFLOW_EVENTS";
/// Name of the per-CPU counter array (`HTTP_STAT_*` indices).
pub const STATS_MAP: &str = "HTTPFLOW_STATS";
/// Name of the per-connection state map (LRU, keyed by socket address, | 1 for TLS).
pub const CONNS_MAP: &str = "HTTPFLOW_CONNS";
/// Name of the read-only global holding [`HttpOffsets`].
pub const OFFSETS_GLOBAL: &str = "HTTP_OFFSETS";
/// Name of the read-only global holding [`IterOffsets`] (fentry tier).
pub const ITER_OFFSETS_GLOBAL: &str = "HTTP_ITER_OFFSETS";
/// Name of the read-only u32 global: the daemon's own tgid (its I/O is never captured).
pub const OWN_PID_GLOBAL: &str = "HTTP_OWN_PID";
/// Name of the probes' global set to 1 when httpflow-tls is on (the syscall programs then
/// look for an OpenSSL call in progress; otherwise they skip that lookup).
pub const TLS_GLOBAL: &str = "HTTP_TLS";

/// Bytes of a fallback connection's call copied to userspace; also the most bytes of a message
/// head the kernel reads (across calls) before it counts the head as `truncated`.
pub const CAPTURE: usize = 1024;
/// Longest request path (target up to `?` or a space) kept, in bytes; longer ones are cut and
/// the exchange is `truncated`.
pub const PATH_CAPTURE: usize = 256;
/// Calls on a socket whose first bytes are not HTTP before it is ignored for good.
pub const MAX_ATTEMPTS: u8 = 4;
/// Connections tracked in the state map (LRU).
pub const MAX_SOCKS: u32 = 65_536;
/// The ring buffers wake the daemon only past this many unread bytes; below it the daemon
/// drains them on its own timer, so a busy socket does not mean a busy daemon.
pub const WAKEUP_BYTES: u64 = 256 * 1024;

/// An exchange or event could not be queued: the ring buffer was full.
pub const HTTP_STAT_RINGBUF_FULL: u32 = 0;
/// A kernel or user memory read failed (the call was skipped).
pub const HTTP_STAT_READ_FAILED: u32 = 1;
/// OpenSSL plain text whose socket was not known (no socket call seen inside the SSL call,
/// none remembered for that SSL object): not captured.
pub const HTTP_STAT_TLS_NO_SOCKET: u32 = 2;
/// An SSL_read/SSL_write return whose thread's record was of the other kind of call (the entry
/// or return of another call was not seen): not captured.
pub const HTTP_STAT_TLS_MISMATCH: u32 = 3;
/// Exchanges completed and parsed in the kernel.
pub const HTTP_STAT_EXCHANGES: u32 = 4;
/// Connections handed to userspace framing (pipelined requests).
pub const HTTP_STAT_FALLBACKS: u32 = 5;
/// Responses with no request pending (the connection was first seen mid-exchange).
pub const HTTP_STAT_ORPHAN_RESPONSES: u32 = 6;
/// Requests dropped unanswered (the next request or the close came first).
pub const HTTP_STAT_UNANSWERED: u32 = 7;
/// Number of counters.
pub const HTTP_STAT_COUNT: u32 = 8;

/// [`HttpEvent::kind`]: bytes read or written.
pub const KIND_DATA: u32 = 0;
/// [`HttpEvent::kind`]: the connection reached TCP CLOSE (no data).
pub const KIND_CLOSE: u32 = 1;
/// [`HttpEvent::kind`]: the connection falls back to userspace framing with one request
/// already parsed by the kernel and still unanswered: `data` holds `METHOD path`, `total` its
/// bytes, `ts_ns` when its last byte moved, `direction` the request's.
pub const KIND_SEED: u32 = 2;

/// [`HttpEvent::direction`]: the process read the bytes.
pub const DIR_READ: u32 = 0;
/// [`HttpEvent::direction`]: the process wrote the bytes.
pub const DIR_WRITE: u32 = 1;

/// [`HttpEvent::flags`]: plain text from OpenSSL (`SSL_read`/`SSL_write`), not the socket.
pub const FLAG_TLS: u32 = 1;

/// [`HttpConn::state`] values.
pub const SOCK_UNKNOWN: u8 = 0;
/// Parsed in the kernel.
pub const SOCK_HTTP: u8 = 1;
pub const SOCK_OTHER: u8 = 2;
/// Framed in userspace from [`HttpEvent`]s.
pub const SOCK_FALLBACK: u8 = 3;
/// Switched protocols (101): nothing after is HTTP/1.
pub const SOCK_UPGRADED: u8 = 4;

/// [`HttpConn::phase`] values.
pub const PHASE_IDLE: u8 = 0;
/// A request is under way (its head, its body), no final response yet.
pub const PHASE_REQUEST: u8 = 1;
/// The final response is under way.
pub const PHASE_RESPONSE: u8 = 2;

/// [`HttpConn::req_write`]: not known yet.
pub const REQ_DIR_UNKNOWN: u8 = 0;
/// The process reads requests (server side).
pub const REQ_DIR_READ: u8 = 1;
/// The process writes requests (client side).
pub const REQ_DIR_WRITE: u8 = 2;

/// Method codes ([`HttpConn::method`], [`HttpExchange::method`]), index + 1 into [`METHODS`].
pub const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
pub const METHOD_HEAD: u8 = 5;

/// [`HeadScan::flags`]: the head's end (CRLF CRLF) was seen.
pub const SCAN_ENDED: u8 = 1;
/// A `Content-Length:` header was seen; [`HeadScan::content_length`] holds its value.
pub const SCAN_CONTENT_LENGTH: u8 = 2;
/// Digits of the Content-Length value are being read.
pub const SCAN_IN_LENGTH: u8 = 4;
/// A `Transfer-Encoding:` header was seen (the body's length is not known up front).
pub const SCAN_TRANSFER_ENCODING: u8 = 8;
/// The head did not end within [`CAPTURE`] bytes, or ran past the call's first buffer.
pub const SCAN_GAVE_UP: u8 = 16;
/// The header line under way had its colon: later colons on it are value bytes.
pub const SCAN_PAST_COLON: u8 = 32;

/// [`HeadScan::target`] values: where the request line scan is.
pub const TARGET_METHOD: u8 = 0;
pub const TARGET_IN: u8 = 1;
pub const TARGET_DONE: u8 = 2;

/// [`HttpExchange::flags`] and [`HttpConn::flags`].
pub const EX_OUTGOING: u8 = 1;
/// The request path was cut at [`PATH_CAPTURE`], or a head did not fit [`CAPTURE`].
pub const EX_TRUNCATED: u8 = 2;
/// Plain text from OpenSSL.
pub const EX_TLS: u8 = 4;
/// An interim (1xx) response was seen; the final one is still to come.
pub const EX_INTERIM: u8 = 8;

/// A message body of unknown length (ends at the next message or at close).
pub const BODY_UNKNOWN: u64 = u64::MAX;

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

/// A connection's two ends, as the kernel's socket has them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEnds {
    /// Local and remote address (IPv4 stored IPv4-mapped).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network namespace inode number.
    pub netns: u32,
    pub family: u16,
    /// Local and remote port, host order.
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
}

crate::assert_size!(SocketEnds, 44);

/// Where the scan of one message head is, across the calls that carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadScan {
    /// The last 16 bytes seen, most recent in the low byte of `w0`.
    pub w0: u64,
    pub w1: u64,
    /// The Content-Length value so far.
    pub content_length: u64,
    /// Head bytes scanned so far; the head's length once `SCAN_ENDED`.
    pub seen: u32,
    /// `SCAN_*`.
    pub flags: u8,
    /// `TARGET_*` (requests).
    pub target: u8,
    pub _pad: u16,
}

crate::assert_size!(HeadScan, 32);

/// One connection (value of [`CONNS_MAP`]): its classification and the exchange under way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpConn {
    /// `SOCK_*`.
    pub state: u8,
    /// Calls seen while `SOCK_UNKNOWN`.
    pub attempts: u8,
    /// `REQ_DIR_*`.
    pub req_dir: u8,
    /// `PHASE_*`.
    pub phase: u8,
    /// Method code (index + 1 into [`METHODS`]).
    pub method: u8,
    /// `EX_*`.
    pub flags: u8,
    /// Minor version of the response (`1` for HTTP/1.1).
    pub minor: u8,
    pub _pad: u8,
    pub status: u16,
    pub path_len: u16,
    /// tgid of the process that moved the request.
    pub pid: u32,
    /// When the request's last byte moved, when the final response's first did.
    pub req_end_ns: u64,
    pub resp_ns: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    /// Body bytes still to come of the message under way ([`BODY_UNKNOWN`]: until the next
    /// message or the close).
    pub body_left: u64,
    pub scan: HeadScan,
    /// `comm` of the thread that moved the request.
    pub comm: [u8; 16],
    pub path: [u8; PATH_CAPTURE],
    /// Read from the socket once, when the connection is found to carry HTTP.
    pub ends: SocketEnds,
    pub _pad2: u32,
}

crate::assert_size!(HttpConn, 152 + PATH_CAPTURE);

/// A completed request/response exchange.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpExchange {
    /// Connection id: the socket's address, with bit 0 set for TLS plain text.
    pub conn: u64,
    /// Request's last byte to the final response's first, ns.
    pub latency_ns: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub pid: u32,
    pub status: u16,
    pub path_len: u16,
    pub method: u8,
    /// `EX_*`.
    pub flags: u8,
    pub minor: u8,
    pub _pad: u8,
    pub ends: SocketEnds,
    pub comm: [u8; 16],
    pub path: [u8; PATH_CAPTURE],
}

crate::assert_size!(HttpExchange, 104 + PATH_CAPTURE);

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
    pub ends: SocketEnds,
    pub _pad: u32,
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
    unsafe impl aya::Pod for super::HttpConn {}
}
