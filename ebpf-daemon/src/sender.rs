//! The output pipeline shared by every plugin: a bounded queue of points and one task that posts
//! them to DataKit's write API as line protocol (or prints them).
//!
//! Unlike the reference (one attempt, batch dropped on failure), delivery is retried with back-off
//! while DataKit is down or overloaded, keeping order; memory stays bounded because the queue
//! drops its oldest points when full.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::lineproto::{Point, encode_batch};

const USER_AGENT: &str = concat!("datakit-ebpf/", env!("CARGO_PKG_VERSION"));
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// How much of an error reply is logged.
const MAX_LOGGED_BODY: usize = 512;
const LAST_ERROR_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time `shutdown` waits past its deadline for the task to account for what it dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// DataKit data category; selects the `/v1/write/<category>` endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    Network,
    Logging,
}

impl Category {
    /// The URL segment, as in `/v1/write/network`.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Network => "network",
            Category::Logging => "logging",
        }
    }
}

/// Where a group of points goes: endpoint category and the `input=` name (e.g. `ebpf-net/netflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub category: Category,
    pub input: &'static str,
}

/// Where points are written.
#[derive(Clone, Debug)]
pub enum OutputTarget {
    /// DataKit's HTTP API at `base_url` (`http://host:port`, no trailing `/`).
    DataKit { base_url: String },
    /// One line-protocol line per point on stdout, for debugging.
    Stdout,
}

/// Tuning of the sender.
#[derive(Clone, Debug)]
pub struct SenderOptions {
    pub target: OutputTarget,
    /// Most points in one request (the reference uses 256).
    pub batch_size: usize,
    /// Most points queued across all destinations; the oldest are dropped beyond it.
    pub queue_capacity: usize,
    /// Gzip request bodies.
    pub gzip: bool,
    /// Shortest interval between two logs of the same repeated failure.
    pub log_every: Duration,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Longest wait between two attempts at the same batch.
    pub max_backoff: Duration,
}

/// Counters since start. Once the sender has stopped,
/// `queued == sent_points + dropped_queue_full + rejected_points + invalid_points`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SenderStats {
    /// Points submitted (every submitted point enters the queue, possibly pushing out older ones).
    pub queued: u64,
    /// Points in batches DataKit accepted (or written to stdout).
    pub sent_points: u64,
    /// Successful requests (or batches written to stdout).
    pub sent_requests: u64,
    /// Points dropped undelivered: pushed out of a full queue, submitted after shutdown, or still
    /// undelivered at the shutdown deadline.
    pub dropped_queue_full: u64,
    /// Points in batches DataKit refused with a 4xx other than 408/429 (not retried), or that
    /// could not be written to stdout.
    pub rejected_points: u64,
    /// Points the encoder could not turn into a valid line.
    pub invalid_points: u64,
    /// Repeated attempts at a batch after a failure.
    pub retries: u64,
}

/// Cheap, cloneable handle to the sender task.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    opts: SenderOptions,
    queue: Mutex<Queue>,
    wake: Notify,
    stats: Counters,
    /// Set once by `shutdown`: the instant after which undelivered points are given up.
    deadline: watch::Sender<Option<Instant>>,
    done: watch::Sender<bool>,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    sent_points: AtomicU64,
    sent_requests: AtomicU64,
    dropped: AtomicU64,
    rejected_points: AtomicU64,
    invalid_points: AtomicU64,
    retries: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Points per destination, each tagged with a global sequence number so the oldest point across
/// destinations can be found when the queue is full.
struct Queue {
    lanes: Vec<Lane>,
    len: usize,
    next_seq: u64,
    /// Set when the task has stopped; later points are dropped at once.
    closed: bool,
    drop_log: RateLimit,
}

struct Lane {
    dest: Destination,
    points: VecDeque<(u64, Point)>,
}

impl Queue {
    /// The lane whose first point is the oldest queued.
    fn oldest_lane(&self) -> Option<usize> {
        self.lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.points.front().map(|(seq, _)| (*seq, i)))
            .min()
            .map(|(_, i)| i)
    }

    fn drop_oldest(&mut self) {
        if let Some(i) = self.oldest_lane() {
            self.lanes[i].points.pop_front();
            self.len -= 1;
        }
    }

    fn clear(&mut self) -> usize {
        let n = self.len;
        for lane in &mut self.lanes {
            lane.points.clear();
        }
        self.len = 0;
        n
    }
}

impl Sender {
    /// Spawns the sender task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(opts: SenderOptions) -> Sender {
        let output = match &opts.target {
            OutputTarget::DataKit { base_url } => Output::Http {
                client: http_client(opts.request_timeout),
                base: base_url.trim_end_matches('/').to_owned(),
            },
            OutputTarget::Stdout => Output::Writer(Box::new(std::io::stdout())),
        };
        Self::start_with(opts, output)
    }

    fn start_with(opts: SenderOptions, output: Output) -> Sender {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                lanes: Vec::new(),
                len: 0,
                next_seq: 0,
                closed: false,
                drop_log: RateLimit::new(opts.log_every),
            }),
            opts,
            wake: Notify::new(),
            stats: Counters::default(),
            deadline: watch::Sender::new(None),
            done: watch::Sender::new(false),
        });
        let worker = Worker {
            inner: inner.clone(),
            output,
            failures: FailureLog::new(inner.opts.log_every),
            rejections: RateLimit::new(inner.opts.log_every),
        };
        tokio::spawn(worker.run());
        Sender { inner }
    }

    /// Never blocks and never waits for the network: queues the points; when the queue is over
    /// capacity the OLDEST queued points are dropped and counted.
    pub fn submit(&self, dest: Destination, points: Vec<Point>) {
        let n = points.len();
        if n == 0 {
            return;
        }
        let stats = &self.inner.stats;
        add(&stats.queued, n as u64);
        let cap = self.inner.opts.queue_capacity;
        let mut q = self.inner.lock_queue();
        if q.closed {
            add(&stats.dropped, n as u64);
            return;
        }

        let mut dropped = 0;
        let mut skip = 0;
        if n >= cap {
            // Everything queued is older than the new points, and only the newest `cap` fit.
            dropped = q.clear() + (n - cap);
            skip = n - cap;
        }
        let lane = match q.lanes.iter().position(|l| l.dest == dest) {
            Some(i) => i,
            None => {
                q.lanes.push(Lane {
                    dest,
                    points: VecDeque::new(),
                });
                q.lanes.len() - 1
            }
        };
        let mut seq = q.next_seq + skip as u64;
        q.next_seq += n as u64;
        let kept = n - skip;
        q.lanes[lane]
            .points
            .extend(points.into_iter().skip(skip).map(|p| {
                seq += 1;
                (seq - 1, p)
            }));
        q.len += kept;
        while q.len > cap {
            q.drop_oldest();
            dropped += 1;
        }

        if dropped > 0 {
            add(&stats.dropped, dropped as u64);
            if let Some(count) = q.drop_log.hit(dropped as u64) {
                warn!(
                    dropped = count,
                    capacity = cap,
                    "output queue full; dropped the oldest points"
                );
            }
        }
        drop(q);
        self.inner.wake.notify_one();
    }

    /// Current counters.
    pub fn stats(&self) -> SenderStats {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SenderStats {
            queued: get(&s.queued),
            sent_points: get(&s.sent_points),
            sent_requests: get(&s.sent_requests),
            dropped_queue_full: get(&s.dropped),
            rejected_points: get(&s.rejected_points),
            invalid_points: get(&s.invalid_points),
            retries: get(&s.retries),
        }
    }

    /// Sends what is queued (best effort, bounded by `deadline`), then stops the task. Returns
    /// final stats. Points still undelivered at the deadline are counted as dropped.
    pub async fn shutdown(&self, deadline: Duration) -> SenderStats {
        let at = Instant::now() + deadline;
        // A second call can only bring the deadline forward.
        self.inner.deadline.send_if_modified(|d| match d {
            Some(old) if *old <= at => false,
            _ => {
                *d = Some(at);
                true
            }
        });
        self.inner.wake.notify_one();
        let mut done = self.inner.done.subscribe();
        if tokio::time::timeout(deadline + SHUTDOWN_GRACE, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            warn!("sender task did not stop in time");
        }
        self.stats()
    }
}

impl Inner {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent enough to keep going.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `batch_size` points of the destination holding the oldest point. When the
    /// queue is empty and `closing`, marks it closed under the same lock so no point slips in.
    fn take_batch(&self, closing: bool) -> Option<(Destination, Vec<Point>)> {
        let mut q = self.lock_queue();
        let Some(i) = q.oldest_lane() else {
            q.closed |= closing;
            return None;
        };
        let lane = &mut q.lanes[i];
        let n = lane.points.len().min(self.opts.batch_size.max(1));
        let dest = lane.dest;
        let batch: Vec<Point> = lane.points.drain(..n).map(|(_, p)| p).collect();
        q.len -= n;
        Some((dest, batch))
    }
}

enum Output {
    Http {
        client: reqwest::Client,
        base: String,
    },
    Writer(Box<dyn Write + Send>),
}

enum Outcome {
    Delivered,
    Rejected,
}

struct Worker {
    inner: Arc<Inner>,
    output: Output,
    failures: FailureLog,
    rejections: RateLimit,
}

impl Worker {
    async fn run(mut self) {
        let mut deadline = self.inner.deadline.subscribe();
        loop {
            let closing = deadline.borrow().is_some();
            let Some((dest, points)) = self.inner.take_batch(closing) else {
                if closing {
                    break;
                }
                // A permit is stored if `submit` or `shutdown` notified before we got here.
                tokio::select! {
                    _ = self.inner.wake.notified() => {}
                    _ = deadline.changed() => {}
                }
                continue;
            };

            let mut body = String::new();
            let invalid = encode_batch(&points, &mut body);
            let valid = (points.len() - invalid) as u64;
            drop(points);
            if invalid > 0 {
                add(&self.inner.stats.invalid_points, invalid as u64);
                debug!(
                    input = dest.input,
                    invalid, "skipped points that cannot be encoded"
                );
            }
            if valid == 0 {
                continue;
            }

            let outcome = tokio::select! {
                biased;
                _ = wait_deadline(&mut deadline) => None,
                o = self.deliver(dest, body, valid) => Some(o),
            };
            let stats = &self.inner.stats;
            match outcome {
                Some(Outcome::Delivered) => {
                    add(&stats.sent_points, valid);
                    add(&stats.sent_requests, 1);
                }
                Some(Outcome::Rejected) => add(&stats.rejected_points, valid),
                None => {
                    let rest = self.inner.lock_queue().clear() as u64;
                    self.give_up(valid + rest);
                    break;
                }
            }
        }
        // Closed even after `give_up`, so later submissions are counted as dropped.
        let late = {
            let mut q = self.inner.lock_queue();
            q.closed = true;
            q.clear() as u64
        };
        if late > 0 {
            self.give_up(late);
        }
        self.inner.done.send_replace(true);
    }

    fn give_up(&self, n: u64) {
        add(&self.inner.stats.dropped, n);
        warn!(
            dropped = n,
            "shutdown deadline reached; dropped undelivered points"
        );
    }

    async fn deliver(&mut self, dest: Destination, body: String, points: u64) -> Outcome {
        let (client, base) = match &mut self.output {
            Output::Writer(w) => {
                let res = w
                    .write_all(body.as_bytes())
                    .and_then(|()| w.write_all(b"\n"))
                    .and_then(|()| w.flush());
                return match res {
                    Ok(()) => Outcome::Delivered,
                    Err(e) => {
                        if self.rejections.hit(1).is_some() {
                            warn!(error = %e, "cannot write points to stdout");
                        }
                        Outcome::Rejected
                    }
                };
            }
            Output::Http { client, base } => (client.clone(), base.clone()),
        };

        let url = write_url(&base, dest);
        let gzip = self.inner.opts.gzip;
        let body = if gzip {
            match gzip_bytes(body.as_bytes()) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    // Cannot happen when writing to memory; fall back to plain text anyway.
                    warn!(error = %e, "gzip failed");
                    return self
                        .deliver_body(&client, &url, dest, body.into(), false, points)
                        .await;
                }
            }
        } else {
            Bytes::from(body)
        };
        self.deliver_body(&client, &url, dest, body, gzip, points)
            .await
    }

    async fn deliver_body(
        &mut self,
        client: &reqwest::Client,
        url: &str,
        dest: Destination,
        body: Bytes,
        gzip: bool,
        points: u64,
    ) -> Outcome {
        let max_backoff = self.inner.opts.max_backoff;
        let mut backoff = INITIAL_BACKOFF.min(max_backoff);
        let mut first = true;
        loop {
            if !first {
                add(&self.inner.stats.retries, 1);
            }
            first = false;
            let mut req = client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/line-protocol")
                .body(body.clone());
            if gzip {
                req = req.header(reqwest::header::CONTENT_ENCODING, "gzip");
            }
            let problem = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        self.failures.success();
                        return Outcome::Delivered;
                    }
                    let code = status.as_u16();
                    let text = read_prefix(resp).await;
                    if status.is_client_error() && code != 408 && code != 429 {
                        // The server is up: count this towards recovery, not failure.
                        self.failures.success();
                        if let Some(count) = self.rejections.hit(1) {
                            warn!(
                                input = dest.input,
                                status = code,
                                points,
                                rejected_batches = count,
                                body = %text,
                                "DataKit rejected a batch; dropped it"
                            );
                        }
                        return Outcome::Rejected;
                    }
                    format!("HTTP {code}: {text}")
                }
                Err(e) => error_chain(&e),
            };
            self.failures.failure(dest, &problem);
            tokio::time::sleep(with_jitter(backoff)).await;
            backoff = (backoff * 2).min(max_backoff);
        }
    }
}

/// Completes when the shutdown deadline is set and has passed.
async fn wait_deadline(rx: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let current = *rx.borrow_and_update();
        if let Some(at) = current {
            tokio::time::sleep_until(at).await;
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Logs delivery failures at most once per interval, and a recovery once.
struct FailureLog {
    limit: RateLimit,
    failing_since: Option<(Instant, u64)>,
}

impl FailureLog {
    fn new(every: Duration) -> Self {
        Self {
            limit: RateLimit::new(every),
            failing_since: None,
        }
    }

    fn failure(&mut self, dest: Destination, problem: &str) {
        let (_, total) = self.failing_since.get_or_insert((Instant::now(), 0));
        *total += 1;
        if let Some(count) = self.limit.hit(1) {
            warn!(
                input = dest.input,
                failures = count,
                error = problem,
                "cannot deliver to DataKit; will retry"
            );
        }
    }

    fn success(&mut self) {
        if let Some((since, total)) = self.failing_since.take() {
            info!(
                failed_attempts = total,
                down_for = ?since.elapsed(),
                "delivery to DataKit recovered"
            );
            self.limit = RateLimit::new(self.limit.every);
        }
    }
}

/// Allows one log per interval and counts the events in between.
struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Records `n` events; returns how many happened since the last log when it is time to log.
    fn hit(&mut self, n: u64) -> Option<u64> {
        self.pending += n;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .build()
        // Without TLS backends building cannot fail in practice; the default client still works.
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot build the HTTP client; using defaults");
            reqwest::Client::new()
        })
}

fn write_url(base: &str, dest: Destination) -> String {
    format!(
        "{base}/v1/write/{}?input={}&precision=n",
        dest.category.as_str(),
        url_escape(dest.input)
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters, like Go's `url.QueryEscape`
/// for the names used here.
fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn gzip_bytes(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::default(),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Reads at most about `MAX_LOGGED_BODY` bytes of a reply, for logging.
async fn read_prefix(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_LOGGED_BODY {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let truncated = buf.len() > MAX_LOGGED_BODY;
    buf.truncate(MAX_LOGGED_BODY);
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if truncated {
        text.push('…');
    }
    text
}

/// reqwest's top-level error hides the cause (e.g. "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Adds up to 10% so that many daemons restarted together do not retry in lockstep.
fn with_jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let frac = (h.finish() % 1000) as f64 / 10_000.0;
    d.mul_f64(1.0 + frac)
}

/// POST {base}/v1/lasterror with JSON {"input":<input>,"source":"ebpf","err_content":msg}; one
/// attempt with a short timeout; logs and returns Err on failure.
pub async fn report_last_error(base_url: &str, input: &str, msg: &str) -> anyhow::Result<()> {
    let result = async {
        // DataKit refuses an empty input or message.
        anyhow::ensure!(
            !input.is_empty() && !msg.is_empty(),
            "empty input or message"
        );
        let body = serde_json::json!({ "input": input, "source": "ebpf", "err_content": msg });
        let url = format!("{}/v1/lasterror", base_url.trim_end_matches('/'));
        let resp = http_client(LAST_ERROR_TIMEOUT)
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("POST {url}: {}", error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = read_prefix(resp).await;
            anyhow::bail!("POST {url}: HTTP {}: {text}", status.as_u16());
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        warn!(error = %e, "cannot report the last error to DataKit");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::lineproto::Field;

    const NETFLOW: Destination = Destination {
        category: Category::Network,
        input: "ebpf-net/netflow",
    };
    const BASH: Destination = Destination {
        category: Category::Logging,
        input: "ebpf-bash",
    };

    #[derive(Clone, Debug)]
    struct Request {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Request {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        /// The body as text, gunzipped when needed.
        fn text(&self) -> String {
            if self.header("content-encoding") == Some("gzip") {
                let mut s = String::new();
                flate2::read::GzDecoder::new(&self.body[..])
                    .read_to_string(&mut s)
                    .unwrap();
                s
            } else {
                String::from_utf8(self.body.clone()).unwrap()
            }
        }

        fn lines(&self) -> Vec<String> {
            self.text().lines().map(str::to_owned).collect()
        }
    }

    /// A tiny HTTP/1.1 server: one request per connection; replies with scripted statuses, then 200.
    #[derive(Clone, Default)]
    struct TestServer {
        requests: Arc<Mutex<Vec<Request>>>,
        script: Arc<Mutex<VecDeque<u16>>>,
    }

    impl TestServer {
        async fn start(script: &[u16]) -> (TestServer, String) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = TestServer::default();
            server.script.lock().unwrap().extend(script);
            server.serve(listener);
            (server, format!("http://{addr}"))
        }

        fn serve(&self, listener: TcpListener) {
            let server = self.clone();
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        let Some(req) = read_request(&mut conn).await else {
                            return;
                        };
                        server.requests.lock().unwrap().push(req);
                        let status = server.script.lock().unwrap().pop_front().unwrap_or(200);
                        let body = if status == 200 {
                            String::new()
                        } else {
                            format!(r#"{{"error_code":"test.{status}","message":"scripted"}}"#)
                        };
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(resp.as_bytes()).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
        }

        fn requests(&self) -> Vec<Request> {
            self.requests.lock().unwrap().clone()
        }

        /// Every line received, over all requests, in arrival order.
        fn all_lines(&self) -> Vec<String> {
            self.requests().iter().flat_map(|r| r.lines()).collect()
        }
    }

    async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<Request> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_owned();
        let target = first.next()?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Request {
            method,
            target,
            headers,
            body,
        })
    }

    fn opts(base: &str) -> SenderOptions {
        SenderOptions {
            target: OutputTarget::DataKit {
                base_url: base.to_owned(),
            },
            batch_size: 256,
            queue_capacity: 10_000,
            gzip: false,
            log_every: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(50),
        }
    }

    fn points(name: &str, range: std::ops::Range<i64>) -> Vec<Point> {
        range
            .map(|i| Point::new(name, i).field("v", Field::Int(i)))
            .collect()
    }

    fn expected_lines(name: &str, range: std::ops::Range<i64>) -> Vec<String> {
        range.map(|i| format!("{name} v={i}i {i}")).collect()
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn assert_balanced(s: &SenderStats) {
        assert_eq!(
            s.queued,
            s.sent_points + s.dropped_queue_full + s.rejected_points + s.invalid_points,
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn request_format_gzip() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(SenderOptions {
            gzip: true,
            ..opts(&base)
        });
        let p = Point::new("netflow", 1_000)
            .tag("src_ip", "10.0.0.1")
            .tag("host", "h")
            .field("bytes_read", Field::Int(5));
        sender.submit(NETFLOW, vec![p]);
        let stats = sender.shutdown(Duration::from_secs(5)).await;

        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.target,
            "/v1/write/network?input=ebpf-net%2Fnetflow&precision=n"
        );
        assert_eq!(r.header("content-type"), Some("application/line-protocol"));
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(
            r.header("user-agent"),
            Some(concat!("datakit-ebpf/", env!("CARGO_PKG_VERSION")))
        );
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
        assert_eq!(r.body[..2], [0x1f, 0x8b]);
        assert_eq!(
            r.text(),
            "netflow,host=h,src_ip=10.0.0.1 bytes_read=5i 1000"
        );
        assert_eq!(stats.sent_points, 1);
        assert_eq!(stats.sent_requests, 1);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn request_format_plain_and_logging_category() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(opts(&format!("{base}/")));
        sender.submit(BASH, points("bash", 0..2));
        sender.shutdown(Duration::from_secs(5)).await;
        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            reqs[0].target,
            "/v1/write/logging?input=ebpf-bash&precision=n"
        );
        assert_eq!(reqs[0].header("content-encoding"), None);
        assert_eq!(
            String::from_utf8(reqs[0].body.clone()).unwrap(),
            "bash v=0i 0\nbash v=1i 1"
        );
    }

    #[tokio::test]
    async fn batches_split_at_batch_size_in_order() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(SenderOptions {
            batch_size: 3,
            ..opts(&base)
        });
        sender.submit(NETFLOW, points("m", 0..7));
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        let sizes: Vec<usize> = server.requests().iter().map(|r| r.lines().len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        assert_eq!(server.all_lines(), expected_lines("m", 0..7));
        assert_eq!(stats.sent_requests, 3);
        assert_eq!(stats.sent_points, 7);
    }

    #[tokio::test]
    async fn retryable_statuses_are_retried_in_order() {
        let (server, base) = TestServer::start(&[500, 503, 429, 408]).await;
        let sender = Sender::start(SenderOptions {
            batch_size: 2,
            ..opts(&base)
        });
        sender.submit(NETFLOW, points("m", 0..5));
        wait_until("delivery", || sender.stats().sent_points == 5).await;
        let stats = sender.shutdown(Duration::from_secs(5)).await;

        let reqs = server.requests();
        assert_eq!(reqs.len(), 7);
        // The first batch went five times, unchanged.
        for r in &reqs[..5] {
            assert_eq!(r.lines(), expected_lines("m", 0..2));
        }
        assert_eq!(reqs[5].lines(), expected_lines("m", 2..4));
        assert_eq!(reqs[6].lines(), expected_lines("m", 4..5));
        assert_eq!(stats.retries, 4);
        assert_eq!(stats.sent_requests, 3);
        assert_eq!(stats.rejected_points, 0);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn client_error_is_rejected_not_retried() {
        let (server, base) = TestServer::start(&[400]).await;
        let sender = Sender::start(SenderOptions {
            batch_size: 2,
            ..opts(&base)
        });
        sender.submit(NETFLOW, points("m", 0..4));
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].lines(), expected_lines("m", 0..2));
        assert_eq!(reqs[1].lines(), expected_lines("m", 2..4));
        assert_eq!(stats.rejected_points, 2);
        assert_eq!(stats.sent_points, 2);
        assert_eq!(stats.retries, 0);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn invalid_points_are_counted_and_skipped() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(opts(&base));
        let mut pts = points("m", 0..2);
        pts.insert(1, Point::new("nofields", 9));
        sender.submit(NETFLOW, pts);
        sender.submit(NETFLOW, vec![Point::new("nofields", 10)]);
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        assert_eq!(server.all_lines(), expected_lines("m", 0..2));
        assert_eq!(stats.invalid_points, 2);
        assert_eq!(stats.sent_points, 2);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn server_down_then_up_delivers_everything() {
        // Reserve a port, then close it so the first attempts are refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sender = Sender::start(SenderOptions {
            batch_size: 10,
            queue_capacity: 100,
            ..opts(&format!("http://{addr}"))
        });
        sender.submit(NETFLOW, points("m", 0..30));
        wait_until("retries", || sender.stats().retries >= 3).await;
        sender.submit(BASH, points("b", 30..60));

        let server = TestServer::default();
        server.serve(TcpListener::bind(addr).await.unwrap());
        wait_until("delivery", || sender.stats().sent_points == 60).await;
        let stats = sender.shutdown(Duration::from_secs(5)).await;

        let lines = server.all_lines();
        let mut expected = expected_lines("m", 0..30);
        expected.extend(expected_lines("b", 30..60));
        assert_eq!(lines, expected);
        assert_eq!(stats.dropped_queue_full, 0);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn queue_overflow_drops_oldest_across_destinations() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(SenderOptions {
            queue_capacity: 4,
            ..opts(&base)
        });
        // The test runtime has one thread and nothing below yields, so the task cannot take a
        // batch before all submissions are in.
        sender.submit(NETFLOW, points("a", 0..3));
        sender.submit(BASH, points("b", 3..8));
        sender.submit(NETFLOW, points("a", 8..10));
        assert_eq!(sender.stats().dropped_queue_full, 6);
        assert_eq!(sender.stats().queued, 10);
        let stats = sender.shutdown(Duration::from_secs(5)).await;

        let mut lines = server.all_lines();
        lines.sort();
        let mut expected = expected_lines("b", 6..8);
        expected.extend(expected_lines("a", 8..10));
        expected.sort();
        assert_eq!(lines, expected);
        assert_eq!(stats.dropped_queue_full, 6);
        assert_eq!(stats.sent_points, 4);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn one_submission_larger_than_capacity_keeps_newest() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(SenderOptions {
            queue_capacity: 3,
            ..opts(&base)
        });
        sender.submit(BASH, points("b", 0..2));
        sender.submit(NETFLOW, points("a", 2..10));
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        assert_eq!(server.all_lines(), expected_lines("a", 7..10));
        assert_eq!(stats.dropped_queue_full, 7);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn shutdown_flushes_and_later_points_are_dropped() {
        let (server, base) = TestServer::start(&[]).await;
        let sender = Sender::start(SenderOptions {
            batch_size: 50,
            ..opts(&base)
        });
        for i in 0..10 {
            sender.submit(NETFLOW, points("m", i * 100..(i + 1) * 100));
        }
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        assert_eq!(server.all_lines(), expected_lines("m", 0..1000));
        assert_eq!(stats.sent_points, 1000);
        assert_eq!(stats.sent_requests, 20);

        sender.submit(NETFLOW, points("m", 0..3));
        let stats = sender.stats();
        assert_eq!(stats.dropped_queue_full, 3);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn shutdown_gives_up_at_deadline_when_server_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sender = Sender::start(SenderOptions {
            batch_size: 4,
            ..opts(&format!("http://{addr}"))
        });
        sender.submit(NETFLOW, points("m", 0..10));
        let started = std::time::Instant::now();
        let stats = sender.shutdown(Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(stats.dropped_queue_full, 10);
        assert_eq!(stats.sent_points, 0);
        assert!(stats.retries >= 1);
        assert_balanced(&stats);
    }

    #[tokio::test]
    async fn stdout_target_writes_lines() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sender = Sender::start_with(
            SenderOptions {
                target: OutputTarget::Stdout,
                batch_size: 2,
                ..opts("")
            },
            Output::Writer(Box::new(buf.clone())),
        );
        sender.submit(BASH, points("b", 0..3));
        let stats = sender.shutdown(Duration::from_secs(5)).await;
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "b v=0i 0\nb v=1i 1\nb v=2i 2\n");
        assert_eq!(stats.sent_points, 3);
        assert_eq!(stats.sent_requests, 2);
    }

    #[tokio::test]
    async fn last_error_report() {
        let (server, base) = TestServer::start(&[]).await;
        report_last_error(&base, "ebpf", "probe \"x\" failed")
            .await
            .unwrap();
        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].target, "/v1/lasterror");
        assert_eq!(reqs[0].header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&reqs[0].body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"input": "ebpf", "source": "ebpf", "err_content": "probe \"x\" failed"})
        );

        let (_server, base) = TestServer::start(&[500]).await;
        assert!(report_last_error(&base, "ebpf", "x").await.is_err());
        assert!(report_last_error(&base, "ebpf", "").await.is_err());
    }

    #[test]
    fn url_escaping() {
        assert_eq!(url_escape("ebpf-net/netflow"), "ebpf-net%2Fnetflow");
        assert_eq!(url_escape("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(url_escape("ebpf_x.y~"), "ebpf_x.y~");
    }

    #[test]
    fn rate_limit_counts_suppressed_events() {
        let mut r = RateLimit::new(Duration::from_secs(60));
        assert_eq!(r.hit(1), Some(1));
        assert_eq!(r.hit(1), None);
        assert_eq!(r.hit(2), None);
        let mut r0 = RateLimit::new(Duration::ZERO);
        assert_eq!(r0.hit(1), Some(1));
        assert_eq!(r0.hit(3), Some(3));
    }

    #[test]
    fn jitter_is_small() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(1000) && d < Duration::from_millis(1100));
        }
    }
}
