//! httpflow: the first bytes of reads and writes on HTTP sockets, for the daemon to parse.
//!
//! - `syscalls:sys_enter_*` of read, write, recvfrom, sendto, readv, writev, recvmsg, sendmsg and
//!   sendfile64 resolve the fd to its socket (task → files → fdtable → file → socket → sock,
//!   offsets from BTF) and, for a TCP socket not known to be something else, remember (socket,
//!   buffer) per thread; `sys_exit_*` with a positive return classifies the socket's first
//!   bytes (HTTP method or `HTTP/1.` status line). An HTTP socket's calls go to userspace (call
//!   length plus the first `CAPTURE` bytes); any other socket is marked and costs the fd walk
//!   and one map lookup per call afterwards. Classic tracepoints exist on
//!   every kernel this project supports, unlike kprobes and trampolines (absent on its CI host).
//! - `sock:inet_sock_set_state` to CLOSE: the classification is forgotten (the kernel reuses
//!   socket memory) and the daemon told that the connection ended.
//! - fentry tier (opt-in, instead of the syscall tracepoints): fentry and fexit on
//!   `inet_sendmsg`/`inet_recvmsg` (and inet6_*). Since syscall tracepoints became faultable
//!   (6.14+) their programs run preemptibly and the kernel skips a run on a CPU where another
//!   is preempted mid-way, losing calls; trampoline programs are preemptible too under full or
//!   lazy preemption, so each hook has twin programs (below).
//!   The fentry half takes the socket and the user buffer from `struct msghdr`'s iterator
//!   (before the call advances it), the fexit half classifies and captures as above.
//! - OpenSSL uprobes (`httpflow-tls`): `SSL_read`/`SSL_write`(`_ex`) remember the plain-text
//!   buffer per thread; the syscall the library makes meanwhile names the socket (and is not
//!   classified itself: it carries ciphertext); the return sends the plain text as for a plain
//!   socket, under the socket's id with bit 0 set.
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
        CAPTURE, DIR_READ, DIR_WRITE, FLAG_TLS, HTTP_STAT_COUNT, HTTP_STAT_READ_FAILED,
        HTTP_STAT_RINGBUF_FULL, HTTP_STAT_TLS_MISMATCH, HTTP_STAT_TLS_NO_SOCKET, HttpEvent,
        HttpOffsets, IterOffsets, KIND_CLOSE, KIND_DATA, MAX_ATTEMPTS, MAX_SOCKS, SOCK_HTTP,
        SOCK_OTHER, SOCK_UNKNOWN, SockState,
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

    /// 4 MiB: about 3,600 events between two reads by the daemon.
    #[map]
    static HTTPFLOW_EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

    #[map]
    static HTTPFLOW_SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

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
        if let Some(ssl) = SSL_CALLS.get_ptr_mut(&thread) {
            // SAFETY: this thread's own entry.
            unsafe { (*ssl).sock = sk };
            return 0;
        }
        // SAFETY: a read of the map value.
        if unsafe { HTTPFLOW_SOCKS.get(&sk) }.is_some_and(|s| s.state == SOCK_OTHER) {
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
        finish(&call, ret)
    }

    /// The remembered call returned `ret`.
    #[inline(always)]
    fn finish(call: &Call, ret: i64) -> u32 {
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
        on_data(sk as u64, sk, src, avail, ret as u64, call.direction, 0);
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
         $send_ret:ident, $send6_ret:ident, $recv_ret:ident, $recv6_ret:ident) => {
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
                msg_exit(&ctx, 3)
            }

            #[fexit(function = "inet6_sendmsg")]
            pub fn $send6_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 3)
            }

            #[fexit(function = "inet_recvmsg")]
            pub fn $recv_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 4)
            }

            #[fexit(function = "inet6_recvmsg")]
            pub fn $recv6_ret(ctx: FExitContext) -> u32 {
                msg_exit(&ctx, 4)
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
        httpflow_inet6_recv_ret
    );
    fentry_programs!(
        httpflow_inet_send_b,
        httpflow_inet6_send_b,
        httpflow_inet_recv_b,
        httpflow_inet6_recv_b,
        httpflow_inet_send_ret_b,
        httpflow_inet6_send_ret_b,
        httpflow_inet_recv_ret_b,
        httpflow_inet6_recv_ret_b
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
        if SSL_CALLS.get_ptr(&bpf_get_current_pid_tgid()).is_some() {
            return 0;
        }
        on_data(sk as u64, sk, 0, 0, ret as u64, DIR_WRITE, 0);
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
    fn msg_exit(ctx: &FExitContext, nargs: usize) -> u32 {
        let thread = bpf_get_current_pid_tgid();
        // SAFETY: a copy out of the map value.
        let Some(call) = (unsafe { CALLS.get(&thread) }).copied() else {
            return 0;
        };
        let _ = CALLS.remove(&thread);
        let ret = ctx.arg::<u64>(nargs) as i32 as i64;
        finish(&call, ret)
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

    /// True when the first bytes start an HTTP/1 request (any method the daemon knows, followed
    /// by a space) or response (`HTTP/1.`).
    fn looks_http(b: &[u8; 8]) -> bool {
        const PREFIXES: [&[u8]; 10] = [
            b"GET ",
            b"PUT ",
            b"POST ",
            b"HEAD ",
            b"DELETE ",
            b"OPTIONS ",
            b"PATCH ",
            b"CONNECT ",
            b"TRACE ",
            b"HTTP/1.",
        ];
        let mut i = 0;
        while i < PREFIXES.len() {
            let p = PREFIXES[i];
            let mut j = 0;
            let mut same = true;
            while j < p.len() {
                if b[j] != p[j] {
                    same = false;
                    break;
                }
                j += 1;
            }
            if same {
                return true;
            }
            i += 1;
        }
        false
    }

    /// `key`: the socket's id (| FLAG_TLS for plain text from OpenSSL); `src`, `avail`: the
    /// contiguous user bytes the call moved first; `total`: what it moved in all.
    #[inline(always)]
    fn on_data(key: u64, sk: *const u8, src: u64, avail: u64, total: u64, dir: u32, flags: u32) {
        match HTTPFLOW_SOCKS.get_ptr_mut(&key) {
            // SAFETY: map value pointers below point into live entries.
            Some(state) if unsafe { (*state).state } == SOCK_OTHER => return,
            Some(state) if unsafe { (*state).state } == SOCK_HTTP => {}
            found => {
                // Unknown: classify this call's first bytes.
                let http = avail >= 8
                    && src != 0
                    // SAFETY: checked user-memory read.
                    && match unsafe { bpf_probe_read_user(src as *const [u8; 8]) } {
                        Ok(head) => looks_http(&head),
                        Err(_) => false,
                    };
                let mut next = SockState::default();
                if let Some(state) = found {
                    // SAFETY: live entry.
                    next = unsafe { *state };
                }
                if http {
                    next.state = SOCK_HTTP;
                } else {
                    next.attempts = next.attempts.saturating_add(1);
                    if next.attempts >= MAX_ATTEMPTS {
                        next.state = SOCK_OTHER;
                    } else {
                        next.state = SOCK_UNKNOWN;
                    }
                }
                let _ = HTTPFLOW_SOCKS.insert(&key, &next, 0);
                if !http {
                    return;
                }
            }
        }
        emit(key, sk, src, avail, total, KIND_DATA, dir, flags);
    }

    #[inline(always)]
    fn emit(
        key: u64,
        sk: *const u8,
        src: u64,
        avail: u64,
        total: u64,
        kind: u32,
        dir: u32,
        flags: u32,
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
            (*ev).flags = flags;
            (*ev).comm = bpf_get_current_comm().unwrap_or_default();
            if describe(sk, ev).is_err() {
                count(HTTP_STAT_READ_FAILED);
            }
        }
        entry.submit(0);
    }

    /// The connection's addresses into the event.
    unsafe fn describe(sk: *const u8, ev: *mut HttpEvent) -> Result<(), ()> {
        let off = offsets();
        let family: u16 = read(sk, off.skc_family)?;
        // SAFETY: `ev` is a reserved ring-buffer record.
        unsafe {
            (*ev).family = family;
            (*ev).sport = read(sk, off.skc_num)?;
            (*ev).dport = u16::from_be(read(sk, off.skc_dport)?);
            if family == AF_INET {
                let saddr: [u8; 4] = read(sk, off.skc_rcv_saddr)?;
                let daddr: [u8; 4] = read(sk, off.skc_daddr)?;
                (*ev).saddr = v4_mapped(saddr);
                (*ev).daddr = v4_mapped(daddr);
            } else {
                (*ev).saddr = read(sk, off.skc_v6_rcv_saddr)?;
                (*ev).daddr = read(sk, off.skc_v6_daddr)?;
            }
            let net: *const u8 = read(sk, off.skc_net)?;
            (*ev).netns = read(net, off.net_ns_inum)?;
        }
        Ok(())
    }

    fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]
    }

    /// A TCP socket closed: forget its classification (socket memory is reused) and tell the
    /// daemon when it was an HTTP one.
    #[tracepoint]
    pub fn httpflow_state(ctx: TracePointContext) -> u32 {
        // SAFETY: skaddr at 8 and newstate at 20 in every kernel's format of this tracepoint.
        let sk = unsafe { ctx.read_at::<u64>(8) }.unwrap_or(0);
        let new = unsafe { ctx.read_at::<i32>(20) }.unwrap_or(0);
        if new != TCP_CLOSE || sk == 0 {
            return 0;
        }
        for key in [sk, sk | FLAG_TLS as u64] {
            // SAFETY: a copy out of the map value.
            if let Some(state) = unsafe { HTTPFLOW_SOCKS.get(&key) }.copied() {
                let _ = HTTPFLOW_SOCKS.remove(&key);
                if state.state == SOCK_HTTP {
                    emit(key, sk as *const u8, 0, 0, 0, KIND_CLOSE, DIR_READ, 0);
                }
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
        ssl_ret(&ctx, DIR_READ)
    }

    /// Return of SSL_write or SSL_write_ex.
    #[uretprobe]
    pub fn httpflow_ssl_write_ret(ctx: RetProbeContext) -> u32 {
        ssl_ret(&ctx, DIR_WRITE)
    }

    #[inline(always)]
    fn ssl_ret(ctx: &RetProbeContext, direction: u32) -> u32 {
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
            FLAG_TLS,
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
