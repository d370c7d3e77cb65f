//! dnsflow end to end: a real DNS server (Debian's dnsmasq) with fixed records, real clients
//! (`dig`, glibc's resolver through `getent`, and a test UDP client), the daemon's real socket
//! filter, and the exact rows it posts to a fake DataKit.
//!
//! The daemon captures the interfaces of its own network namespace (the root one, as the
//! reference does), so every lab is a veth between the root namespace and a namespace the test
//! creates, with addresses unique to this test process (from its pid, in 10.53.0.0/16 and
//! fd00:53::/32): concurrent runs and other traffic on the machine never mix into the rows
//! checked. In the root namespace the traffic crosses one interface, so each packet is seen once.

mod common;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    Daemon,
    netns::{self, Netns},
    privileged, scratch, serial, wait_until,
};
use fake_datakit::{FakeDataKit, Point};

/// The daemon's flush period in these tests, and the unanswered-query timeout.
const INTERVAL: &str = "2s";
const TIMEOUT: &str = "1s";
/// Longer than an interval: rows that would come late (double counts) have come by then.
const SETTLE: Duration = Duration::from_secs(3);

/// Distinguishes the labs of one process.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Where the DNS server runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServerSide {
    /// In the test namespace; clients in the root namespace (the host is a client).
    Namespace,
    /// In the root namespace; clients in the test namespace (the host is the server).
    Root,
}

/// A veth between the root namespace and a test namespace, and dnsmasq on one end.
struct DnsLab {
    ns: Netns,
    root_if: String,
    root_v4: Ipv4Addr,
    ns_v4: Ipv4Addr,
    root_v6: Ipv6Addr,
    ns_v6: Ipv6Addr,
    /// Routed into the namespace, where nothing answers (and nothing sends ICMP back).
    silent_v4: Ipv4Addr,
    dnsmasq: Child,
    servfail: ServfailUpstream,
    dir: PathBuf,
}

impl DnsLab {
    fn new(dir: &Path, side: ServerSide) -> DnsLab {
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // An 8-address block per lab in 10.53.0.0/16: .1 root, .2 namespace (a /30), .5 silent.
        let block = ((pid.wrapping_mul(4).wrapping_add(seq)) % 8192) * 8;
        let v4 = |host: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 53, 0, 0)) + block + host);
        let (root_v4, ns_v4, silent_v4) = (v4(1), v4(2), v4(5));
        let v6 = |host: u16| {
            Ipv6Addr::new(
                0xfd00,
                0x53,
                (pid >> 16) as u16,
                pid as u16,
                seq as u16,
                0,
                0,
                host,
            )
        };
        let (root_v6, ns_v6) = (v6(1), v6(2));
        let ns = Netns::new("dns");
        let root_if = format!("dkdns{pid}x{seq}");
        let _ = Command::new("ip").args(["link", "del", &root_if]).output();
        netns::run_cmd(
            "ip",
            &[
                "link", "add", &root_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        );
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=0"]);
        ns.ip(&["addr", "add", &format!("{ns_v4}/30"), "dev", "eth0"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{ns_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        netns::run_cmd(
            "ip",
            &["addr", "add", &format!("{root_v4}/30"), "dev", &root_if],
        );
        netns::run_cmd(
            "ip",
            &[
                "addr",
                "add",
                &format!("{root_v6}/64"),
                "dev",
                &root_if,
                "nodad",
            ],
        );
        netns::run_cmd("ip", &["link", "set", &root_if, "up"]);
        netns::run_cmd(
            "ip",
            &[
                "route",
                "add",
                &format!("{silent_v4}/32"),
                "via",
                &ns_v4.to_string(),
                "dev",
                &root_if,
            ],
        );
        wait_link(&root_if, None);
        wait_link("eth0", Some(&ns));

        // SERVFAIL comes from a real upstream failure: dnsmasq forwards fail.dns.test to a tiny
        // server on the namespace's loopback that answers every query with SERVFAIL.
        // (Only the namespace-side server uses it.)
        let servfail = ServfailUpstream::start(&ns);
        let (listen_v4, listen_v6) = match side {
            ServerSide::Namespace => (ns_v4, ns_v6),
            ServerSide::Root => (root_v4, root_v6),
        };
        let log = fs::File::create(dir.join(format!("dnsmasq-{seq}.log"))).unwrap();
        let mut args: Vec<String> = Vec::new();
        args.extend(
            [
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
                "--log-queries",
                "--local-ttl=300",
                "--address=/nx.dns.test/",
            ]
            .map(String::from),
        );
        args.push(format!("--listen-address={listen_v4}"));
        args.push(format!("--listen-address={listen_v6}"));
        args.push("--server=/fail.dns.test/127.0.0.1#5399".into());
        args.push("--host-record=www.dns.test,10.99.0.1,fd00:99::1".into());
        // web.dns.test is the namespace itself, for the netflow test.
        args.push(format!("--host-record=web.dns.test,{ns_v4}"));
        let dnsmasq = in_side(side, &ns, "dnsmasq")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq) is needed for this test");
        let lab = DnsLab {
            ns,
            root_if,
            root_v4,
            ns_v4,
            root_v6,
            ns_v6,
            silent_v4,
            dnsmasq,
            servfail,
            dir: dir.to_path_buf(),
        };
        lab.wait_dnsmasq(listen_v4, side, seq);
        lab
    }

    /// Waits until dnsmasq answers (before the daemon starts, so these queries are not seen).
    fn wait_dnsmasq(&self, server: Ipv4Addr, side: ServerSide, seq: u32) {
        // The client is on the other side of the veth.
        let client_side = match side {
            ServerSide::Namespace => ServerSide::Root,
            ServerSide::Root => ServerSide::Namespace,
        };
        let at = format!("@{server}");
        let ok = wait_until(Duration::from_secs(10), || {
            in_side(client_side, &self.ns, "dig")
                .args([at.as_str(), "www.dns.test", "+tries=1", "+timeout=1"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("status: NOERROR"))
        });
        assert!(
            ok,
            "dnsmasq did not answer:\n{}",
            fs::read_to_string(self.dir.join(format!("dnsmasq-{seq}.log"))).unwrap_or_default()
        );
    }

    /// `dig <args>` in the root namespace; its output.
    fn dig(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&netns::run_cmd("dig", args).stdout).into_owned()
    }

    /// `dig <args>` in the test namespace.
    fn dig_in_ns(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ns.exec("dig", args).stdout).into_owned()
    }

    /// glibc's resolver (`getent ahosts NAME`) in the root namespace, with a private
    /// resolv.conf naming the lab's server (bind-mounted in a mount namespace of its own).
    fn getent(&self, name: &str, options: &str) -> String {
        let conf = self.dir.join(format!("resolv-{}.conf", self.root_if));
        fs::write(
            &conf,
            format!(
                "nameserver {}\noptions attempts:1 timeout:2 {options}\n",
                self.ns_v4
            ),
        )
        .unwrap();
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec getent ahosts {name}",
            conf.display()
        );
        let out = netns::run_cmd("unshare", &["-m", "sh", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        self.servfail.stop();
        // Deleting one end deletes the pair (and its route); the namespace goes with `ns`.
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
    }
}

/// `program` to run in the root namespace, or in `ns`.
fn in_side(side: ServerSide, ns: &Netns, program: &str) -> Command {
    match side {
        ServerSide::Root => Command::new(program),
        ServerSide::Namespace => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &ns.name, program]);
            cmd
        }
    }
}

/// Waits until `dev` (in `ns`, or the root namespace) has carrier.
fn wait_link(dev: &str, ns: Option<&Netns>) {
    let ok = wait_until(Duration::from_secs(10), || {
        let out = match ns {
            Some(ns) => ns.ip(&["-o", "link", "show", "dev", dev]),
            None => netns::run_cmd("ip", &["-o", "link", "show", "dev", dev]),
        };
        String::from_utf8_lossy(&out.stdout).contains("LOWER_UP")
    });
    assert!(ok, "{dev} has no carrier");
}

/// A DNS server that answers everything with SERVFAIL (dnsmasq's upstream for fail.dns.test).
struct ServfailUpstream {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl ServfailUpstream {
    fn start(ns: &Netns) -> ServfailUpstream {
        let mut s = ServfailUpstream {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        s.listen(ns);
        s
    }

    fn listen(&mut self, ns: &Netns) {
        let socket = ns.run(move || {
            let s =
                UdpSocket::bind((Ipv4Addr::LOCALHOST, 5399)).expect("bind the SERVFAIL upstream");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        });
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = simple_dns::Packet::parse(&buf[..n]) else {
                    continue;
                };
                let mut reply = query.into_reply();
                *reply.rcode_mut() = simple_dns::RCODE::ServerFailure;
                let _ = socket.send_to(&reply.build_bytes_vec().unwrap(), from);
            }
        }));
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// netflow's tier (its rows carry the domains): `DKE_TEST_NETFLOW_TIER`, else `tracepoint`, the
/// host's; the kernel matrix sets the kernel's first tier.
fn netflow_tier() -> String {
    std::env::var("DKE_TEST_NETFLOW_TIER").unwrap_or_else(|_| "tracepoint".into())
}

fn start_daemon(dir: &Path, datakit: &FakeDataKit) -> Daemon {
    let mut daemon = spawn_daemon(dir, datakit, &[]);
    daemon.wait_log("dnsflow: capturing DNS", Duration::from_secs(30));
    daemon
}

fn spawn_daemon(dir: &Path, datakit: &FakeDataKit, extra: &[&str]) -> Daemon {
    let apiserver = datakit.addr().to_string();
    let tier = netflow_tier();
    let mut args = vec![
        "run",
        "--datakit-apiserver",
        &apiserver,
        "--enabled",
        "ebpf-net",
        // dnsflow and netflow are under test: httpflow's load (tens of seconds in emulated
        // guests) would only delay the start and the SIGTERM of each test.
        "--l7net-disabled",
        "httpflow",
        "--interval",
        INTERVAL,
        "--min-interval",
        "1s",
        "--dnsflow-interval",
        INTERVAL,
        "--dnsflow-timeout",
        TIMEOUT,
        "--netflow-tier",
        &tier,
        "--hostname",
        "dns-host",
        "--log-level",
        "debug",
    ];
    args.extend_from_slice(extra);
    Daemon::start(dir, &args)
}

fn dnsflow(points: &[Point]) -> Vec<&Point> {
    points
        .iter()
        .filter(|p| p.measurement == "dnsflow")
        .collect()
}

/// Rows of queries from `client` to `server` over `transport` with `rcode`.
fn rows_of<'a>(
    points: &'a [Point],
    client: IpAddr,
    server: IpAddr,
    transport: &str,
    rcode: i64,
) -> Vec<&'a Point> {
    dnsflow(points)
        .into_iter()
        .filter(|p| {
            p.tag("client_ip") == Some(client.to_string().as_str())
                && p.tag("server_ip") == Some(server.to_string().as_str())
                && p.tag("transport") == Some(transport)
                && p.int("rcode") == Some(rcode)
        })
        .collect()
}

fn count(rows: &[&Point]) -> i64 {
    rows.iter().map(|p| p.int("count").unwrap_or(0)).sum()
}

/// Expected (client, server, transport, rcode, count) of every row between the lab's addresses.
type Want = (IpAddr, IpAddr, &'static str, i64, i64);

/// Waits for the wanted counts, waits one more interval for anything extra, then checks that
/// the rows between the lab's addresses are exactly these.
fn expect_exact(datakit: &FakeDataKit, daemon: &Daemon, lab: &DnsLab, want: &[Want]) -> Vec<Point> {
    let all_there = |pts: &[Point]| {
        want.iter()
            .all(|&(c, s, t, r, n)| count(&rows_of(pts, c, s, t, r)) >= n)
    };
    datakit.wait_for(Duration::from_secs(20), all_there);
    thread::sleep(SETTLE);
    let points = datakit.points();
    let ours = |p: &&Point| {
        let lab_ips = [
            lab.root_v4.to_string(),
            lab.ns_v4.to_string(),
            lab.root_v6.to_string(),
            lab.ns_v6.to_string(),
            lab.silent_v4.to_string(),
        ];
        p.tag("src_ip")
            .is_some_and(|ip| lab_ips.iter().any(|l| l == ip))
    };
    let mut got: Vec<(String, String, String, i64, i64)> = Vec::new();
    for p in dnsflow(&points).into_iter().filter(ours) {
        let key = (
            p.tag("client_ip").unwrap().to_string(),
            p.tag("server_ip").unwrap().to_string(),
            p.tag("transport").unwrap().to_string(),
            p.int("rcode").unwrap(),
        );
        match got
            .iter_mut()
            .find(|g| (&g.0, &g.1, &g.2, g.3) == (&key.0, &key.1, &key.2, key.3))
        {
            Some(g) => g.4 += p.int("count").unwrap(),
            None => got.push((key.0, key.1, key.2, key.3, p.int("count").unwrap())),
        }
    }
    got.sort();
    let mut expected: Vec<(String, String, String, i64, i64)> = want
        .iter()
        .map(|&(c, s, t, r, n)| (c.to_string(), s.to_string(), t.to_string(), r, n))
        .collect();
    expected.sort();
    assert_eq!(
        got,
        expected,
        "(client, server, transport, rcode, count) of the rows; log:\n{}",
        daemon.log_text()
    );
    points
}

/// Tags every dnsflow row between a client on the host and a server elsewhere must carry.
fn check_outgoing_tags(row: &Point, client: IpAddr, server: IpAddr) {
    let (c, s) = (client.to_string(), server.to_string());
    assert_eq!(row.tag("src_ip"), Some(c.as_str()));
    assert_eq!(row.tag("dst_ip"), Some(s.as_str()));
    assert_eq!(row.tag("src_port"), Some("*"));
    assert_eq!(row.tag("dst_port"), Some("53"));
    assert_eq!(row.tag("client_port"), Some("*"));
    assert_eq!(row.tag("server_port"), Some("53"));
    assert_eq!(row.tag("src_ip_type"), Some("private"));
    assert_eq!(row.tag("dst_ip_type"), Some("private"));
    assert_eq!(row.tag("client_ip_type"), Some("private"));
    assert_eq!(row.tag("server_ip_type"), Some("private"));
    assert_eq!(
        row.tag("family"),
        Some(if server.is_ipv4() { "IPv4" } else { "IPv6" })
    );
    assert_eq!(row.tag("direction"), Some("outgoing"));
    assert_eq!(row.tag("conn_side"), Some("client"));
    assert_eq!(row.tag("host"), Some("dns-host"));
    assert_eq!(row.tag("service"), Some("ebpf"));
    assert_eq!(row.category, "network");
    assert_eq!(row.input, "ebpf-net/dnsflow");
    let (latency, max) = (row.int("latency").unwrap(), row.int("latency_max").unwrap());
    if row.int("rcode") == Some(-1) {
        assert_eq!((latency, max), (0, 0));
    } else {
        assert!(0 < latency && latency <= max, "latency {latency} max {max}");
        assert!(max < 2_000_000_000, "latency_max {max} ns");
    }
}

#[test]
fn udp_a_and_aaaa_to_ipv4_and_ipv6_servers() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-udp");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    let (at4, at6) = (format!("@{}", lab.ns_v4), format!("@{}", lab.ns_v6));
    assert_eq!(
        lab.dig(&[&at4, "www.dns.test", "A", "+short"]).trim(),
        "10.99.0.1"
    );
    assert_eq!(
        lab.dig(&[&at4, "www.dns.test", "AAAA", "+short"]).trim(),
        "fd00:99::1"
    );
    assert_eq!(
        lab.dig(&[&at6, "www.dns.test", "AAAA", "+short"]).trim(),
        "fd00:99::1"
    );
    // glibc's resolver: A and AAAA in flight together on one socket, distinct ids.
    let resolved = lab.getent("www.dns.test", "");
    assert!(
        resolved.contains("10.99.0.1") && resolved.contains("fd00:99::1"),
        "{resolved}"
    );

    let (r4, n4, r6, n6) = (
        IpAddr::from(lab.root_v4),
        IpAddr::from(lab.ns_v4),
        IpAddr::from(lab.root_v6),
        IpAddr::from(lab.ns_v6),
    );
    let points = expect_exact(
        &datakit,
        &daemon,
        &lab,
        &[(r4, n4, "udp", 0, 4), (r6, n6, "udp", 0, 1)],
    );
    for row in rows_of(&points, r4, n4, "udp", 0) {
        check_outgoing_tags(row, r4, n4);
    }
    for row in rows_of(&points, r6, n6, "udp", 0) {
        check_outgoing_tags(row, r6, n6);
    }
    assert!(daemon.terminate().success());
}

/// `--dnsflow-disabled`: ebpf-net runs netflow alone; queries leave no dnsflow row (and the
/// daemon opens no packet socket), while netflow still counts the query's datagrams.
#[test]
fn disabled_dnsflow_captures_nothing_and_netflow_runs() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-off");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = spawn_daemon(&dir, &datakit, &["--dnsflow-disabled"]);
    daemon.wait_log("ebpf-net: running via", Duration::from_secs(120));
    let at4 = format!("@{}", lab.ns_v4);
    assert_eq!(
        lab.dig(&[&at4, "www.dns.test", "A", "+short"]).trim(),
        "10.99.0.1"
    );
    let (r4, n4) = (lab.root_v4.to_string(), lab.ns_v4.to_string());
    let netflow_row = |p: &Point| {
        p.measurement == "netflow"
            && p.tag("src_ip") == Some(r4.as_str())
            && p.tag("dst_ip") == Some(n4.as_str())
            && p.tag("dst_port") == Some("53")
    };
    let points = datakit.wait_for(Duration::from_secs(20), |pts| pts.iter().any(netflow_row));
    let row = points
        .iter()
        .find(|p| netflow_row(p))
        .expect("netflow row of the query");
    assert_eq!(row.tag("transport"), Some("udp"));
    assert!(row.int("bytes_written").unwrap_or(0) > 0);
    assert_eq!(row.tag("dst_domain"), None, "no dnsflow, no names");
    thread::sleep(SETTLE);
    assert!(dnsflow(&datakit.points()).is_empty());
    let log = daemon.log_text();
    assert!(log.contains("dnsflow: off (--dnsflow-disabled)"), "{log}");
    assert!(!log.contains("capturing DNS"), "{log}");
    assert!(daemon.terminate().success());
}

#[test]
fn tcp_single_query_and_resolver_pair_in_one_write() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-tcp");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    let at4 = format!("@{}", lab.ns_v4);
    let at6 = format!("@{}", lab.ns_v6);
    assert_eq!(
        lab.dig(&[&at4, "www.dns.test", "+tcp", "+short"]).trim(),
        "10.99.0.1"
    );
    assert_eq!(
        lab.dig(&[&at6, "www.dns.test", "AAAA", "+tcp", "+short"])
            .trim(),
        "fd00:99::1"
    );
    // `use-vc`: glibc sends its A and AAAA queries over TCP, both in one write (two
    // length-prefixed messages in one segment).
    let resolved = lab.getent("www.dns.test", "use-vc");
    assert!(resolved.contains("10.99.0.1"), "{resolved}");
    // Our own client: one message split across two segments, then two messages in one write.
    tcp_split_and_pair(SocketAddr::new(lab.ns_v4.into(), 53));
    let (r4, n4, r6, n6) = (
        IpAddr::from(lab.root_v4),
        IpAddr::from(lab.ns_v4),
        IpAddr::from(lab.root_v6),
        IpAddr::from(lab.ns_v6),
    );
    let points = expect_exact(
        &datakit,
        &daemon,
        &lab,
        &[(r4, n4, "tcp", 0, 6), (r6, n6, "tcp", 0, 1)],
    );
    for row in rows_of(&points, r4, n4, "tcp", 0) {
        check_outgoing_tags(row, r4, n4);
    }
    assert!(daemon.terminate().success());
}

#[test]
fn nxdomain_servfail_and_unanswered() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-rcodes");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    let at4 = format!("@{}", lab.ns_v4);
    assert!(lab.dig(&[&at4, "nx.dns.test"]).contains("status: NXDOMAIN"));
    assert!(
        lab.dig(&[&at4, "fail.dns.test"])
            .contains("status: SERVFAIL")
    );
    // One try, no answer: reported once with rcode -1 after the timeout, however long we wait.
    let silent = format!("@{}", lab.silent_v4);
    let out = Command::new("dig")
        .args([silent.as_str(), "www.dns.test", "+tries=1", "+timeout=1"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("status:"));
    // Not DNS at all, to port 53: counted and skipped, no row.
    let junk = UdpSocket::bind((lab.root_v4, 0)).unwrap();
    junk.send_to(b"hello", (lab.ns_v4, 53)).unwrap();

    let (r4, n4, s4) = (
        IpAddr::from(lab.root_v4),
        IpAddr::from(lab.ns_v4),
        IpAddr::from(lab.silent_v4),
    );
    let points = expect_exact(
        &datakit,
        &daemon,
        &lab,
        &[
            (r4, n4, "udp", 3, 1),
            (r4, n4, "udp", 2, 1),
            (r4, s4, "udp", -1, 1),
        ],
    );
    for rcode in [3, 2] {
        for row in rows_of(&points, r4, n4, "udp", rcode) {
            check_outgoing_tags(row, r4, n4);
        }
    }
    let lost = rows_of(&points, r4, s4, "udp", -1);
    check_outgoing_tags(lost[0], r4, s4);
    // Still exactly one after more intervals.
    thread::sleep(SETTLE);
    assert_eq!(count(&rows_of(&datakit.points(), r4, s4, "udp", -1)), 1);
    assert!(
        daemon
            .log_text()
            .contains("dnsflow: 1 DNS messages skipped: malformed"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().success());
}

/// Over one TCP connection: a query whose bytes go out in two segments (Nagle off, a pause
/// between the writes), then two queries in a single write; reads the three answers.
fn tcp_split_and_pair(server: SocketAddr) {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let framed = |id: u16| {
        let q = query(id, "www.dns.test");
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        out
    };
    let first = framed(1);
    conn.write_all(&first[..7]).unwrap();
    thread::sleep(Duration::from_millis(100));
    conn.write_all(&first[7..]).unwrap();
    let mut pair = framed(2);
    let read_answer = |conn: &mut std::net::TcpStream| {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len).into()];
        conn.read_exact(&mut msg).unwrap();
        simple_dns::Packet::parse(&msg).unwrap().id()
    };
    assert_eq!(read_answer(&mut conn), 1);
    pair.extend_from_slice(&framed(3));
    conn.write_all(&pair).unwrap();
    let mut ids = [read_answer(&mut conn), read_answer(&mut conn)];
    ids.sort();
    assert_eq!(ids, [2, 3]);
}

/// A query for `name` with `id`, as wire bytes.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = simple_dns::Packet::new_query(id);
    q.questions.push(simple_dns::Question::new(
        simple_dns::Name::new_unchecked(name),
        simple_dns::QTYPE::TYPE(simple_dns::TYPE::A),
        simple_dns::QCLASS::CLASS(simple_dns::CLASS::IN),
        false,
    ));
    q.build_bytes_vec().unwrap()
}

#[test]
fn queries_in_flight_and_latency_within_the_clients_own_measure() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-inflight");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    let (r4, n4) = (IpAddr::from(lab.root_v4), IpAddr::from(lab.ns_v4));
    let server = SocketAddr::new(n4, 53);
    let socket = UdpSocket::bind((r4, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1500];

    // One query, timed by the client: the daemon's latency (kernel timestamps of the two
    // packets on the veth) lies within what the client measured around its calls.
    let start = Instant::now();
    socket.send_to(&query(7, "www.dns.test"), server).unwrap();
    socket.recv_from(&mut buf).unwrap();
    let client_ns = start.elapsed().as_nanos() as i64;
    let points = expect_exact(&datakit, &daemon, &lab, &[(r4, n4, "udp", 0, 1)]);
    let row = rows_of(&points, r4, n4, "udp", 0)[0];
    let latency = row.int("latency").unwrap();
    assert!(
        0 < latency && latency <= client_ns,
        "latency {latency} ns outside (0, {client_ns}] measured by the client"
    );
    assert_eq!(row.int("latency_max"), Some(latency));

    // Eight queries in flight at once from one socket, distinct ids, answers in any order.
    let start = Instant::now();
    for id in 100..108 {
        socket.send_to(&query(id, "www.dns.test"), server).unwrap();
    }
    let mut ids = Vec::new();
    for _ in 100..108 {
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        ids.push(simple_dns::Packet::parse(&buf[..n]).unwrap().id());
    }
    let client_ns = start.elapsed().as_nanos() as i64;
    ids.sort();
    assert_eq!(ids, (100..108).collect::<Vec<u16>>());
    let points = expect_exact(&datakit, &daemon, &lab, &[(r4, n4, "udp", 0, 9)]);
    let rows = rows_of(&points, r4, n4, "udp", 0);
    let later: Vec<_> = rows.iter().filter(|p| p.int("count") != Some(1)).collect();
    assert_eq!(later.len(), 1, "the eight in one row: {rows:#?}");
    let max = later[0].int("latency_max").unwrap();
    assert!(
        0 < max && max <= client_ns,
        "latency_max {max} vs client {client_ns}"
    );
    assert!(daemon.terminate().success());
}

#[test]
fn host_is_the_server_ipv4_and_ipv6() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-server");
    let lab = DnsLab::new(&dir, ServerSide::Root);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    let (at4, at6) = (format!("@{}", lab.root_v4), format!("@{}", lab.root_v6));
    assert!(lab.dig_in_ns(&[&at4, "www.dns.test"]).contains("10.99.0.1"));
    assert!(
        lab.dig_in_ns(&[&at6, "www.dns.test", "AAAA"])
            .contains("fd00:99::1")
    );
    assert!(lab.dig_in_ns(&[&at4, "nx.dns.test"]).contains("NXDOMAIN"));
    assert!(
        lab.dig_in_ns(&[&at4, "www.dns.test", "+tcp"])
            .contains("10.99.0.1")
    );

    let (r4, n4, r6, n6) = (
        IpAddr::from(lab.root_v4),
        IpAddr::from(lab.ns_v4),
        IpAddr::from(lab.root_v6),
        IpAddr::from(lab.ns_v6),
    );
    // Clients are in the namespace, the server is this host.
    let points = expect_exact(
        &datakit,
        &daemon,
        &lab,
        &[
            (n4, r4, "udp", 0, 1),
            (n6, r6, "udp", 0, 1),
            (n4, r4, "udp", 3, 1),
            (n4, r4, "tcp", 0, 1),
        ],
    );
    for row in dnsflow(&points)
        .into_iter()
        .filter(|p| p.tag("server_ip") == Some(&r4.to_string()))
    {
        assert_eq!(row.tag("direction"), Some("incoming"));
        assert_eq!(row.tag("conn_side"), Some("server"));
        assert_eq!(row.tag("src_ip"), Some(r4.to_string().as_str()));
        assert_eq!(row.tag("src_port"), Some("53"));
        assert_eq!(row.tag("dst_ip"), Some(n4.to_string().as_str()));
        assert_eq!(row.tag("dst_port"), Some("*"));
        assert_eq!(row.tag("client_ip"), Some(n4.to_string().as_str()));
    }
    let v6 = &rows_of(&points, n6, r6, "udp", 0)[0];
    assert_eq!(v6.tag("family"), Some("IPv6"));
    assert_eq!(v6.tag("direction"), Some("incoming"));
    assert!(daemon.terminate().success());
}

#[test]
fn netflow_rows_to_a_resolved_address_carry_the_domain() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("dns-netflow");
    let lab = DnsLab::new(&dir, ServerSide::Namespace);
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit);
    daemon.wait_log(
        &format!("netflow: attached at the {} tier", netflow_tier()),
        Duration::from_secs(30),
    );
    let (r4, n4) = (IpAddr::from(lab.root_v4), IpAddr::from(lab.ns_v4));
    // The libc resolver names web.dns.test; then a TCP connection to the address it gave.
    let resolved = lab.getent("web.dns.test", "");
    assert!(resolved.contains(&n4.to_string()), "{resolved}");
    let listener = common::netns::tcp_listen(&lab.ns, n4, 0);
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"world").unwrap();
    });
    {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect((n4, port)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
    }
    server.join().unwrap();
    let is_conn = |p: &Point| {
        p.measurement == "netflow"
            && p.tag("src_ip") == Some(r4.to_string().as_str())
            && p.tag("dst_ip") == Some(n4.to_string().as_str())
            && p.tag("dst_port") == Some(port.to_string().as_str())
    };
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        pts.iter()
            .filter(|p| is_conn(p))
            .map(|p| p.int("bytes_written").unwrap_or(0))
            .sum::<i64>()
            >= 5
    });
    let rows: Vec<_> = points.iter().filter(|p| is_conn(p)).collect();
    assert!(
        !rows.is_empty(),
        "no netflow row; log:\n{}",
        daemon.log_text()
    );
    for row in &rows {
        assert_eq!(row.tag("dst_domain"), Some("web.dns.test"), "{row:#?}");
        assert_eq!(row.tag("server_domain"), Some("web.dns.test"));
    }
    // The server end (in the namespace) talks to an address nobody resolved: no domain tag.
    let unnamed: Vec<_> = points
        .iter()
        .filter(|p| p.measurement == "netflow" && p.tag("dst_ip") == Some(r4.to_string().as_str()))
        .collect();
    for row in unnamed {
        assert_eq!(row.tag("dst_domain"), None, "{row:#?}");
    }
    assert!(daemon.terminate().success());
}
