//! netflow end to end: real connections between network namespaces the test creates, the
//! daemon's real programs at the tier this kernel offers, and the exact numbers it posts.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use common::{
    Daemon,
    netns::{self, NetPair},
    privileged, scratch, serial,
};
use fake_datakit::{FakeDataKit, Point};

/// The tier forced in these tests: `DKE_TEST_NETFLOW_TIER`, else `tracepoint`, the only one this
/// host kernel (no kprobes, no trampolines) can run. The kernel matrix (`cargo xtask vm-test`)
/// runs the same tests at the fentry and kprobe tiers inside other kernels.
fn tier() -> String {
    std::env::var("DKE_TEST_NETFLOW_TIER").unwrap_or_else(|_| "tracepoint".into())
}

/// Set by the kernel matrix's guests (software emulation, about 7x slower): timing-based
/// tolerances widen there; exact byte and count checks never do.
fn emulated() -> bool {
    std::env::var("DKE_TEST_EMULATED").is_ok_and(|v| v == "1")
}

fn start(dir: &std::path::Path, datakit: &FakeDataKit, extra: &[&str]) -> Daemon {
    start_env(dir, datakit, extra, &[])
}

/// `start` with these environment variables (the daemon's environment is otherwise empty).
fn start_env(
    dir: &std::path::Path,
    datakit: &FakeDataKit,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    start_wrapped(dir, datakit, &[], extra, env)
}

/// `start_env` through `wrapper` (see `Daemon::start_wrapped`).
fn start_wrapped(
    dir: &std::path::Path,
    datakit: &FakeDataKit,
    wrapper: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let apiserver = datakit.addr().to_string();
    let tier = tier();
    let mut args = vec![
        "run",
        "--datakit-apiserver",
        &apiserver,
        "--enabled",
        "ebpf-net",
        // httpflow is not under test here: its load (tens of seconds at the fentry tier in
        // emulated guests) would outlast the test and its SIGTERM.
        "--l7net-disabled",
        "httpflow",
        "--interval",
        "2s",
        "--min-interval",
        "1s",
        "--netflow-tier",
        &tier,
        "--hostname",
        "nf-host",
        "--log-level",
        "debug",
    ];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start_wrapped(dir, wrapper, &args, env, std::process::Stdio::null());
    daemon.wait_log(
        &format!("netflow: attached at the {tier} tier"),
        Duration::from_secs(60),
    );
    // Intervals start once every part of ebpf-net is up (dnsflow and httpflow load after
    // netflow; 20 s and more under emulation): a test that times its steps by intervals
    // waits for that.
    daemon.wait_log("ebpf-net: running via", Duration::from_secs(120));
    if tier == "kprobe" {
        // The warm-up's rows come with the first report: wait one interval and a margin.
        let interval = extra
            .windows(2)
            .find(|w| w[0] == "--interval")
            .and_then(|w| w[1].trim_end_matches('s').parse().ok())
            .unwrap_or(2);
        wait_kprobes_live(datakit, &daemon, Duration::from_secs(interval + 6));
    }
    daemon
}

/// Kprobes count only once the kernel has finished arming them: in an emulated guest (the
/// kernel matrix) the first second or so of traffic after attach can be missed, while the
/// kernel's optimiser rewrites the probed instructions. Until a warm-up exchange of our own is
/// counted exactly, the tests' ground truth would not be; the warm-up rows carry namespaces of
/// their own and stay out of every test's sums.
fn wait_kprobes_live(datakit: &FakeDataKit, daemon: &Daemon, report_wait: Duration) {
    for _ in 0..10 {
        let pair = NetPair::create("warm");
        let (client, server) = (pair.a_v4.into(), pair.b_v4.into());
        let client_ns = pair.a.inode();
        netns::tcp_exchange(&pair, server, 0, 1000, 2000);
        let counted = |pts: &[Point]| {
            let rows = netflow(pts);
            let row = |p: &Point| is_row(p, client, server, "outgoing", client_ns);
            sum(&rows, "bytes_written", row) == 1000 && sum(&rows, "bytes_read", row) == 2000
        };
        if counted(&datakit.wait_for(report_wait, counted)) {
            return;
        }
    }
    panic!(
        "kprobes never counted a warm-up exchange exactly; log:\n{}",
        daemon.log_text()
    );
}

/// Calls the daemon reported its programs never saw: the total of netflow's last "calls
/// missed" warning (runs the kernel skipped, `recursion_misses`). 0 where the kernel runs BPF
/// programs without preemption, as on the CI host.
fn reported_misses(log: &str) -> i64 {
    // Runs skipped, and (kprobe tier) send returns the kretprobe missed: each a running total.
    ["calls missed", "sends not counted"]
        .iter()
        .map(|kind| {
            log.lines()
                .filter(|line| line.contains("netflow: ") && line.contains(kind))
                .filter_map(|line| {
                    line.rsplit("(total ")
                        .next()?
                        .strip_suffix(')')?
                        .parse::<i64>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        })
        .sum()
}

fn netflow(points: &[Point]) -> Vec<&Point> {
    points
        .iter()
        .filter(|p| p.measurement == "netflow")
        .collect()
}

/// Sum of an integer field over the rows matching `pred` (rows of several intervals).
fn sum(rows: &[&Point], field: &str, pred: impl Fn(&Point) -> bool) -> i64 {
    rows.iter()
        .filter(|p| pred(p))
        .map(|p| p.int(field).unwrap_or(0))
        .sum()
}

/// A row of one connection end: its addresses, direction, and network namespace (the namespace
/// keeps other traffic on the machine, such as a concurrent test, out of the sums).
fn is_row(p: &Point, src: IpAddr, dst: IpAddr, direction: &str, netns: u64) -> bool {
    p.tag("netns") == Some(netns.to_string().as_str()) && is_row_any_ns(p, src, dst, direction)
}

fn is_row_any_ns(p: &Point, src: IpAddr, dst: IpAddr, direction: &str) -> bool {
    p.tag("src_ip") == Some(&src.to_string())
        && p.tag("dst_ip") == Some(&dst.to_string())
        && p.tag("direction") == Some(direction)
}

/// One UDP exchange's two ends, as netflow reports them.
struct UdpEnds {
    client_ip: IpAddr,
    server_ip: IpAddr,
    client_ns: u64,
    server_ns: u64,
}

impl UdpEnds {
    fn client(&self, p: &Point) -> bool {
        p.tag("transport") == Some("udp")
            && is_row(
                p,
                self.client_ip,
                self.server_ip,
                "outgoing",
                self.client_ns,
            )
    }

    fn server(&self, p: &Point) -> bool {
        p.tag("transport") == Some("udp")
            && is_row(
                p,
                self.server_ip,
                self.client_ip,
                "incoming",
                self.server_ns,
            )
    }

    /// Waits until the client's rows carry exactly `sent` bytes written and `received` read,
    /// and the server's the reverse; returns all points.
    fn wait_exact(
        &self,
        datakit: &FakeDataKit,
        daemon: &Daemon,
        sent: i64,
        received: i64,
    ) -> Vec<Point> {
        wait_total(datakit, daemon, "bytes_written", sent, |p| self.client(p));
        wait_total(datakit, daemon, "bytes_read", received, |p| self.client(p));
        wait_total(datakit, daemon, "bytes_read", sent, |p| self.server(p));
        wait_total(datakit, daemon, "bytes_written", received, |p| {
            self.server(p)
        })
    }
}

/// Waits until the rows matching `pred` carry `field` totalling `want`; returns all rows.
fn wait_total(
    datakit: &FakeDataKit,
    daemon: &Daemon,
    field: &str,
    want: i64,
    pred: impl Fn(&Point) -> bool,
) -> Vec<Point> {
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        sum(&netflow(pts), field, &pred) >= want
    });
    let got = sum(&netflow(&points), field, &pred);
    assert_eq!(
        got,
        want,
        "{field}: rows {:#?}\nlog:\n{}",
        netflow(&points)
            .iter()
            .filter(|p| pred(p))
            .collect::<Vec<_>>(),
        daemon.log_text()
    );
    points
}

/// This test process's name as netflow reports it: the basename of argv[0] (the kernel's comm
/// is cut at 15 bytes, and cargo's test binaries have longer names).
fn process_name() -> String {
    let argv0 = std::env::args().next().unwrap();
    argv0.rsplit('/').next().unwrap().to_string()
}

fn exact_bytes(family_v6: bool) {
    let _serial = serial();
    let dir = scratch(if family_v6 { "nf-tcp6" } else { "nf-tcp4" });
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create(if family_v6 { "tcp6" } else { "tcp4" });
    let (client_ip, server_ip): (IpAddr, IpAddr) = if family_v6 {
        (pair.a_v6.into(), pair.b_v6.into())
    } else {
        (pair.a_v4.into(), pair.b_v4.into())
    };
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let (request, response) = (1_234_567usize, 7_654_321usize);
    let ex = netns::tcp_exchange(&pair, server_ip, 0, request, response);
    let server_port = ex.server_local.port().to_string();

    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    let server = |p: &Point| is_row(p, server_ip, client_ip, "incoming", server_ns);
    wait_total(&datakit, &daemon, "bytes_written", request as i64, client);
    wait_total(&datakit, &daemon, "bytes_read", response as i64, client);
    wait_total(&datakit, &daemon, "bytes_read", request as i64, server);
    let points = wait_total(&datakit, &daemon, "bytes_written", response as i64, server);
    let rows = netflow(&points);
    for (pred, what) in [
        (&client as &dyn Fn(&Point) -> bool, "client"),
        (&server, "server"),
    ] {
        assert_eq!(sum(&rows, "tcp_established", pred), 1, "{what} established");
        assert_eq!(sum(&rows, "tcp_closed", pred), 1, "{what} closed");
    }
    let pid = std::process::id().to_string();
    let family = if family_v6 { "IPv6" } else { "IPv4" };
    for row in rows.iter().filter(|p| client(p)) {
        assert_eq!(row.tag("src_port"), Some("*"), "client port folds");
        assert_eq!(row.tag("dst_port"), Some(server_port.as_str()));
        assert_eq!(row.tag("pid"), Some(pid.as_str()));
        assert_eq!(row.tag("process_name"), Some(process_name().as_str()));
        assert_eq!(row.tag("family"), Some(family));
        assert_eq!(row.tag("transport"), Some("tcp"));
        assert_eq!(row.tag("conn_side"), Some("client"));
        assert_eq!(row.tag("netns"), Some(pair.a.inode().to_string().as_str()));
        assert_eq!(row.tag("host"), Some("nf-host"));
        assert_eq!(row.tag("service"), Some("ebpf"));
        assert_eq!(row.category, "network");
        assert_eq!(row.input, "ebpf-net/netflow");
    }
    for row in rows.iter().filter(|p| server(p)) {
        assert_eq!(row.tag("src_port"), Some(server_port.as_str()));
        assert_eq!(
            row.tag("dst_port"),
            Some("*"),
            "client port folds on the server side"
        );
        assert_eq!(row.tag("pid"), Some(pid.as_str()));
        assert_eq!(row.tag("conn_side"), Some("server"));
        assert_eq!(row.tag("server_ip"), Some(server_ip.to_string().as_str()));
        assert_eq!(row.tag("netns"), Some(pair.b.inode().to_string().as_str()));
    }
    // RTT as the kernel computed it for that socket, in µs. TCP_INFO was read just before close;
    // the FIN exchange may move the smoothed value slightly, hence the tolerance.
    let closing_row = rows
        .iter()
        .find(|p| client(p) && p.int("tcp_closed") == Some(1))
        .unwrap();
    let rtt = closing_row.int("rtt").unwrap();
    let kernel_rtt = ex.client_info.rtt_us as i64;
    // Emulated, the FIN exchange can take several times the handshake's RTT: only the order of
    // magnitude is checked there.
    let tolerance = if emulated() {
        kernel_rtt * 10 + 20_000
    } else {
        kernel_rtt / 2 + 50
    };
    assert!(
        (rtt - kernel_rtt).abs() <= tolerance,
        "rtt {rtt} vs TCP_INFO {kernel_rtt}"
    );
    assert!(closing_row.int("rtt_var").is_some());
    assert!(daemon.terminate().success());
}

#[test]
fn tcp_ipv4_exact_bytes_both_ends() {
    if privileged() {
        exact_bytes(false);
    }
}

#[test]
fn tcp_ipv6_exact_bytes_both_ends() {
    if privileged() {
        exact_bytes(true);
    }
}

#[test]
fn thousand_short_connections_in_one_interval() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    thousand_short_connections("nf-short", &[]);
}

/// The same through the perf event array, what kernels without a BPF ring buffer use: closed
/// connections come through per-CPU perf buffers, and none is lost or counted twice.
#[test]
fn thousand_short_connections_through_the_perf_event_array() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let log = thousand_short_connections(
        "nf-short-perf",
        &["--netflow-closed-events", "perf-event-array"],
    );
    assert!(
        log.contains("closed connections through the perf-event-array"),
        "{log}"
    );
    // The rows would be exact even if every record stayed in the map for the sweep (a full
    // buffer's fallback): the perf buffers must really have carried them, 2000 closed ends.
    let received: usize = log
        .lines()
        .filter_map(|line| line.split("netflow: ").nth(1))
        .filter_map(|rest| rest.split(" closed records").next()?.rsplit(' ').next())
        .filter_map(|n| n.parse::<usize>().ok())
        .sum();
    assert!(
        received >= 1000,
        "{received} closed records came through the perf buffers"
    );
}

/// 1000 connections of 100 bytes up and 200 down, each opened and closed within one interval;
/// every one counted on both ends. Returns the daemon's log.
fn thousand_short_connections(name: &str, extra: &[&str]) -> String {
    let dir = scratch(name);
    let datakit = FakeDataKit::start();
    // Emulated, 1000 connections take longer than one interval: rows of several intervals add
    // up the same, but a longer interval keeps the per-interval folding check meaningful.
    let interval = if emulated() { "60s" } else { "20s" };
    let mut args = vec!["--interval", interval];
    args.extend_from_slice(extra);
    let mut daemon = start(&dir, &datakit, &args);
    let pair = NetPair::create("short");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let ports = netns::short_connections(&pair, server_ip, 0, 1000, 100, 200);
    assert_eq!(ports.len(), 1000);
    // SIGTERM reports what the interval holds so far.
    assert!(daemon.terminate().success());
    let rows_owned = datakit.points();
    let rows = netflow(&rows_owned);
    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    let server = |p: &Point| is_row(p, server_ip, client_ip, "incoming", server_ns);
    // Exact, unless the daemon reported calls the kernel kept from its programs (fentry and
    // tracepoint tiers on kernels that preempt BPF programs, such as 7.2): then every difference
    // must be within what those misses explain. A skipped run costs at most one connection's
    // count (a lost state change) or 200 bytes (one call, or a connection's side in another row).
    let missed = reported_misses(&daemon.log_text());
    eprintln!("calls the daemon reported missed: {missed}");
    let client_rows: &dyn Fn(&Point) -> bool = &client;
    let server_rows: &dyn Fn(&Point) -> bool = &server;
    for (side, rows_of_side, field, want, per_miss) in [
        ("client", client_rows, "tcp_established", 1000, 1),
        ("client", client_rows, "tcp_closed", 1000, 1),
        ("client", client_rows, "bytes_written", 100_000, 200),
        ("client", client_rows, "bytes_read", 200_000, 200),
        ("server", server_rows, "tcp_established", 1000, 1),
        ("server", server_rows, "tcp_closed", 1000, 1),
        ("server", server_rows, "bytes_read", 100_000, 200),
    ] {
        let got = sum(&rows, field, rows_of_side);
        if missed == 0 {
            assert_eq!(got, want, "{side} {field}; rows: {rows:#?}");
        } else {
            eprintln!("{side} {field}: {got} for {want}");
            // Both ways: seen once on 7.2 at fentry, 100 bytes too many with 403 misses (how a
            // lost run over-counts is not understood yet; the suspect is an entry left by a
            // lost close and inherited by a later socket at the same address).
            assert!(
                got.abs_diff(want) <= (missed * per_miss) as u64,
                "{side} {field}: {got} for {want}, with {missed} calls reported missed"
            );
        }
    }
    // Client ports fold: one client row per interval (a slow machine may span several).
    let mut stamps: Vec<i64> = rows
        .iter()
        .filter(|p| client(p))
        .map(|p| p.timestamp.unwrap())
        .collect();
    let rows_count = stamps.len();
    stamps.dedup();
    assert_eq!(
        rows_count,
        stamps.len(),
        "one folded client row per interval"
    );
    daemon.log_text()
}

#[test]
fn long_lived_connection_reports_deltas_that_add_up() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-long");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create("long");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let client_ns = pair.a.inode();
    let mut session = netns::tcp_session(&pair, server_ip, 0);
    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    let mut sent = 0i64;
    for step in 1..=3usize {
        session.send_client(step * 100_000);
        session.send_server(step * 10_000);
        sent += (step * 100_000) as i64;
        // Let an interval pass so this step lands in a row of its own.
        std::thread::sleep(Duration::from_millis(2500));
    }
    session.close();
    wait_total(&datakit, &daemon, "tcp_closed", 1, client);
    let points = wait_total(&datakit, &daemon, "bytes_written", sent, client);
    let rows = netflow(&points);
    let per_interval: Vec<i64> = rows
        .iter()
        .filter(|p| client(p))
        .map(|p| p.int("bytes_written").unwrap())
        .collect();
    assert!(
        per_interval.len() >= 3,
        "deltas per interval: {per_interval:?}\ndaemon log:\n{}",
        daemon.log_text()
    );
    assert_eq!(sum(&rows, "bytes_read", client), 60_000);
    assert_eq!(sum(&rows, "tcp_established", client), 1);
    assert_eq!(sum(&rows, "tcp_closed", client), 1);
    assert!(daemon.terminate().success());
}

#[test]
fn retransmits_match_the_kernel_count() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-retrans");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create("loss");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let client_ns = pair.a.inode();
    let mut session = netns::tcp_session(&pair, server_ip, 0);
    {
        let _loss = netns::packet_loss(&pair, 0.1);
        session.send_client(2_000_000);
        session.send_server(1);
    }
    // Loss removed: let pending retransmission timers settle before reading the kernel's count.
    std::thread::sleep(Duration::from_secs(2));
    let (client_info, _) = session.info();
    assert!(client_info.total_retrans > 0, "no retransmits induced");
    session.close();
    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    wait_total(&datakit, &daemon, "tcp_closed", 1, client);
    let points = datakit.points();
    let rows = netflow(&points);
    assert_eq!(
        sum(&rows, "retransmits", client),
        client_info.total_retrans as i64
    );
    assert!(daemon.terminate().success());
}

#[test]
fn tiny_map_counts_drops_and_keeps_running() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-tiny");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &["--netflow-max-conns", "16"]);
    let pair = NetPair::create("tiny");
    let server_ip: IpAddr = pair.b_v4.into();
    // 32 connections (64 sockets) open at once: at most 16 fit.
    let mut sessions: Vec<_> = (0..32)
        .map(|_| netns::tcp_session(&pair, server_ip, 0))
        .collect();
    for s in &mut sessions {
        s.send_client(1000);
    }
    daemon.wait_log("map full", Duration::from_secs(10));
    for s in sessions {
        s.close();
    }
    // Still alive and reporting after the overflow.
    let pair2 = NetPair::create("tiny2");
    netns::tcp_exchange(&pair2, pair2.b_v4.into(), 0, 4321, 1234);
    let client = |p: &Point| {
        is_row(
            p,
            pair2.a_v4.into(),
            pair2.b_v4.into(),
            "outgoing",
            pair2.a.inode(),
        )
    };
    wait_total(&datakit, &daemon, "bytes_written", 4321, client);
    assert!(daemon.terminate().success());
}

#[test]
fn udp_connected_client_exact_bytes() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-udp");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create("udp");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let client_ns = pair.a.inode();
    let (_, server) =
        netns::udp_connected_exchange(&pair, server_ip, &[100, 1000, 1472], &[10, 20, 30]);
    let client = |p: &Point| {
        is_row(p, client_ip, server_ip, "outgoing", client_ns) && p.tag("transport") == Some("udp")
    };
    wait_total(&datakit, &daemon, "bytes_written", 2572, client);
    let points = wait_total(&datakit, &daemon, "bytes_read", 60, client);
    let rows = netflow(&points);
    let row = rows.iter().find(|p| client(p)).unwrap();
    assert_eq!(
        row.tag("dst_port"),
        Some(server.port().to_string().as_str())
    );
    assert_eq!(row.tag("src_port"), Some("*"));
    assert!(
        row.field("retransmits").is_none() && row.field("tcp_established").is_none(),
        "UDP rows carry byte fields only"
    );
    assert!(daemon.terminate().success());
}

/// Kernels without /sys/kernel/btf/vmlinux: the same BTF given as a file works the same.
#[test]
fn external_btf_file_is_used() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-btf");
    // The kernel matrix hides /sys/kernel/btf in one guest and passes a copy made before.
    let btf = match std::env::var_os("DKE_TEST_BTF_FILE") {
        Some(file) => std::path::PathBuf::from(file),
        None => {
            let btf = dir.join("vmlinux.btf");
            std::fs::copy("/sys/kernel/btf/vmlinux", &btf).unwrap();
            btf
        }
    };
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &["--btf", btf.to_str().unwrap()]);
    let pair = NetPair::create("btf");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let client_ns = pair.a.inode();
    netns::tcp_exchange(&pair, server_ip, 0, 11_111, 22_222);
    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    wait_total(&datakit, &daemon, "bytes_written", 11_111, client);
    wait_total(&datakit, &daemon, "bytes_read", 22_222, client);
    assert!(daemon.terminate().success());

    // ebpf-net still runs without netflow (dnsflow needs no BTF), so `check` exits 0: what
    // matters is that it says netflow cannot run and names the missing file.
    let (code, stdout, _) = {
        let out = std::process::Command::new(common::DAEMON)
            .args([
                "check",
                "--enabled",
                "ebpf-net",
                "--btf",
                "/nonexistent/vmlinux",
            ])
            .env_clear()
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            (),
        )
    };
    // netflow cannot run without BTF and says why; ebpf-net's dnsflow needs none, so the plugin
    // runs in part (exit 1).
    assert_eq!(code, Some(1), "{stdout}");
    let net_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ebpf-net"))
        .unwrap();
    assert!(
        net_line.contains("not running: netflow") && net_line.contains("/nonexistent/vmlinux"),
        "check names the missing file:\n{stdout}"
    );
}

/// The log line saying unconnected UDP is counted through the cgroup programs (the default).
const UDP_PEERS_CGROUP: &str = "netflow: unconnected UDP counted through cgroup programs";
/// ... through the syscall tracepoints.
const UDP_PEERS_SYSCALLS: &str = "netflow: unconnected UDP counted through syscall tracepoints";
/// The environment that forces the syscall tracepoints.
const FORCE_SYSCALLS: (&str, &str) = ("DKE_NETFLOW_UDP_PEERS", "syscalls");

/// Unconnected UDP sockets on both ends (sendto/recvfrom), without any UDP flag: counted by
/// default, through the cgroup programs. Each end's flow is exact, the server's incoming.
#[test]
fn udp_unconnected_both_ends_exact_bytes() {
    if !privileged() {
        return;
    }
    udp_unconnected_both_ends("nf-udp2", &[], &[], UDP_PEERS_CGROUP);
}

/// The same through the syscall tracepoints (forced; what runs where the cgroup programs cannot
/// attach and `--netflow-udp-unconnected` is given).
#[test]
fn udp_unconnected_through_syscall_tracepoints_exact_bytes() {
    if !privileged() {
        return;
    }
    let args = ["--netflow-udp-unconnected"];
    udp_unconnected_both_ends("nf-udp2-sys", &args, &[FORCE_SYSCALLS], UDP_PEERS_SYSCALLS);
}

/// With no cgroup2 mounted (the daemon runs in a mount namespace of its own without any), the
/// daemon mounts one at /run/datakit-ebpf/cgroup2: the same hierarchy's root, every socket.
#[test]
fn udp_unconnected_through_a_cgroup2_mounted_by_the_daemon() {
    if !privileged() {
        return;
    }
    // Unmounts every cgroup2 of the new namespace, then becomes the daemon.
    let script = r#"for m in $(/usr/bin/awk '$(NF-2) == "cgroup2" { print $5 }' /proc/self/mountinfo); do /usr/bin/umount "$m" || exit 1; done; exec "$0" "$@""#;
    let wrapper = [
        "/usr/bin/unshare",
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        script,
    ];
    let mechanism = "cgroup v2 root /run/datakit-ebpf/cgroup2 (mounted now: no cgroup2 was)";
    udp_unconnected_both_ends_via("nf-udp2-mnt", &wrapper, &[], &[], mechanism);
    // The mount was the namespace's; its (empty) directory is left on the host.
    let _ = std::fs::remove_dir("/run/datakit-ebpf/cgroup2");
    let _ = std::fs::remove_dir("/run/datakit-ebpf");
}

fn udp_unconnected_both_ends(name: &str, args: &[&str], env: &[(&str, &str)], mechanism: &str) {
    udp_unconnected_both_ends_via(name, &[], args, env, mechanism)
}

fn udp_unconnected_both_ends_via(
    name: &str,
    wrapper: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    mechanism: &str,
) {
    let _serial = serial();
    let dir = scratch(name);
    let datakit = FakeDataKit::start();
    let mut daemon = start_wrapped(&dir, &datakit, wrapper, args, env);
    assert!(
        daemon.log_text().contains(mechanism),
        "{}",
        daemon.log_text()
    );
    let pair = NetPair::create(name);
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let (client_addr, server_addr) = netns::udp_exchange(
        &pair,
        server_ip,
        0,
        &[100, 1000, 1472, 7],
        &[10, 20, 30, 40],
    );
    let ends = UdpEnds {
        client_ip,
        server_ip,
        client_ns,
        server_ns,
    };
    let (client, server) = (|p: &Point| ends.client(p), |p: &Point| ends.server(p));
    let points = ends.wait_exact(&datakit, &daemon, 2579, 100);
    let rows = netflow(&points);
    let s = rows.iter().find(|p| server(p)).unwrap();
    assert_eq!(
        s.tag("src_port"),
        Some(server_addr.port().to_string().as_str())
    );
    assert_eq!(s.tag("dst_port"), Some("*"));
    let c = rows.iter().find(|p| client(p)).unwrap();
    assert_eq!(
        c.tag("dst_port"),
        Some(server_addr.port().to_string().as_str())
    );
    assert_ne!(client_addr.port(), 0);
    assert!(daemon.terminate().success());
}

/// `sendmmsg`/`recvmmsg` batches on unconnected sockets: the cgroup programs run for each
/// datagram of a batch, so each is credited to its peer (the syscall tracepoints cannot: they
/// are not hooked on the batch calls).
#[test]
fn udp_unconnected_batches_exact_bytes() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-udp-mmsg");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create("udp-mmsg");
    let (client_ip, server_ip) = (pair.a_v4, pair.b_v4);
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let server_sock = pair
        .b
        .run(move || std::net::UdpSocket::bind((server_ip, 0)).unwrap());
    let client_sock = pair
        .a
        .run(move || std::net::UdpSocket::bind((client_ip, 0)).unwrap());
    let server_addr = server_sock.local_addr().unwrap();
    let client_addr = client_sock.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let got = mmsg::recv(&server_sock, 3);
        let sizes: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, [100, 200, 300]);
        assert!(got.iter().all(|(_, from)| *from == client_addr), "{got:?}");
        mmsg::send(&server_sock, client_addr, &[10, 20, 30]);
    });
    mmsg::send(&client_sock, server_addr, &[100, 200, 300]);
    let got = mmsg::recv(&client_sock, 3);
    assert_eq!(got.iter().map(|(n, _)| *n).sum::<usize>(), 60);
    server.join().unwrap();
    let (client_ip, server_ip): (IpAddr, IpAddr) = (client_ip.into(), server_ip.into());
    let ends = UdpEnds {
        client_ip,
        server_ip,
        client_ns,
        server_ns,
    };
    ends.wait_exact(&datakit, &daemon, 600, 60);
    assert!(daemon.terminate().success());
}

/// `sendmmsg`/`recvmmsg` on IPv4 UDP sockets, each datagram with its own address.
mod mmsg {
    use std::{
        net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
        os::fd::AsRawFd as _,
    };

    fn sockaddr(addr: SocketAddr) -> libc::sockaddr_in {
        let SocketAddr::V4(addr) = addr else {
            panic!("IPv4 only: {addr}")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }

    /// One `sendmmsg` of datagrams of `sizes` to `to`.
    pub fn send(sock: &UdpSocket, to: SocketAddr, sizes: &[usize]) {
        let mut name = sockaddr(to);
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xa5; n]).collect();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: plain C structs, all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every pointer refers to memory that outlives the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as _, 0) };
        assert_eq!(
            n,
            sizes.len() as i32,
            "sendmmsg: {}",
            std::io::Error::last_os_error()
        );
    }

    /// `recvmmsg` until `count` datagrams came: (size, source) of each.
    pub fn recv(sock: &UdpSocket, count: usize) -> Vec<(usize, SocketAddr)> {
        let mut got = Vec::new();
        while got.len() < count {
            let want = count - got.len();
            // SAFETY: plain C structs, all-zero is valid.
            let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; want];
            let mut bufs = vec![vec![0u8; 65536]; want];
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(names.iter_mut())
                .map(|(iov, name)| {
                    // SAFETY: as above.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = (name as *mut libc::sockaddr_in).cast();
                    m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let mut timeout = libc::timespec {
                tv_sec: 30,
                tv_nsec: 0,
            };
            // SAFETY: every pointer refers to memory that outlives the call.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    want as _,
                    libc::MSG_WAITFORONE,
                    &mut timeout,
                )
            };
            assert!(n > 0, "recvmmsg: {}", std::io::Error::last_os_error());
            for (m, name) in msgs.iter().zip(&names).take(n as usize) {
                let ip = Ipv4Addr::from(name.sin_addr.s_addr.to_ne_bytes());
                let from = SocketAddrV4::new(ip, u16::from_be(name.sin_port));
                got.push((m.msg_len as usize, from.into()));
            }
        }
        got
    }
}

/// `--netflow-udp-unconnected-disabled`: neither end of an unconnected exchange is counted
/// (the client of a connected exchange still is, and marks a report made after the exchange).
#[test]
fn udp_unconnected_disabled_is_not_counted() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-udp-off");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &["--netflow-udp-unconnected-disabled"]);
    assert!(
        daemon
            .log_text()
            .contains("netflow: unconnected UDP not counted (--netflow-udp-unconnected-disabled)"),
        "{}",
        daemon.log_text()
    );
    let pair = NetPair::create("udp-off");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let (_, unconnected_server) = netns::udp_exchange(&pair, server_ip, 0, &[100, 1000], &[10, 20]);
    let (_, connected_server) =
        netns::udp_connected_exchange(&pair, server_ip, &[300, 400], &[30, 40]);
    let udp = |p: &Point| p.tag("transport") == Some("udp");
    let connected_client = |p: &Point| {
        udp(p)
            && is_row(p, client_ip, server_ip, "outgoing", client_ns)
            && p.tag("dst_port") == Some(connected_server.port().to_string().as_str())
    };
    wait_total(&datakit, &daemon, "bytes_written", 700, connected_client);
    // One more interval: what the unconnected sockets did would be in it at the latest.
    std::thread::sleep(Duration::from_secs(3));
    let points = datakit.points();
    let rows = netflow(&points);
    let unconnected_client = |p: &Point| {
        udp(p)
            && is_row(p, client_ip, server_ip, "outgoing", client_ns)
            && p.tag("dst_port") == Some(unconnected_server.port().to_string().as_str())
    };
    // Both servers' sockets are unconnected.
    let server = |p: &Point| udp(p) && p.tag("netns") == Some(server_ns.to_string().as_str());
    let uncounted: Vec<_> = rows
        .iter()
        .filter(|p| unconnected_client(p) || server(p))
        .collect();
    assert!(
        uncounted.is_empty(),
        "rows of unconnected UDP: {uncounted:#?}"
    );
    assert!(daemon.terminate().success());
}

#[test]
fn udp_disabled_sends_tcp_rows_only() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-tcp-only");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &["--netflow-udp-disabled"]);
    assert!(
        daemon
            .log_text()
            .contains("netflow: unconnected UDP not counted (--netflow-udp-disabled)"),
        "{}",
        daemon.log_text()
    );
    let pair = NetPair::create("tcp-only");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    netns::udp_exchange(&pair, server_ip, 0, &[100, 1000], &[10, 20]);
    netns::udp_connected_exchange(&pair, server_ip, &[300, 400], &[30, 40]);
    let (request, response) = (123_456usize, 654_321usize);
    netns::tcp_exchange(&pair, server_ip, 0, request, response);
    let client = |p: &Point| is_row(p, client_ip, server_ip, "outgoing", client_ns);
    let server = |p: &Point| is_row(p, server_ip, client_ip, "incoming", server_ns);
    wait_total(&datakit, &daemon, "bytes_written", request as i64, client);
    wait_total(&datakit, &daemon, "bytes_written", response as i64, server);
    // One more interval: the UDP sockets' rows would be in it at the latest.
    std::thread::sleep(Duration::from_secs(3));
    let points = datakit.points();
    let rows = netflow(&points);
    let ours = |p: &Point| client(p) || server(p);
    let udp: Vec<_> = rows
        .iter()
        .filter(|p| p.tag("transport") == Some("udp"))
        .collect();
    assert!(udp.is_empty(), "UDP rows: {udp:#?}");
    // TCP exact, from both ends.
    assert_eq!(sum(&rows, "bytes_written", client), request as i64);
    assert_eq!(sum(&rows, "bytes_read", client), response as i64);
    assert_eq!(sum(&rows, "bytes_read", server), request as i64);
    assert_eq!(sum(&rows, "bytes_written", server), response as i64);
    assert!(
        rows.iter()
            .filter(|p| ours(p))
            .all(|p| p.tag("transport") == Some("tcp"))
    );
    assert!(daemon.terminate().success());
}

/// Flows of the lifecycle stress suite: `DKE_TEST_STRESS_FLOWS`, else 10,000 (the kernel
/// matrix runs a smaller slice).
fn stress_flows() -> usize {
    std::env::var("DKE_TEST_STRESS_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The totals one end's rows must carry: (bytes_written, bytes_read, tcp_established,
/// tcp_closed); the last two are 0 for UDP (not reported).
type Totals = (i64, i64, i64, i64);

fn row_totals(rows: &[&Point], pred: impl Fn(&Point) -> bool) -> Totals {
    (
        sum(rows, "bytes_written", &pred),
        sum(rows, "bytes_read", &pred),
        sum(rows, "tcp_established", &pred),
        sum(rows, "tcp_closed", &pred),
    )
}

/// Every lifecycle of `common::lifecycles` (server closes first with slow readers, resets with
/// data unread, client closes first, half-close, SO_LINGER 0, one 4-tuple reused, concurrent,
/// long-lived, refused; connected, unconnected and unbound UDP) in IPv4, IPv6 and v4-mapped
/// IPv6, thousands of flows at once: each end's rows equal what its own calls returned, and no
/// row in the test's namespaces carries bytes of no case.
#[test]
fn lifecycles_stress_every_row_exact() {
    if !privileged() {
        return;
    }
    lifecycles_stress("nf-stress", stress_flows(), &[], &[]);
}

/// The stress suite with final records through the perf event array (a third of the flows),
/// and unconnected UDP peers from the syscall tracepoints (forced): both stay exact.
#[test]
fn lifecycles_stress_through_the_perf_event_array() {
    if !privileged() {
        return;
    }
    let extra = ["--netflow-closed-events", "perf-event-array"];
    let env = [FORCE_SYSCALLS];
    lifecycles_stress("nf-stress-perf", stress_flows() / 3, &extra, &env);
}

/// The stress suite against a daemon that falls behind: a 4 KiB ring buffer (about 25
/// records) read only at sweeps. Final records overflow it and wait in the map, entries replaced
/// meanwhile go through the retired map; nothing is lost (a third of the flows).
#[test]
fn lifecycles_stress_with_an_overflowing_ring_buffer() {
    if !privileged() {
        return;
    }
    let env = [("DKE_TEST_NETFLOW_SLOW_DRAIN", "4096")];
    let log = lifecycles_stress("nf-stress-ring", stress_flows() / 3, &[], &env);
    assert!(
        log.contains("closed connections deferred to the next sweep"),
        "the small ring never overflowed:\n{log}"
    );
}

/// Runs the suite against a daemon started with `extra` and `env`; returns the daemon's log.
fn lifecycles_stress(name: &str, flows: usize, extra: &[&str], env: &[(&str, &str)]) -> String {
    use common::lifecycles::{self, Case};
    let _serial = serial();
    let dir = scratch(name);
    let datakit = FakeDataKit::start();
    let mut daemon = start_env(&dir, &datakit, extra, env);
    let pair = NetPair::create(name);
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let addresses: Vec<String> = [
        IpAddr::from(pair.a_v4),
        pair.b_v4.into(),
        pair.a_v6.into(),
        pair.b_v6.into(),
    ]
    .iter()
    .map(IpAddr::to_string)
    .collect();
    let started = std::time::Instant::now();
    let cases = lifecycles::run(&pair, flows);
    let flows: usize = cases.iter().map(|c| c.flows).sum();
    eprintln!("{flows} flows in {:?}", started.elapsed());

    let transport = |c: &Case| if c.lifecycle.is_udp() { "udp" } else { "tcp" };
    let client_row = |c: &Case, p: &Point| {
        p.tag("transport") == Some(transport(c))
            && is_row(p, c.client_ip, c.server_ip, "outgoing", client_ns)
            && p.tag("dst_port") == Some(c.port.to_string().as_str())
    };
    let server_row = |c: &Case, p: &Point| {
        p.tag("transport") == Some(transport(c))
            && is_row(p, c.server_ip, c.client_ip, "incoming", server_ns)
            && p.tag("src_port") == Some(c.port.to_string().as_str())
    };
    let want = |c: &Case, end: &lifecycles::Tally| -> Totals {
        let (written, read, established) = end.get();
        let conns = if c.lifecycle.is_udp() {
            0
        } else {
            established as i64
        };
        (written as i64, read as i64, conns, conns)
    };
    // (case, end, wanted, got) for every end whose rows differ from its tally.
    let mismatches = |points: &[Point]| {
        let rows = netflow(points);
        let mut bad = Vec::new();
        for c in &cases {
            let client = row_totals(&rows, |p| client_row(c, p));
            let server = row_totals(&rows, |p| server_row(c, p));
            for (end, wanted, got) in [
                ("client", want(c, &c.client), client),
                ("server", want(c, &c.server), server),
            ] {
                if wanted != got {
                    bad.push(format!("{} {end}: want {wanted:?} got {got:?}", c.name()));
                }
            }
        }
        // Bytes on rows of the test's namespaces that belong to no case.
        for p in &rows {
            // By namespace and address: a namespace's inode number is reused once it is gone
            // (the kprobe warm-up's pair had the same ones, with other addresses).
            let ours = [client_ns, server_ns]
                .iter()
                .any(|ns| p.tag("netns") == Some(ns.to_string().as_str()))
                && addresses
                    .iter()
                    .any(|ip| p.tag("src_ip") == Some(ip.as_str()));
            let known = cases.iter().any(|c| client_row(c, p) || server_row(c, p));
            let bytes = p.int("bytes_written").unwrap_or(0) + p.int("bytes_read").unwrap_or(0);
            if ours && !known && bytes > 0 {
                bad.push(format!("row of no case: {p:?}"));
            }
        }
        bad
    };
    let settle = if emulated() { 120 } else { 30 };
    let points = datakit.wait_for(Duration::from_secs(settle), |pts| {
        mismatches(pts).is_empty()
    });
    let bad = mismatches(&points);
    // Two more intervals: nothing may arrive late (a count credited twice, or to a later row).
    let points = if bad.is_empty() {
        std::thread::sleep(Duration::from_secs(5));
        datakit.points()
    } else {
        points
    };
    let bad = if bad.is_empty() {
        mismatches(&points)
    } else {
        bad
    };
    // Exact, unless the daemon reported calls its programs never saw (kernels that preempt BPF
    // programs, at tiers `auto` avoids there): then each wrong end or stray row must be one the
    // misses can explain.
    let missed = reported_misses(&daemon.log_text());
    if missed > 0 && !bad.is_empty() {
        eprintln!(
            "{} ends or rows differ, with {missed} calls reported missed:\n{}",
            bad.len(),
            bad.join("\n")
        );
        assert!(
            bad.len() as i64 <= 2 * missed,
            "more differences than the reported misses explain"
        );
        let log = daemon.log_text();
        assert!(daemon.terminate().success());
        return log;
    }
    assert!(
        bad.is_empty(),
        "{} of {} ends wrong ({flows} flows, tier {}):\n{}\nlog:\n{}",
        bad.len(),
        2 * cases.len(),
        tier(),
        bad.join("\n"),
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(daemon.terminate().success());
    log
}

/// A client whose unconnected UDP socket is bound to the unspecified address (`bind` to
/// 0.0.0.0:0 or [::]:0, then `sendto`) has no local address in the kernel: the daemon takes the
/// one the client namespace's routing picks for the server. Both ends' rows are exact, also once
/// the client's socket is gone and its flow retired.
fn unbound_udp_client_exact_bytes(name: &str, client_bind: IpAddr, server_v6: bool) {
    let _serial = serial();
    let dir = scratch(name);
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create(name);
    let server_ip: IpAddr = if server_v6 {
        pair.b_v6.into()
    } else {
        pair.b_v4.into()
    };
    let client_ip = pair.a_ip_for(server_ip);
    let (client_ns, server_ns) = (pair.a.inode(), pair.b.inode());
    let (client_addr, server_addr) =
        netns::udp_exchange_from(&pair, client_bind, server_ip, 0, &[1000; 10], &[500; 10]);
    assert_eq!(client_addr.ip(), client_ip);
    let ends = UdpEnds {
        client_ip,
        server_ip,
        client_ns,
        server_ns,
    };
    let (client, server) = (|p: &Point| ends.client(p), |p: &Point| ends.server(p));
    let points = ends.wait_exact(&datakit, &daemon, 10_000, 5_000);
    let rows = netflow(&points);
    let c = rows.iter().find(|p| client(p)).unwrap();
    assert_eq!(
        c.tag("dst_port"),
        Some(server_addr.port().to_string().as_str())
    );
    assert_eq!(
        c.tag("family"),
        Some(if server_v6 { "IPv6" } else { "IPv4" })
    );
    // The flows retire after two quiet intervals (2 s each) and the daemon reports once more
    // on exit: nothing is counted twice.
    std::thread::sleep(Duration::from_secs(6));
    assert!(daemon.terminate().success());
    let rows = datakit.points();
    let rows = netflow(&rows);
    assert_eq!(
        [
            sum(&rows, "bytes_written", client),
            sum(&rows, "bytes_read", client),
            sum(&rows, "bytes_read", server),
            sum(&rows, "bytes_written", server),
        ],
        [10_000, 5_000, 10_000, 5_000],
        "rows {rows:#?}"
    );
}

#[test]
fn udp_unconnected_unbound_ipv4_client_exact_bytes() {
    if !privileged() {
        return;
    }
    unbound_udp_client_exact_bytes("nf-udp-any4", Ipv4Addr::UNSPECIFIED.into(), false);
}

#[test]
fn udp_unconnected_unbound_ipv6_client_exact_bytes() {
    if !privileged() {
        return;
    }
    unbound_udp_client_exact_bytes("nf-udp-any6", Ipv6Addr::UNSPECIFIED.into(), true);
}

/// An IPv6 socket bound to :: sending to an IPv4 server (at its IPv4-mapped address).
#[test]
fn udp_unconnected_unbound_dual_stack_client_exact_bytes() {
    if !privileged() {
        return;
    }
    unbound_udp_client_exact_bytes("nf-udp-any46", Ipv6Addr::UNSPECIFIED.into(), false);
}

/// `pid` and `process_name` are those of the process that made the connection, also when its
/// socket's memory was another process's connection a moment before: connections from short-
/// lived bash processes (`/dev/tcp`) alternate with the test's own, to one server port.
#[test]
fn pid_is_the_connecting_process_when_socket_memory_is_reused() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("nf-pid");
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, &[]);
    let pair = NetPair::create("pid");
    let (client_ip, server_ip): (IpAddr, IpAddr) = (pair.a_v4.into(), pair.b_v4.into());
    let client_ns = pair.a.inode();
    const ROUNDS: usize = 30;
    let listener = netns::tcp_listen(&pair.b, server_ip, 0);
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::Read as _;
        for _ in 0..2 * ROUNDS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink).unwrap();
        }
    });
    let target = std::net::SocketAddr::new(server_ip, port);
    let mut bash_pids = Vec::new();
    for _ in 0..ROUNDS {
        // bash's builtins only: the connecting and writing process is bash itself.
        let script = format!("exec 3<>/dev/tcp/{server_ip}/{port}; printf '%01000d' 0 >&3");
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &pair.a.name, "bash", "-c", &script])
            .spawn()
            .unwrap();
        bash_pids.push(child.id());
        assert!(child.wait().unwrap().success());
        let stream = netns::tcp_connect(&pair.a, target);
        use std::io::Write as _;
        (&stream).write_all(&[7u8; 2000]).unwrap();
    }
    server.join().unwrap();
    let own_pid = std::process::id().to_string();
    let ours = |p: &Point, pid: &str| {
        is_row(p, client_ip, server_ip, "outgoing", client_ns)
            && p.tag("dst_port") == Some(port.to_string().as_str())
            && p.tag("pid") == Some(pid)
    };
    let own = |p: &Point| ours(p, &own_pid);
    let points = wait_total(
        &datakit,
        &daemon,
        "bytes_written",
        2000 * ROUNDS as i64,
        own,
    );
    let rows = netflow(&points);
    for pid in &bash_pids {
        let pid = pid.to_string();
        let bash = |p: &Point| ours(p, &pid);
        assert_eq!(sum(&rows, "bytes_written", bash), 1000, "bash pid {pid}");
        assert_eq!(sum(&rows, "tcp_established", bash), 1, "bash pid {pid}");
        let names: Vec<_> = rows
            .iter()
            .filter(|p| bash(p))
            .filter_map(|p| p.tag("process_name"))
            .collect();
        assert!(names.iter().all(|n| *n == "bash"), "{names:?}");
    }
    assert_eq!(sum(&rows, "tcp_established", own), ROUNDS as i64);
    assert!(daemon.terminate().success());
}
