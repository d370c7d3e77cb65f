//! The overhead benchmark (`cargo xtask bench`, which runs `cargo bench`): not a test, so
//! `cargo test` never runs it. It prints its figures beside the targets and asserts none of them.
//!
//! - Three daemon configurations, each against the daemon off: **netflow alone** (httpflow and
//!   dnsflow off), the **default** (`--enabled ebpf-net` and nothing else: netflow, dnsflow and
//!   httpflow), and **everything on** (`--enabled ebpf-net,ebpf-bash --l7net-enabled
//!   httpflow,httpflow-tls --netflow-udp-unconnected`). The netflow tier is the daemon's own
//!   choice (`auto`) unless `DKE_BENCH_NETFLOW_TIER` names one.
//! - Three loads from one network namespace to another, each to saturation: nginx (Debian's
//!   package) serving a 1 KiB page over 16 keep-alive connections driven by `wrk -t1 -c16`
//!   (Debian's package); the same over HTTPS (a self-signed certificate made with the `openssl`
//!   CLI at start; with httpflow-tls on, the daemon attaches its OpenSSL uprobes to the libssl
//!   nginx maps, the file wrk maps too, so both ends pay them as both ends pay netflow's hooks);
//!   and the worst case, a 64-byte ping-pong on 4 connections, where a transaction is a few µs of
//!   syscalls so every hook shows.
//! - One run of interleaved pairs: per pair and load, a run with the daemon off (first in even
//!   pairs, last in odd ones, so warm-up and drift favour neither side) and one per
//!   configuration, each with a daemon started for it and fully attached before the load
//!   starts. 5 s runs, 5 pairs: the median of the pair ratios on/off and their range.
//! - The hooks' floor, in the same pairs: each load with only an empty program where httpflow
//!   attaches (its 18 syscall tracepoints for HTTP and the ping-pong; uprobe and uretprobe on
//!   libssl's SSL_read/SSL_write and their `_ex` variants for HTTPS): what the kernel charges for
//!   the hooks themselves, before any work of ours.
//! - CPU added per request, µs, both ends: cores × (1/on − 1/off) (both cores are busy in these
//!   loads), for every configuration and for the floors.
//! - The daemon in each run: CPU (utime + stime of /proc/<pid>/stat across the load) as a share
//!   of one core and in ms per 10,000 requests (50 ms per 10k requests is 5 % of one core at
//!   10k req/s), peak RSS (VmHWM at the load's end, the highest of the runs: mostly the start-up
//!   peak) and steady RSS (VmRSS at the load's end, the median of the runs).
//! - Kernel cost: average ns per run of each netflow program (`kernel.bpf_stats_enabled`,
//!   run_time_ns / run_cnt; target ≤ 150 ns on the hot path), and the same for an empty
//!   program on `sock_send_length`: the floor the statistics themselves put under every figure.
//!   Then httpflow's: ns per run of each of its programs, and all of them per request, with
//!   everything on under the HTTP and HTTPS loads.
//! - The daemon (default configuration) with 10,000 live connections: CPU, peak and steady RSS.
//!
//! Targets (printed, never asserted): throughput on/off ≥ 0.97 for netflow alone and the
//! default configuration, ≥ 0.95 with everything on; daemon CPU ≤ 5 % of one core at 10k req/s;
//! RSS ≤ 24 MB.

#[path = "../e2e/common/mod.rs"]
mod common;

use std::{
    collections::{BTreeSet, HashSet},
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{Daemon, netns::NetPair, scratch};

const CLIENTS: usize = 4;
const MESSAGE: usize = 64;
const RUN: Duration = Duration::from_secs(5);
/// Interleaved off/on pairs per configuration and load.
const PAIRS: usize = 5;
/// The HTTP loads' page size and ports.
const PAGE: usize = 1024;
const HTTP_PORT: u16 = 8088;
const HTTPS_PORT: u16 = 8443;
/// Enough keep-alive connections that nginx and wrk keep both cores busy: a load with idle gaps
/// measures wake-up latency, not cost.
const HTTP_CLIENTS: usize = 16;
/// Between "attached" and the load: what start-up leaves running settles first.
const SETTLE: Duration = Duration::from_secs(1);
/// Targets: daemon CPU per 10,000 requests (5 % of one core at 10k req/s), and RSS.
const CPU_MS_PER_10K_TARGET: f64 = 50.0;
const RSS_MB_TARGET: f64 = 24.0;

/// The netflow tier forced: `DKE_BENCH_NETFLOW_TIER`, else none (the daemon's `auto`).
fn bench_tier() -> Option<&'static str> {
    static TIER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TIER.get_or_init(|| std::env::var("DKE_BENCH_NETFLOW_TIER").ok())
        .as_deref()
}

/// A daemon configuration measured against the daemon off.
struct Config {
    name: &'static str,
    /// Arguments after the ones every run has (output, interval, tier).
    args: &'static [&'static str],
    /// Log lines that together say every plugin of the configuration is attached.
    ready: &'static [&'static str],
    /// Target for throughput on/off.
    target: f64,
}

const NETFLOW_ALONE: Config = Config {
    name: "netflow alone",
    // httpflow (on by default) has syscall tracepoints of its own, and dnsflow's packet tap
    // looks at every packet.
    args: &[
        "--enabled",
        "ebpf-net",
        "--l7net-disabled",
        "httpflow,httpflow-tls",
        "--dnsflow-disabled",
    ],
    ready: &["ebpf-net: running via"],
    target: 0.97,
};

const DEFAULT: Config = Config {
    name: "default (ebpf-net)",
    args: &["--enabled", "ebpf-net"],
    ready: &["ebpf-net: running via"],
    target: 0.97,
};

const EVERYTHING: Config = Config {
    name: "everything on",
    args: &[
        "--enabled",
        "ebpf-net,ebpf-bash",
        "--l7net-enabled",
        "httpflow,httpflow-tls",
        "--netflow-udp-unconnected",
    ],
    // The OpenSSL uprobes attach to the libssl of running processes: nginx is one.
    ready: &[
        "httpflow-tls: attached to",
        "ebpf-net: running via",
        "ebpf-bash: running via",
    ],
    target: 0.95,
};

const CONFIGS: [&Config; 3] = [&NETFLOW_ALONE, &DEFAULT, &EVERYTHING];

impl Config {
    fn daemon_args(&self) -> Vec<&'static str> {
        let mut args = vec![
            "run",
            "--output",
            "-",
            "--interval",
            "5s",
            "--min-interval",
            "1s",
        ];
        if let Some(tier) = bench_tier() {
            args.extend(["--netflow-tier", tier]);
        }
        args.extend(self.args);
        args
    }
}

#[derive(Clone, Copy)]
enum Load {
    Http,
    Https,
    PingPong,
}

impl Load {
    const ALL: [Load; 3] = [Load::Http, Load::Https, Load::PingPong];

    fn name(self) -> &'static str {
        match self {
            Load::Http => "HTTP: nginx 1 KiB, wrk -c16 keep-alive",
            Load::Https => "HTTPS: the same over TLS",
            Load::PingPong => "64-byte ping-pong, 4 conns",
        }
    }

    /// Runs the load for `run`.
    fn run(self, pair: &NetPair, run: Duration) -> Done {
        match self {
            Load::Http => wrk(
                pair,
                &format!("http://{}:{HTTP_PORT}/page.html", pair.b_v4),
                run,
            ),
            Load::Https => wrk(
                pair,
                &format!("https://{}:{HTTPS_PORT}/page.html", pair.b_v4),
                run,
            ),
            Load::PingPong => request_response(pair, run),
        }
    }
}

/// Requests (or transactions) a load completed, and their rate.
struct Done {
    requests: u64,
    rate: f64,
}

/// `wrk -t1 -c HTTP_CLIENTS` in namespace a against `url` for `run`.
fn wrk(pair: &NetPair, url: &str, run: Duration) -> Done {
    let connections = format!("-c{HTTP_CLIENTS}");
    let duration = format!("-d{}s", run.as_secs().max(1));
    let out = pair.a.exec(
        "wrk",
        &["-t1", &connections, &duration, "--timeout", "5s", url],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "  87281 requests in 3.02s, 105.13MB read" and "Requests/sec:  28867.07".
    let requests = text
        .lines()
        .find_map(|l| l.split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<u64>().ok());
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|r| r.trim().parse::<f64>().ok());
    let (Some(requests), Some(rate)) = (requests, rate) else {
        panic!("no request count in wrk's output:\n{text}");
    };
    assert!(requests > 0, "wrk made no request:\n{text}");
    for line in text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        eprintln!("warning: wrk {url}: {}", line.trim());
    }
    Done { requests, rate }
}

/// `CLIENTS` connections doing 64-byte ping-pong for `run`.
fn request_response(pair: &NetPair, run: Duration) -> Done {
    let server_ip: IpAddr = pair.b_v4.into();
    let listener = pair
        .b
        .run(move || TcpListener::bind(SocketAddr::new(server_ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..CLIENTS {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            handles.push(thread::spawn(move || {
                let mut buf = [0u8; MESSAGE];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.join();
        }
    });
    let done = rate_of(pair, CLIENTS, run, move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [7u8; MESSAGE];
        move || {
            s.write_all(&buf).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
    });
    server.join().unwrap();
    done
}

/// nginx in namespace b serving one `PAGE`-byte page over HTTP and HTTPS (a self-signed
/// certificate made here), for the HTTP loads. Killed on drop.
struct Nginx(std::process::Child);

impl Nginx {
    fn start(pair: &NetPair, dir: &Path) -> Nginx {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("temp")).unwrap();
        std::fs::write(www.join("page.html"), "p".repeat(PAGE)).unwrap();
        let (cert, key) = common::self_signed_certificate(dir, "datakit-ebpf-bench");
        let (ip, d) = (pair.b_v4, dir.display());
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
               client_body_temp_path {d}/www/temp;\n  proxy_temp_path {d}/www/temp;\n\
               fastcgi_temp_path {d}/www/temp;\n  uwsgi_temp_path {d}/www/temp;\n\
               scgi_temp_path {d}/www/temp;\n\
               server {{\n    listen {ip}:{HTTP_PORT};\n    listen {ip}:{HTTPS_PORT} ssl;\n\
                 ssl_certificate {};\n    ssl_certificate_key {};\n    root {d}/www;\n  }}\n}}\n",
            cert.display(),
            key.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "nginx", "-c"])
            .arg(&conf_path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx)");
        for port in [HTTP_PORT, HTTPS_PORT] {
            let addr = SocketAddr::new(pair.b_v4.into(), port);
            let up = pair.a.run(move || {
                (0..100).any(|_| {
                    thread::sleep(Duration::from_millis(50));
                    TcpStream::connect(addr).is_ok()
                })
            });
            assert!(up, "nginx did not start listening on {addr}");
        }
        Nginx(child)
    }
}

impl Nginx {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `clients` threads in namespace a for `run`: each calls `connect` once, then the transaction
/// it returns until told to stop.
fn rate_of<C, T>(pair: &NetPair, clients: usize, run: Duration, connect: C) -> Done
where
    C: Fn() -> T + Clone + Send + 'static,
    T: FnMut(),
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, done, connect) = (stop.clone(), done.clone(), connect.clone());
            pair.a.spawn(move || {
                let mut transaction = connect();
                while !stop.load(Ordering::Relaxed) {
                    transaction();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let requests = done.load(Ordering::Relaxed);
    Done {
        requests,
        rate: requests as f64 / start.elapsed().as_secs_f64(),
    }
}

/// What one run with the daemon on measured.
struct Sample {
    rate: f64,
    /// Daemon CPU across the load, % of one core.
    cpu_percent: f64,
    /// Daemon CPU per 10,000 requests, ms.
    cpu_ms_per_10k: f64,
    /// VmHWM and VmRSS at the load's end, kB.
    peak_kb: u64,
    rss_kb: u64,
}

/// A fresh directory for the next daemon: the daemon appends to its log, and a log of its own
/// is what `wait_log` must read.
fn run_dir(dir: &Path) -> PathBuf {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = dir.join(format!("run-{}", RUNS.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&run).unwrap();
    run
}

/// Starts the daemon in `config` and waits until all of it is attached.
fn start_daemon(dir: &Path, config: &Config) -> Daemon {
    let mut daemon = Daemon::start(&run_dir(dir), &config.daemon_args());
    for needle in config.ready {
        daemon.wait_log(needle, Duration::from_secs(30));
    }
    daemon
}

/// What the runs saw beside their figures.
#[derive(Default)]
struct Seen {
    /// The tiers the daemons chose ("netflow at the tracepoint tier").
    tiers: BTreeSet<String>,
    /// datakit-ebpf processes not ours that ran during runs (someone's tests): their programs
    /// hook the same calls, so the runs beside them measure them too.
    others: BTreeSet<u32>,
    runs: usize,
    runs_with_others: usize,
}

impl Seen {
    /// Runs `load` for `RUN`, noting other daemons (any but `ours`) at its start and end.
    fn run(&mut self, pair: &NetPair, load: Load, ours: Option<u32>) -> Done {
        let before = other_daemons(ours);
        let done = load.run(pair, RUN);
        let after = other_daemons(ours);
        self.runs += 1;
        if !before.is_empty() || !after.is_empty() {
            self.runs_with_others += 1;
        }
        self.others.extend(before.into_iter().chain(after));
        done
    }
}

/// Pids of the running datakit-ebpf processes other than `ours`.
fn other_daemons(ours: Option<u32>) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid) != ours)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "datakit-ebpf")
        })
        .collect()
}

/// `load` for `RUN` with the daemon running in `config`.
fn with_daemon(dir: &Path, pair: &NetPair, config: &Config, load: Load, seen: &mut Seen) -> Sample {
    let mut daemon = start_daemon(dir, config);
    thread::sleep(SETTLE);
    let pid = daemon.pid();
    let (cpu_before, start) = (cpu_seconds(pid), Instant::now());
    let done = seen.run(pair, load, Some(pid));
    let (cpu, wall) = (cpu_seconds(pid) - cpu_before, start.elapsed().as_secs_f64());
    let (peak_kb, rss_kb) = (proc_status(pid, "VmHWM:"), proc_status(pid, "VmRSS:"));
    let log = daemon.log_text();
    for plugin in ["netflow", "httpflow"] {
        let prefix = format!("{plugin}: attached at the ");
        if let Some(tier) = log
            .lines()
            .find_map(|l| l.split_once(&prefix))
            .and_then(|(_, rest)| rest.split_whitespace().next())
        {
            seen.tiers.insert(format!("{plugin} at the {tier} tier"));
        }
    }
    assert!(
        daemon.terminate().success(),
        "the daemon failed:\n{}",
        daemon.log_text()
    );
    Sample {
        rate: done.rate,
        cpu_percent: cpu / wall * 100.0,
        cpu_ms_per_10k: cpu * 1000.0 / done.requests as f64 * 10_000.0,
        peak_kb,
        rss_kb,
    }
}

fn cores() -> f64 {
    thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Per pair, the CPU time each request cost more than in the "off" run, in µs: with every core
/// busy, a request costs cores / rate seconds of CPU.
fn added_us(on: impl Iterator<Item = f64>, off: &[f64]) -> Vec<f64> {
    on.zip(off)
        .map(|(on, off)| cores() * (1.0 / on - 1.0 / off) * 1e6)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// "median (min–max)" with `decimals` digits.
fn median_range(mut v: Vec<f64>, decimals: usize) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.decimals$} ({:.decimals$}–{:.decimals$})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

/// A whole number with thousands separators: 53,233.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// Prints a Markdown table with padded columns (the README's figures table has its layout).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].chars().count()])
            .max()
            .unwrap()
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.to_vec());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn bpftool() -> &'static str {
    ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("bpftool")
}

/// Ids of the eBPF programs `pid` holds (its program and link descriptors' `prog_id`): another
/// daemon running on the machine (someone's tests) has programs of the same names.
fn program_ids(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return HashSet::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// (name, run_time_ns, run_cnt) of a loaded program.
type ProgramStats = (String, u64, u64);

/// The statistics of the loaded programs named `prefix…` that `pid` holds.
fn program_stats(prefix: &str, pid: u32) -> Vec<ProgramStats> {
    let ours = program_ids(pid);
    let out = Command::new(bpftool())
        .args(["prog", "show", "--json"])
        .output()
        .unwrap();
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .filter(|p| p["id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["run_time_ns"].as_u64().unwrap_or(0),
                p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid` (all its threads), seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second as f64
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to select.
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs: run it as root"
    );
    let started = Instant::now();
    let dir = scratch("bench");
    let pair = NetPair::create("bench");
    let sysctl = |v: &str| {
        let _ = Command::new("sysctl")
            .args(["-q", &format!("kernel.bpf_stats_enabled={v}")])
            .status();
    };
    // nginx serves every HTTP run (started once, before any daemon: the OpenSSL uprobes attach
    // to the libssl of processes running when the daemon starts, or found by its rescans).
    let nginx = Nginx::start(&pair, &dir);
    for load in Load::ALL {
        load.run(&pair, Duration::from_secs(1));
    }
    let libssl = libssl_of(nginx.pid());

    // Per load: the "off" rates of the pairs, and per configuration its samples, pair by pair.
    let mut off = vec![Vec::new(); Load::ALL.len()];
    let mut on: Vec<Vec<Vec<Sample>>> = Load::ALL
        .iter()
        .map(|_| CONFIGS.iter().map(|_| Vec::new()).collect())
        .collect();
    // Per load: the rates with only the hooks' floor attached, pair by pair.
    let mut floors = vec![Vec::new(); Load::ALL.len()];
    let mut seen = Seen::default();
    for i in 0..PAIRS {
        for (l, load) in Load::ALL.into_iter().enumerate() {
            // Off first in even pairs, last in odd ones: warm-up and drift favour neither side.
            let early = (i % 2 == 0).then(|| seen.run(&pair, load, None).rate);
            let samples: Vec<Sample> = CONFIGS
                .iter()
                .map(|config| with_daemon(&dir, &pair, config, load, &mut seen))
                .collect();
            let floor = {
                let _hooks = Floor::of(load).attach(&libssl);
                seen.run(&pair, load, None).rate
            };
            let base = early.unwrap_or_else(|| seen.run(&pair, load, None).rate);
            let ratios: Vec<String> = CONFIGS
                .iter()
                .zip(&samples)
                .map(|(c, s)| format!("{} {:.3}", c.name, s.rate / base))
                .collect();
            eprintln!(
                "pair {}/{PAIRS}, {}: off {} req/s; on/off: {}",
                i + 1,
                load.name(),
                thousands(base),
                ratios.join(", ")
            );
            off[l].push(base);
            floors[l].push(floor);
            for (runs, sample) in on[l].iter_mut().zip(samples) {
                runs.push(sample);
            }
        }
    }

    // Kernel time in a run of its own: the statistics themselves cost time per run. An empty
    // program on the same tracepoint, measured alike in the same run, shows that floor.
    let (kernel, floor) = {
        let mut daemon = start_daemon(&dir, &NETFLOW_ALONE);
        let empty = EmptyProgram::attach("sock_send_length");
        sysctl("1");
        Load::PingPong.run(&pair, RUN);
        let kernel = program_stats("netflow_", daemon.pid());
        let floor = empty
            .as_ref()
            .map(|_| program_stats(EmptyProgram::NAME, std::process::id()));
        sysctl("0");
        drop(empty);
        assert!(daemon.terminate().success());
        (kernel, floor)
    };

    // httpflow's kernel time per request, everything on, under the HTTP and HTTPS loads: all
    // its programs' run time (both ends of each request are on this host) over wrk's requests.
    let http_kernel: Vec<(Load, Vec<ProgramStats>, u64)> = [Load::Http, Load::Https]
        .into_iter()
        .map(|load| {
            let mut daemon = start_daemon(&dir, &EVERYTHING);
            sysctl("1");
            let done = load.run(&pair, RUN);
            let stats = program_stats("httpflow_", daemon.pid());
            sysctl("0");
            assert!(daemon.terminate().success());
            (load, stats, done.requests)
        })
        .collect();

    // 10,000 live connections (20,000 tracked sockets: both ends are on this host). The server
    // ends live in another process: a process may hold only 20,000 descriptors here.
    let (idle_cpu_percent, idle_peak_kb, idle_rss_kb) = {
        let mut daemon = start_daemon(&dir, &DEFAULT);
        let pid = daemon.pid();
        let (cpu_before, start) = (cpu_seconds(pid), Instant::now());
        let server_ip = pair.b_v4.to_string();
        let script = format!(
            "import socket,sys,time\ns=socket.socket()\ns.bind(('{server_ip}',7777))\ns.listen(4096)\n\
             print('ready',flush=True)\nc=[]\nwhile len(c)<10000:\n  c.append(s.accept()[0])\n\
             print('all',flush=True)\ntime.sleep(120)\n"
        );
        let mut server = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        server
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        let addr = SocketAddr::new(pair.b_v4.into(), 7777);
        let clients = pair.a.run(move || {
            (0..10_000)
                .map(|_| {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.write_all(b"x").unwrap();
                    s
                })
                .collect::<Vec<_>>()
        });
        // Two intervals with every connection live.
        thread::sleep(Duration::from_secs(11));
        let peak_kb = proc_status(pid, "VmHWM:");
        let rss_kb = proc_status(pid, "VmRSS:");
        let cpu = cpu_seconds(pid) - cpu_before;
        let wall = start.elapsed().as_secs_f64();
        drop(clients);
        let _ = server.kill();
        let _ = server.wait();
        assert!(daemon.terminate().success());
        (cpu / wall * 100.0, peak_kb, rss_kb)
    };

    println!(
        "\n== overhead: {PAIRS} interleaved off/on pairs of {} s runs per configuration and load, \
         over veth between two namespaces; daemon {}",
        RUN.as_secs(),
        seen.tiers.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    if seen.runs_with_others > 0 {
        println!(
            "WARNING: other datakit-ebpf processes (pids {:?}: someone's tests?) ran during {} of \
             the {} runs; their programs hook the same calls, so the \"off\" runs and the ratios \
             include their cost",
            seen.others, seen.runs_with_others, seen.runs
        );
    }
    let header = [
        "configuration",
        "load",
        "req/s off → on (medians)",
        "on/off throughput, median (pairs' range)",
        "target",
        "CPU added per request, µs (both ends)",
        "daemon CPU, % of one core",
        "daemon CPU, ms per 10k requests (target ≤ 50)",
        "peak RSS, MB (target ≤ 24)",
        "steady RSS, MB (target ≤ 24)",
    ];
    let mut rows = Vec::new();
    for (c, config) in CONFIGS.iter().enumerate() {
        for (l, load) in Load::ALL.into_iter().enumerate() {
            let runs = &on[l][c];
            let ratios: Vec<f64> = runs.iter().zip(&off[l]).map(|(s, o)| s.rate / o).collect();
            let of = |f: fn(&Sample) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
            rows.push(vec![
                config.name.to_string(),
                load.name().to_string(),
                format!(
                    "{} → {}",
                    thousands(median(off[l].clone())),
                    thousands(median(of(|s| s.rate)))
                ),
                median_range(ratios, 3),
                format!("≥ {:.2}", config.target),
                median_range(added_us(runs.iter().map(|s| s.rate), &off[l]), 1),
                format!("{:.1}", median(of(|s| s.cpu_percent))),
                median_range(of(|s| s.cpu_ms_per_10k), 1),
                mb(runs.iter().map(|s| s.peak_kb).max().unwrap()),
                mb(median(of(|s| s.rss_kb as f64)) as u64),
            ]);
        }
    }
    rows.push(vec![
        DEFAULT.name.to_string(),
        "10,000 live connections, idle".to_string(),
        "–".to_string(),
        "–".to_string(),
        "–".to_string(),
        "–".to_string(),
        format!("{idle_cpu_percent:.1}"),
        "–".to_string(),
        mb(idle_peak_kb),
        mb(idle_rss_kb),
    ]);
    print_table(&header, &rows);
    println!(
        "(ratio: each run with the daemon on against the \"off\" run of its pair; CPU: utime + \
         stime across the load, {CPU_MS_PER_10K_TARGET:.0} ms per 10k requests being 5 % of one \
         core at 10k req/s; peak RSS: the highest VmHWM of the runs, mostly the start-up peak; \
         steady RSS: the median VmRSS at the load's end; targets printed, not checked: RSS ≤ \
         {RSS_MB_TARGET:.0} MB)"
    );

    println!(
        "\n== the hooks' floor: the same loads with only empty programs where httpflow attaches \
         (in the same pairs)"
    );
    let rows: Vec<Vec<String>> = Load::ALL
        .into_iter()
        .enumerate()
        .map(|(l, load)| {
            let ratios: Vec<f64> = floors[l].iter().zip(&off[l]).map(|(f, o)| f / o).collect();
            vec![
                load.name().to_string(),
                Floor::of(load).name().to_string(),
                format!(
                    "{} → {}",
                    thousands(median(off[l].clone())),
                    thousands(median(floors[l].clone()))
                ),
                median_range(ratios, 3),
                median_range(added_us(floors[l].iter().copied(), &off[l]), 1),
            ]
        })
        .collect();
    print_table(
        &[
            "load",
            "hooks",
            "req/s off → floor (medians)",
            "floor/off throughput, median (pairs' range)",
            "CPU added per request, µs (both ends)",
        ],
        &rows,
    );
    println!(
        "(CPU added per request: {} cores × (1/on − 1/off), both cores being busy in these loads)",
        cores()
    );

    println!("\n== kernel time per program run (netflow alone, 64-byte ping-pong, bpf_stats)");
    let mut rows: Vec<Vec<String>> = kernel
        .iter()
        .filter(|(_, _, count)| *count > 0)
        .map(|(name, ns, count)| {
            let hot = ["netflow_send", "netflow_recv"].contains(&name.as_str());
            vec![
                name.clone(),
                format!("{:.0}", *ns as f64 / *count as f64),
                count.to_string(),
                if hot { "≤ 150" } else { "–" }.to_string(),
            ]
        })
        .collect();
    match floor.as_deref() {
        Some([(_, ns, count), ..]) if *count > 0 => rows.push(vec![
            "empty program on sock_send_length (the statistics' own floor)".to_string(),
            format!("{:.0}", *ns as f64 / *count as f64),
            count.to_string(),
            "–".to_string(),
        ]),
        _ => println!("(no empty-program floor: sock_send_length not attachable here)"),
    }
    print_table(&["program", "ns per run", "runs", "target, ns"], &rows);

    println!("\n== httpflow's kernel time (everything on, bpf_stats)");
    let mut rows = Vec::new();
    for (load, stats, requests) in &http_kernel {
        let total_ns: u64 = stats.iter().map(|(_, ns, _)| ns).sum();
        for (name, ns, count) in stats.iter().filter(|(_, _, count)| *count > 0) {
            rows.push(vec![
                load.name().to_string(),
                name.clone(),
                format!("{:.0}", *ns as f64 / *count as f64),
                count.to_string(),
            ]);
        }
        rows.push(vec![
            load.name().to_string(),
            format!("all httpflow programs, per request ({requests} requests, both ends)"),
            format!("{:.0}", total_ns as f64 / (*requests).max(1) as f64),
            "–".to_string(),
        ]);
    }
    print_table(&["load", "program", "ns per run", "runs"], &rows);
    println!("\nbench took {:.0} s", started.elapsed().as_secs_f64());
}

/// A program that only returns, attached as a raw tracepoint with the bare bpf(2) calls (no
/// object file needed): its `run_time_ns / run_cnt` is what the kernel's statistics cost per
/// run on this machine, the floor under every figure above. Detached on Drop (closing the fds).
struct EmptyProgram {
    _prog: std::os::fd::OwnedFd,
    _link: std::os::fd::OwnedFd,
}

impl EmptyProgram {
    const NAME: &'static str = "dke_bench_empty";

    fn attach(tracepoint: &str) -> Option<EmptyProgram> {
        use std::os::fd::{FromRawFd, OwnedFd};
        const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
        const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
        let name = std::ffi::CString::new(tracepoint).unwrap();
        let prog = Hooks::empty_program(BPF_PROG_TYPE_RAW_TRACEPOINT);
        // BPF_RAW_TRACEPOINT_OPEN: name, prog_fd.
        let mut attr = [0u8; 128];
        attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&prog) as u32).to_ne_bytes());
        // SAFETY: bpf(2) with an attribute buffer of the size passed; it only reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_RAW_TRACEPOINT_OPEN,
                attr.as_ptr(),
                attr.len(),
            )
        };
        // SAFETY: a new descriptor that we own.
        let link = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })?;
        Some(EmptyProgram {
            _prog: prog,
            _link: link,
        })
    }
}

/// What the hooks httpflow attaches to cost with nothing in them: the same empty program
/// attached where httpflow's syscalls tier attaches, or where httpflow-tls attaches its OpenSSL
/// probes. The gap between a configuration and its floor is the programs' own work.
#[derive(Clone, Copy)]
enum Floor {
    /// httpflow's syscalls tier: entry and exit of the read/write family.
    SyscallTracepoints,
    /// httpflow-tls: uprobe and uretprobe on SSL_read, SSL_write and their `_ex` variants.
    LibsslUprobes,
}

/// httpflow's syscall tracepoints (ebpf-daemon/src/plugins/httpflow/collector.rs).
const HTTPFLOW_SYSCALLS: [&str; 9] = [
    "read",
    "recvfrom",
    "write",
    "sendto",
    "readv",
    "writev",
    "recvmsg",
    "sendmsg",
    "sendfile64",
];

/// httpflow-tls's OpenSSL functions (ebpf-daemon/src/plugins/httpflow/tls.rs).
const LIBSSL_FUNCTIONS: [&str; 4] = ["SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"];

impl Floor {
    fn of(load: Load) -> Floor {
        match load {
            Load::Https => Floor::LibsslUprobes,
            Load::Http | Load::PingPong => Floor::SyscallTracepoints,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Floor::SyscallTracepoints => {
                "empty programs on httpflow's 18 syscall tracepoints (its syscalls tier's floor)"
            }
            Floor::LibsslUprobes => {
                "empty uprobe + uretprobe on libssl's SSL_read/SSL_write(_ex) (httpflow-tls's floor)"
            }
        }
    }

    /// Attaches the empty programs; `libssl`: the library nginx maps.
    fn attach(self, libssl: &Path) -> Hooks {
        match self {
            Floor::SyscallTracepoints => {
                let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                    .into_iter()
                    .map(Path::new)
                    .find(|p| p.join("events/syscalls").is_dir())
                    .expect("tracefs with syscall events (a daemon run mounts it)");
                let prog = Hooks::empty_program(Hooks::BPF_PROG_TYPE_TRACEPOINT);
                let events = HTTPFLOW_SYSCALLS
                    .iter()
                    .flat_map(|call| [format!("sys_enter_{call}"), format!("sys_exit_{call}")])
                    .map(|event| {
                        let id = std::fs::read_to_string(
                            tracefs.join("events/syscalls").join(&event).join("id"),
                        )
                        .unwrap_or_else(|err| panic!("tracepoint {event}: {err}"));
                        let mut attr = Hooks::event_attr(2, 0); // PERF_TYPE_TRACEPOINT
                        attr[8..16]
                            .copy_from_slice(&id.trim().parse::<u64>().unwrap().to_ne_bytes());
                        Hooks::open_with(&attr, &prog, &event)
                    })
                    .collect();
                Hooks {
                    _events: events,
                    _prog: prog,
                }
            }
            Floor::LibsslUprobes => {
                let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
                    .expect("the uprobe PMU")
                    .trim()
                    .parse()
                    .unwrap();
                let prog = Hooks::empty_program(Hooks::BPF_PROG_TYPE_KPROBE);
                let path = std::ffi::CString::new(libssl.as_os_str().as_encoded_bytes()).unwrap();
                let mut events = Vec::new();
                for (function, offset) in file_offsets(libssl, &LIBSSL_FUNCTIONS) {
                    for retprobe in [0u64, 1] {
                        let mut attr = Hooks::event_attr(pmu, retprobe);
                        attr[56..64].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
                        attr[64..72].copy_from_slice(&offset.to_ne_bytes());
                        events.push(Hooks::open_with(&attr, &prog, function));
                    }
                }
                Hooks {
                    _events: events,
                    _prog: prog,
                }
            }
        }
    }
}

/// An empty program on perf events (tracepoints or uprobes); detached on Drop.
struct Hooks {
    _events: Vec<std::os::fd::OwnedFd>,
    _prog: std::os::fd::OwnedFd,
}

impl Hooks {
    const BPF_PROG_TYPE_KPROBE: u32 = 2;
    const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;

    fn empty_program(prog_type: u32) -> std::os::fd::OwnedFd {
        use std::os::fd::{FromRawFd, OwnedFd};
        // r0 = 0; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..48 + EmptyProgram::NAME.len()].copy_from_slice(EmptyProgram::NAME.as_bytes());
        // SAFETY: bpf(2) BPF_PROG_LOAD with an attribute buffer of the size passed.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
        assert!(
            fd >= 0,
            "loading an empty program: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new descriptor that we own.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// `struct perf_event_attr` with type, size, config and sample_period 1.
    fn event_attr(kind: u32, config: u64) -> [u8; 128] {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&kind.to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&config.to_ne_bytes());
        attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
        attr
    }

    /// Opens the event for every process (on CPU 0: a BPF program on a tracepoint or uprobe
    /// runs wherever it fires) and runs `prog` on it.
    fn open_with(
        attr: &[u8; 128],
        prog: &std::os::fd::OwnedFd,
        what: &str,
    ) -> std::os::fd::OwnedFd {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: perf_event_open(2) reads the attribute buffer; the strings it points to live
        // across the call.
        let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), -1, 0, -1, 0) };
        assert!(
            fd >= 0,
            "perf_event_open {what}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new descriptor that we own.
        let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
        const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
        // SAFETY: ioctls on our perf event with a program descriptor.
        let set =
            unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) };
        assert!(
            set == 0,
            "attaching to {what}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above.
        unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) };
        event
    }
}

/// File offsets of `functions` (dynamic symbols) in the ELF file `path`, for uprobes.
fn file_offsets<'a>(path: &Path, functions: &[&'a str]) -> Vec<(&'a str, u64)> {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let data = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let file = object::File::parse(&*data).expect("an ELF library");
    functions
        .iter()
        .filter_map(|&function| {
            let address = file
                .dynamic_symbols()
                .find(|s| s.name().is_ok_and(|n| n == function))?
                .address();
            let segment = file
                .segments()
                .find(|s| (s.address()..s.address() + s.size()).contains(&address))?;
            Some((
                function,
                address - segment.address() + segment.file_range().0,
            ))
        })
        .collect()
}

/// The libssl that process `pid` maps.
fn libssl_of(pid: u32) -> PathBuf {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("/libssl.so"))
        .map(PathBuf::from)
        .expect("nginx maps a libssl")
}
