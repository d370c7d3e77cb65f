//! Black-box tests of the fake DataKit over real HTTP (a tiny std TcpStream client).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fake_datakit::{FakeDataKit, FieldValue};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

fn read_reply(r: &mut impl BufRead) -> Reply {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_reply(&mut BufReader::new(s))
}

fn post(dk: &FakeDataKit, target: &str, body: &str) -> Reply {
    request(
        dk.addr(),
        "POST",
        target,
        &[("Content-Type", "application/line-protocol")],
        body.as_bytes(),
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

const ESCAPED: &str = r#"measurement\,x,tag\ key=va\=l\,ue field="a \"q\" \\ b",i=-3i,u=4u,f=1.5,b=true 1700000000000000000"#;

#[test]
fn accepts_all_field_types_and_escapes() {
    let dk = FakeDataKit::start();
    let r = post(
        &dk,
        "/v1/write/network?input=ebpf-net%2Fnetflow&precision=n",
        &format!("# comment\n\n{ESCAPED}\nm2 v=1i\n"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "");
    assert_eq!(r.header("X-DataKit"), Some("1.82.0/fake"));

    let pts = dk.points();
    assert_eq!(pts.len(), 2);
    let p = &pts[0];
    assert_eq!(p.category, "network");
    assert_eq!(p.input, "ebpf-net/netflow");
    assert_eq!(p.measurement, "measurement,x");
    assert_eq!(p.tag("tag key"), Some("va=l,ue"));
    assert_eq!(p.tags.len(), 1);
    assert_eq!(p.str("field"), Some(r#"a "q" \ b"#));
    assert_eq!(p.int("i"), Some(-3));
    assert_eq!(p.field("u"), Some(&FieldValue::U(4)));
    assert_eq!(p.field("f"), Some(&FieldValue::F(1.5)));
    assert_eq!(p.field("b"), Some(&FieldValue::B(true)));
    assert_eq!(p.int("u"), None, "int() is strict about the type");
    assert_eq!(p.timestamp, Some(1_700_000_000_000_000_000));
    assert_eq!(pts[1].measurement, "m2");
    assert_eq!(pts[1].timestamp, None);

    let reqs = dk.requests();
    assert_eq!(reqs.len(), 1);
    let q = &reqs[0];
    assert_eq!(q.method, "POST");
    assert_eq!(q.path, "/v1/write/network");
    assert_eq!(q.category.as_deref(), Some("network"));
    assert_eq!(q.input.as_deref(), Some("ebpf-net/netflow"));
    assert_eq!(q.precision.as_deref(), Some("n"));
    assert_eq!(q.content_type.as_deref(), Some("application/line-protocol"));
    assert_eq!(q.status, 200);
    assert_eq!(q.error, None);
    assert_eq!(q.points, 2);
}

#[test]
fn gzip_body_is_decompressed() {
    let dk = FakeDataKit::start();
    let lp = "netflow,src_ip=1.2.3.4 bytes_read=10i 1\nnetflow,src_ip=5.6.7.8 bytes_read=20i 2\n";
    let r = request(
        dk.addr(),
        "POST",
        "/v1/write/network?input=x",
        &[("Content-Encoding", "gzip")],
        &gzip(lp.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let pts = dk.points();
    assert_eq!(pts.len(), 2);
    assert_eq!(pts[1].int("bytes_read"), Some(20));
    let q = &dk.requests()[0];
    assert_eq!(q.content_encoding.as_deref(), Some("gzip"));
    assert_eq!(q.body, lp.as_bytes(), "body is recorded decompressed");
    assert_eq!(q.content_type, None);
}

#[test]
fn broken_gzip_and_unknown_encoding_are_rejected() {
    let dk = FakeDataKit::start();
    for enc in ["gzip", "compress"] {
        let r = request(
            dk.addr(),
            "POST",
            "/v1/write/network",
            &[("Content-Encoding", enc)],
            b"m f=1i",
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error_code"], "datakit.decodeBodyFailed");
    }
    assert!(dk.points().is_empty());
}

#[test]
fn one_bad_line_rejects_the_whole_request() {
    let dk = FakeDataKit::start();
    let r = post(&dk, "/v1/write/logging", "ok f=1i\nbad line here\nok2 f=2i");
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error_code"], "datakit.invalidLinePoint");
    assert!(
        v["message"].as_str().unwrap().contains("bad line here"),
        "{v}"
    );
    assert!(dk.points().is_empty());
    let q = &dk.requests()[0];
    assert_eq!(q.status, 400);
    assert_eq!(q.error.as_deref(), Some("datakit.invalidLinePoint"));
    assert!(q.message.as_deref().unwrap().contains("line 2"));
    assert_eq!(q.points, 0);
}

#[test]
fn empty_tag_value_is_rejected() {
    let dk = FakeDataKit::start();
    let r = post(&dk, "/v1/write/network", "m,process_name= f=1i");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "datakit.invalidLinePoint");
    assert!(dk.points().is_empty());
}

#[test]
fn tag_and_field_with_same_key_is_rejected() {
    let dk = FakeDataKit::start();
    let r = post(&dk, "/v1/write/network", "m,k=v k=1i");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "datakit.invalidLinePoint");
    assert!(dk.points().is_empty());
}

#[test]
fn unknown_category_empty_body_and_no_points() {
    let dk = FakeDataKit::start();
    for cat in ["metrics", "profiling"] {
        let r = post(&dk, &format!("/v1/write/{cat}"), "m f=1i");
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error_code"], "datakit.invalidCategory");
    }
    let r = request(
        dk.addr(),
        "POST",
        "/v1/write/network",
        &[("Content-Type", "application/json")],
        b"m f=1i",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "datakit.invalidJsonPoint");
    let r = request(
        dk.addr(),
        "POST",
        "/v1/write/network",
        &[("Content-Type", "text/plain")],
        b"m f=1i",
    );
    assert_eq!(r.status, 200, "any other type means line protocol");
    dk.clear();
    let r = post(&dk, "/v1/write/network", "");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "datakit.emptyBody");
    let r = post(&dk, "/v1/write/network", "# only a comment\n\n");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "datakit.noPoints");
    assert!(dk.points().is_empty());
    assert_eq!(dk.requests().len(), 2);
}

#[test]
fn precision_is_recorded_and_checked() {
    let dk = FakeDataKit::start();
    assert_eq!(
        post(&dk, "/v1/write/metric?precision=ms", "m f=1i 1700000000000").status,
        200
    );
    assert_eq!(
        post(&dk, "/v1/write/metric?precision=xs", "m f=1i 1").status,
        400
    );
    let reqs = dk.requests();
    assert_eq!(reqs[0].precision.as_deref(), Some("ms"));
    assert_eq!(reqs[1].precision.as_deref(), Some("xs"));
    assert_eq!(reqs[1].status, 400);
    assert_eq!(dk.points()[0].timestamp, Some(1_700_000_000_000));
    assert_eq!(dk.points().len(), 1);
}

#[test]
fn fail_next_answers_n_failures_then_recovers() {
    let dk = FakeDataKit::start();
    dk.fail_next(500, 2);
    let statuses: Vec<u16> = (0..3)
        .map(|_| post(&dk, "/v1/write/network", "m f=1i").status)
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert_eq!(dk.points().len(), 1);
    let reqs = dk.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].points, 0);
    assert!(reqs[0].error.is_some());

    dk.fail_next(429, 1);
    let r = post(&dk, "/v1/write/network", "m f=1i");
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error_code"], "datakit.reachMaxAPILimit");
    dk.fail_next(408, 1);
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 408);
    // Only write requests consume failures.
    dk.fail_next(503, 1);
    assert_eq!(request(dk.addr(), "GET", "/v1/ping", &[], b"").status, 200);
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 503);
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 200);
    assert_eq!(dk.points().len(), 2);
}

#[test]
fn lasterror_is_recorded() {
    let dk = FakeDataKit::start();
    let body = r#"{"input":"ebpf","source":"ebpf","err_content":"probe failed"}"#;
    let r = request(
        dk.addr(),
        "POST",
        "/v1/lasterror",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "");
    let bad = request(
        dk.addr(),
        "POST",
        "/v1/lasterror",
        &[],
        br#"{"input":"ebpf","err_content":""}"#,
    );
    assert!((500..600).contains(&bad.status));
    let errs = dk.last_errors();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["err_content"], "probe failed");
    assert_eq!(errs[0]["input"], "ebpf");
}

#[test]
fn ping_and_unknown_paths() {
    let dk = FakeDataKit::start();
    let r = request(dk.addr(), "GET", "/v1/ping", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-datakit"), Some("1.82.0/fake"));
    assert_eq!(r.json()["content"]["version"], "1.82.0");
    for (m, p) in [
        ("GET", "/v1/write/network"),
        ("POST", "/v1/write/"),
        ("POST", "/v1/nope"),
    ] {
        let r = request(dk.addr(), m, p, &[], b"m f=1i");
        assert_eq!(r.status, 404, "{m} {p}");
        assert_eq!(r.header("X-DataKit"), Some("1.82.0/fake"));
    }
}

#[test]
fn keep_alive_and_chunked_requests() {
    let dk = FakeDataKit::start();
    let mut s = TcpStream::connect(dk.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..3 {
        let body = format!("m f={i}i");
        write!(
            s,
            "POST /v1/write/network HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        assert_eq!(read_reply(&mut r).status, 200);
    }
    write!(
        s,
        "POST /v1/write/network HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n3\r\nm f\r\n4\r\n=9i\n\r\n0\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_reply(&mut r).status, 100);
    assert_eq!(read_reply(&mut r).status, 200);
    let pts = dk.points();
    assert_eq!(pts.len(), 4);
    assert_eq!(pts[3].int("f"), Some(9));
}

#[test]
fn delay_slows_replies() {
    let dk = FakeDataKit::start();
    dk.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    dk.set_delay(Duration::ZERO);
    let t = Instant::now();
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 200);
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[test]
fn wait_for_polls_until_predicate() {
    let dk = FakeDataKit::start();
    let addr = dk.addr();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        request(addr, "POST", "/v1/write/network", &[], b"late f=1i");
    });
    let pts = dk.wait_for(Duration::from_secs(5), |p| {
        p.iter().any(|p| p.measurement == "late")
    });
    assert_eq!(pts.len(), 1);
    h.join().unwrap();
    let t = Instant::now();
    let pts = dk.wait_for(Duration::from_millis(200), |p| p.len() > 5);
    assert_eq!(pts.len(), 1);
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[test]
fn down_at_start_then_up_then_stopped() {
    // Reserve a free port, then release it: connections are refused until the fake starts.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(TcpStream::connect(addr).is_err());
    let dk = FakeDataKit::start_on(addr).unwrap();
    assert_eq!(dk.addr(), addr);
    assert_eq!(dk.url(), format!("http://{addr}"));

    // An idle keep-alive connection is closed when the fake stops.
    let idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 200);
    dk.stop();
    assert!(TcpStream::connect(addr).is_err(), "port closed after stop");
    let mut buf = [0u8; 1];
    assert!(matches!((&idle).read(&mut buf), Ok(0) | Err(_)));

    // And it can come back on the same port.
    let dk = FakeDataKit::start_on(addr).unwrap();
    assert_eq!(post(&dk, "/v1/write/network", "m f=1i").status, 200);
    drop(dk);
    assert!(TcpStream::connect(addr).is_err(), "port closed after drop");
}

#[test]
fn many_concurrent_clients() {
    let dk = FakeDataKit::start();
    let addr = dk.addr();
    let hs: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                request(
                    addr,
                    "POST",
                    "/v1/write/network",
                    &[],
                    format!("m f={i}i").as_bytes(),
                )
                .status
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(dk.points().len(), 8);
    dk.clear();
    assert!(dk.points().is_empty() && dk.requests().is_empty());
}

#[test]
fn parse_lp_is_usable_directly() {
    let pts = fake_datakit::parse_lp("a,t=1 f=\"x\"\n", "logging", "in").unwrap();
    assert_eq!(pts[0].str("f"), Some("x"));
    assert_eq!(pts[0].input, "in");
    let e = fake_datakit::parse_lp("a f=1i,f=2i", "logging", "in").unwrap_err();
    assert!(e.contains("duplicate field"), "{e}");
}
