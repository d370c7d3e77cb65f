//! `fake-datakit [--listen ADDR]`: runs the fake DataKit API (default `127.0.0.1:9529`) and prints
//! each accepted line and each rejected request to stdout.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use fake_datakit::FakeDataKit;

const USAGE: &str = "usage: fake-datakit [--listen ADDR]   (default 127.0.0.1:9529)";

fn main() {
    let mut listen = "127.0.0.1:9529".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" | "-l" => match args.next() {
                Some(v) => listen = v,
                None => exit_usage("--listen needs a value"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => match a.strip_prefix("--listen=") {
                Some(v) => listen = v.to_string(),
                None => exit_usage(&format!("unknown argument `{a}`")),
            },
        }
    }
    let addr: SocketAddr = listen
        .parse()
        .unwrap_or_else(|e| exit_usage(&format!("bad address `{listen}`: {e}")));
    let dk = FakeDataKit::start_on(addr).unwrap_or_else(|e| {
        eprintln!("fake-datakit: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    println!("fake-datakit listening on {}", dk.url());

    let mut seen = 0;
    loop {
        let new = dk.requests_since(seen);
        seen += new.len();
        let mut out = std::io::stdout().lock();
        for r in new {
            let query = format!(
                "input={} precision={}",
                r.input.as_deref().unwrap_or("-"),
                r.precision.as_deref().unwrap_or("-")
            );
            if r.status != 200 {
                let _ = writeln!(
                    out,
                    "REJECT {} {} {query} -> {} {}: {}",
                    r.method,
                    r.path,
                    r.status,
                    r.error.as_deref().unwrap_or("-"),
                    r.message.as_deref().unwrap_or("-"),
                );
            } else if let Some(cat) = &r.category {
                let body = String::from_utf8_lossy(&r.body);
                for line in body.lines() {
                    let t = line.trim();
                    if !t.is_empty() && !t.starts_with('#') {
                        let _ = writeln!(out, "[{cat} {query}] {line}");
                    }
                }
            } else if r.path == "/v1/lasterror" {
                let _ = writeln!(out, "LASTERROR {}", String::from_utf8_lossy(&r.body));
            }
        }
        let _ = out.flush();
        drop(out);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exit_usage(msg: &str) -> ! {
    eprintln!("fake-datakit: {msg}\n{USAGE}");
    std::process::exit(2);
}
