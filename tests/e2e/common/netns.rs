//! Test hosts in network namespaces the test creates: two namespaces joined by a veth pair, and
//! traffic between them with exact ground truth (byte counts, and the kernel's own TCP_INFO).
//! Only addresses of these namespaces are used (10.213.N.0/24, fd00:213:N::/64).

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn ip(args: &[&str]) {
    run_cmd("ip", args);
}

fn run_cmd(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace created by the test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        Netns { name }
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates belong here
    /// (and stay usable from any thread afterwards).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// `ip netns exec <name> <cmd> <args>`; panics with stderr on failure.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    /// The namespace's inode number: what netflow reports as `netns`.
    pub fn inode(&self) -> u64 {
        fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair, with IPv4 and IPv6 addresses.
pub struct NetPair {
    pub a: Netns,
    pub b: Netns,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
}

impl NetPair {
    pub fn create(tag: &str) -> NetPair {
        static COUNTER: AtomicU32 = AtomicU32::new(1);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = Netns::create(format!("dke-{tag}-{pid}-{n}-a"));
        let b = Netns::create(format!("dke-{tag}-{pid}-{n}-b"));
        // Interface names are at most 15 bytes.
        let (va, vb) = (
            format!("dk{}x{n}a", pid % 100_000),
            format!("dk{}x{n}b", pid % 100_000),
        );
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a.name]);
        ip(&["link", "set", &vb, "netns", &b.name]);
        let subnet = (n % 250) as u8;
        let pair = NetPair {
            a_v4: Ipv4Addr::new(10, 213, subnet, 1),
            b_v4: Ipv4Addr::new(10, 213, subnet, 2),
            a_v6: Ipv6Addr::new(0xfd00, 0x213, u16::from(subnet), 0, 0, 0, 0, 1),
            b_v6: Ipv6Addr::new(0xfd00, 0x213, u16::from(subnet), 0, 0, 0, 0, 2),
            a,
            b,
        };
        for (ns, dev, v4, v6) in [
            (&pair.a, &va, pair.a_v4, pair.a_v6),
            (&pair.b, &vb, pair.b_v4, pair.b_v6),
        ] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        pair
    }
}

/// The kernel's own view of a TCP socket (getsockopt TCP_INFO).
#[derive(Debug, Clone, Copy)]
pub struct TcpInfo {
    pub rtt_us: u32,
    pub rttvar_us: u32,
    pub total_retrans: u32,
}

pub fn tcp_info(stream: &TcpStream) -> TcpInfo {
    // SAFETY: TCP_INFO fills a struct tcp_info of the given length.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    TcpInfo {
        rtt_us: info.tcpi_rtt,
        rttvar_us: info.tcpi_rttvar,
        total_retrans: info.tcpi_total_retrans,
    }
}

fn listen(pair: &NetPair, server_ip: IpAddr, port: u16) -> TcpListener {
    pair.b.run(move || {
        let listener =
            TcpListener::bind(SocketAddr::new(server_ip, port)).expect("bind in namespace b");
        listener.set_nonblocking(false).unwrap();
        listener
    })
}

fn connect(pair: &NetPair, addr: SocketAddr) -> TcpStream {
    let stream = pair
        .a
        .run(move || TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect from namespace a"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

fn accept(listener: &TcpListener) -> TcpStream {
    let (stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

fn read_n(stream: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(buf.len());
        stream.read_exact(&mut buf[..chunk]).expect("read");
        left -= chunk;
    }
}

fn write_n(stream: &mut TcpStream, n: usize) {
    let buf = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(buf.len());
        stream.write_all(&buf[..chunk]).expect("write");
        left -= chunk;
    }
}

/// A connection from namespace a to namespace b, driven step by step.
pub struct TcpSession {
    pub client: TcpStream,
    pub server: TcpStream,
}

pub fn tcp_session(pair: &NetPair, server_ip: IpAddr, port: u16) -> TcpSession {
    let listener = listen(pair, server_ip, port);
    let addr = listener.local_addr().unwrap();
    let client = connect(pair, addr);
    let server = accept(&listener);
    TcpSession { client, server }
}

impl TcpSession {
    /// Sends exactly `n` bytes client → server; returns once the server has read them.
    pub fn send_client(&mut self, n: usize) {
        let (client, server) = (&mut self.client, &mut self.server);
        thread::scope(|s| {
            s.spawn(|| read_n(server, n));
            write_n(client, n);
        });
    }

    /// Sends exactly `n` bytes server → client; returns once the client has read them.
    pub fn send_server(&mut self, n: usize) {
        let (client, server) = (&mut self.client, &mut self.server);
        thread::scope(|s| {
            s.spawn(|| read_n(client, n));
            write_n(server, n);
        });
    }

    /// TCP_INFO of (client, server).
    pub fn info(&self) -> (TcpInfo, TcpInfo) {
        (tcp_info(&self.client), tcp_info(&self.server))
    }

    pub fn close(self) {
        drop(self.client);
        drop(self.server);
    }
}

/// Result of one exchange: the addresses, and TCP_INFO just before close on both sides.
pub struct TcpExchange {
    pub client_local: SocketAddr,
    pub server_local: SocketAddr,
    pub client_info: TcpInfo,
    pub server_info: TcpInfo,
}

/// The client in a sends exactly `request` bytes; the server in b reads them and replies exactly
/// `response` bytes; both read TCP_INFO and close.
pub fn tcp_exchange(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    request: usize,
    response: usize,
) -> TcpExchange {
    let mut session = tcp_session(pair, server_ip, port);
    session.send_client(request);
    session.send_server(response);
    let (client_info, server_info) = session.info();
    let exchange = TcpExchange {
        client_local: session.client.local_addr().unwrap(),
        server_local: session.server.local_addr().unwrap(),
        client_info,
        server_info,
    };
    session.close();
    exchange
}

/// `count` sequential short connections from a to b, each sending `request` bytes and receiving
/// `response`, each open a few ms. Returns the client ports used.
pub fn short_connections(
    pair: &NetPair,
    server_ip: IpAddr,
    port: u16,
    count: usize,
    request: usize,
    response: usize,
) -> Vec<u16> {
    let listener = listen(pair, server_ip, port);
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..count {
            let mut stream = accept(&listener);
            read_n(&mut stream, request);
            write_n(&mut stream, response);
            // Wait for the client's close so both ends close cleanly.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
    });
    let ports = pair.a.run(move || {
        (0..count)
            .map(|_| {
                let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                write_n(&mut stream, request);
                read_n(&mut stream, response);
                thread::sleep(Duration::from_millis(2));
                stream.local_addr().unwrap().port()
            })
            .collect()
    });
    server.join().expect("server thread");
    ports
}

/// Drops a share of the TCP packets entering namespace `ns` (iptables `statistic` match; this
/// kernel has no netem), until dropped.
pub struct PacketLoss<'a> {
    ns: &'a Netns,
    rule: Vec<String>,
}

pub fn packet_loss(ns: &Netns, probability: f64) -> PacketLoss<'_> {
    let rule: Vec<String> = [
        "INPUT",
        "-p",
        "tcp",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        &probability.to_string(),
        "-j",
        "DROP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut args = vec!["-A"];
    args.extend(rule.iter().map(String::as_str));
    ns.exec("iptables", &args);
    PacketLoss { ns, rule }
}

impl Drop for PacketLoss<'_> {
    fn drop(&mut self) {
        let mut args = vec!["-D"];
        args.extend(self.rule.iter().map(String::as_str));
        let mut all = vec!["netns", "exec", self.ns.name.as_str(), "iptables"];
        all.extend(args);
        let _ = Command::new("ip").args(&all).output();
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
    server.set_read_timeout(Some(TIMEOUT)).unwrap();
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
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
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
