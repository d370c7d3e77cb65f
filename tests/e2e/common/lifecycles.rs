//! Ground truth for netflow under real connection lifecycles: thousands of TCP and UDP flows
//! between the two namespaces of a [`NetPair`], each end counting exactly what its own calls
//! returned (bytes written and read, connections established and closed).
//!
//! Every case (a lifecycle in one address family) gets a server port of its own, so each case
//! has one netflow row per end (the client's ephemeral port is folded to `*`), and the rows can
//! be compared with the case's tallies field by field. Nothing is assumed about timing: a
//! lifecycle whose outcome depends on it (a reset racing a read) counts what really happened.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sys::socket::{self as nixsock, sockopt};

use super::netns::{IO_TIMEOUT, NetPair};

/// What one end of a case did, as its own calls returned it.
#[derive(Debug, Default)]
pub struct Tally {
    pub written: AtomicU64,
    pub read: AtomicU64,
    /// Connections that completed (connect returned, or accept returned).
    pub established: AtomicU64,
}

impl Tally {
    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn got(&self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn connected(&self) {
        self.established.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.read.load(Ordering::Relaxed),
            self.established.load(Ordering::Relaxed),
        )
    }
}

/// How a connection lives and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The server answers and closes at once; the client still reads (some flows slowly) to EOF.
    ServerClosesFirst,
    /// The server reads part of the request, answers, and closes with data unread: the kernel
    /// resets the connection while the client may still have the answer to read (after the
    /// reset, its socket is already in CLOSE).
    ServerResetsUnread,
    /// The client reads the answer and closes first; the server reads to EOF.
    ClientClosesFirst,
    /// The client sends and `shutdown(SHUT_WR)`s; the server reads to EOF, answers, closes.
    HalfClose,
    /// The client aborts (`SO_LINGER` 0) after the answer: a reset instead of a FIN.
    LingerReset,
    /// Every connection of the case uses the same client port (and so the same 4-tuple), one
    /// after another, each ended by a reset so that no TIME_WAIT holds the tuple.
    SameTuple,
    /// Many connections open at once, then served, then closed.
    Concurrent,
    /// A few connections that trickle data both ways across several report intervals.
    LongLived,
    /// connect() to a port nothing listens on: refused, nothing counted.
    Refused,
    /// UDP: a client that connect()s, sends datagrams, reads the replies, and goes away.
    UdpConnected,
    /// UDP: a client bound to its address (not connected) using sendto/recvfrom.
    UdpUnconnected,
    /// UDP: a short-lived client that never binds (local address 0.0.0.0 or ::).
    UdpUnbound,
}

pub const TCP_LIFECYCLES: [Lifecycle; 9] = [
    Lifecycle::ServerClosesFirst,
    Lifecycle::ServerResetsUnread,
    Lifecycle::ClientClosesFirst,
    Lifecycle::HalfClose,
    Lifecycle::LingerReset,
    Lifecycle::SameTuple,
    Lifecycle::Concurrent,
    Lifecycle::LongLived,
    Lifecycle::Refused,
];

pub const UDP_LIFECYCLES: [Lifecycle; 3] = [
    Lifecycle::UdpConnected,
    Lifecycle::UdpUnconnected,
    Lifecycle::UdpUnbound,
];

impl Lifecycle {
    pub fn is_udp(self) -> bool {
        matches!(
            self,
            Lifecycle::UdpConnected | Lifecycle::UdpUnconnected | Lifecycle::UdpUnbound
        )
    }
}

/// The address family of a case. `Mapped`: the client's socket is IPv6 and connects to the
/// server's IPv4 address as `::ffff:a.b.c.d` (netflow reports such ends as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    Mapped,
}

/// One lifecycle in one family: its server port, the addresses its rows carry, its tallies.
#[derive(Debug)]
pub struct Case {
    pub lifecycle: Lifecycle,
    pub family: Family,
    pub flows: usize,
    /// The server's port (each case has its own).
    pub port: u16,
    /// The ends' addresses as netflow reports them (IPv4 for mapped).
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    pub client: Arc<Tally>,
    pub server: Arc<Tally>,
}

impl Case {
    pub fn name(&self) -> String {
        format!("{:?}/{:?}", self.lifecycle, self.family)
    }
}

/// Runs every lifecycle in every family it applies to, about `total` flows in all, all cases
/// at once; returns the cases with their tallies once every flow has ended.
pub fn run(pair: &NetPair, total: usize) -> Vec<Case> {
    let mut plans = Vec::new();
    for lifecycle in TCP_LIFECYCLES {
        for family in [Family::V4, Family::V6, Family::Mapped] {
            plans.push((lifecycle, family));
        }
    }
    for lifecycle in UDP_LIFECYCLES {
        for family in [Family::V4, Family::V6] {
            plans.push((lifecycle, family));
        }
    }
    // LongLived cases are a handful of connections and Concurrent ones at most 100 at once;
    // the other cases share the rest of the total.
    const LONG_LIVED: usize = 4;
    let concurrent = (total / plans.len()).clamp(4, 100);
    let fixed: usize = plans
        .iter()
        .map(|(l, _)| match l {
            Lifecycle::LongLived => LONG_LIVED,
            Lifecycle::Concurrent => concurrent,
            _ => 0,
        })
        .sum();
    let shared = plans
        .iter()
        .filter(|(l, _)| !matches!(l, Lifecycle::LongLived | Lifecycle::Concurrent))
        .count();
    let per_case = total.saturating_sub(fixed).div_ceil(shared).max(4);
    let mut running = Vec::new();
    for (lifecycle, family) in plans {
        let flows = match lifecycle {
            Lifecycle::LongLived => LONG_LIVED,
            Lifecycle::Concurrent => concurrent,
            _ => per_case,
        };
        running.push(start_case(pair, lifecycle, family, flows));
    }
    running
        .into_iter()
        .map(|(case, handles)| {
            for handle in handles {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            }
            case
        })
        .collect()
}

fn start_case(
    pair: &NetPair,
    lifecycle: Lifecycle,
    family: Family,
    flows: usize,
) -> (Case, Vec<JoinHandle<()>>) {
    let (client_ip, server_ip): (IpAddr, IpAddr) = match family {
        Family::V4 | Family::Mapped => (pair.a_v4.into(), pair.b_v4.into()),
        Family::V6 => (pair.a_v6.into(), pair.b_v6.into()),
    };
    // What the client dials: the mapped form for Mapped.
    let dial_ip: IpAddr = match (family, server_ip) {
        (Family::Mapped, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => server_ip,
    };
    let client = Arc::new(Tally::default());
    let server = Arc::new(Tally::default());
    let mut handles = Vec::new();
    let port;
    if lifecycle.is_udp() {
        let socket = pair.b.run(move || UdpSocket::bind((server_ip, 0)).unwrap());
        port = socket.local_addr().unwrap().port();
        let done = Arc::new(AtomicBool::new(false));
        let (tally, stop) = (server.clone(), done.clone());
        handles.push(pair.b.spawn(move || udp_server(socket, &tally, &stop)));
        let tally = client.clone();
        let target = SocketAddr::new(dial_ip, port);
        let client_thread = pair.a.spawn(move || {
            for i in 0..flows {
                udp_client(lifecycle, client_ip, target, i, &tally);
            }
        });
        // The server stops once the client is done (its socket read times out meanwhile).
        handles.push(thread::spawn(move || {
            let result = client_thread.join();
            done.store(true, Ordering::Relaxed);
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        }));
    } else if lifecycle == Lifecycle::Refused {
        // A port that was just free: bound, then released.
        port = pair
            .b
            .run(move || TcpListener::bind((server_ip, 0)).unwrap())
            .local_addr()
            .unwrap()
            .port();
        let target = SocketAddr::new(dial_ip, port);
        handles.push(pair.a.spawn(move || {
            for _ in 0..flows {
                match TcpStream::connect_timeout(&target, IO_TIMEOUT) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    other => panic!("connect to a closed port: {other:?}"),
                }
            }
        }));
    } else {
        let listener = pair.b.run(move || {
            let listener = TcpListener::bind((server_ip, 0)).unwrap();
            // Concurrent connections queue in the backlog before the server accepts them.
            let _ = nixsock::listen(&listener, nixsock::Backlog::new(1024).unwrap());
            listener
        });
        port = listener.local_addr().unwrap().port();
        let tally = server.clone();
        handles.push(pair.b.spawn(move || {
            // A thread per connection: clients such as Concurrent and LongLived interleave
            // their connections.
            let served: Vec<JoinHandle<()>> = (0..flows)
                .map(|i| {
                    let (stream, _) = listener.accept().expect("accept");
                    tally.connected();
                    set_timeouts(&stream);
                    let tally = tally.clone();
                    thread::spawn(move || serve(lifecycle, &stream, i, &tally))
                })
                .collect();
            for handle in served {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            }
        }));
        let tally = client.clone();
        let target = SocketAddr::new(dial_ip, port);
        handles.push(
            pair.a
                .spawn(move || tcp_clients(lifecycle, client_ip, target, flows, &tally)),
        );
    }
    let case = Case {
        lifecycle,
        family,
        flows,
        port,
        client_ip,
        server_ip,
        client,
        server,
    };
    (case, handles)
}

/// Request and answer sizes of flow `i`: varied, and small enough to sit in socket buffers
/// (the lifecycles that stop reading must not deadlock their peer).
fn sizes(i: usize) -> (usize, usize) {
    (1_000 + (i * 7_919) % 20_000, 2_000 + (i * 104_729) % 40_000)
}

fn set_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// Writes up to `n` bytes, counting what each call accepted; stops at the first error.
fn write_counted(mut stream: &TcpStream, n: usize, tally: &Tally) {
    let chunk = [0xa5u8; 16 * 1024];
    let mut left = n;
    while left > 0 {
        match stream.write(&chunk[..left.min(chunk.len())]) {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                tally.wrote(k);
                left -= k;
            }
        }
    }
}

/// Reads up to `limit` bytes (None: to EOF), `chunk` at a time, counting what each call
/// returned; stops at EOF or the first error (a reset).
fn read_counted(
    mut stream: &TcpStream,
    limit: Option<usize>,
    chunk: usize,
    pause: Duration,
    tally: &Tally,
) {
    let mut buf = vec![0u8; chunk];
    let mut left = limit.unwrap_or(usize::MAX);
    while left > 0 {
        match stream.read(&mut buf[..chunk.min(left)]) {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                tally.got(k);
                left -= k;
                if !pause.is_zero() {
                    thread::sleep(pause);
                }
            }
        }
    }
}

fn abort_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nixsock::setsockopt(stream, sockopt::Linger, &linger).expect("SO_LINGER");
}

/// The server's side of flow `i`.
fn serve(lifecycle: Lifecycle, stream: &TcpStream, i: usize, tally: &Tally) {
    let (request, answer) = sizes(i);
    let none = Duration::ZERO;
    match lifecycle {
        Lifecycle::ServerClosesFirst => {
            read_counted(stream, Some(request), 64 * 1024, none, tally);
            write_counted(stream, answer, tally);
        }
        Lifecycle::ServerResetsUnread => {
            read_counted(stream, Some(request / 2), 64 * 1024, none, tally);
            write_counted(stream, answer, tally);
        }
        Lifecycle::ClientClosesFirst
        | Lifecycle::LingerReset
        | Lifecycle::SameTuple
        | Lifecycle::Concurrent => {
            read_counted(stream, Some(request), 64 * 1024, none, tally);
            write_counted(stream, answer, tally);
            // Until the client's FIN or reset.
            read_counted(stream, None, 64 * 1024, none, tally);
        }
        Lifecycle::HalfClose => {
            read_counted(stream, None, 64 * 1024, none, tally);
            write_counted(stream, answer, tally);
        }
        Lifecycle::LongLived => {
            // Echo every chunk until the client closes.
            let mut buf = [0u8; 4096];
            let mut s = stream;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        tally.got(k);
                        write_counted(stream, k * 2, tally);
                    }
                }
            }
        }
        Lifecycle::Refused | Lifecycle::UdpConnected | Lifecycle::UdpUnconnected => {
            unreachable!()
        }
        Lifecycle::UdpUnbound => unreachable!(),
    }
}

fn connect(target: SocketAddr, tally: &Tally) -> TcpStream {
    let stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {target}: {e}"));
    tally.connected();
    set_timeouts(&stream);
    stream
}

/// connect() from `local` (SO_REUSEADDR, so that the same port serves flow after flow).
fn connect_from(local: SocketAddr, target: SocketAddr, tally: &Tally) -> TcpStream {
    let family = if target.is_ipv4() {
        nixsock::AddressFamily::Inet
    } else {
        nixsock::AddressFamily::Inet6
    };
    let fd = nixsock::socket(
        family,
        nixsock::SockType::Stream,
        nixsock::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    nixsock::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    use std::os::fd::AsRawFd as _;
    nixsock::bind(fd.as_raw_fd(), &nixsock::SockaddrStorage::from(local))
        .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    nixsock::connect(fd.as_raw_fd(), &nixsock::SockaddrStorage::from(target))
        .unwrap_or_else(|e| panic!("connect {local} -> {target}: {e}"));
    tally.connected();
    let stream = TcpStream::from(fd);
    set_timeouts(&stream);
    stream
}

fn tcp_clients(
    lifecycle: Lifecycle,
    client_ip: IpAddr,
    target: SocketAddr,
    flows: usize,
    tally: &Tally,
) {
    let none = Duration::ZERO;
    match lifecycle {
        Lifecycle::Concurrent => {
            let streams: Vec<TcpStream> = (0..flows).map(|_| connect(target, tally)).collect();
            for (i, stream) in streams.iter().enumerate() {
                write_counted(stream, sizes(i).0, tally);
            }
            for (i, stream) in streams.into_iter().enumerate() {
                read_counted(&stream, Some(sizes(i).1), 64 * 1024, none, tally);
            }
        }
        Lifecycle::LongLived => {
            let streams: Vec<TcpStream> = (0..flows).map(|_| connect(target, tally)).collect();
            let end = Instant::now() + Duration::from_secs(5);
            let mut round = 0;
            while Instant::now() < end {
                for stream in &streams {
                    let n = 100 + round % 900;
                    write_counted(stream, n, tally);
                    read_counted(stream, Some(2 * n), 64 * 1024, none, tally);
                }
                round += 1;
                thread::sleep(Duration::from_millis(250));
            }
        }
        Lifecycle::SameTuple => {
            let local_ip = match target.ip() {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                }
                _ => client_ip,
            };
            let port = TcpListener::bind((local_ip, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let local = SocketAddr::new(local_ip, port);
            for i in 0..flows {
                let stream = connect_from(local, target, tally);
                let (request, answer) = sizes(i);
                write_counted(&stream, request, tally);
                read_counted(&stream, Some(answer), 64 * 1024, none, tally);
                abort_on_close(&stream);
            }
        }
        _ => {
            for i in 0..flows {
                let stream = connect(target, tally);
                tcp_client(lifecycle, &stream, i, tally);
            }
        }
    }
}

/// The client's side of flow `i`; the connection closes when `stream` is dropped.
fn tcp_client(lifecycle: Lifecycle, stream: &TcpStream, i: usize, tally: &Tally) {
    let (request, answer) = sizes(i);
    let none = Duration::ZERO;
    match lifecycle {
        Lifecycle::ServerClosesFirst => {
            write_counted(stream, request, tally);
            // One flow in ten reads slowly, in small pieces, long after the server closed.
            let (chunk, pause) = if i.is_multiple_of(10) {
                (1024, Duration::from_micros(200))
            } else {
                (64 * 1024, none)
            };
            read_counted(stream, None, chunk, pause, tally);
        }
        Lifecycle::ServerResetsUnread => {
            write_counted(stream, request, tally);
            // Let the reset arrive while the answer waits in our receive queue.
            thread::sleep(Duration::from_millis(1));
            read_counted(stream, None, 4096, none, tally);
        }
        Lifecycle::ClientClosesFirst => {
            write_counted(stream, request, tally);
            read_counted(stream, Some(answer), 64 * 1024, none, tally);
        }
        Lifecycle::HalfClose => {
            write_counted(stream, request, tally);
            stream.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
            read_counted(stream, None, 64 * 1024, none, tally);
        }
        Lifecycle::LingerReset => {
            write_counted(stream, request, tally);
            read_counted(stream, Some(answer), 64 * 1024, none, tally);
            abort_on_close(stream);
        }
        _ => unreachable!("{lifecycle:?} has its own client loop"),
    }
}

/// Datagrams per UDP flow, and their sizes.
const UDP_DATAGRAMS: usize = 5;

fn udp_sizes(i: usize, k: usize) -> (usize, usize) {
    (100 + (i * 31 + k * 7) % 1_300, 50 + (i * 17 + k * 13) % 600)
}

/// One short-lived UDP client: a fresh socket, datagrams and their replies, then gone.
fn udp_client(
    lifecycle: Lifecycle,
    client_ip: IpAddr,
    target: SocketAddr,
    i: usize,
    tally: &Tally,
) {
    let unspecified: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = match lifecycle {
        Lifecycle::UdpUnconnected => UdpSocket::bind((client_ip, 0)),
        _ => UdpSocket::bind((unspecified, 0)),
    }
    .expect("bind UDP client");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    if lifecycle == Lifecycle::UdpConnected {
        socket.connect(target).expect("connect UDP");
    }
    let mut buf = [0u8; 2048];
    for k in 0..UDP_DATAGRAMS {
        let (size, _) = udp_sizes(i, k);
        let payload = &[0x42u8; 2048][..size];
        let sent = if lifecycle == Lifecycle::UdpConnected {
            socket.send(payload)
        } else {
            socket.send_to(payload, target)
        };
        match sent {
            Ok(n) => tally.wrote(n),
            Err(e) => panic!("UDP send: {e}"),
        }
        let got = if lifecycle == Lifecycle::UdpConnected {
            socket.recv(&mut buf)
        } else {
            socket.recv_from(&mut buf).map(|(n, _)| n)
        };
        match got {
            Ok(n) => tally.got(n),
            Err(e) => panic!("UDP reply {k} of flow {i}: {e}"),
        }
    }
}

/// Answers each datagram with the size its flow expects (encoded by the client's size).
fn udp_server(socket: UdpSocket, tally: &Tally, done: &AtomicBool) {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut seq = 0usize;
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                tally.got(n);
                // The client waits for each reply, so datagrams come in order.
                let (i, k) = (seq / UDP_DATAGRAMS, seq % UDP_DATAGRAMS);
                seq += 1;
                let reply = udp_sizes(i, k).1;
                let sent = socket
                    .send_to(&[0x24u8; 2048][..reply], from)
                    .expect("UDP reply");
                tally.wrote(sent);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if done.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(e) => panic!("UDP server: {e}"),
        }
    }
}
