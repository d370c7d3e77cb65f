//! netflow tier parity: the same fixed workload under every attach tier this kernel offers
//! (what `datakit-ebpf check --netflow-tier X` says can run) gives the same rows, equal to fixed
//! expected values. On the CI host the tracepoint and classic-tracepoint tiers run;
//! the kernel matrix (`cargo xtask vm-test`) runs it on kernels with fentry and kprobes, where it
//! proves the tiers agree, and the fixed values make the kernels agree with each other too.

mod common;

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use common::{
    DAEMON, Daemon,
    netns::{self, NetPair},
    privileged, scratch, serial,
};
use fake_datakit::{FakeDataKit, Point};

const TIERS: [&str; 4] = ["fentry", "tracepoint", "classic-tracepoint", "kprobe"];

/// Fixed server ports of the TCP exchanges (fresh namespaces per tier: never taken).
const TCP4_PORT: u16 = 7001;
const TCP6_PORT: u16 = 7002;

/// A row with its variable parts (addresses, ephemeral ports, namespaces) replaced by roles.
type Key = (String, String, String, String, String, String);
/// Summed fields: bytes_written, bytes_read, tcp_established, tcp_closed, retransmits.
type Totals = [i64; 5];
const FIELDS: [&str; 5] = [
    "bytes_written",
    "bytes_read",
    "tcp_established",
    "tcp_closed",
    "retransmits",
];

/// The tiers `check` says can run here, in the daemon's own order of preference.
fn usable_tiers() -> Vec<&'static str> {
    TIERS
        .into_iter()
        .filter(|tier| {
            let out = Command::new(DAEMON)
                .args(["check", "--enabled", "ebpf-net", "--netflow-tier", tier])
                .env_clear()
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(&format!("netflow at the {tier} tier"))
        })
        .collect()
}

/// Tiers to compare: every usable one. `DKE_TEST_EXPECT_TIERS` (comma-separated, set by the
/// kernel matrix from what each kernel is known to support) makes a tier `check` lost a failure
/// rather than a silently shorter comparison.
fn tiers_under_test() -> Vec<&'static str> {
    let usable = usable_tiers();
    if let Ok(expected) = std::env::var("DKE_TEST_EXPECT_TIERS") {
        let mut expected: Vec<&str> = expected.split(',').filter(|t| !t.is_empty()).collect();
        expected.sort();
        let mut got = usable.clone();
        got.sort();
        assert_eq!(got, expected, "tiers `check` accepts on this kernel");
    }
    assert!(!usable.is_empty(), "no netflow tier can run here");
    // Known failures the kernel matrix's smoke leaves out (named in its report; the full
    // `cargo xtask vm-test` still runs them).
    let skip = std::env::var("DKE_TEST_SKIP_TIERS").unwrap_or_default();
    usable
        .into_iter()
        .filter(|tier| {
            let skipped = skip.split(',').any(|s| s == *tier);
            if skipped {
                eprintln!("tier {tier} left out: DKE_TEST_SKIP_TIERS");
            }
            !skipped
        })
        .collect()
}

fn emulated() -> bool {
    std::env::var("DKE_TEST_EMULATED").is_ok_and(|v| v == "1")
}

/// The daemon at `tier`, and at the kprobe tier the warm-up's namespaces: kept until the test
/// ends, because a namespace freed at once can hand its inode (the rows' `netns` tag) to the
/// test's own pair.
fn start(
    dir: &std::path::Path,
    datakit: &FakeDataKit,
    tier: &str,
    extra: &[&str],
) -> (Daemon, Option<NetPair>) {
    let apiserver = datakit.addr().to_string();
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
        tier,
        "--hostname",
        "tiers-host",
    ];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(dir, &args);
    daemon.wait_log(
        &format!("netflow: attached at the {tier} tier"),
        Duration::from_secs(60),
    );
    let warm = (tier == "kprobe").then(|| wait_kprobes_live(datakit, &daemon));
    (daemon, warm)
}

/// Kprobes miss traffic for about a second after attach in an emulated guest (see
/// tests/e2e/netflow.rs): a warm-up exchange in namespaces of its own must be counted first.
fn wait_kprobes_live(datakit: &FakeDataKit, daemon: &Daemon) -> NetPair {
    for _ in 0..10 {
        let pair = NetPair::create("twarm");
        netns::tcp_exchange(&pair, pair.b_v4.into(), 0, 1000, 2000);
        let ns = pair.a.inode().to_string();
        let counted = |pts: &[Point]| {
            let mine = |p: &&Point| p.measurement == "netflow" && p.tag("netns") == Some(&ns);
            let written: i64 = pts
                .iter()
                .filter(mine)
                .map(|p| p.int("bytes_written").unwrap_or(0))
                .sum();
            let read: i64 = pts
                .iter()
                .filter(mine)
                .map(|p| p.int("bytes_read").unwrap_or(0))
                .sum();
            written == 1000 && read == 2000
        };
        if counted(&datakit.wait_for(Duration::from_secs(8), counted)) {
            return pair;
        }
    }
    panic!(
        "kprobes never counted a warm-up exchange; log:\n{}",
        daemon.log_text()
    );
}

/// The rows of `pair`'s namespaces, keyed by role and summed over intervals.
fn canonical(points: &[Point], pair: &NetPair, server_ports: &[u16]) -> BTreeMap<Key, Totals> {
    let namespaces = [pair.a.inode().to_string(), pair.b.inode().to_string()];
    let role = |ip: Option<&str>| -> String {
        let ip: Option<IpAddr> = ip.and_then(|ip| ip.parse().ok());
        match ip {
            Some(ip) if ip == IpAddr::from(pair.a_v4) || ip == IpAddr::from(pair.a_v6) => "a",
            Some(ip) if ip == IpAddr::from(pair.b_v4) || ip == IpAddr::from(pair.b_v6) => "b",
            _ => "other",
        }
        .into()
    };
    let port = |p: Option<&str>| -> String {
        match p {
            Some("*") => "*".into(),
            Some(p) if p.parse().is_ok_and(|p: u16| server_ports.contains(&p)) => "server".into(),
            Some(p) => format!("other:{p}"),
            None => "none".into(),
        }
    };
    let mut rows = BTreeMap::new();
    for p in points.iter().filter(|p| {
        p.measurement == "netflow" && namespaces.iter().any(|n| p.tag("netns") == Some(n))
    }) {
        let key = (
            p.tag("transport").unwrap_or("").to_string(),
            p.tag("family").unwrap_or("").to_string(),
            p.tag("direction").unwrap_or("").to_string(),
            format!("{}->{}", role(p.tag("src_ip")), role(p.tag("dst_ip"))),
            port(p.tag("src_port")),
            port(p.tag("dst_port")),
        );
        let totals: &mut Totals = rows.entry(key).or_default();
        for (total, field) in totals.iter_mut().zip(FIELDS) {
            *total += p.int(field).unwrap_or(0);
        }
    }
    // Under software emulation a segment is now and then really retransmitted (the guest runs
    // several times slower than its timers); the retransmit test checks that count against the
    // kernel's own, so parity leaves it out there.
    if emulated() {
        for totals in rows.values_mut() {
            totals[4] = 0;
        }
    }
    rows
}

/// One line per row: key, then the totals in FIELDS order.
fn show(rows: &BTreeMap<Key, Totals>) -> String {
    rows.iter()
        .map(|(k, v)| format!("  {k:?} {v:?}\n"))
        .collect()
}

fn key(transport: &str, family: &str, direction: &str, ends: &str, src: &str, dst: &str) -> Key {
    (
        transport.into(),
        family.into(),
        direction.into(),
        ends.into(),
        src.into(),
        dst.into(),
    )
}

/// Runs `workload` at `tier` and returns its canonical rows once they hold at least what
/// `expected` does (or the wait ends), after one more interval that must add nothing.
fn rows_at(
    tier: &str,
    extra: &[&str],
    expected: &BTreeMap<Key, Totals>,
    workload: impl FnOnce(&NetPair) -> Vec<u16>,
) -> BTreeMap<Key, Totals> {
    let dir = scratch(&format!("tiers-{tier}"));
    let datakit = FakeDataKit::start();
    let (mut daemon, _warm) = start(&dir, &datakit, tier, extra);
    let pair = NetPair::create("tiers");
    let server_ports = workload(&pair);
    let reached = |pts: &[Point]| {
        let rows = canonical(pts, &pair, &server_ports);
        expected.iter().all(|(k, want)| {
            rows.get(k)
                .is_some_and(|got| got.iter().zip(want).all(|(g, w)| g >= w))
        })
    };
    let wait = if emulated() { 60 } else { 20 };
    datakit.wait_for(Duration::from_secs(wait), reached);
    // A late duplicate would show up in the next interval.
    std::thread::sleep(Duration::from_millis(2500));
    let rows = canonical(&datakit.points(), &pair, &server_ports);
    if rows != *expected {
        // What the daemon said of losses (missed calls, full maps), for the failure report.
        let log = daemon.log_text();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        eprintln!(
            "{tier}: rows differ; the daemon's warnings:\n{}",
            warnings.join("\n")
        );
    }
    assert!(daemon.terminate().success(), "{}", daemon.log_text());
    rows
}

/// Compares every tier's rows with `expected`, reporting all tiers before failing.
fn assert_parity(
    name: &str,
    extra: &[&str],
    expected: BTreeMap<Key, Totals>,
    workload: fn(&NetPair) -> Vec<u16>,
) {
    let tiers = tiers_under_test();
    let mut mismatches = Vec::new();
    for tier in &tiers {
        let got = rows_at(tier, extra, &expected, workload);
        let shown = show(&got);
        eprintln!("{name} at the {tier} tier:\n{shown}");
        if got != expected {
            mismatches.push(format!("{tier}:\n{shown}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{name}: rows differ from the expected ones (tiers run: {tiers:?})\nexpected:\n{}\n{}",
        show(&expected),
        mismatches.join("\n")
    );
}

/// TCP over IPv4 and IPv6 (both ends seen) and a connected UDP client.
fn tcp_and_connected_udp(pair: &NetPair) -> Vec<u16> {
    netns::tcp_exchange(pair, pair.b_v4.into(), TCP4_PORT, 100_000, 200_000);
    netns::tcp_exchange(pair, pair.b_v6.into(), TCP6_PORT, 30_000, 40_000);
    let (_, udp_server) =
        netns::udp_connected_exchange(pair, pair.b_v4.into(), &[100, 1000, 1472], &[10, 20, 30]);
    vec![TCP4_PORT, TCP6_PORT, udp_server.port()]
}

/// `auto`'s pick is usable, is `DKE_TEST_AUTO_TIER` when the kernel matrix says which it must
/// be, and where `check` reports that the kernel preempts BPF programs, runs with preemption
/// off (classic tracepoints or kprobes: the others lose calls there).
#[test]
fn auto_picks_a_tier_that_loses_nothing_here() {
    if !privileged() {
        return;
    }
    let out = Command::new(DAEMON)
        .args(["check", "--enabled", "ebpf-net"])
        .env_clear()
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let picked = TIERS
        .into_iter()
        .find(|tier| text.contains(&format!("netflow at the {tier} tier")))
        .unwrap_or_else(|| panic!("check names no netflow tier:\n{text}"));
    assert!(usable_tiers().contains(&picked), "{text}");
    if let Ok(expected) = std::env::var("DKE_TEST_AUTO_TIER") {
        assert_eq!(picked, expected, "auto's tier on this kernel:\n{text}");
    }
    let preemptible = text.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("preemption") && words.next() == Some("yes")
    });
    if preemptible {
        assert!(
            matches!(picked, "classic-tracepoint" | "kprobe"),
            "a preemptible kernel got {picked}:\n{text}"
        );
    }
}

#[test]
fn same_rows_at_every_tier_tcp_and_connected_udp() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let expected = BTreeMap::from([
        (
            key("tcp", "IPv4", "outgoing", "a->b", "*", "server"),
            [100_000, 200_000, 1, 1, 0],
        ),
        (
            key("tcp", "IPv4", "incoming", "b->a", "server", "*"),
            [200_000, 100_000, 1, 1, 0],
        ),
        (
            key("tcp", "IPv6", "outgoing", "a->b", "*", "server"),
            [30_000, 40_000, 1, 1, 0],
        ),
        (
            key("tcp", "IPv6", "incoming", "b->a", "server", "*"),
            [40_000, 30_000, 1, 1, 0],
        ),
        // The server's socket is unconnected: counted per peer too (by default).
        (
            key("udp", "IPv4", "outgoing", "a->b", "*", "server"),
            [2572, 60, 0, 0, 0],
        ),
        (
            key("udp", "IPv4", "incoming", "b->a", "server", "*"),
            [60, 2572, 0, 0, 0],
        ),
    ]);
    assert_parity("tcp+udp", &[], expected, tcp_and_connected_udp);
}

/// Unconnected UDP on both ends (sendto/recvfrom), counted by default.
fn unconnected_udp(pair: &NetPair) -> Vec<u16> {
    let (_, server) = netns::udp_exchange(
        pair,
        pair.b_v4.into(),
        0,
        &[100, 1000, 1472, 7],
        &[10, 20, 30, 40],
    );
    vec![server.port()]
}

#[test]
fn same_rows_at_every_tier_unconnected_udp() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let expected = BTreeMap::from([
        (
            key("udp", "IPv4", "outgoing", "a->b", "*", "server"),
            [2579, 100, 0, 0, 0],
        ),
        (
            key("udp", "IPv4", "incoming", "b->a", "server", "*"),
            [100, 2579, 0, 0, 0],
        ),
    ]);
    assert_parity("unconnected udp", &[], expected, unconnected_udp);
}
