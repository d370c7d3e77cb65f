//! httpflow: HTTP/1.x parsed in the kernel, one record per completed exchange.
//!
//! - `syscalls:sys_enter_*` of read, write, recvfrom, sendto, readv, writev, recvmsg, sendmsg and
//!   sendfile64 resolve the fd to its socket (task → files → fdtable → file → socket → sock,
//!   offsets from BTF) and, for a TCP socket not known to be something else, remember (socket,
//!   buffer) per thread; `sys_exit_*` with a positive return hands the call to the connection's
//!   state machine ([`on_data`]). Classic tracepoints exist on every kernel this project
//!   supports, unlike kprobes and trampolines (absent on its CI host).
//! - The state machine classifies a socket by its first bytes (an HTTP method or `HTTP/1.`);
//!   any other socket is marked and costs the fd walk and one lookup per call afterwards. On an
//!   HTTP socket it scans each message head once (method, path prefix, status, head length,
//!   Content-Length), counts every call's bytes against the message under way, pairs the
//!   request with its response and, when the response is complete (its length is reached, the
//!   next request starts or the connection closes), writes one [`HttpExchange`] to a ring buffer
//!   that wakes the daemon only past [`WAKEUP_BYTES`]. Body bytes never leave the kernel.
//! - Pipelined requests (a request starting before the previous one was answered) cannot be
//!   paired without queueing them: such a connection falls back, counted, to the old path for
//!   good: its calls' first `CAPTURE` bytes go to userspace as [`HttpEvent`]s, after a seed
//!   record with the request the kernel had already parsed.
//! - `sock:inet_sock_set_state` to CLOSE: the exchange under way ends (a response delimited by
//!   the close) and the connection's state is dropped (the kernel reuses socket memory).
//! - fentry tier (opt-in, instead of the syscall tracepoints): fentry and fexit on
//!   `inet_sendmsg`/`inet_recvmsg` (and inet6_*). Since syscall tracepoints became faultable
//!   (6.14+) their programs run preemptibly and the kernel skips a run on a CPU where another
//!   is preempted mid-way, losing calls; trampoline programs are preemptible too under full or
//!   lazy preemption, so each hook has twin programs (below).
//!   The fentry half takes the socket and the user buffer from `struct msghdr`'s iterator
//!   (before the call advances it), the fexit half runs the state machine as above.
//! - OpenSSL uprobes (`httpflow-tls`): `SSL_read`/`SSL_write`(`_ex`) remember the plain-text
//!   buffer per thread; the syscall the library makes meanwhile names the socket (and is not
//!   parsed itself: it carries ciphertext); the return runs the same state machine on the plain
//!   text, under the socket's id with bit 0 set.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
            bpf_probe_read_kernel, bpf_probe_read_user,
            generated::bpf_probe_read_user as raw_read_user,
        },
        macros::{fentry, fexit, map, tracepoint, uprobe, uretprobe},
        maps::{LruHashMap, PerCpuArray, RingBuf},
        programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
    };
    use ebpf_common::httpflow::{
        BODY_UNKNOWN, CAPTURE, DIR_READ, DIR_WRITE, EX_INTERIM, EX_OUTGOING, EX_TLS, EX_TRUNCATED,
        FLAG_TLS, HTTP_STAT_COUNT, HTTP_STAT_EXCHANGES, HTTP_STAT_FALLBACKS,
        HTTP_STAT_ORPHAN_RESPONSES, HTTP_STAT_READ_FAILED, HTTP_STAT_RINGBUF_FULL,
        HTTP_STAT_TLS_MISMATCH, HTTP_STAT_TLS_NO_SOCKET, HTTP_STAT_UNANSWERED, HeadScan, HttpConn,
        HttpEvent, HttpExchange, HttpOffsets, IterOffsets, KIND_CLOSE, KIND_DATA, KIND_SEED,
        MAX_ATTEMPTS, MAX_SOCKS, METHOD_HEAD, METHODS, PATH_CAPTURE, PHASE_IDLE, PHASE_REQUEST,
        PHASE_RESPONSE, REQ_DIR_READ, REQ_DIR_UNKNOWN, REQ_DIR_WRITE, SCAN_CONTENT_LENGTH,
        SCAN_ENDED, SCAN_GAVE_UP, SCAN_IN_LENGTH, SCAN_PAST_COLON, SCAN_TRANSFER_ENCODING,
        SOCK_FALLBACK, SOCK_HTTP, SOCK_OTHER, SOCK_UNKNOWN, SOCK_UPGRADED, SocketEnds, TARGET_DONE,
        TARGET_IN, TARGET_METHOD, WAKEUP_BYTES,
    };

    /// Filled in by the daemon from the running kernel's BTF before loading.
    #[unsafe(no_mangle)]
    static HTTP_OFFSETS: HttpOffsets = HttpOffsets {
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_inode: 0,
        file_private_data: 0,
        inode_mode: 0,
        socket_sk: 0,
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
        net_ns_inum: 0,
        _pad: 0,
    };

    /// Filled in by the daemon for the fentry tier.
    #[unsafe(no_mangle)]
    static HTTP_ITER_OFFSETS: IterOffsets = IterOffsets {
        msghdr_msg_iter: 0,
        iter_type: 0,
        iter_iov_offset: 0,
        iter_ubuf: 0,
        iter_iov: 0,
        type_ubuf: 0,
        type_iovec: 0,
        _pad: 0,
    };

    /// The daemon's tgid: its own traffic (to DataKit) is never captured.
    #[unsafe(no_mangle)]
    static HTTP_OWN_PID: u32 = 0;

    /// 1 when httpflow-tls is on: only then can a thread be inside SSL_read/SSL_write.
    #[unsafe(no_mangle)]
    static HTTP_TLS: u32 = 0;

    fn tls_on() -> bool {
        // SAFETY: our own read-only global; volatile so the loader's value is used.
        let on = unsafe { core::ptr::read_volatile::<u32>(&HTTP_TLS) };
        on != 0
    }

    /// 2 MiB: about 5,700 exchanges between two drains by the daemon (it drains at least
    /// every 100 ms, and is woken past WAKEUP_BYTES).
    #[map]
    static HTTPFLOW_EXCHANGES: RingBuf = RingBuf::with_byte_size(2 * 1024 * 1024, 0);

    /// Calls of connections in fallback: about 900 between two drains.
    #[map]
    static HTTPFLOW_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

    #[map]
    static HTTPFLOW_CONNS: LruHashMap<u64, HttpConn> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

    /// Per CPU: the head scan at work (too big for the 512-byte BPF stack), one slot per
    /// program that scans. On kernels with full or lazy preemption (7.x) a program can be
    /// preempted mid-scan and another run on that CPU: the kernel never nests a program with
    /// itself (it skips the run), but any other program may, so none shares a slot.
    #[map]
    static SCAN_WORK: PerCpuArray<ScanWork> = PerCpuArray::with_max_entries(SCAN_SLOTS, 0);
    /// The fexit programs of one twin set: send, send6, recv, recv6 from here.
    const SLOT_FEXIT_A: u32 = 0;
    const SLOT_FEXIT_B: u32 = 4;
    const SLOT_SYSCALL_EXIT: u32 = 8;
    const SLOT_SSL_READ_RET: u32 = 9;
    const SLOT_SSL_WRITE_RET: u32 = 10;
    const SCAN_SLOTS: u32 = 11;
    /// A blank connection to insert from.
    #[map]
    static BLANK: PerCpuArray<HttpConn> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static HTTPFLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HTTP_STAT_COUNT, 0);

    /// A thread's syscall in progress.
    #[map]
    static CALLS: LruHashMap<u64, Call> = LruHashMap::with_max_entries(16_384, 0);

    /// A thread's SSL_read/SSL_write in progress.
    #[map]
    static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(16_384, 0);

    /// The socket each SSL object was last seen using: SSL_read may return buffered plain text
    /// without a syscall.
    #[map]
    static SSL_SOCK: LruHashMap<SslKey, u64> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

    const BUF: u32 = 0;
    const IOVEC: u32 = 1;
    const MSGHDR: u32 = 2;
    const NOBUF: u32 = 3;
    /// `ptr` is the user bytes themselves, `len` of them contiguous (fentry tier).
    const SPAN: u32 = 4;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Call {
        /// The `struct sock *` of the call's fd.
        sock: u64,
        /// The buffer, the `struct iovec *` or the `struct user_msghdr *` (per `how`).
        ptr: u64,
        /// Contiguous bytes at `ptr` (SPAN only).
        len: u64,
        how: u32,
        direction: u32,
    }

    /// A head scan in progress: the call's bytes, and the connection's scan state and path
    /// while the chunks work on them.
    #[repr(C)]
    struct ScanWork {
        buf: [u8; CAPTURE],
        path: [u8; PATH_CAPTURE],
        scan: HeadScan,
        path_len: u16,
        /// The path was longer than PATH_CAPTURE.
        truncated: u8,
        _pad: [u8; 5],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SslCall {
        ssl: u64,
        buf: u64,
        /// `size_t *` of the `_ex` variants, else 0.
        size_ptr: u64,
        /// The socket the library used during the call, 0 until seen.
        sock: u64,
        direction: u32,
        _pad: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SslKey {
        tgid: u64,
        ssl: u64,
    }

    const S_IFMT: u16 = 0o170000;
    const S_IFSOCK: u16 = 0o140000;
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const IPPROTO_TCP: u16 = 6;
    const SOCK_STREAM: u16 = 1;
    const TCP_CLOSE: i32 = 7;
    const MSG_PEEK: u64 = 2;

    fn offsets() -> HttpOffsets {
        // SAFETY: our own read-only global; volatile so the loader's value is used.
        unsafe { core::ptr::read_volatile(&HTTP_OFFSETS) }
    }

    fn count(index: u32) {
        if let Some(counter) = HTTPFLOW_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot.
            unsafe { *counter += 1 };
        }
    }

    fn read<T>(base: *const u8, offset: u32) -> Result<T, ()> {
        // SAFETY: the helper checks the address; a failure is an error, never a fault.
        unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
            .map_err(|_| ())
    }

    fn is_own() -> bool {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: our own read-only global.
        tgid == unsafe { core::ptr::read_volatile(&HTTP_OWN_PID) }
    }

    fn syscall_arg(ctx: &TracePointContext, n: usize) -> u64 {
        // SAFETY: syscall tracepoints carry six 8-byte arguments from offset 16.
        unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
    }

    fn enter(ctx: &TracePointContext, how: u32, direction: u32) -> u32 {
        if is_own() {
            return 0;
        }
        let fd = syscall_arg(ctx, 0);
        // 0, 1, 2 are almost never sockets, and cost the most calls.
        if fd < 3 {
            return 0;
        }
        // A later syscall of an SSL_read/SSL_write whose socket is already known: ciphertext,
        // nothing more to learn from it.
        if tls_on()
            && SSL_CALLS
                .get_ptr(&bpf_get_current_pid_tgid())
                // SAFETY: a read of this thread's entry.
                .is_some_and(|ssl| unsafe { (*ssl).sock } != 0)
        {
            return 0;
        }
        // The socket is resolved here, so that calls on anything else (files, pipes, other
        // sockets) and on sockets known not to carry HTTP cost no map update.
        let sk = match tcp_sock(fd) {
            Ok(Some(sk)) => sk as u64,
            Ok(None) => return 0,
            Err(()) => {
                count(HTTP_STAT_READ_FAILED);
                return 0;
            }
        };
        remember(sk, syscall_arg(ctx, 1), 0, how, direction)
    }

    /// A call on the TCP socket `sk` starts: remember it for its return, unless the socket is
    /// known not to carry HTTP or the call is OpenSSL's own.
    #[inline(always)]
    fn remember(sk: u64, ptr: u64, len: u64, how: u32, direction: u32) -> u32 {
        let thread = bpf_get_current_pid_tgid();
        // Inside SSL_read/SSL_write: ciphertext, but it names the socket of the plain text.
        if let Some(ssl) = tls_on().then(|| SSL_CALLS.get_ptr_mut(&thread)).flatten() {
            // SAFETY: this thread's own entry.
            unsafe { (*ssl).sock = sk };
            return 0;
        }
        // SAFETY: a read of the map value.
        if unsafe { HTTPFLOW_CONNS.get(&sk) }
            .is_some_and(|c| c.state == SOCK_OTHER || c.state == SOCK_UPGRADED)
        {
            return 0;
        }
        let call = Call {
            sock: sk,
            ptr,
            len,
            how,
            direction,
        };
        let _ = CALLS.insert(&thread, &call, 0);
        0
    }

    #[tracepoint]
    pub fn httpflow_read_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, BUF, DIR_READ)
    }

    #[tracepoint]
    pub fn httpflow_write_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, BUF, DIR_WRITE)
    }

    #[tracepoint]
    pub fn httpflow_readv_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, IOVEC, DIR_READ)
    }

    #[tracepoint]
    pub fn httpflow_writev_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, IOVEC, DIR_WRITE)
    }

    #[tracepoint]
    pub fn httpflow_recvmsg_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, MSGHDR, DIR_READ)
    }

    #[tracepoint]
    pub fn httpflow_sendmsg_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, MSGHDR, DIR_WRITE)
    }

    /// sendfile64(out_fd, ...): bytes written to a socket with nothing to capture.
    #[tracepoint]
    pub fn httpflow_sendfile_enter(ctx: TracePointContext) -> u32 {
        enter(&ctx, NOBUF, DIR_WRITE)
    }

    #[tracepoint]
    pub fn httpflow_exit(ctx: TracePointContext) -> u32 {
        let thread = bpf_get_current_pid_tgid();
        // SAFETY: a copy out of the map value.
        let Some(call) = (unsafe { CALLS.get(&thread) }).copied() else {
            return 0;
        };
        let _ = CALLS.remove(&thread);
        // SAFETY: `ret` of a syscall exit tracepoint is at offset 16.
        let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0);
        finish(&call, ret, SLOT_SYSCALL_EXIT)
    }

    /// The remembered call returned `ret`; `slot`: the caller's [`SCAN_WORK`] slot.
    #[inline(always)]
    fn finish(call: &Call, ret: i64, slot: u32) -> u32 {
        if ret <= 0 {
            return 0;
        }
        let sk = call.sock as *const u8;
        let (src, avail) = match user_buffer(call, ret as u64) {
            Ok(found) => found,
            Err(()) => {
                count(HTTP_STAT_READ_FAILED);
                return 0;
            }
        };
        on_data(
            sk as u64,
            sk,
            src,
            avail,
            ret as u64,
            call.direction,
            false,
            slot,
        );
        0
    }

    /// Where the call's first bytes are in user memory, and how many of them are contiguous.
    fn user_buffer(call: &Call, ret: u64) -> Result<(u64, u64), ()> {
        match call.how {
            BUF => Ok((call.ptr, ret)),
            SPAN => Ok((call.ptr, if call.len < ret { call.len } else { ret })),
            IOVEC => first_iovec(call.ptr, ret),
            MSGHDR => {
                // struct user_msghdr: name, namelen (padded), iov at 16.
                // SAFETY: checked user-memory read.
                let iov: u64 = unsafe { bpf_probe_read_user((call.ptr + 16) as *const u64) }
                    .map_err(|_| ())?;
                first_iovec(iov, ret)
            }
            _ => Ok((0, 0)),
        }
    }

    fn first_iovec(iov: u64, ret: u64) -> Result<(u64, u64), ()> {
        // SAFETY: checked user-memory reads of iov[0] = { base, len }.
        let base: u64 = unsafe { bpf_probe_read_user(iov as *const u64) }.map_err(|_| ())?;
        let len: u64 = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.map_err(|_| ())?;
        Ok((base, if len < ret { len } else { ret }))
    }

    /// The `struct sock *` of `fd` in the current process when it is an INET TCP socket.
    fn tcp_sock(fd: u64) -> Result<Option<*const u8>, ()> {
        let off = offsets();
        // SAFETY: the current task pointer is always valid.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let files: *const u8 = read(task, off.task_files)?;
        let fdt: *const u8 = read(files, off.files_fdt)?;
        let max_fds: u32 = read(fdt, off.fdt_max_fds)?;
        if fd >= max_fds as u64 {
            return Ok(None);
        }
        let fds: *const u8 = read(fdt, off.fdt_fd)?;
        let file: *const u8 = read(fds, (fd * 8) as u32)?;
        if file.is_null() {
            return Ok(None);
        }
        let inode: *const u8 = read(file, off.file_inode)?;
        let mode: u16 = read(inode, off.inode_mode)?;
        if mode & S_IFMT != S_IFSOCK {
            return Ok(None);
        }
        let socket: *const u8 = read(file, off.file_private_data)?;
        let sk: *const u8 = read(socket, off.socket_sk)?;
        Ok(is_tcp(sk)?.then_some(sk))
    }

    /// True when `sk` is an INET TCP socket.
    fn is_tcp(sk: *const u8) -> Result<bool, ()> {
        let off = offsets();
        if sk.is_null() {
            return Ok(false);
        }
        let family: u16 = read(sk, off.skc_family)?;
        if family != AF_INET && family != AF_INET6 {
            return Ok(false);
        }
        let protocol: u16 = read(sk, off.sk_protocol)?;
        let kind: u16 = read(sk, off.sk_type)?;
        Ok(protocol == IPPROTO_TCP && kind == SOCK_STREAM)
    }

    // ---- fentry tier ----
    // `int inet_sendmsg(struct socket *, struct msghdr *, size_t)` and
    // `int inet_recvmsg(struct socket *, struct msghdr *, size_t, int flags)` (same for inet6_*).
    // An fexit context holds the arguments, then the return value: read as a u64 slot, since
    // `ctx.ret()` needs bpf_get_func_ret (5.17+).

    /// Each hook gets two identical programs. On preemptible kernels (PREEMPT_DYNAMIC in
    /// full or lazy mode, 7.x) a trampoline program runs with only migration disabled, and the
    /// kernel skips a program on a CPU where that same program is preempted mid-run (counted in
    /// `recursion_misses`). The preempted task holds one copy; the twin still runs for the
    /// others. Both halves are idempotent per thread: the entry writes the same value, the first
    /// exit takes the entry and the second finds none.
    macro_rules! fentry_programs {
        ($send:ident, $send6:ident, $recv:ident, $recv6:ident,
         $send_ret:ident, $send6_ret:ident, $recv_ret:ident, $recv6_ret:ident, $slot:expr) => {
            #[fentry(function = "inet_sendmsg")]
            pub fn $send(ctx: FEntryContext) -> u32 {
                msg_enter(&ctx, DIR_WRITE)
            }

            #[fentry(function = "inet6_sendmsg")]
            pub fn $send6(ctx: FEntryContext) -> u32 {
                msg_enter(&ctx, DIR_WRITE)
            }

            #[fentry(function = "inet_recvmsg")]
            pub fn $recv(ctx: FEntryContext) -> u32 {
                msg_enter(&ctx, DIR_READ)
            }

            #[fentry(function = "inet6_recvmsg")]
            pub fn $recv6(ctx: FEntryContext) -> u32 {
                msg_enter(&ctx, DIR_READ)
            }

            #[fexit(function = "inet_sendmsg")]
            pub fn $send_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 3, $slot)
            }

            #[fexit(function = "inet6_sendmsg")]
            pub fn $send6_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 3, $slot + 1)
            }

            #[fexit(function = "inet_recvmsg")]
            pub fn $recv_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 4, $slot + 2)
            }

            #[fexit(function = "inet6_recvmsg")]
            pub fn $recv6_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 4, $slot + 3)
            }
        };
    }

    fentry_programs!(
        httpflow_inet_send,
        httpflow_inet6_send,
        httpflow_inet_recv,
        httpflow_inet6_recv,
        httpflow_inet_send_ret,
        httpflow_inet6_send_ret,
        httpflow_inet_recv_ret,
        httpflow_inet6_recv_ret,
        SLOT_FEXIT_A
    );
    fentry_programs!(
        httpflow_inet_send_b,
        httpflow_inet6_send_b,
        httpflow_inet_recv_b,
        httpflow_inet6_recv_b,
        httpflow_inet_send_ret_b,
        httpflow_inet6_send_ret_b,
        httpflow_inet_recv_ret_b,
        httpflow_inet6_recv_ret_b,
        SLOT_FEXIT_B
    );

    /// `ssize_t inet_sendpage(struct socket *, struct page *, int offset, size_t, int flags)`
    /// (IPv4 and IPv6; gone in 6.5, since when sendfile goes through inet_sendmsg): sendfile's
    /// bytes, with nothing to capture. Only kernels before 6.5 have it, whose trampolines are
    /// not preempted by default, so it has no twin.
    #[fexit(function = "inet_sendpage")]
    pub fn httpflow_inet_sendpage(ctx: FExitContext) -> u32 {
        let ret = ctx.arg::<u64>(5) as i64;
        if ret <= 0 || is_own() {
            return 0;
        }
        let socket: *const u8 = ctx.arg(0);
        let found =
            read::<*const u8>(socket, offsets().socket_sk).and_then(|sk| Ok((sk, is_tcp(sk)?)));
        let sk = match found {
            Ok((sk, true)) => sk,
            Ok((_, false)) => return 0,
            Err(()) => {
                count(HTTP_STAT_READ_FAILED);
                return 0;
            }
        };
        // Inside SSL_write (kTLS sendfile): not plain text of ours.
        if tls_on() && SSL_CALLS.get_ptr(&bpf_get_current_pid_tgid()).is_some() {
            return 0;
        }
        // Nothing to scan (no user bytes): no slot.
        on_data(
            sk as u64, sk, 0, 0, ret as u64, DIR_WRITE, false, SCAN_SLOTS,
        );
        0
    }

    #[inline(always)]
    fn msg_enter(ctx: &FEntryContext, direction: u32) -> u32 {
        if is_own() {
            return 0;
        }
        // A peek leaves the bytes for the next read, which is the one captured.
        if direction == DIR_READ && ctx.arg::<u64>(3) & MSG_PEEK != 0 {
            return 0;
        }
        let socket: *const u8 = ctx.arg(0);
        let msg: *const u8 = ctx.arg(1);
        let found =
            read::<*const u8>(socket, offsets().socket_sk).and_then(|sk| Ok((sk, is_tcp(sk)?)));
        let sk = match found {
            Ok((sk, true)) => sk,
            Ok((_, false)) => return 0,
            Err(()) => {
                count(HTTP_STAT_READ_FAILED);
                return 0;
            }
        };
        let (ptr, len) = match msg_buffer(msg) {
            Ok(found) => found,
            Err(()) => {
                count(HTTP_STAT_READ_FAILED);
                return 0;
            }
        };
        remember(sk as u64, ptr, len, SPAN, direction)
    }

    #[inline(always)]
    fn msg_exit(ctx: &FExitContext, nargs: usize, slot: u32) -> u32 {
        let thread = bpf_get_current_pid_tgid();
        // SAFETY: a copy out of the map value.
        let Some(call) = (unsafe { CALLS.get(&thread) }).copied() else {
            return 0;
        };
        let _ = CALLS.remove(&thread);
        let ret = ctx.arg::<u64>(nargs) as i32 as i64;
        finish(&call, ret, slot)
    }

    /// The first user bytes a `struct msghdr`'s iterator points at, and how many are
    /// contiguous; (0, 0) for kernel-memory iterators (a sendfile's pages, in-kernel callers).
    fn msg_buffer(msg: *const u8) -> Result<(u64, u64), ()> {
        // SAFETY: our own read-only global; volatile so the loader's value is used.
        let io = unsafe { core::ptr::read_volatile(&HTTP_ITER_OFFSETS) };
        let iter = msg.wrapping_add(io.msghdr_msg_iter as usize);
        let kind: u8 = read(iter, io.iter_type)?;
        let skip: u64 = read(iter, io.iter_iov_offset)?;
        if kind as u32 == io.type_ubuf {
            let base: u64 = read(iter, io.iter_ubuf)?;
            return Ok((base + skip, u64::MAX));
        }
        if kind as u32 != io.type_iovec {
            return Ok((0, 0));
        }
        // The iovec array is the kernel's copy of the caller's.
        let iov: *const u8 = read(iter, io.iter_iov)?;
        let base: u64 = read(iov, 0)?;
        let len: u64 = read(iov, 8)?;
        if skip >= len {
            return Ok((0, 0));
        }
        Ok((base + skip, len - skip))
    }

    /// The first bytes of a call (at most 16, zero-padded), when at least 8 are readable.
    #[inline(always)]
    fn prefix(src: u64, avail: u64) -> Option<[u8; 16]> {
        if src == 0 || avail < 8 {
            return None;
        }
        if avail >= 16 {
            // SAFETY: checked user-memory read.
            return unsafe { bpf_probe_read_user(src as *const [u8; 16]) }.ok();
        }
        // SAFETY: checked user-memory read.
        let head = unsafe { bpf_probe_read_user(src as *const [u8; 8]) }.ok()?;
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&head);
        Some(out)
    }

    /// The method code when `p` starts a request (a method the daemon knows, then a space).
    fn request_method(p: &[u8; 16]) -> u8 {
        let mut i = 0;
        while i < METHODS.len() {
            let m = METHODS[i];
            let mut j = 0;
            let mut same = true;
            while j < m.len() {
                if p[j] != m[j] {
                    same = false;
                    break;
                }
                j += 1;
            }
            if same && p[m.len() & 15] == b' ' {
                return i as u8 + 1;
            }
            i += 1;
        }
        0
    }

    /// `(status, minor version)` when `p` starts a response (`HTTP/1.x ddd`).
    fn response_status(p: &[u8; 16]) -> Option<(u16, u8)> {
        if &p[..7] != b"HTTP/1." || p[8] != b' ' {
            return None;
        }
        let mut status: u16 = 0;
        let mut i = 9;
        while i < 12 {
            let d = p[i].wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            status = status * 10 + d as u16;
            i += 1;
        }
        Some((status, p[7]))
    }

    /// `key`: the connection's id (the socket's address, | FLAG_TLS for plain text from
    /// OpenSSL); `src`, `avail`: the contiguous user bytes the call moved first (0, 0: none
    /// readable, as for sendfile); `total`: what it moved in all; `dir`: `DIR_*`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn on_data(
        key: u64,
        sk: *const u8,
        src: u64,
        avail: u64,
        total: u64,
        dir: u32,
        tls: bool,
        slot: u32,
    ) {
        let mut first = None;
        let conn = match HTTPFLOW_CONNS.get_ptr_mut(&key) {
            Some(conn) => conn,
            None => {
                let Some(blank) = BLANK.get_ptr_mut(0) else {
                    return;
                };
                // SAFETY: this CPU's scratch slot, reset before use.
                unsafe {
                    (*blank).state = SOCK_UNKNOWN;
                    (*blank).attempts = 0;
                    (*blank).phase = PHASE_IDLE;
                    (*blank).req_dir = REQ_DIR_UNKNOWN;
                    if HTTPFLOW_CONNS.insert(&key, &*blank, 0).is_err() {
                        return;
                    }
                }
                match HTTPFLOW_CONNS.get_ptr_mut(&key) {
                    Some(conn) => conn,
                    None => return,
                }
            }
        };
        // Through a raw pointer: the global functions below write the same entry.
        let c = conn;
        // SAFETY: `c` is the live map entry of `key` (see the function's contract).
        unsafe {
            match (*c).state {
                SOCK_HTTP => {}
                SOCK_FALLBACK => {
                    emit(key, sk, src, avail, total, KIND_DATA, dir, tls);
                    return;
                }
                SOCK_UNKNOWN => {
                    first = prefix(src, avail);
                    let http = match &first {
                        Some(p) => request_method(p) != 0 || response_status(p).is_some(),
                        None => false,
                    };
                    if !http {
                        (*c).attempts = (*c).attempts.saturating_add(1);
                        if (*c).attempts >= MAX_ATTEMPTS {
                            (*c).state = SOCK_OTHER;
                        }
                        return;
                    }
                    (*c).state = SOCK_HTTP;
                    // Read once: the records of every exchange on it copy them.
                    if describe(sk, &mut (*c).ends).is_err() {
                        count(HTTP_STAT_READ_FAILED);
                    }
                }
                _ => return,
            }
            let now = bpf_ktime_get_ns();
            let head = match first {
                Some(head) => Some(head),
                None => prefix(src, avail),
            };
            let Some(head) = head else {
                // Nothing readable (sendfile, a kernel buffer): bytes of the message under way.
                add_bytes(c, key, total, dir, now);
                return;
            };
            let method = request_method(&head);
            let is_req = match (*c).req_dir {
                REQ_DIR_READ => dir == DIR_READ,
                REQ_DIR_WRITE => dir == DIR_WRITE,
                _ => {
                    // A connection is followed from its first request.
                    if method == 0 {
                        if response_status(&head).is_some() {
                            count(HTTP_STAT_ORPHAN_RESPONSES);
                        }
                        return;
                    }
                    (*c).req_dir = if dir == DIR_WRITE {
                        REQ_DIR_WRITE
                    } else {
                        REQ_DIR_READ
                    };
                    true
                }
            };
            if is_req {
                on_request_call(c, key, sk, method, src, avail, total, dir, now, tls, slot);
            } else {
                on_response_call(c, key, &head, src, avail, total, now, slot);
            }
        }
    }

    /// A call in the requests' direction with readable bytes.
    /// SAFETY: `c` points at the live map entry of `key`.
    #[inline(always)]
    unsafe fn on_request_call(
        c: *mut HttpConn,
        key: u64,
        sk: *const u8,
        method: u8,
        src: u64,
        avail: u64,
        total: u64,
        dir: u32,
        now: u64,
        tls: bool,
        slot: u32,
    ) {
        // SAFETY: `c` is the live map entry of `key` (see the function's contract).
        unsafe {
            if (*c).phase == PHASE_REQUEST {
                if (*c).scan.flags & (SCAN_ENDED | SCAN_GAVE_UP) == 0 {
                    // The head continues (written in several calls).
                    let used = scan_head(key, src, avail, total, true, slot);
                    body_after_head(&mut *c, total - used);
                } else if method != 0 && (*c).body_left == 0 {
                    // A second request before the first was answered: pipelining.
                    fall_back(&mut *c, key, dir, tls, true);
                    emit(key, sk, src, avail, total, KIND_DATA, dir, tls);
                    return;
                } else {
                    consume_body(&mut *c, total);
                }
                (*c).req_bytes += total;
                (*c).req_end_ns = now;
                return;
            }
            if method == 0 {
                // A request body still arriving after the response started (an early answer).
                if (*c).phase == PHASE_RESPONSE {
                    (*c).req_bytes += total;
                }
                return;
            }
            if (*c).phase == PHASE_RESPONSE {
                // Keep-alive: the next request ends the previous response.
                complete(key);
            }
            let pid_tgid = bpf_get_current_pid_tgid();
            (*c).phase = PHASE_REQUEST;
            (*c).method = method;
            (*c).flags = if tls { EX_TLS } else { 0 }
                | if (*c).req_dir == REQ_DIR_WRITE {
                    EX_OUTGOING
                } else {
                    0
                };
            (*c).status = 0;
            (*c).minor = 0;
            (*c).path_len = 0;
            (*c).pid = (pid_tgid >> 32) as u32;
            (*c).comm = bpf_get_current_comm().unwrap_or_default();
            (*c).req_bytes = total;
            (*c).resp_bytes = 0;
            (*c).req_end_ns = now;
            (*c).resp_ns = 0;
            (*c).scan = Default::default();
            let used = scan_head(key, src, avail, total, true, slot);
            if (*c).scan.flags & SCAN_ENDED != 0 {
                let body = request_body(&*c);
                if body != BODY_UNKNOWN && used + body < total {
                    // More requests in the same call: pipelining. Userspace frames this call and
                    // the rest of the connection.
                    (*c).phase = PHASE_IDLE;
                    fall_back(&mut *c, key, dir, tls, false);
                    emit(key, sk, src, avail, total, KIND_DATA, dir, tls);
                    return;
                }
            }
            body_after_head(&mut *c, total - used);
        }
    }

    /// A call in the responses' direction with readable bytes.
    /// SAFETY: `c` points at the live map entry of `key`.
    #[inline(always)]
    unsafe fn on_response_call(
        c: *mut HttpConn,
        key: u64,
        head: &[u8; 16],
        src: u64,
        avail: u64,
        total: u64,
        now: u64,
        slot: u32,
    ) {
        // SAFETY: `c` is the live map entry of `key` (see the function's contract).
        unsafe {
            match (*c).phase {
                PHASE_REQUEST => {
                    let Some((status, minor)) = response_status(head) else {
                        // Bytes after an interim response are its own (e.g. its head in two calls).
                        if (*c).flags & EX_INTERIM != 0 {
                            (*c).resp_bytes += total;
                        }
                        return;
                    };
                    (*c).resp_bytes += total;
                    if (100..200).contains(&status) && status != 101 {
                        // Interim (100 Continue): counted, the final response is still to come.
                        (*c).flags |= EX_INTERIM;
                        return;
                    }
                    (*c).phase = PHASE_RESPONSE;
                    (*c).status = status;
                    (*c).minor = minor;
                    (*c).resp_ns = now;
                    (*c).scan = Default::default();
                    let used = scan_head(key, src, avail, total, false, slot);
                    if status == 101 {
                        // Switched protocols: what follows is not HTTP/1.
                        complete(key);
                        (*c).state = SOCK_UPGRADED;
                        return;
                    }
                    body_after_head(&mut *c, total - used);
                }
                PHASE_RESPONSE => {
                    (*c).resp_bytes += total;
                    if (*c).scan.flags & (SCAN_ENDED | SCAN_GAVE_UP) == 0 {
                        let used = scan_head(key, src, avail, total, false, slot);
                        body_after_head(&mut *c, total - used);
                    } else {
                        consume_body(&mut *c, total);
                    }
                }
                _ => {
                    if response_status(head).is_some() {
                        count(HTTP_STAT_ORPHAN_RESPONSES);
                    }
                    return;
                }
            }
            if (*c).phase == PHASE_RESPONSE && (*c).body_left == 0 {
                complete(key);
            }
        }
    }

    /// Bytes with nothing readable (sendfile): the body of the message under way.
    /// SAFETY: `c` points at the live map entry of `key`.
    #[inline(always)]
    unsafe fn add_bytes(c: *mut HttpConn, key: u64, total: u64, dir: u32, now: u64) {
        // SAFETY: `c` is the live map entry of `key` (see the function's contract).
        unsafe {
            let is_req = match (*c).req_dir {
                REQ_DIR_READ => dir == DIR_READ,
                REQ_DIR_WRITE => dir == DIR_WRITE,
                _ => return,
            };
            if is_req {
                if (*c).phase == PHASE_REQUEST {
                    (*c).req_bytes += total;
                    (*c).req_end_ns = now;
                    consume_body(&mut *c, total);
                } else if (*c).phase == PHASE_RESPONSE {
                    (*c).req_bytes += total;
                }
            } else if (*c).phase == PHASE_RESPONSE {
                (*c).resp_bytes += total;
                if (*c).scan.flags & (SCAN_ENDED | SCAN_GAVE_UP) == 0 {
                    // A head cut by a call we cannot read: its length is lost.
                    (*c).scan.flags |= SCAN_GAVE_UP;
                    (*c).body_left = BODY_UNKNOWN;
                }
                consume_body(&mut *c, total);
                if (*c).body_left == 0 {
                    complete(key);
                }
            }
        }
    }

    /// The body length a finished request head announces (none without Content-Length or
    /// Transfer-Encoding).
    fn request_body(c: &HttpConn) -> u64 {
        if c.scan.flags & SCAN_TRANSFER_ENCODING != 0 {
            BODY_UNKNOWN
        } else if c.scan.flags & SCAN_CONTENT_LENGTH != 0 {
            c.scan.content_length
        } else {
            0
        }
    }

    /// The body length a finished response head announces.
    fn response_body(c: &HttpConn) -> u64 {
        if c.method == METHOD_HEAD || c.status == 204 || c.status == 304 {
            0
        } else if c.scan.flags & SCAN_TRANSFER_ENCODING != 0 {
            BODY_UNKNOWN
        } else if c.scan.flags & SCAN_CONTENT_LENGTH != 0 {
            c.scan.content_length
        } else {
            // Delimited by the close.
            BODY_UNKNOWN
        }
    }

    /// The head scan of the current message moved on; `rest`: the call's bytes after it.
    #[inline(always)]
    fn body_after_head(c: &mut HttpConn, rest: u64) {
        if c.scan.flags & SCAN_ENDED != 0 {
            c.body_left = if c.phase == PHASE_REQUEST {
                request_body(c)
            } else {
                response_body(c)
            };
            consume_body(c, rest);
        } else if c.scan.flags & SCAN_GAVE_UP != 0 {
            c.body_left = BODY_UNKNOWN;
        }
    }

    #[inline(always)]
    fn consume_body(c: &mut HttpConn, n: u64) {
        if c.body_left != BODY_UNKNOWN {
            c.body_left -= if n < c.body_left { n } else { c.body_left };
        }
    }

    /// Scans the call's head bytes (from `src`, at most `avail` contiguous of `total`) into
    /// `c.scan` (and `c.path` for a request); returns how many of them belong to the head.
    #[inline(always)]
    fn scan_head(key: u64, src: u64, avail: u64, total: u64, request: bool, slot: u32) -> u64 {
        httpflow_scan(key, src, avail, total, request as u64 | (slot as u64) << 1)
    }

    /// [`scan_head`] as a global BPF function: the verifier checks it once, on its own, rather
    /// than at every call site along every path.
    ///
    /// The call's head bytes are read from user memory in one helper call into this CPU's
    /// [`ScanWork`], with the scan state; the chunks work there (a per-CPU lookup is a few
    /// instructions, a connection lookup per chunk was a hash each), and the state goes back.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn httpflow_scan(key: u64, src: u64, avail: u64, total: u64, mode: u64) -> u64 {
        let request = mode & 1;
        let Some(conn) = HTTPFLOW_CONNS.get_ptr_mut(&key) else {
            return 0;
        };
        let Some(work) = SCAN_WORK.get_ptr_mut((mode >> 1) as u32) else {
            return 0;
        };
        // SAFETY: a live map entry and this CPU's slot.
        let (c, work) = unsafe { (&mut *conn, &mut *work) };
        let seen = c.scan.seen as u64;
        let room = CAPTURE as u64
            - if seen < CAPTURE as u64 {
                seen
            } else {
                CAPTURE as u64
            };
        let mut n = if avail < total { avail } else { total };
        if n > room {
            n = room;
        }
        if src == 0 {
            n = 0;
        }
        // Bounded right before the helper call, on a value LLVM cannot see through: it knows
        // n <= CAPTURE and would drop the mask, and older verifiers (5.10, 6.1) cannot carry
        // that bound through a comparison of two registers.
        let n32 = n as u32;
        // SAFETY: a read of a local.
        let len = unsafe { core::ptr::read_volatile(&n32) } & (2 * CAPTURE as u32 - 1);
        let len = if len > CAPTURE as u32 {
            CAPTURE as u32
        } else {
            len
        };
        // SAFETY: `buf` holds CAPTURE bytes and len <= CAPTURE.
        if len > 0
            && unsafe { raw_read_user(work.buf.as_mut_ptr() as *mut _, len, src as *const _) } != 0
        {
            count(HTTP_STAT_READ_FAILED);
            c.scan.flags |= SCAN_GAVE_UP;
            return 0;
        }
        let capture_target = request != 0 && c.scan.target != TARGET_DONE;
        work.scan = c.scan;
        work.truncated = 0;
        if capture_target {
            work.path_len = c.path_len;
            copy_path(&mut work.path, &c.path);
        }
        // In chunks: the verifier checks the chunk function once, and its loop is short.
        let mut done: u64 = 0;
        let mut k = 0;
        while k < CAPTURE / CHUNK && done < n {
            let left = n - done;
            let want = if left < CHUNK as u64 {
                left
            } else {
                CHUNK as u64
            };
            let used = httpflow_scan_chunk(done, want, mode);
            done += used;
            // SAFETY: this CPU's slot, written by the chunk through its own pointer.
            let flags = unsafe { core::ptr::read_volatile(&work.scan.flags) };
            if used < want || flags & SCAN_ENDED != 0 {
                break;
            }
            k += 1;
        }
        // SAFETY: the slot after the chunks' writes (volatile: written through another
        // pointer).
        c.scan = unsafe { core::ptr::read_volatile(&work.scan) };
        if capture_target {
            c.path_len = work.path_len;
            copy_path(&mut c.path, &work.path);
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(&work.truncated) } != 0 {
                c.flags |= EX_TRUNCATED;
            }
        }
        if c.scan.flags & (SCAN_ENDED | SCAN_GAVE_UP) == 0 {
            if c.scan.seen as usize >= CAPTURE {
                // Longer than we read: cut.
                c.scan.flags |= SCAN_GAVE_UP;
                c.flags |= EX_TRUNCATED;
            } else if done < total {
                // The head goes on in bytes we cannot see (another iovec).
                c.scan.flags |= SCAN_GAVE_UP;
            }
        }
        done
    }

    /// Head bytes scanned per call of [`httpflow_scan_chunk`].
    const CHUNK: usize = 32;

    /// Scans up to [`CHUNK`] bytes of this CPU's [`ScanWork`] from `at` (a multiple of
    /// CHUNK); returns how many belong to the head (fewer than `n` when it ends).
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn httpflow_scan_chunk(at: u64, n: u64, mode: u64) -> u64 {
        let request = mode & 1 != 0;
        let Some(work) = SCAN_WORK.get_ptr_mut((mode >> 1) as u32) else {
            return 0;
        };
        // SAFETY: this CPU's slot.
        let work = unsafe { &mut *work };
        let base = (at as usize) & (CAPTURE - CHUNK);
        let len = (n as u32) & (2 * CHUNK as u32 - 1);
        let len = if len > CHUNK as u32 {
            CHUNK as u32
        } else {
            len
        };
        let mut w = Window {
            w0: work.scan.w0,
            w1: work.scan.w1,
            content_length: work.scan.content_length,
        };
        // The loop counts to the constant CHUNK, leaving at `len`: read back through a volatile
        // so that LLVM cannot turn the exit test into `i != len`, an exit older verifiers
        // (5.10, 6.1) cannot bound ("the sequence of 8193 jumps is too complex").
        // SAFETY: a read of a local.
        let limit = unsafe { core::ptr::read_volatile(&len) };
        let mut i: u32 = 0;
        let mut k: u32 = 0;
        while k < CHUNK as u32 {
            if k >= limit {
                break;
            }
            // Eight bytes at once where none of them can matter: no line end, and no colon
            // that could end a header's name. Most of a head is header values.
            if k & 7 == 0
                && k + 8 <= limit
                && work.scan.flags & SCAN_IN_LENGTH == 0
                && (!request || work.scan.target == TARGET_DONE)
            {
                let at = (base + k as usize) & (CAPTURE - 8);
                // SAFETY: at + 8 <= CAPTURE; `buf` is 8-byte aligned and `at` a multiple of 8.
                let word = unsafe { *(work.buf.as_ptr().add(at) as *const u64) };
                if !has_byte(word, b'\n')
                    && (work.scan.flags & SCAN_PAST_COLON != 0 || !has_byte(word, b':'))
                {
                    w.w1 = w.w0;
                    w.w0 = u64::from_be(word);
                    k += 8;
                    i = k;
                    continue;
                }
            }
            let b = work.buf[(base + k as usize) & (CAPTURE - 1)];
            k += 1;
            i = k;
            if scan_byte(work, &mut w, b, request) {
                break;
            }
        }
        work.scan.w0 = w.w0;
        work.scan.w1 = w.w1;
        work.scan.content_length = w.content_length;
        work.scan.seen += i;
        i as u64
    }

    const LOWER: u64 = 0x2020_2020_2020_2020;
    const ONES: u64 = 0x0101_0101_0101_0101;

    /// True when one of the eight bytes of `word` is `b` (the "has zero byte" test on
    /// `word ^ b...b`, exact).
    #[inline(always)]
    fn has_byte(word: u64, b: u8) -> bool {
        let x = word ^ (ONES * b as u64);
        x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
    }

    /// The scan's hot state, kept in registers through a chunk (the rest stays in the map
    /// entry: it changes rarely, and values loaded from memory keep the verifier's paths few).
    struct Window {
        w0: u64,
        w1: u64,
        content_length: u64,
    }

    /// One head byte; true at the head's end (CRLF CRLF).
    #[inline(always)]
    fn scan_byte(c: &mut ScanWork, w: &mut Window, b: u8, request: bool) -> bool {
        w.w1 = (w.w1 << 8) | (w.w0 >> 56);
        w.w0 = (w.w0 << 8) | b as u64;
        if request && c.scan.target != TARGET_DONE {
            if c.scan.target == TARGET_METHOD {
                if b == b' ' {
                    c.scan.target = TARGET_IN;
                }
            } else if b == b' ' || b == b'?' || b == b'\r' || b == b'\n' {
                c.scan.target = TARGET_DONE;
            } else if (c.path_len as usize) < PATH_CAPTURE {
                c.path[(c.path_len as usize) & (PATH_CAPTURE - 1)] = b;
                c.path_len += 1;
            } else {
                c.truncated = 1;
                c.scan.target = TARGET_DONE;
            }
        }
        if c.scan.flags & SCAN_IN_LENGTH != 0 {
            let d = b.wrapping_sub(b'0');
            if d <= 9 {
                if w.content_length < (1 << 56) {
                    w.content_length = w.content_length * 10 + d as u64;
                }
            } else if b != b' ' && b != b'\t' {
                c.scan.flags &= !SCAN_IN_LENGTH;
            }
        }
        if b == b'\n' {
            c.scan.flags &= !SCAN_PAST_COLON;
        }
        if b == b':' && c.scan.flags & SCAN_PAST_COLON == 0 {
            c.scan.flags |= SCAN_PAST_COLON;
            let lw0 = w.w0 | LOWER;
            let lw1 = w.w1 | LOWER;
            if lw0 == u64::from_be_bytes(*b"-length:")
                && lw1 == u64::from_be_bytes(*b"*content")
                && (w.w1 >> 56) as u8 == b'\n'
            {
                c.scan.flags |= SCAN_IN_LENGTH | SCAN_CONTENT_LENGTH;
                w.content_length = 0;
            } else if lw0 == u64::from_be_bytes(*b"ncoding:")
                && lw1 == u64::from_be_bytes(*b"ansfer-e")
            {
                c.scan.flags |= SCAN_TRANSFER_ENCODING;
            }
        }
        if w.w0 & 0xffff_ffff == 0x0d0a_0d0a {
            c.scan.flags |= SCAN_ENDED;
            return true;
        }
        false
    }

    /// The exchange under way is over: one record for userspace.
    #[inline(always)]
    fn complete(key: u64) {
        httpflow_complete(key);
    }

    /// [`complete`] as a global BPF function, checked once by the verifier.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn httpflow_complete(key: u64) -> u64 {
        let Some(conn) = HTTPFLOW_CONNS.get_ptr_mut(&key) else {
            return 0;
        };
        // SAFETY: a live map entry.
        let c = unsafe { &mut *conn };
        let phase = c.phase;
        c.phase = PHASE_IDLE;
        if phase == PHASE_REQUEST || c.status == 0 {
            count(HTTP_STAT_UNANSWERED);
            return 0;
        }
        if phase != PHASE_RESPONSE {
            return 0;
        }
        let Some(mut entry) = HTTPFLOW_EXCHANGES.reserve::<HttpExchange>(0) else {
            count(HTTP_STAT_RINGBUF_FULL);
            return 0;
        };
        let ex = entry.as_mut_ptr();
        // SAFETY: `ex` is the reserved record, written field by field before submit.
        unsafe {
            (*ex).conn = key;
            (*ex).latency_ns = c.resp_ns.saturating_sub(c.req_end_ns);
            (*ex).req_bytes = c.req_bytes;
            (*ex).resp_bytes = c.resp_bytes;
            (*ex).pid = c.pid;
            (*ex).status = c.status;
            (*ex).path_len = c.path_len;
            (*ex).method = c.method;
            (*ex).flags = c.flags;
            (*ex).minor = c.minor;
            (*ex).comm = c.comm;
            (*ex).ends = c.ends;
            copy_path(&mut (*ex).path, &c.path);
        }
        entry.submit(wake_flags(&HTTPFLOW_EXCHANGES));
        count(HTTP_STAT_EXCHANGES);
        1
    }

    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;

    /// Wake the daemon only when the ring fills up; it drains on its own timer otherwise.
    #[inline(always)]
    fn wake_flags(ring: &RingBuf) -> u64 {
        if ring.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }

    /// From now on this connection's calls go to userspace. `seed`: the request under way
    /// (parsed here, unanswered) goes first, so that userspace can pair it.
    #[inline(always)]
    fn fall_back(c: &mut HttpConn, key: u64, dir: u32, tls: bool, seed: bool) {
        c.state = SOCK_FALLBACK;
        count(HTTP_STAT_FALLBACKS);
        if !seed || c.phase != PHASE_REQUEST {
            return;
        }
        c.phase = PHASE_IDLE;
        let Some(mut entry) = HTTPFLOW_EVENTS.reserve::<HttpEvent>(0) else {
            count(HTTP_STAT_RINGBUF_FULL);
            return;
        };
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record, written field by field before submit.
        unsafe {
            (*ev).conn = key;
            (*ev).ts_ns = c.req_end_ns;
            (*ev).total = c.req_bytes;
            (*ev).pid = c.pid;
            (*ev).tid = 0;
            (*ev).kind = KIND_SEED;
            (*ev).direction = dir;
            // The method code and whether the path was cut, for userspace.
            (*ev).flags = if tls { FLAG_TLS } else { 0 }
                | (c.method as u32) << 8
                | if c.flags & EX_TRUNCATED != 0 {
                    1 << 16
                } else {
                    0
                };
            (*ev).captured = c.path_len as u32;
            (*ev).comm = c.comm;
            let mut i = 0;
            while i < PATH_CAPTURE {
                (*ev).data[i] = c.path[i];
                i += 1;
            }
            (*ev).ends = c.ends;
        }
        entry.submit(wake_flags(&HTTPFLOW_EVENTS));
    }

    /// One call (or a close) of a connection in fallback, for userspace to frame.
    #[inline(always)]
    fn emit(
        key: u64,
        sk: *const u8,
        src: u64,
        avail: u64,
        total: u64,
        kind: u32,
        dir: u32,
        tls: bool,
    ) {
        let Some(mut entry) = HTTPFLOW_EVENTS.reserve::<HttpEvent>(0) else {
            count(HTTP_STAT_RINGBUF_FULL);
            return;
        };
        let ev = entry.as_mut_ptr();
        // The copy comes first, its length bounded right before the helper call: older
        // verifiers (5.10) lose a scalar's bounds when it is spilled across other calls.
        let mut n = if avail < total { avail } else { total };
        if src == 0 {
            n = 0;
        }
        let len = (n as u32) & (2 * CAPTURE as u32 - 1);
        let len = if n > CAPTURE as u64 || len > CAPTURE as u32 {
            CAPTURE as u32
        } else {
            len
        };
        // SAFETY: `ev` is the reserved record; `data` holds CAPTURE bytes and len <= CAPTURE.
        let copied = len > 0
            && unsafe { raw_read_user((*ev).data.as_mut_ptr() as *mut _, len, src as *const _) }
                == 0;
        if len > 0 && !copied {
            count(HTTP_STAT_READ_FAILED);
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        // SAFETY: `ev` is the reserved record, written field by field before submit.
        unsafe {
            (*ev).captured = if copied { len } else { 0 };
            (*ev).conn = key;
            (*ev).ts_ns = bpf_ktime_get_ns();
            (*ev).total = total;
            (*ev).pid = (pid_tgid >> 32) as u32;
            (*ev).tid = pid_tgid as u32;
            (*ev).kind = kind;
            (*ev).direction = dir;
            (*ev).flags = if tls { FLAG_TLS } else { 0 };
            (*ev).comm = bpf_get_current_comm().unwrap_or_default();
            if describe(sk, &mut (*ev).ends).is_err() {
                count(HTTP_STAT_READ_FAILED);
            }
        }
        entry.submit(wake_flags(&HTTPFLOW_EVENTS));
    }

    /// Copies a captured path a word at a time (a plain array copy becomes a byte loop).
    #[inline(always)]
    fn copy_path(dst: &mut [u8; PATH_CAPTURE], src: &[u8; PATH_CAPTURE]) {
        let (d, s) = (dst.as_mut_ptr() as *mut u64, src.as_ptr() as *const u64);
        let mut i = 0;
        while i < PATH_CAPTURE / 8 {
            // SAFETY: i < PATH_CAPTURE / 8 words of both arrays; both are 8-byte aligned in
            // their structs.
            unsafe { *d.add(i) = *s.add(i) };
            i += 1;
        }
    }

    /// The connection's addresses.
    fn describe(sk: *const u8, out: &mut SocketEnds) -> Result<(), ()> {
        let off = offsets();
        let family: u16 = read(sk, off.skc_family)?;
        out.family = family;
        out.sport = read(sk, off.skc_num)?;
        out.dport = u16::from_be(read(sk, off.skc_dport)?);
        if family == AF_INET {
            let saddr: [u8; 4] = read(sk, off.skc_rcv_saddr)?;
            let daddr: [u8; 4] = read(sk, off.skc_daddr)?;
            out.saddr = v4_mapped(saddr);
            out.daddr = v4_mapped(daddr);
        } else {
            out.saddr = read(sk, off.skc_v6_rcv_saddr)?;
            out.daddr = read(sk, off.skc_v6_daddr)?;
        }
        let net: *const u8 = read(sk, off.skc_net)?;
        out.netns = read(net, off.net_ns_inum)?;
        Ok(())
    }

    fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]
    }

    /// A TCP socket closed: the exchange under way ends (a response delimited by the close
    /// counts), the state is dropped (the kernel reuses socket memory).
    #[tracepoint]
    pub fn httpflow_state(ctx: TracePointContext) -> u32 {
        // SAFETY: skaddr at 8 and newstate at 20 in every kernel's format of this tracepoint.
        let sk = unsafe { ctx.read_at::<u64>(8) }.unwrap_or(0);
        let new = unsafe { ctx.read_at::<i32>(20) }.unwrap_or(0);
        if new != TCP_CLOSE || sk == 0 {
            return 0;
        }
        for key in [sk, sk | FLAG_TLS as u64] {
            if let Some(conn) = HTTPFLOW_CONNS.get_ptr_mut(&key) {
                // SAFETY: a live map entry.
                let c = unsafe { &mut *conn };
                match c.state {
                    SOCK_HTTP => {
                        if c.phase != PHASE_IDLE {
                            complete(key);
                        }
                    }
                    SOCK_FALLBACK => emit(
                        key,
                        sk as *const u8,
                        0,
                        0,
                        0,
                        KIND_CLOSE,
                        DIR_READ,
                        key & FLAG_TLS as u64 != 0,
                    ),
                    _ => {}
                }
                let _ = HTTPFLOW_CONNS.remove(&key);
            }
        }
        0
    }

    fn ssl_enter(ctx: &ProbeContext, direction: u32, ex: bool) -> u32 {
        if is_own() {
            return 0;
        }
        let call = SslCall {
            ssl: ctx.arg::<u64>(0).unwrap_or(0),
            buf: ctx.arg::<u64>(1).unwrap_or(0),
            size_ptr: if ex {
                ctx.arg::<u64>(3).unwrap_or(0)
            } else {
                0
            },
            sock: 0,
            direction,
            _pad: 0,
        };
        let _ = SSL_CALLS.insert(&bpf_get_current_pid_tgid(), &call, 0);
        0
    }

    #[uprobe]
    pub fn httpflow_ssl_read(ctx: ProbeContext) -> u32 {
        ssl_enter(&ctx, DIR_READ, false)
    }

    #[uprobe]
    pub fn httpflow_ssl_write(ctx: ProbeContext) -> u32 {
        ssl_enter(&ctx, DIR_WRITE, false)
    }

    #[uprobe]
    pub fn httpflow_ssl_read_ex(ctx: ProbeContext) -> u32 {
        ssl_enter(&ctx, DIR_READ, true)
    }

    #[uprobe]
    pub fn httpflow_ssl_write_ex(ctx: ProbeContext) -> u32 {
        ssl_enter(&ctx, DIR_WRITE, true)
    }

    /// Return of SSL_read or SSL_read_ex.
    #[uretprobe]
    pub fn httpflow_ssl_read_ret(ctx: RetProbeContext) -> u32 {
        ssl_ret(&ctx, DIR_READ, SLOT_SSL_READ_RET)
    }

    /// Return of SSL_write or SSL_write_ex.
    #[uretprobe]
    pub fn httpflow_ssl_write_ret(ctx: RetProbeContext) -> u32 {
        ssl_ret(&ctx, DIR_WRITE, SLOT_SSL_WRITE_RET)
    }

    #[inline(always)]
    fn ssl_ret(ctx: &RetProbeContext, direction: u32, slot: u32) -> u32 {
        let thread = bpf_get_current_pid_tgid();
        // SAFETY: a copy out of the map value.
        let Some(call) = (unsafe { SSL_CALLS.get(&thread) }).copied() else {
            return 0;
        };
        let _ = SSL_CALLS.remove(&thread);
        // The thread's record must be of this kind of call: a record left by a call whose
        // return was not seen (or a return whose entry was not) would put another call's
        // buffer and direction on these bytes.
        if call.direction != direction {
            count(HTTP_STAT_TLS_MISMATCH);
            return 0;
        }
        let ret: i64 = ctx.ret::<i32>() as i64;
        let n = if call.size_ptr != 0 {
            if ret != 1 {
                return 0;
            }
            // SAFETY: checked user-memory read of the `size_t *` out argument.
            match unsafe { bpf_probe_read_user(call.size_ptr as *const u64) } {
                Ok(n) => n,
                Err(_) => return 0,
            }
        } else if ret > 0 {
            ret as u64
        } else {
            return 0;
        };
        if n == 0 {
            return 0;
        }
        let key = SslKey {
            tgid: thread >> 32,
            ssl: call.ssl,
        };
        let sock = if call.sock != 0 {
            let _ = SSL_SOCK.insert(&key, &call.sock, 0);
            call.sock
        } else {
            // SAFETY: a copy out of the map value.
            match unsafe { SSL_SOCK.get(&key) } {
                Some(sock) => *sock,
                None => {
                    count(HTTP_STAT_TLS_NO_SOCKET);
                    return 0;
                }
            }
        };
        on_data(
            sock | FLAG_TLS as u64,
            sock as *const u8,
            call.buf,
            n,
            n,
            call.direction,
            true,
            slot,
        );
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
