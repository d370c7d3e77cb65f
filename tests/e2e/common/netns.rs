//! Test hosts in network namespaces: real TCP/UDP traffic between two namespaces joined by a
//! veth pair, with the kernel's own counts (TCP_INFO) as ground truth.
//!
//! Everything here is synchronous: std threads and std::net sockets. A socket belongs to the
//! network namespace of the thread that created it, whatever thread uses it afterwards; the
//! helpers create every socket on a thread that entered the right namespace (`Netns::run`).
//!
//! Addresses are private test addresses (10.213.N.1/2, fd00:213:0:N::1/2) and exist only
//! inside the namespaces created here; no traffic leaves them.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Read/write/accept/connect timeout of every socket made here: no test may hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a side waits for the peer to acknowledge everything it sent.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Distinguishes the namespaces (and address blocks) of one process.
static SEQ: AtomicU32 = AtomicU32::new(0);

fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ip <args>` (no namespace); panics with stderr on failure.
fn ip(args: &[&str]) -> Output {
    run_cmd("ip", args)
}

pub fn run_cmd(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "`{cmd} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace created by the test (`ip netns add dke-<tag>-<pid>-<n>`), deleted on Drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `dke-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Netns {
        Self::named(format!("dke-{tag}-{}-{}", std::process::id(), next_seq()))
    }

    fn named(name: String) -> Netns {
        // A leftover of an earlier process that had our pid: its owner is gone.
        if fs::exists(format!("/run/netns/{name}")).unwrap_or(false) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <name> <args>`; panics with stderr on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns its result
    /// (a panic in `f` is resumed here). Sockets created inside belong to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        join(self.spawn(f))
    }

    /// Like `run`, without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let file =
            fs::File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path()));
        thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns(CLONE_NEWNET)");
                drop(file);
                f()
            })
            .expect("spawn thread")
    }

    /// `ip netns exec <name> <cmd> <args>`; panics with stderr on failure.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The namespace's inode number (what netflow reports as `netns`).
    pub fn inode(&self) -> u64 {
        fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path()))
            .ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            // Never panic in Drop (it may run while unwinding); say what was left behind.
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// Joins a thread, resuming its panic (with its message) in the caller.
fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Two namespaces joined by a veth pair (`eth0` in each), with IPv4 and IPv6 addresses
/// (IPv6 with `nodad`, usable at once), links and `lo` up. Drop removes everything.
pub struct NetPair {
    pub a: Netns,
    pub b: Netns,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
}

impl NetPair {
    /// Namespaces `dke-<tag>-<pid>-<n>-a` and `-b`, addresses 10.213.N.1/24 (a) and
    /// 10.213.N.2/24 (b), fd00:213:0:N::1/64 and ::2/64, N = n % 250 + 1.
    pub fn create(tag: &str) -> NetPair {
        let n = next_seq();
        let base = format!("dke-{tag}-{}-{n}", std::process::id());
        let a = Netns::named(format!("{base}-a"));
        let b = Netns::named(format!("{base}-b"));
        let block = (n % 250 + 1) as u8;
        let a_v4 = Ipv4Addr::new(10, 213, block, 1);
        let b_v4 = Ipv4Addr::new(10, 213, block, 2);
        let a_v6 = Ipv6Addr::new(0xfd00, 0x213, 0, block.into(), 0, 0, 0, 1);
        let b_v6 = Ipv6Addr::new(0xfd00, 0x213, 0, block.into(), 0, 0, 0, 2);

        for ns in [&a, &b] {
            // IPv6 on, and no duplicate address detection for the interfaces created next:
            // their link-local addresses are usable at once too, not only the `nodad` ones.
            ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            );
        }
        a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]);
        for (ns, v4, v6) in [(&a, a_v4, a_v6), (&b, b_v4, b_v6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        let pair = NetPair {
            a,
            b,
            a_v4,
            b_v4,
            a_v6,
            b_v6,
        };
        pair.wait_ready();
        pair
    }

    /// The address of `a` in the family of `server_ip`.
    pub fn a_ip_for(&self, server_ip: IpAddr) -> IpAddr {
        match server_ip {
            IpAddr::V4(_) => self.a_v4.into(),
            IpAddr::V6(_) => self.a_v6.into(),
        }
    }

    /// Waits until both ends of the veth are up (carrier) and the IPv6 addresses are not
    /// tentative.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for ns in [&self.a, &self.b] {
            loop {
                let link = ns.ip(&["-o", "link", "show", "dev", "eth0"]);
                let addr = ns.ip(&["-o", "-6", "addr", "show", "dev", "eth0"]);
                let link = String::from_utf8_lossy(&link.stdout);
                let addr = String::from_utf8_lossy(&addr.stdout);
                if link.contains("LOWER_UP") && !addr.contains("tentative") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "veth in {} not ready:\n{link}\n{addr}",
                    ns.name
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Kernel's own view of a TCP socket (getsockopt TCP_INFO): what netflow must agree with.
///
/// The helpers of this module read it once everything sent was acknowledged and before any FIN
/// was exchanged, so the byte counts are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Smoothed RTT (`tcpi_rtt`), microseconds.
    pub rtt_us: u32,
    /// RTT variance (`tcpi_rttvar`), microseconds.
    pub rttvar_us: u32,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
    /// `tcpi_bytes_acked` exactly as the kernel reports it. Linux counts the SYN in it on the
    /// side that called connect() (payload + 1 there; the ACK of the SYN goes through
    /// `tcp_ack()` → `tcp_snd_una_update()`), not on the accepting side (its SYN-ACK is acked
    /// in the SYN_RECV path, which sets `snd_una` directly). See `payload_acked`.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: payload bytes received (no SYN, and no FIN when read before it).
    pub bytes_received: u64,
    /// Segments sent but not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Bytes written by the application but not yet sent (`tcpi_notsent_bytes`).
    pub notsent_bytes: u32,
}

impl TcpInfo {
    /// Payload bytes the peer acknowledged: `bytes_acked` without the SYN, which the kernel
    /// counts on the connecting side only (`connecting_side`: this socket called connect()).
    pub fn payload_acked(&self, connecting_side: bool) -> u64 {
        if connecting_side {
            self.bytes_acked
                .checked_sub(1)
                .expect("a connected socket has its SYN acknowledged")
        } else {
            self.bytes_acked
        }
    }
}

/// getsockopt(TCP_INFO) of `stream`.
pub fn tcp_info(stream: &TcpStream) -> TcpInfo {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut raw: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `raw`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut raw).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(TCP_INFO): {}",
        io::Error::last_os_error()
    );
    // bytes_received and the fields before it exist since Linux 4.1, notsent_bytes since 4.6.
    assert!(
        len as usize >= std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt),
        "short TCP_INFO ({len} bytes)"
    );
    TcpInfo {
        rtt_us: raw.tcpi_rtt,
        rttvar_us: raw.tcpi_rttvar,
        total_retrans: raw.tcpi_total_retrans,
        bytes_acked: raw.tcpi_bytes_acked,
        bytes_received: raw.tcpi_bytes_received,
        unacked: raw.tcpi_unacked,
        notsent_bytes: raw.tcpi_notsent_bytes,
    }
}

/// Waits until everything written on `stream` was sent and acknowledged by the peer, and
/// `received` bytes arrived; returns TCP_INFO then.
fn settled_info(stream: &TcpStream, received: u64) -> TcpInfo {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let info = tcp_info(stream);
        if info.unacked == 0 && info.notsent_bytes == 0 && info.bytes_received >= received {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "peer did not acknowledge everything within {SETTLE_TIMEOUT:?}: {info:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

fn set_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// SO_RCVTIMEO on a listener bounds accept().
fn set_accept_timeout(listener: &TcpListener) {
    let tv = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: the pointer and length describe `tv`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
}

/// A TCP listener on `ip:port` in `ns` (port 0: the kernel picks), accept bounded by
/// IO_TIMEOUT.
pub fn tcp_listen(ns: &Netns, ip: IpAddr, port: u16) -> TcpListener {
    ns.run(move || {
        let listener = TcpListener::bind((ip, port))
            .unwrap_or_else(|e| panic!("bind {ip}:{port} in namespace: {e}"));
        set_accept_timeout(&listener);
        listener
    })
}

fn accept(listener: &TcpListener) -> TcpStream {
    let (stream, _) = listener.accept().expect("accept (timeout 30 s)");
    set_timeouts(&stream);
    stream
}

/// Connects from namespace `ns` to `server` (timeouts set).
pub fn tcp_connect(ns: &Netns, server: SocketAddr) -> TcpStream {
    ns.run(move || connect(server))
}

fn connect(server: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&server, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {server}: {e}"));
    set_timeouts(&stream);
    stream
}

/// Writes exactly `n` bytes (a repeating pattern).
fn send_bytes(mut stream: &TcpStream, n: usize) {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = n;
    while left > 0 {
        let len = left.min(chunk.len());
        stream
            .write_all(&chunk[..len])
            .unwrap_or_else(|e| panic!("write ({} of {n} bytes left): {e}", left));
        left -= len;
    }
}

/// Reads exactly `n` bytes.
fn recv_bytes(mut stream: &TcpStream, n: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let len = left.min(buf.len());
        stream
            .read_exact(&mut buf[..len])
            .unwrap_or_else(|e| panic!("read ({left} of {n} bytes missing): {e}"));
        left -= len;
    }
}

/// Reads until the peer's FIN; panics if any data comes instead.
fn recv_eof(mut stream: &TcpStream) {
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(_) => panic!("unexpected data before EOF"),
        // The peer may reset instead of closing gracefully; either ends the connection.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("waiting for EOF: {e}"),
    }
}

/// Tells the peer thread we are done, then waits for it (a panicking peer drops its sender,
/// which ends the wait at once).
fn rendezvous(tx: &mpsc::Sender<()>, rx: &mpsc::Receiver<()>) {
    let _ = tx.send(());
    rx.recv_timeout(IO_TIMEOUT)
        .expect("the peer thread failed or timed out");
}

/// Result of one exchange: addresses as each side saw them, and TCP_INFO read before close on
/// both sides (once everything was acknowledged, before any FIN).
#[derive(Debug, Clone, Copy)]
pub struct TcpExchange {
    pub client_local: SocketAddr,
    pub server_local: SocketAddr,
    pub client_info: TcpInfo,
    pub server_info: TcpInfo,
}

/// Server listens in `pair.b` on `server_ip:port` (port 0 = pick), client in `pair.a`
/// connects, sends exactly `request` bytes; the server reads exactly that many, replies exactly
/// `response` bytes, client reads them; both read TCP_INFO then close (client first).
pub fn tcp_exchange(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    request: usize,
    response: usize,
) -> TcpExchange {
    tcp_exchange_hold(pair, server_ip, port, request, response, Duration::ZERO)
}

/// `tcp_exchange` that keeps the connection open for `hold` between request and response.
pub fn tcp_exchange_hold(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    request: usize,
    response: usize,
    hold: Duration,
) -> TcpExchange {
    let listener = tcp_listen(&pair.b, server_ip, port);
    let server_addr = listener.local_addr().unwrap();
    let (server_tx, client_rx) = mpsc::channel();
    let (client_tx, server_rx) = mpsc::channel();
    let server = pair.b.spawn(move || {
        let stream = accept(&listener);
        drop(listener);
        recv_bytes(&stream, request);
        thread::sleep(hold);
        send_bytes(&stream, response);
        let info = settled_info(&stream, request as u64);
        rendezvous(&server_tx, &server_rx);
        // The client closes first; its FIN ends our side.
        recv_eof(&stream);
        (stream.local_addr().unwrap(), info)
    });
    let client = pair.a.spawn(move || {
        let stream = connect(server_addr);
        send_bytes(&stream, request);
        recv_bytes(&stream, response);
        let info = settled_info(&stream, response as u64);
        rendezvous(&client_tx, &client_rx);
        let local = stream.local_addr().unwrap();
        drop(stream);
        (local, info)
    });
    let (client_local, client_info) = join(client);
    let (server_local, server_info) = join(server);
    TcpExchange {
        client_local,
        server_local,
        client_info,
        server_info,
    }
}

/// A long-lived connection from `pair.a` to `pair.b` driven step by step. Each step returns
/// once the receiver read everything and the sender saw it acknowledged, so `info()` is exact.
pub struct TcpSession {
    client: TcpStream,
    server: TcpStream,
    pub client_local: SocketAddr,
    pub server_local: SocketAddr,
    client_sent: u64,
    server_sent: u64,
}

/// Opens a `TcpSession` to a server listening in `pair.b` on `server_ip:port` (0 = pick).
pub fn tcp_session(pair: &NetPair, server_ip: IpAddr, port: u16) -> TcpSession {
    let listener = tcp_listen(&pair.b, server_ip, port);
    let server_addr = listener.local_addr().unwrap();
    // The listen backlog completes the handshake; accept afterwards.
    let client = tcp_connect(&pair.a, server_addr);
    let server = accept(&listener);
    TcpSession {
        client_local: client.local_addr().unwrap(),
        server_local: server.local_addr().unwrap(),
        client,
        server,
        client_sent: 0,
        server_sent: 0,
    }
}

impl TcpSession {
    /// Sends `n` bytes client→server; the server reads them.
    pub fn send_client(&mut self, n: usize) {
        Self::transfer(&self.client, &self.server, n);
        self.client_sent += n as u64;
        settled_info(&self.client, self.server_sent);
    }

    /// Sends `n` bytes server→client; the client reads them.
    pub fn send_server(&mut self, n: usize) {
        Self::transfer(&self.server, &self.client, n);
        self.server_sent += n as u64;
        settled_info(&self.server, self.client_sent);
    }

    fn transfer(from: &TcpStream, to: &TcpStream, n: usize) {
        thread::scope(|s| {
            let writer = s.spawn(|| send_bytes(from, n));
            recv_bytes(to, n);
            writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
    }

    /// Bytes sent so far client→server and server→client.
    pub fn sent(&self) -> (u64, u64) {
        (self.client_sent, self.server_sent)
    }

    /// TCP_INFO of (client, server).
    pub fn info(&self) -> (TcpInfo, TcpInfo) {
        (tcp_info(&self.client), tcp_info(&self.server))
    }

    /// Closes the client, waits for its FIN at the server, closes the server; returns
    /// TCP_INFO of (client, server) read just before.
    pub fn close(self) -> (TcpInfo, TcpInfo) {
        let infos = self.info();
        drop(self.client);
        recv_eof(&self.server);
        drop(self.server);
        infos
    }
}

/// `count` short connections from a to b, each sending `request` bytes and receiving
/// `response`, sequentially, each open a few ms; returns the client-side local ports used.
pub fn short_connections(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    count: usize,
    request: usize,
    response: usize,
) -> Vec<u16> {
    short_connections_at(pair, server_ip, port, count, request, response).1
}

/// `short_connections` that also returns the server's address (useful with port 0).
pub fn short_connections_at(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    count: usize,
    request: usize,
    response: usize,
) -> (SocketAddr, Vec<u16>) {
    let listener = tcp_listen(&pair.b, server_ip, port);
    let server_addr = listener.local_addr().unwrap();
    let server = pair.b.spawn(move || {
        for _ in 0..count {
            let stream = accept(&listener);
            recv_bytes(&stream, request);
            send_bytes(&stream, response);
            recv_eof(&stream);
        }
    });
    let client = pair.a.spawn(move || {
        (0..count)
            .map(|_| {
                let stream = connect(server_addr);
                send_bytes(&stream, request);
                recv_bytes(&stream, response);
                thread::sleep(Duration::from_millis(2));
                stream.local_addr().unwrap().port()
            })
            .collect::<Vec<u16>>()
    });
    let ports = join(client);
    join(server);
    (server_addr, ports)
}

/// UDP: client in a (bound to a's address, kernel-picked port) sends each datagram of `sizes`
/// to the server in b, which checks its size and replies with `reply_sizes[i]` bytes; the
/// client waits for each reply before sending the next (nothing queues, nothing drops).
/// Returns (client local addr, server addr).
pub fn udp_exchange(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    sizes: &[usize],
    reply_sizes: &[usize],
) -> (SocketAddr, SocketAddr) {
    let client_ip = pair.a_ip_for(server_ip);
    udp_exchange_from(pair, client_ip, server_ip, port, sizes, reply_sizes)
}

/// `udp_exchange` with the client socket bound to `client_bind` (kernel-picked port). Bound to
/// the unspecified address (0.0.0.0 or ::), it has no local address of its own: the kernel picks
/// a's address per datagram by routing. An IPv6 client socket reaches an IPv4 server at its
/// IPv4-mapped address (dual stack). Returns (client address as the server saw it, server addr).
pub fn udp_exchange_from(
    pair: &NetPair,
    client_bind: IpAddr,
    server_ip: IpAddr,
    port: u16,
    sizes: &[usize],
    reply_sizes: &[usize],
) -> (SocketAddr, SocketAddr) {
    assert_eq!(sizes.len(), reply_sizes.len(), "one reply per datagram");
    let client_ip = pair.a_ip_for(server_ip);
    let server_sock = pair
        .b
        .run(move || UdpSocket::bind((server_ip, port)).unwrap());
    let client_sock = pair
        .a
        .run(move || UdpSocket::bind((client_bind, 0)).unwrap());
    for sock in [&server_sock, &client_sock] {
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    let server_addr = server_sock.local_addr().unwrap();
    let client_addr = SocketAddr::new(client_ip, client_sock.local_addr().unwrap().port());
    let target = match (client_bind, server_addr) {
        (IpAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => server_addr,
    };
    let (sizes, replies) = (sizes.to_vec(), reply_sizes.to_vec());
    let (expected, reply_sizes) = (sizes.clone(), replies.clone());
    let server = pair.b.spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        for &reply in &reply_sizes {
            let (n, from) = server_sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP server: datagram #{}: {e}", got.len()));
            assert_eq!(from, client_addr, "UDP datagram from a stranger");
            got.push(n);
            let sent = server_sock.send_to(&vec![0x5a; reply], from).unwrap();
            assert_eq!(sent, reply);
        }
        got
    });
    let client = pair.a.spawn(move || {
        let mut buf = vec![0u8; 65536];
        for (i, &size) in sizes.iter().enumerate() {
            let sent = client_sock.send_to(&vec![0xa5; size], target).unwrap();
            assert_eq!(sent, size);
            let (n, from) = client_sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP client: reply #{i}: {e}"));
            assert_eq!(from, target, "UDP reply from a stranger");
            assert_eq!(n, replies[i], "size of reply #{i}");
            assert!(buf[..n].iter().all(|&b| b == 0x5a), "payload of reply #{i}");
        }
        // client_sock is dropped here: the client is gone before the daemon reports.
    });
    join(client);
    let got = join(server);
    assert_eq!(got, expected, "datagram sizes seen by the UDP server");
    (client_addr, server_addr)
}

/// Drops a share of the TCP packets entering a pair's `b` end (iptables and ip6tables `statistic`
/// match on INPUT); the rules are removed on Drop.
pub struct PacketLoss {
    ns: String,
    rule: Vec<String>,
}

/// Drops `probability` (0..=1) of the TCP packets (IPv4 and IPv6) entering `pair.b`.
///
/// Segmentation offloads are turned off on both ends first: veth carries a TSO/GSO skb of up to
/// 64 KB whole, so 2 MB could cross as a few dozen "packets" and a 10% rule may drop none of
/// them. With MTU-sized packets the rule sees every segment (about 1,450 per 2 MB). The device's
/// features apply at transmit time, so sockets already connected are segmented too.
pub fn packet_loss(pair: &NetPair, probability: f64) -> PacketLoss {
    assert!((0.0..=1.0).contains(&probability));
    for ns in [&pair.a, &pair.b] {
        ns.exec(
            "ethtool",
            &["-K", "eth0", "tso", "off", "gso", "off", "gro", "off"],
        );
    }
    let ns = &pair.b;
    let rule: Vec<String> = [
        "INPUT",
        "-p",
        "tcp",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        &format!("{probability}"),
        "-j",
        "DROP",
    ]
    .map(String::from)
    .to_vec();
    let loss = PacketLoss {
        ns: ns.name.clone(),
        rule,
    };
    for tool in ["iptables", "ip6tables"] {
        let mut args = vec!["-w", "-A"];
        args.extend(loss.rule.iter().map(String::as_str));
        ns.exec(tool, &args);
    }
    loss
}

impl Drop for PacketLoss {
    fn drop(&mut self) {
        for tool in ["iptables", "ip6tables"] {
            let mut args = vec!["netns", "exec", &self.ns, tool, "-w", "-D"];
            args.extend(self.rule.iter().map(String::as_str));
            // The namespace may already be gone; nothing to undo then.
            let _ = Command::new("ip").args(&args).output();
        }
    }
}

/// UDP from a to b with a *connected* client socket: each datagram of `sizes` is answered with
/// one of `replies` bytes by an unconnected server socket. Returns (client, server) addresses.
pub fn udp_connected_exchange(
    pair: &NetPair,
    server_ip: IpAddr,
    sizes: &[usize],
    replies: &[usize],
) -> (SocketAddr, SocketAddr) {
    use std::net::UdpSocket;
    assert_eq!(sizes.len(), replies.len());
    let server = pair
        .b
        .run(move || UdpSocket::bind(SocketAddr::new(server_ip, 0)).expect("udp bind"));
    server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let server_addr = server.local_addr().unwrap();
    let client = pair.a.run(move || {
        let unspecified: IpAddr = if server_ip.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0)).expect("udp bind");
        socket.connect(server_addr).expect("udp connect");
        socket
    });
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = vec![0u8; 65536];
    for (&size, &reply) in sizes.iter().zip(replies) {
        client.send(&vec![b'u'; size]).expect("udp send");
        let (n, from) = server.recv_from(&mut buf).expect("udp recv at server");
        assert_eq!(n, size);
        server.send_to(&vec![b'r'; reply], from).expect("udp reply");
        let n = client.recv(&mut buf).expect("udp recv at client");
        assert_eq!(n, reply);
    }
    (client.local_addr().unwrap(), server_addr)
}
