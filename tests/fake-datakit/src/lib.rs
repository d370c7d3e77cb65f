//! A fake DataKit HTTP API for end-to-end tests.
//!
//! [`FakeDataKit`] listens on a TCP port and answers like DataKit 1.82's HTTP API
//! (`POST /v1/write/<category>`, `POST /v1/lasterror`, `GET /v1/ping`), recording every
//! request and every accepted point so that tests can check exactly what the daemon posts.
//!
//! Line protocol is parsed with the independent `influxdb-line-protocol` crate, plus the extra
//! strictness DataKit has (no empty tag values, no key that is both a tag and a field). As in
//! DataKit, one bad line rejects the whole request with 400 and nothing of it is stored.
//!
//! The server runs on its own threads (a plain std HTTP/1.1 server), so it can be used from
//! synchronous tests and from inside a tokio runtime alike. Failures can be switched on at run
//! time: [`FakeDataKit::fail_next`], [`FakeDataKit::set_delay`], and stopping/starting the server
//! on a fixed port ([`FakeDataKit::start_on`], [`FakeDataKit::stop`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// DataKit version the fake claims to be.
pub const VERSION: &str = "1.82.0";
/// Value of the `X-DataKit` header sent on every reply.
pub const X_DATAKIT: &str = "1.82.0/fake";
/// Categories accepted by `POST /v1/write/<category>`.
pub const CATEGORIES: [&str; 9] = [
    "metric",
    "network",
    "keyevent",
    "object",
    "custom_object",
    "logging",
    "tracing",
    "rum",
    "security",
];
/// Values accepted for the `precision` query parameter.
pub const PRECISIONS: [&str; 6] = ["n", "u", "ms", "s", "m", "h"];

/// A field value of an accepted point.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Signed integer (`42i`).
    I(i64),
    /// Unsigned integer (`42u`).
    U(u64),
    /// Float (`1.5`, or a bare number).
    F(f64),
    /// Boolean (`t`, `true`, `F`, ...).
    B(bool),
    /// String (`"..."`), unescaped.
    S(String),
}

/// One accepted line-protocol point, with names and values unescaped.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Category from the URL (`network`, `logging`, ...).
    pub category: String,
    /// The `input` query parameter, URL-decoded; empty when absent.
    pub input: String,
    /// Measurement name.
    pub measurement: String,
    /// Tags by key.
    pub tags: BTreeMap<String, String>,
    /// Fields by key.
    pub fields: BTreeMap<String, FieldValue>,
    /// Timestamp exactly as posted (not converted by `precision`); `None` when the line has none.
    pub timestamp: Option<i64>,
}

impl Point {
    /// The field `k`, of any type.
    pub fn field(&self, k: &str) -> Option<&FieldValue> {
        self.fields.get(k)
    }

    /// The tag `k`.
    pub fn tag(&self, k: &str) -> Option<&str> {
        self.tags.get(k).map(String::as_str)
    }

    /// The field `k` if it is a signed integer (`42i`); `None` for any other type.
    pub fn int(&self, k: &str) -> Option<i64> {
        match self.fields.get(k) {
            Some(FieldValue::I(v)) => Some(*v),
            _ => None,
        }
    }

    /// The field `k` if it is a string; `None` for any other type.
    pub fn str(&self, k: &str) -> Option<&str> {
        match self.fields.get(k) {
            Some(FieldValue::S(v)) => Some(v),
            _ => None,
        }
    }
}

/// One HTTP request the fake received, accepted or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// HTTP method (`POST`, `GET`, ...).
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// `<category>` of a `/v1/write/<category>` request (also when it is not a valid one).
    pub category: Option<String>,
    /// The `input` query parameter, URL-decoded.
    pub input: Option<String>,
    /// The `precision` query parameter.
    pub precision: Option<String>,
    /// The `Content-Encoding` header.
    pub content_encoding: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body, decompressed (the raw body when decompression failed).
    pub body: Vec<u8>,
    /// HTTP status of the reply.
    pub status: u16,
    /// DataKit `error_code` of the reply (e.g. `datakit.invalidLinePoint`); `None` on success.
    pub error: Option<String>,
    /// Error message of the reply (names the bad lines for `datakit.invalidLinePoint`).
    pub message: Option<String>,
    /// Number of points accepted from this request.
    pub points: usize,
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    points: Vec<Point>,
    last_errors: Vec<serde_json::Value>,
    fail: Option<(u16, usize)>,
    delay: Duration,
}

struct Shared {
    state: Mutex<State>,
    stopped: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake DataKit. Dropping it (or [`FakeDataKit::stop`]) closes the port and every open
/// connection, as if DataKit died.
pub struct FakeDataKit {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeDataKit {
    /// Starts on `127.0.0.1:0` (a free port). Panics if it cannot bind.
    pub fn start() -> FakeDataKit {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind fake DataKit")
    }

    /// Starts on `addr` (e.g. a port picked earlier, for "DataKit down at start, up later").
    pub fn start_on(addr: SocketAddr) -> io::Result<FakeDataKit> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = thread::Builder::new()
            .name("fake-datakit-accept".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(FakeDataKit {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `n` write requests (`/v1/write/...`) with `status` and an error body,
    /// storing nothing. Replaces any failure still pending. 429 uses DataKit's
    /// `datakit.reachMaxAPILimit`, 408 DataKit's plain-text `timeout(30s)`, others
    /// `datakit.injectedFailure`.
    pub fn fail_next(&self, status: u16, n: usize) {
        lock(&self.shared.state).fail = if n == 0 { None } else { Some((status, n)) };
    }

    /// Delays every reply by `d` (the request is processed and recorded first). Zero turns it off.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.shared.state).delay = d;
    }

    /// Every request received so far, accepted or not, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.state).requests.clone()
    }

    /// Requests from index `start` on (for polling without copying everything again).
    pub fn requests_since(&self, start: usize) -> Vec<Request> {
        let st = lock(&self.shared.state);
        st.requests.get(start..).unwrap_or_default().to_vec()
    }

    /// Accepted points only, in arrival order.
    pub fn points(&self) -> Vec<Point> {
        lock(&self.shared.state).points.clone()
    }

    /// Accepted `/v1/lasterror` bodies (those answered 200), in arrival order.
    pub fn last_errors(&self) -> Vec<serde_json::Value> {
        lock(&self.shared.state).last_errors.clone()
    }

    /// Forgets all recorded requests, points and last errors (failure settings are kept).
    pub fn clear(&self) {
        let mut st = lock(&self.shared.state);
        st.requests.clear();
        st.points.clear();
        st.last_errors.clear();
    }

    /// Polls (every 50 ms) until `pred(&points)` is true or `timeout` passes; returns the points
    /// either way.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Point]) -> bool) -> Vec<Point> {
        let deadline = Instant::now() + timeout;
        loop {
            let pts = self.points();
            if pred(&pts) || Instant::now() >= deadline {
                return pts;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops listening (the port is closed on return) and closes open connections.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(handle) = self.accept.take() else {
            return;
        };
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Wake the accept thread, which then drops the listener.
        let wake = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, self.addr.port()))
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::from((Ipv6Addr::LOCALHOST, self.addr.port()))
            }
            _ => self.addr,
        };
        if TcpStream::connect_timeout(&wake, Duration::from_secs(2)).is_ok() {
            let _ = handle.join();
        }
        for (_, c) in lock(&self.shared.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FakeDataKit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Ok(c) = stream.try_clone() {
            lock(&shared.conns).insert(id, c);
        }
        let sh = shared.clone();
        let spawned = thread::Builder::new()
            .name("fake-datakit-conn".into())
            .spawn(move || {
                serve_conn(&sh, stream);
                lock(&sh.conns).remove(&id);
            });
        if spawned.is_err() {
            lock(&shared.conns).remove(&id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 server side.

struct HttpRequest {
    method: String,
    target: String,
    keep_alive: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

impl Response {
    fn empty(status: u16) -> Response {
        Response {
            status,
            content_type: None,
            body: Vec::new(),
        }
    }

    fn json(status: u16, v: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: Some("application/json"),
            body: v.to_string().into_bytes(),
        }
    }

    fn text(status: u16, s: &str) -> Response {
        Response {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            body: s.as_bytes().to_vec(),
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf)? == 0 {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| invalid("non-UTF-8 header"))
}

/// Reads one request; `Ok(None)` on a clean EOF between requests.
fn read_request(r: &mut impl BufRead, w: &mut impl Write) -> io::Result<Option<HttpRequest>> {
    let line = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("bad request line"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(invalid("bad HTTP version")),
    };
    let mut headers = Vec::new();
    loop {
        let l = read_line(r)?.ok_or_else(|| invalid("EOF in headers"))?;
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| invalid("bad header"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = HttpRequest {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive: http11,
        headers,
        body: Vec::new(),
    };
    if let Some(c) = req.header("connection") {
        let c = c.to_ascii_lowercase();
        if c.contains("close") {
            req.keep_alive = false;
        } else if c.contains("keep-alive") {
            req.keep_alive = true;
        }
    }
    if req
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        w.flush()?;
    }
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let l = read_line(r)?.ok_or_else(|| invalid("EOF in chunk size"))?;
            let size = l.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers up to the empty line.
                while read_line(r)?.is_some_and(|l| !l.is_empty()) {}
                break;
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])?;
            read_line(r)?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        req.body = vec![0; len];
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_response(w: &mut impl Write, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nX-DataKit: {X_DATAKIT}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    if let Some(ct) = resp.content_type {
        out.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&resp.body);
    w.write_all(&bytes)?;
    w.flush()
}

fn serve_conn(shared: &Shared, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let req = match read_request(&mut reader, &mut writer) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = write_response(&mut writer, &Response::text(400, "bad request"), false);
                }
                return;
            }
        };
        let resp = handle(shared, &req);
        let delay = lock(&shared.state).delay;
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        if write_response(&mut writer, &resp, req.keep_alive).is_err() || !req.keep_alive {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DataKit API behaviour.

struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            code,
            message: message.into(),
        }
    }

    fn response(&self) -> Response {
        if self.status == 408 {
            // DataKit's timeout middleware answers in plain text.
            return Response::text(408, &self.message);
        }
        Response::json(
            self.status,
            &serde_json::json!({"error_code": self.code, "message": self.message}),
        )
    }
}

fn handle(shared: &Shared, req: &HttpRequest) -> Response {
    let (path, query) = req
        .target
        .split_once('?')
        .unwrap_or((req.target.as_str(), ""));
    let mut input = None;
    let mut precision = None;
    let mut encoding_param = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "input" if input.is_none() => input = Some(v.into_owned()),
            "precision" if precision.is_none() => precision = Some(v.into_owned()),
            "encoding" if encoding_param.is_none() => encoding_param = Some(v.into_owned()),
            _ => {}
        }
    }
    let mut rec = Request {
        method: req.method.clone(),
        path: path.to_string(),
        category: None,
        input,
        precision,
        content_encoding: req.header("content-encoding").map(str::to_string),
        content_type: req.header("content-type").map(str::to_string),
        body: req.body.clone(),
        status: 200,
        error: None,
        message: None,
        points: 0,
    };

    let category = path
        .strip_prefix("/v1/write/")
        .filter(|c| !c.is_empty() && !c.contains('/'));
    let (resp, points, last_error) = match (req.method.as_str(), path, category) {
        ("POST", _, Some(category)) => {
            rec.category = Some(category.to_string());
            let encoding = rec.content_encoding.clone().or(encoding_param);
            let decoded = decode_body(encoding.as_deref(), &req.body);
            if let Ok(b) = &decoded {
                rec.body = b.clone();
            }
            let injected = {
                let mut st = lock(&shared.state);
                match &mut st.fail {
                    Some((status, n)) => {
                        let status = *status;
                        *n -= 1;
                        if *n == 0 {
                            st.fail = None;
                        }
                        Some(status)
                    }
                    None => None,
                }
            };
            let result = match injected {
                Some(status) => Err(injected_error(status)),
                None => process_write(
                    category,
                    rec.input.as_deref().unwrap_or(""),
                    rec.precision.as_deref(),
                    rec.content_type.as_deref(),
                    &req.body,
                    decoded,
                ),
            };
            match result {
                Ok(points) => (Response::empty(200), points, None),
                Err(e) => {
                    rec.error = Some(e.code.to_string());
                    rec.message = Some(e.message.clone());
                    (e.response(), Vec::new(), None)
                }
            }
        }
        ("POST", "/v1/lasterror", _) => match check_last_error(&req.body) {
            Ok(v) => (Response::empty(200), Vec::new(), Some(v)),
            Err(e) => {
                rec.error = Some(e.code.to_string());
                rec.message = Some(e.message.clone());
                (e.response(), Vec::new(), None)
            }
        },
        ("GET", "/v1/ping", _) => (
            Response::json(
                200,
                &serde_json::json!({"content": {
                    "version": VERSION, "uptime": "1s", "host": "fake", "commit": "fake"}}),
            ),
            Vec::new(),
            None,
        ),
        _ => (Response::text(404, "404 page not found"), Vec::new(), None),
    };

    rec.status = resp.status;
    rec.points = points.len();
    let mut st = lock(&shared.state);
    st.requests.push(rec);
    st.points.extend(points);
    st.last_errors.extend(last_error);
    resp
}

fn injected_error(status: u16) -> ApiError {
    let (code, message) = match status {
        429 => (
            "datakit.reachMaxAPILimit",
            "reach max API limit".to_string(),
        ),
        408 => ("datakit.timeout", "timeout(30s)".to_string()),
        _ => (
            "datakit.injectedFailure",
            format!("injected failure {status} (fake DataKit fail_next)"),
        ),
    };
    ApiError {
        status,
        code,
        message,
    }
}

fn decode_body(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    let enc = encoding.unwrap_or("").trim().to_ascii_lowercase();
    match enc.as_str() {
        "" | "identity" => Ok(body.to_vec()),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip: {e}"))?;
            Ok(out)
        }
        "deflate" => {
            // zlib-wrapped per RFC 9110; fall back to raw deflate as some clients send it.
            let mut out = Vec::new();
            if flate2::read::ZlibDecoder::new(body)
                .read_to_end(&mut out)
                .is_ok()
            {
                return Ok(out);
            }
            out.clear();
            flate2::read::DeflateDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| format!("deflate: {e}"))?;
            Ok(out)
        }
        other => Err(format!("unsupported content encoding `{other}`")),
    }
}

fn process_write(
    category: &str,
    input: &str,
    precision: Option<&str>,
    content_type: Option<&str>,
    raw: &[u8],
    decoded: Result<Vec<u8>, String>,
) -> Result<Vec<Point>, ApiError> {
    if !CATEGORIES.contains(&category) {
        return Err(ApiError::bad(
            "datakit.invalidCategory",
            format!("invalid category `{category}`"),
        ));
    }
    if let Some(p) = precision
        && !PRECISIONS.contains(&p)
    {
        return Err(ApiError::bad(
            "datakit.invalidPrecision",
            format!("invalid precision `{p}`, want one of n,u,ms,s,m,h"),
        ));
    }
    if raw.is_empty() {
        return Err(ApiError::bad("datakit.emptyBody", "empty body"));
    }
    let body = decoded.map_err(|e| ApiError::bad("datakit.decodeBodyFailed", e))?;
    if body.is_empty() {
        return Err(ApiError::bad("datakit.emptyBody", "empty body"));
    }
    // DataKit decodes these types as JSON / protobuf; the fake only decodes line protocol, so it
    // answers as DataKit would to line protocol sent under such a header.
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    if ct.contains("application/json") || ct.starts_with("application/pbjson") {
        return Err(ApiError::bad(
            "datakit.invalidJsonPoint",
            format!("Content-Type `{ct}` is not line protocol (the fake decodes only LP)"),
        ));
    }
    if ct.contains("application/protobuf") {
        return Err(ApiError::bad(
            "datakit.invalidProtobufPoint",
            format!("Content-Type `{ct}` is not line protocol (the fake decodes only LP)"),
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad("datakit.invalidLinePoint", format!("body not UTF-8: {e}")))?;
    let points = parse_lp(text, category, input)
        .map_err(|e| ApiError::bad("datakit.invalidLinePoint", e))?;
    if points.is_empty() {
        return Err(ApiError::bad("datakit.noPoints", "no points in body"));
    }
    Ok(points)
}

fn check_last_error(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let err = |m: String| ApiError {
        status: 500,
        code: "datakit.invalidLastError",
        message: m,
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| err(format!("bad JSON: {e}")))?;
    for key in ["input", "err_content"] {
        match v.get(key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {}
            _ => return Err(err(format!("`{key}` must be a non-empty string"))),
        }
    }
    Ok(v)
}

/// Parses a line-protocol body the way the fake's write endpoint does, stamping each point
/// with `category` and `input`. `Err` lists every bad line (1-based number, reason, text).
///
/// Rules: the `influxdb-line-protocol` parser, `#` comment and blank lines skipped, plus
/// DataKit's strictness (no empty tag value, no key that is both tag and field) and, stricter
/// than DataKit, no repeated field key.
pub fn parse_lp(body: &str, category: &str, input: &str) -> Result<Vec<Point>, String> {
    let mut points = Vec::new();
    let mut errors = Vec::new();
    for (idx, line) in influxdb_line_protocol::split_lines(body).enumerate() {
        for parsed in influxdb_line_protocol::parse_lines(line) {
            match parsed.map_err(|e| e.to_string()).and_then(|pl| {
                convert(&pl).map(|(measurement, tags, fields)| Point {
                    category: category.to_string(),
                    input: input.to_string(),
                    measurement,
                    tags,
                    fields,
                    timestamp: pl.timestamp,
                })
            }) {
                Ok(p) => points.push(p),
                Err(e) => errors.push(format!("line {}: {e}: {line:?}", idx + 1)),
            }
        }
    }
    if errors.is_empty() {
        Ok(points)
    } else {
        Err(format!(
            "{} bad line(s), {} parsed: {}",
            errors.len(),
            points.len(),
            errors.join("; ")
        ))
    }
}

type Converted = (
    String,
    BTreeMap<String, String>,
    BTreeMap<String, FieldValue>,
);

fn convert(pl: &influxdb_line_protocol::ParsedLine<'_>) -> Result<Converted, String> {
    use influxdb_line_protocol::FieldValue as F;
    let measurement = pl.series.measurement.as_str().to_string();
    if measurement.is_empty() {
        return Err("empty measurement".into());
    }
    let mut tags = BTreeMap::new();
    for (k, v) in pl.series.tag_set.iter().flatten() {
        if v.as_str().is_empty() {
            return Err(format!("missing tag value for tag `{}`", k.as_str()));
        }
        if tags
            .insert(k.as_str().to_string(), v.as_str().to_string())
            .is_some()
        {
            return Err(format!("duplicate tag `{}`", k.as_str()));
        }
    }
    let mut fields = BTreeMap::new();
    for (k, v) in &pl.field_set {
        let k = k.as_str();
        if tags.contains_key(k) {
            return Err(format!("key `{k}` is both a tag and a field"));
        }
        let v = match v {
            F::I64(i) => FieldValue::I(*i),
            F::U64(u) => FieldValue::U(*u),
            F::F64(f) => FieldValue::F(*f),
            F::Boolean(b) => FieldValue::B(*b),
            F::String(s) => FieldValue::S(s.as_str().to_string()),
        };
        if fields.insert(k.to_string(), v).is_some() {
            return Err(format!("duplicate field `{k}`"));
        }
    }
    Ok((measurement, tags, fields))
}
