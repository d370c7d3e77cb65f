//! httpflow end to end: nginx and a Python `http.server` in one network namespace, curl, a
//! keep-alive client and `openssl s_client` in another, the daemon's real programs, and the
//! exact rows it posts. Byte counts are checked against what curl itself says it sent and
//! received (`-w %{size_*}`), latency against what curl measured.

mod common;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{Daemon, netns::NetPair, privileged, scratch, serial};
use fake_datakit::{FakeDataKit, FieldValue, Point};

const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const PY_PORT: u16 = 8000;
/// Bytes of the large page a client resets in the middle of.
const BIG_PAGE: usize = 8 << 20;
/// Bytes of the static page nginx serves.
const PAGE: usize = 3000;

/// The capture tier forced in these tests: `DKE_TEST_HTTPFLOW_TIER`, else `syscalls`, the only
/// one this host kernel (no trampolines) can run. `cargo xtask vm-test` runs them at the fentry
/// tier inside other kernels.
fn tier() -> String {
    std::env::var("DKE_TEST_HTTPFLOW_TIER").unwrap_or_else(|_| "syscalls".into())
}

fn start(dir: &Path, datakit: &FakeDataKit, l7: &str) -> Daemon {
    let apiserver = datakit.addr().to_string();
    let tier = tier();
    let mut daemon = Daemon::start(
        dir,
        &[
            "run",
            "--datakit-apiserver",
            &apiserver,
            "--enabled",
            "ebpf-net",
            "--l7net-enabled",
            l7,
            "--interval",
            "2s",
            "--min-interval",
            "1s",
            "--netflow-tier",
            "tracepoint",
            "--httpflow-tier",
            &tier,
            "--hostname",
            "hf-host",
            "--log-level",
            "debug",
        ],
    );
    // Generous: loading takes tens of seconds in vm-test's emulated guests.
    daemon.wait_log(
        &format!("httpflow: attached at the {tier} tier"),
        Duration::from_secs(120),
    );
    daemon
}

/// nginx (Debian's) in `ns`, on `ip`: a static page, 404 and 500 locations, and HTTPS with a
/// self-signed certificate made here. Killed on drop.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(pair: &NetPair, dir: &Path) -> Nginx {
        let www = dir.join("www");
        fs::create_dir_all(www.join("temp")).unwrap();
        fs::write(www.join("index.html"), "x".repeat(PAGE)).unwrap();
        fs::write(www.join("keep.html"), "k".repeat(100)).unwrap();
        fs::write(www.join("q.html"), "q".repeat(10)).unwrap();
        fs::write(www.join("big.html"), "b".repeat(BIG_PAGE)).unwrap();
        let (cert, key) = common::self_signed_certificate(dir, "httpflow-test");
        let ip = pair.b_v4;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log;\nevents {{ worker_connections 128; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 1000;\n\
               client_body_temp_path {d}/www/temp;\n  proxy_temp_path {d}/www/temp;\n\
               fastcgi_temp_path {d}/www/temp;\n  uwsgi_temp_path {d}/www/temp;\n\
               scgi_temp_path {d}/www/temp;\n\
               server {{\n    listen {ip}:{HTTP_PORT};\n    listen {ip}:{HTTPS_PORT} ssl;\n\
                 ssl_certificate {};\n    ssl_certificate_key {};\n    root {d}/www;\n\
                 location = /fail {{ return 500; }}\n  }}\n}}\n",
            cert.display(),
            key.display()
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "nginx", "-c"])
            .arg(&conf_path)
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx)");
        wait_listening(pair, ip.into(), HTTP_PORT);
        Nginx { child }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python `http.server` handler that reads POST bodies (with `100 Continue`) and answers.
const PY_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        while n > 0:
            n -= len(self.rfile.read(min(n, 65536)))
        body = b"stored\n"
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

struct PyServer {
    child: Child,
}

impl PyServer {
    fn start(pair: &NetPair, dir: &Path) -> PyServer {
        let script = dir.join("server.py");
        fs::write(&script, PY_SERVER).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "/usr/bin/python3"])
            .arg(&script)
            .arg(pair.b_v4.to_string())
            .arg(PY_PORT.to_string())
            .spawn()
            .expect("python3 (Debian package python3)");
        wait_listening(pair, pair.b_v4.into(), PY_PORT);
        PyServer { child }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(pair: &NetPair, ip: IpAddr, port: u16) {
    let ns = pair.a.name.clone();
    // 60 s: python starts slowly under software emulation (vm-test) on a busy host.
    let ok = common::wait_until(Duration::from_secs(60), || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{ip}/{port}"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(ok, "nothing listens on {ip}:{port}");
}

/// What curl reports for one transfer.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    code: u16,
    /// Request head + body bytes curl sent.
    sent: i64,
    /// Response heads (interim ones included) + body bytes curl received.
    received: i64,
    time_total_ns: i64,
    new_connections: i64,
}

/// Runs curl in `pair.a` with `args` (URLs and their options); one Transfer per URL.
fn curl(pair: &NetPair, args: &[String]) -> Vec<Transfer> {
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.a.name, "curl", "-s", "-k", "-w"])
        .arg(
            "%{http_code} %{size_request} %{size_upload} %{size_header} %{size_download} \
             %{time_total} %{num_connects}\\n",
        )
        .args(args)
        .output()
        .expect("curl (Debian package curl)");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let v: Vec<&str> = line.split(' ').collect();
            let n = |i: usize| v[i].parse::<i64>().unwrap();
            Transfer {
                code: v[0].parse().unwrap(),
                sent: n(1) + n(2),
                received: n(3) + n(4),
                time_total_ns: (v[5].parse::<f64>().unwrap() * 1e9) as i64,
                new_connections: n(6),
            }
        })
        .collect()
}

fn url(ip: Ipv4Addr, port: u16, path: &str) -> String {
    let scheme = if port == HTTPS_PORT { "https" } else { "http" };
    format!("{scheme}://{ip}:{port}{path}")
}

/// One GET per call of curl (its own connection), body discarded.
fn get(pair: &NetPair, port: u16, path: &str) -> Transfer {
    curl(
        pair,
        &["-o".into(), "/dev/null".into(), url(pair.b_v4, port, path)],
    )[0]
}

fn httpflow(points: &[Point]) -> Vec<&Point> {
    points
        .iter()
        .filter(|p| p.measurement == "httpflow")
        .collect()
}

/// The rows of one side of the exchanges with `path` on `port` (client: in namespace a,
/// outgoing; server: in b, incoming), over all intervals.
fn rows<'a>(
    points: &'a [Point],
    pair: &NetPair,
    client: bool,
    port: u16,
    path: &str,
) -> Vec<&'a Point> {
    rows_of(points, pair, client, port, path, None)
}

/// `rows`, of one method only when `method` is given.
fn rows_of<'a>(
    points: &'a [Point],
    pair: &NetPair,
    client: bool,
    port: u16,
    path: &str,
    method: Option<&str>,
) -> Vec<&'a Point> {
    let (ns, direction, port_tag) = if client {
        (pair.a.inode(), "outgoing", "dst_port")
    } else {
        (pair.b.inode(), "incoming", "src_port")
    };
    httpflow(points)
        .into_iter()
        .filter(|p| {
            p.tag("netns") == Some(ns.to_string().as_str())
                && p.tag("direction") == Some(direction)
                && p.tag(port_tag) == Some(port.to_string().as_str())
                && p.str("path") == Some(path)
                && method.is_none_or(|m| p.str("method") == Some(m))
        })
        .collect()
}

fn sum(rows: &[&Point], field: &str) -> i64 {
    rows.iter().map(|p| p.int(field).unwrap_or(0)).sum()
}

/// What one side's rows for a path must add up to.
struct Expect<'a> {
    port: u16,
    path: &'a str,
    method: &'a str,
    status: i64,
    count: i64,
    /// From the client's view.
    written: i64,
    read: i64,
    truncated: bool,
    client_process: &'a str,
    server_process: &'a str,
}

fn wait_rows(datakit: &FakeDataKit, daemon: &Daemon, pair: &NetPair, e: &Expect) -> Vec<Point> {
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        [true, false].iter().all(|&client| {
            sum(
                &rows_of(pts, pair, client, e.port, e.path, Some(e.method)),
                "count",
            ) >= e.count
        })
    });
    for client in [true, false] {
        let side = rows_of(&points, pair, client, e.port, e.path, Some(e.method));
        let what = format!(
            "{} {} {}: rows {side:#?}\nlog:\n{}",
            if client { "client" } else { "server" },
            e.method,
            e.path,
            daemon.log_text()
        );
        let (written, read) = if client {
            (e.written, e.read)
        } else {
            (e.read, e.written)
        };
        // Exact, unless the kernel skipped both twins of a program for some call (preemptible
        // trampolines, 7.x): then short by at most the calls the daemon says it lost.
        let lost = calls_lost_at_most(daemon);
        if lost == 0 {
            assert_eq!(sum(&side, "count"), e.count, "count, {what}");
            assert_eq!(
                sum(&side, "bytes_written"),
                written,
                "bytes_written, {what}"
            );
            assert_eq!(sum(&side, "bytes_read"), read, "bytes_read, {what}");
            // The same bytes by role, whichever end reports them.
            assert_eq!(sum(&side, "client_sent"), e.written, "client_sent, {what}");
            assert_eq!(sum(&side, "server_sent"), e.read, "server_sent, {what}");
        } else {
            let count = sum(&side, "count");
            assert!(
                count <= e.count && count + lost as i64 >= e.count,
                "count {count}, expected {} less at most {lost} lost calls, {what}",
                e.count
            );
            assert!(
                sum(&side, "bytes_written") <= written,
                "bytes_written, {what}"
            );
            assert!(sum(&side, "bytes_read") <= read, "bytes_read, {what}");
        }
        for row in &side {
            assert_eq!(row.str("method"), Some(e.method), "{what}");
            assert_eq!(row.int("status_code"), Some(e.status), "{what}");
            assert_eq!(row.str("http_version"), Some("1.1"), "{what}");
            assert_eq!(
                row.field("truncated"),
                Some(&FieldValue::B(e.truncated)),
                "{what}"
            );
            assert_eq!(row.tag("transport"), Some("tcp"));
            assert_eq!(row.tag("family"), Some("IPv4"));
            assert_eq!(row.tag("host"), Some("hf-host"));
            assert_eq!(row.category, "network");
            assert_eq!(row.input, "ebpf-net/httpflow");
            let b = pair.b_v4.to_string();
            let a = pair.a_v4.to_string();
            assert_eq!(row.tag("server_ip"), Some(b.as_str()));
            assert_eq!(row.tag("client_ip"), Some(a.as_str()));
            assert_eq!(row.tag("server_port"), Some(e.port.to_string().as_str()));
            assert_eq!(row.tag("client_port"), Some("*"));
            if client {
                assert_eq!(row.tag("src_ip"), Some(a.as_str()));
                assert_eq!(row.tag("src_port"), Some("*"));
                assert_eq!(row.tag("conn_side"), Some("client"));
                assert_eq!(row.tag("process_name"), Some(e.client_process), "{what}");
            } else {
                assert_eq!(row.tag("src_ip"), Some(b.as_str()));
                assert_eq!(row.tag("dst_port"), Some("*"));
                assert_eq!(row.tag("conn_side"), Some("server"));
                assert_eq!(row.tag("process_name"), Some(e.server_process), "{what}");
            }
            assert!(row.int("latency").unwrap() > 0, "{what}");
        }
    }
    points
}

fn setup(name: &str) -> (PathBuf, NetPair) {
    let dir = scratch(name);
    let pair = NetPair::create(name);
    (dir, pair)
}

/// Client-measured latency bound: the row's mean latency is at most curl's total time.
fn assert_latency_within(points: &[Point], pair: &NetPair, port: u16, path: &str, t: &Transfer) {
    for row in rows(points, pair, true, port, path) {
        let latency = row.int("latency").unwrap();
        assert!(
            latency > 0 && latency <= t.time_total_ns,
            "{path}: latency {latency} ns, curl measured {} ns in all",
            t.time_total_ns
        );
    }
}

#[test]
fn plain_http_exact_rows() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-plain");
    let _nginx = Nginx::start(&pair, &dir);
    let _py = PyServer::start(&pair, &dir);
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, "httpflow");
    let expect = |port, path, method, status, count, written, read, truncated, client| Expect {
        port,
        path,
        method,
        status,
        count,
        written,
        read,
        truncated,
        client_process: client,
        server_process: if port == PY_PORT { "python3" } else { "nginx" },
    };

    // GET 200.
    let t = get(&pair, HTTP_PORT, "/index.html");
    assert_eq!(t.code, 200);
    assert!(t.received > PAGE as i64);
    let points = wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            HTTP_PORT,
            "/index.html",
            "GET",
            200,
            1,
            t.sent,
            t.received,
            false,
            "curl",
        ),
    );
    assert_latency_within(&points, &pair, HTTP_PORT, "/index.html", &t);

    // 404 and 500.
    let t = get(&pair, HTTP_PORT, "/missing");
    assert_eq!(t.code, 404);
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            HTTP_PORT, "/missing", "GET", 404, 1, t.sent, t.received, false, "curl",
        ),
    );
    let t = get(&pair, HTTP_PORT, "/fail");
    assert_eq!(t.code, 500);
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            HTTP_PORT, "/fail", "GET", 500, 1, t.sent, t.received, false, "curl",
        ),
    );

    // A query string is not part of the path.
    let t = get(&pair, HTTP_PORT, "/q.html?id=42&x=y");
    assert_eq!(t.code, 200);
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            HTTP_PORT, "/q.html", "GET", 200, 1, t.sent, t.received, false, "curl",
        ),
    );

    // 20 requests on one keep-alive connection (curl reuses it for URLs on one command line).
    let mut args = Vec::new();
    for _ in 0..20 {
        args.extend(["-o".to_string(), "/dev/null".to_string()]);
        args.push(url(pair.b_v4, HTTP_PORT, "/keep.html"));
    }
    let ts = curl(&pair, &args);
    assert_eq!(ts.len(), 20);
    assert_eq!(
        ts.iter().map(|t| t.new_connections).sum::<i64>(),
        1,
        "one connection"
    );
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            HTTP_PORT,
            "/keep.html",
            "GET",
            200,
            20,
            ts.iter().map(|t| t.sent).sum(),
            ts.iter().map(|t| t.received).sum(),
            false,
            "curl",
        ),
    );

    // POST with a 1 MiB body (curl sends `Expect: 100-continue`; the server answers 100 first).
    let body = dir.join("body.bin");
    fs::write(&body, vec![b'b'; 1 << 20]).unwrap();
    let t = curl(
        &pair,
        &[
            "-o".into(),
            "/dev/null".into(),
            "--data-binary".into(),
            format!("@{}", body.display()),
            url(pair.b_v4, PY_PORT, "/upload"),
        ],
    )[0];
    assert_eq!(t.code, 201);
    assert!(t.sent > 1 << 20);
    let points = wait_rows(
        &datakit,
        &daemon,
        &pair,
        &expect(
            PY_PORT, "/upload", "POST", 201, 1, t.sent, t.received, false, "curl",
        ),
    );
    assert_latency_within(&points, &pair, PY_PORT, "/upload", &t);

    // A path longer than the capture (1 KiB): the request head did not fit the capture of
    // the client's write nor of nginx's read, so both rows say truncated; the path is what
    // was captured, cut at 256 bytes; the sizes are still the real ones.
    let long = format!("/long/{}", "a".repeat(2000));
    let t = get(&pair, HTTP_PORT, &long);
    assert_eq!(t.code, 404);
    let cut = &long[..256];
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        [true, false]
            .iter()
            .all(|&c| sum(&rows(pts, &pair, c, HTTP_PORT, cut), "count") >= 1)
    });
    for client in [true, false] {
        let side = rows(&points, &pair, client, HTTP_PORT, cut);
        assert_eq!(sum(&side, "count"), 1, "{side:#?}");
        let (written, read) = if client {
            (t.sent, t.received)
        } else {
            (t.received, t.sent)
        };
        assert_eq!(sum(&side, "bytes_written"), written, "{side:#?}");
        assert_eq!(sum(&side, "bytes_read"), read, "{side:#?}");
        assert_eq!(side[0].field("truncated"), Some(&FieldValue::B(true)));
        assert_eq!(side[0].int("status_code"), Some(404));
    }
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
    // Every exchange above was parsed in the kernel (each seen from both ends): 1 + 2 + 1 + 20
    // + 1 + 1 requests, plus the daemon's own posts as the fake DataKit served them; nothing
    // needed userspace framing.
    // A call the kernel skipped (7.2's lazy preemption; the daemon reports each) can lose its
    // exchange, or make a request look pipelined: that connection is then framed in userspace.
    let (exchanges, fallbacks) = kernel_counts(&daemon);
    assert!(
        exchanges >= 2 * 26 || (exchanges > 0 && calls_possibly_lost(&daemon)),
        "{exchanges} exchanges"
    );
    assert!(
        fallbacks == 0 || calls_possibly_lost(&daemon),
        "{fallbacks} connections handed to userspace"
    );
}

/// The kernel parser's totals from the daemon's last report: (exchanges parsed in the kernel,
/// connections handed to userspace framing).
fn kernel_counts(daemon: &Daemon) -> (u64, u64) {
    let log = daemon.log_text();
    let line = log
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once("httpflow: in the kernel: ")
                .map(|(_, rest)| rest)
        })
        .unwrap_or_else(|| panic!("no in-kernel counters in the daemon log:\n{log}"));
    let number = |after: &str| -> u64 {
        line.split(after)
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (number(" exchanges"), number(" connections handed"))
}

/// Whether the daemon reported program runs the kernel skipped (missed calls, or skips of a
/// hook's twins: on 7.2 both twins of a hook can be skipped for different calls of one
/// exchange).
/// The daemon's running total of calls the kernel may have lost ("totals N covered, at most M
/// lost": both twins of a program skipped for one call), 0 when it reported none.
fn calls_lost_at_most(daemon: &Daemon) -> u64 {
    daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("httpflow: ") && l.contains("totals "))
        .filter_map(|l| {
            let totals = l.split("totals ").nth(1)?;
            totals
                .split("at most ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn calls_possibly_lost(daemon: &Daemon) -> bool {
    daemon.log_text().lines().any(|l| {
        l.contains("httpflow: ")
            && (l.contains("calls missed")
                || l.contains("program runs skipped by the kernel")
                || l.split("at most ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .is_some_and(|n| n != "0"))
    })
}

/// No error or warning from httpflow (netflow may say it cannot run on kernels before 6.3).
fn assert_no_httpflow_complaints(daemon: &Daemon) {
    let log = daemon.log_text();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains(" ERROR ") || l.contains(" WARN ")) && l.contains("httpflow"))
        .collect();
    assert!(complaints.is_empty(), "{log}");
}

/// `openssl s_client` as an interactive HTTPS client: started before the daemon, used after.
struct SClient {
    child: Child,
}

impl SClient {
    fn start(pair: &NetPair) -> SClient {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.a.name,
                "openssl",
                "s_client",
                "-quiet",
                "-crlf",
            ])
            .arg("-connect")
            .arg(format!("{}:{HTTPS_PORT}", pair.b_v4))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        SClient { child }
    }

    /// Sends a GET line by line (one SSL_write per line) and reads the response; returns the
    /// request and response sizes.
    fn get(&mut self, path: &str) -> (i64, i64) {
        let stdin = self.child.stdin.as_mut().unwrap();
        let lines = [
            format!("GET {path} HTTP/1.1"),
            "Host: s".into(),
            String::new(),
        ];
        let mut sent = 0;
        for line in &lines {
            stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
            stdin.flush().unwrap();
            sent += line.len() as i64 + 2;
            std::thread::sleep(Duration::from_millis(50));
        }
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stdout.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "s_client closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                if got.len() >= end + 4 + len {
                    return (sent, got.len() as i64);
                }
            }
        }
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_through_openssl_uprobes() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-tls");
    let _nginx = Nginx::start(&pair, &dir);
    // A client started before the daemon (its connection too).
    let mut early = SClient::start(&pair);
    std::thread::sleep(Duration::from_millis(500));
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, "httpflow,httpflow-tls");
    daemon.wait_log("httpflow-tls: attached to", Duration::from_secs(10));

    let (sent, received) = early.get("/index.html");
    let both = |port, path, method, client_process| Expect {
        port,
        path,
        method,
        status: 200,
        count: 1,
        written: sent,
        read: received,
        truncated: false,
        client_process,
        server_process: "nginx",
    };
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &both(HTTPS_PORT, "/index.html", "GET", "openssl"),
    );

    // A client started after the daemon: the same rows as plain HTTP.
    let t = get(&pair, HTTPS_PORT, "/q.html?a=1");
    assert_eq!(t.code, 200);
    let points = wait_rows(
        &datakit,
        &daemon,
        &pair,
        &Expect {
            written: t.sent,
            read: t.received,
            ..both(HTTPS_PORT, "/q.html", "GET", "curl")
        },
    );
    assert_latency_within(&points, &pair, HTTPS_PORT, "/q.html", &t);
    let t = get(&pair, HTTPS_PORT, "/fail");
    assert_eq!(t.code, 500);
    wait_rows(
        &datakit,
        &daemon,
        &pair,
        &Expect {
            status: 500,
            written: t.sent,
            read: t.received,
            ..both(HTTPS_PORT, "/fail", "GET", "curl")
        },
    );
    drop(early);
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
    // The plain text was parsed by the same kernel state machine: three exchanges, both ends.
    let (exchanges, fallbacks) = kernel_counts(&daemon);
    assert!(exchanges >= 2 * 3, "{exchanges} exchanges");
    assert_eq!(fallbacks, 0);
}

#[test]
fn non_http_bytes_make_no_rows() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-noise");
    let _nginx = Nginx::start(&pair, &dir);
    let datakit = FakeDataKit::start();
    // httpflow without the TLS uprobes: HTTPS is only ciphertext to it.
    let mut daemon = start(&dir, &datakit, "httpflow");
    for _ in 0..3 {
        assert_eq!(get(&pair, HTTPS_PORT, "/index.html").code, 200);
    }
    // Random bytes both ways over plain TCP.
    let ex = common::netns::tcp_exchange(&pair, pair.b_v4.into(), 0, 200_000, 300_000);
    assert!(ex.server_local.port() > 0);
    // One plain request afterwards proves the daemon was looking.
    assert_eq!(get(&pair, HTTP_PORT, "/index.html").code, 200);
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        !rows(pts, &pair, true, HTTP_PORT, "/index.html").is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
    let points: Vec<Point> = points.into_iter().chain(datakit.points()).collect();
    let ns = [pair.a.inode().to_string(), pair.b.inode().to_string()];
    let stray: Vec<&Point> = httpflow(&points)
        .into_iter()
        .filter(|p| p.tag("netns").is_some_and(|n| ns.iter().any(|x| x == n)))
        .filter(|p| p.str("path") != Some("/index.html") || p.tag("server_port") != Some("8080"))
        .collect();
    assert!(stray.is_empty(), "{stray:#?}");
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
}

/// Sends `parts` as separate writes, then reads one response (`head_only`: no body, as for
/// HEAD); returns (bytes written, bytes read).
fn exchange(
    stream: &mut std::net::TcpStream,
    parts: &[&[u8]],
    responses: usize,
    head_only: bool,
) -> (i64, i64) {
    let mut sent = 0;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        stream.write_all(part).unwrap();
        sent += part.len() as i64;
    }
    let mut got: Vec<u8> = Vec::new();
    let mut read = 0;
    for _ in 0..responses {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let len: usize = if head_only {
                    0
                } else {
                    head.lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap()
                };
                if got.len() >= end + 4 + len {
                    let n = end + 4 + len;
                    read += n as i64;
                    got.drain(..n);
                    break;
                }
            }
            let mut buf = [0u8; 16384];
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "server closed");
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert!(got.is_empty());
    (sent, read)
}

/// A thousand short connections, one exchange each, one after the other: on half of them the
/// server closes first (`Connection: close`), on the others the client does. Socket memory is
/// reused from one connection to the next (the state of the last must be gone), and every
/// exchange is counted once, with exact bytes, at both ends, parsed in the kernel.
#[test]
fn thousand_short_connections_either_side_closing_first() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-short");
    let _nginx = Nginx::start(&pair, &dir);
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, "httpflow");
    let server = std::net::SocketAddr::new(pair.b_v4.into(), HTTP_PORT);
    const CONNECTIONS: usize = 1000;
    // (written, read) per case: [client closes first, server closes first].
    let mut totals = [(0i64, 0i64); 2];
    for i in 0..CONNECTIONS {
        let server_closes = i % 2 == 1;
        let request = if server_closes {
            "GET /keep.html HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
        } else {
            "GET /q.html HTTP/1.1\r\nHost: s\r\n\r\n"
        };
        let mut stream = common::netns::tcp_connect(&pair.a, server);
        let (w, r) = exchange(&mut stream, &[request.as_bytes()], 1, false);
        if server_closes {
            // nginx's FIN before ours.
            let mut rest = [0u8; 64];
            assert_eq!(
                stream.read(&mut rest).unwrap(),
                0,
                "nginx kept the connection"
            );
        }
        drop(stream);
        let t = &mut totals[server_closes as usize];
        *t = (t.0 + w, t.1 + r);
    }
    let me = process_name();
    for (path, (written, read)) in [("/q.html", totals[0]), ("/keep.html", totals[1])] {
        wait_rows(
            &datakit,
            &daemon,
            &pair,
            &Expect {
                port: HTTP_PORT,
                path,
                method: "GET",
                status: 200,
                count: (CONNECTIONS / 2) as i64,
                written,
                read,
                truncated: false,
                client_process: &me,
                server_process: "nginx",
            },
        );
    }
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
    let (exchanges, fallbacks) = kernel_counts(&daemon);
    assert!(
        exchanges >= 2 * CONNECTIONS as u64 || calls_possibly_lost(&daemon),
        "{exchanges} exchanges"
    );
    assert!(
        fallbacks == 0 || calls_possibly_lost(&daemon),
        "{fallbacks} connections handed to userspace"
    );
}

/// A client that resets its connection (SO_LINGER 0) after reading part of a large response:
/// the exchange ends with the connection, counted once at each end, with the bytes that really
/// moved on the client's side, and the request exactly on the server's.
#[test]
fn client_reset_in_the_middle_of_a_response() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-reset");
    let _nginx = Nginx::start(&pair, &dir);
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, "httpflow");
    let server = std::net::SocketAddr::new(pair.b_v4.into(), HTTP_PORT);
    let mut stream = common::netns::tcp_connect(&pair.a, server);
    let request = b"GET /big.html HTTP/1.1\r\nHost: r\r\n\r\n";
    stream.write_all(request).unwrap();
    let mut read = 0usize;
    let mut buf = [0u8; 65536];
    while read < 256 * 1024 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "nginx closed");
        read += n;
    }
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(stream);
    let me = process_name();
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        [true, false].iter().all(|&client| {
            sum(
                &rows_of(pts, &pair, client, HTTP_PORT, "/big.html", Some("GET")),
                "count",
            ) >= 1
        })
    });
    let client = rows_of(&points, &pair, true, HTTP_PORT, "/big.html", Some("GET"));
    let server = rows_of(&points, &pair, false, HTTP_PORT, "/big.html", Some("GET"));
    let log = daemon.log_text();
    assert_eq!(sum(&client, "count"), 1, "{client:#?}\n{log}");
    assert_eq!(
        sum(&client, "bytes_written"),
        request.len() as i64,
        "{client:#?}"
    );
    assert_eq!(sum(&client, "bytes_read"), read as i64, "{client:#?}");
    assert_eq!(client[0].tag("process_name"), Some(me.as_str()));
    assert_eq!(sum(&server, "count"), 1, "{server:#?}\n{log}");
    assert_eq!(
        sum(&server, "bytes_read"),
        request.len() as i64,
        "{server:#?}"
    );
    // nginx's head, and whatever of its sendfile calls returned before the reset closed the
    // connection: a call still under way then counts toward no exchange (the exchange ended
    // with the connection).
    let served = sum(&server, "bytes_written");
    assert!(
        served > 0 && served < (BIG_PAGE + 1024) as i64,
        "nginx wrote {served}, the client read {read}"
    );
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
}

/// This test process's name as httpflow reports it (argv[0]'s basename: the kernel's comm is
/// cut at 15 bytes).
fn process_name() -> String {
    let argv0 = std::env::args().next().unwrap();
    argv0.rsplit('/').next().unwrap().to_string()
}

#[test]
fn keep_alive_client_pipelining_split_writes_and_head() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let (dir, pair) = setup("hf-keep");
    let _nginx = Nginx::start(&pair, &dir);
    let datakit = FakeDataKit::start();
    let mut daemon = start(&dir, &datakit, "httpflow");
    let server = std::net::SocketAddr::new(pair.b_v4.into(), HTTP_PORT);
    let mut stream = common::netns::tcp_connect(&pair.a, server);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: k\r\n\r\n").into_bytes();

    // Sequential requests on one connection.
    let mut keep = (0, 0);
    for _ in 0..5 {
        let (w, r) = exchange(&mut stream, &[&get("/keep.html")], 1, false);
        keep = (keep.0 + w, keep.1 + r);
    }
    // Three pipelined requests in one write.
    let three = [get("/q.html"), get("/q.html"), get("/q.html")].concat();
    let pipelined = exchange(&mut stream, &[&three], 3, false);
    // One request head split across three writes.
    let split = get("/index.html");
    let split = exchange(
        &mut stream,
        &[&split[..7], &split[7..20], &split[20..]],
        1,
        false,
    );
    // HEAD: the response announces a length but carries no body.
    let head = exchange(
        &mut stream,
        &[b"HEAD /index.html HTTP/1.1\r\nHost: k\r\n\r\n"],
        1,
        true,
    );
    let me = process_name();
    for (path, method, count, (written, read)) in [
        ("/keep.html", "GET", 5, keep),
        ("/q.html", "GET", 3, pipelined),
        ("/index.html", "GET", 1, split),
        ("/index.html", "HEAD", 1, head),
    ] {
        wait_rows(
            &datakit,
            &daemon,
            &pair,
            &Expect {
                port: HTTP_PORT,
                path,
                method,
                status: 200,
                count,
                written,
                read,
                truncated: false,
                client_process: &me,
                server_process: "nginx",
            },
        );
    }
    drop(stream);
    assert!(daemon.terminate().success());
    assert_no_httpflow_complaints(&daemon);
    // The pipelined burst handed the client's and nginx's connection ends to userspace
    // framing (counted); the five exchanges before it were parsed in the kernel, both ends.
    let (exchanges, fallbacks) = kernel_counts(&daemon);
    assert!(exchanges >= 2 * 5, "{exchanges} exchanges");
    assert_eq!(fallbacks, 2);
}
