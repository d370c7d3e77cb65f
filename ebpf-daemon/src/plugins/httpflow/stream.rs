//! Userspace framing, for the connections the kernel hands over (pipelined requests, which its
//! parser does not queue): per-connection HTTP/1 exchanges from the calls the kernel reports: requests and responses
//! are framed (head, then Content-Length or chunked body counted over the following calls, so
//! sizes are the messages' real sizes whatever the capture saw), queued in order for
//! pipelining, and paired first-in first-out. Interim `1xx` responses (`100 Continue`) are
//! counted into the final response and do not end the exchange.

use std::collections::{HashMap, VecDeque};

use ebpf_common::httpflow::SocketEnds;

use super::parse::{
    self, BodyLen, ChunkStep, Chunked, Parsed, is_request_start, is_response_start,
};

/// Most bytes of a message head gathered across calls before it counts as cut off.
const MAX_HEAD: usize = 8192;
/// Requests waiting for their response on one connection (pipelining depth).
const MAX_PENDING: usize = 64;

/// What the kernel reported about one connection (from its first call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnMeta {
    pub ends: SocketEnds,
    pub pid: u32,
    pub comm: [u8; 16],
}

/// One read or write on a connection.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub conn: u64,
    pub ts_ns: u64,
    /// `true` for a write by the process.
    pub write: bool,
    /// Bytes the call moved.
    pub total: u64,
    /// The first of them (at most `total`).
    pub data: &'a [u8],
}

/// The request the kernel had parsed, unanswered, when it handed the connection over.
#[derive(Debug, Clone)]
pub struct Seed {
    pub method: String,
    pub target: String,
    pub truncated: bool,
    /// The process wrote the request (client side).
    pub write: bool,
    /// The request's bytes, and when its last one moved.
    pub bytes: u64,
    pub ts_ns: u64,
}

/// A request with its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub meta: ConnMeta,
    /// The process sent the request (client side).
    pub outgoing: bool,
    pub method: String,
    /// Request target as sent (path not yet cut or normalised).
    pub target: String,
    pub version: &'static str,
    pub status: u16,
    /// First response call − last request call, ns.
    pub latency_ns: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// The request or response head did not fit the capture.
    pub truncated: bool,
}

/// Counters for the daemon's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub exchanges: u64,
    /// Requests dropped unanswered (connection closed or idle, or too many pending).
    pub unanswered: u64,
    /// Responses with no request to pair with.
    pub orphan_responses: u64,
    /// Calls whose bytes could not be framed (not HTTP, or framing lost).
    pub unparsed_calls: u64,
    /// Connections forgotten because the table was full.
    pub evicted_conns: u64,
}

#[derive(Debug)]
enum Frame {
    /// Between messages.
    Idle,
    /// Head bytes so far.
    Head(Vec<u8>),
    Body(u64),
    Chunked(Chunked),
    /// Length unknown: the message ends at the next one, or at close.
    Open,
}

#[derive(Debug)]
struct Side {
    frame: Frame,
    /// The exchange the current message belongs to.
    txn: Option<u64>,
}

impl Side {
    fn new() -> Self {
        Side {
            frame: Frame::Idle,
            txn: None,
        }
    }
}

#[derive(Debug)]
struct Txn {
    seq: u64,
    method: String,
    target: String,
    truncated: bool,
    req_end_ts: u64,
    req_bytes: u64,
    req_done: bool,
    status: Option<(u16, &'static str)>,
    first_resp_ts: u64,
    resp_bytes: u64,
    resp_done: bool,
}

struct Conn {
    meta: ConnMeta,
    last_ts: u64,
    /// Direction of requests: `Some(true)` when the process writes them (client).
    req_write: Option<bool>,
    txns: VecDeque<Txn>,
    next_seq: u64,
    req: Side,
    resp: Side,
    /// Switched protocols (101): nothing after is HTTP/1.
    upgraded: bool,
}

pub struct Streams {
    conns: HashMap<u64, Conn>,
    max_conns: usize,
    pub stats: StreamStats,
}

impl Streams {
    pub fn new(max_conns: usize) -> Self {
        Streams {
            conns: HashMap::new(),
            max_conns,
            stats: StreamStats::default(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// A read or write; finished exchanges go to `out`.
    pub fn on_call(
        &mut self,
        call: &Call,
        meta: impl FnOnce() -> ConnMeta,
        out: &mut Vec<Exchange>,
    ) {
        if !self.conns.contains_key(&call.conn) {
            // A connection starts being followed at a request.
            if !is_request_start(call.data) {
                self.stats.unparsed_calls += 1;
                return;
            }
            if self.conns.len() >= self.max_conns {
                self.evict_oldest(out);
            }
            self.conns.insert(
                call.conn,
                Conn {
                    meta: meta(),
                    last_ts: call.ts_ns,
                    req_write: Some(call.write),
                    txns: VecDeque::new(),
                    next_seq: 0,
                    req: Side::new(),
                    resp: Side::new(),
                    upgraded: false,
                },
            );
        }
        tracing::trace!(
            "httpflow: conn {:#x} t={} {} {} bytes: {:?}",
            call.conn,
            call.ts_ns,
            if call.write { "write" } else { "read" },
            call.total,
            String::from_utf8_lossy(&call.data[..call.data.len().min(20)])
        );
        let conn = self.conns.get_mut(&call.conn).expect("inserted above");
        conn.last_ts = call.ts_ns;
        if conn.upgraded {
            return;
        }
        let is_req = conn.req_write == Some(call.write);
        feed(conn, is_req, call, &mut self.stats);
        complete(conn, out, &mut self.stats);
    }

    /// The kernel hands a connection over with one request it parsed, still unanswered: it
    /// comes first in the queue, complete.
    pub fn on_seed(&mut self, conn_id: u64, meta: ConnMeta, seed: Seed) {
        if let Some(old) = self.conns.remove(&conn_id) {
            // A connection of the same id that was not closed: finish it first.
            let mut out = Vec::new();
            finish_conn(old, &mut out, &mut self.stats);
        }
        if self.conns.len() >= self.max_conns {
            let mut out = Vec::new();
            self.evict_oldest(&mut out);
        }
        let mut conn = Conn {
            meta,
            last_ts: seed.ts_ns,
            req_write: Some(seed.write),
            txns: VecDeque::new(),
            next_seq: 0,
            req: Side::new(),
            resp: Side::new(),
            upgraded: false,
        };
        start_request(
            &mut conn,
            seed.method,
            seed.target,
            seed.truncated,
            seed.ts_ns,
            seed.bytes,
            &mut self.stats,
        );
        conn.req.txn = None;
        if let Some(txn) = conn.txns.back_mut() {
            txn.req_done = true;
        }
        self.conns.insert(conn_id, conn);
    }

    /// The connection closed: a response cut short by the close still counts; requests
    /// without a response are dropped (as the reference does).
    pub fn on_close(&mut self, conn: u64, out: &mut Vec<Exchange>) {
        if let Some(conn) = self.conns.remove(&conn) {
            finish_conn(conn, out, &mut self.stats);
        }
    }

    /// Closes connections idle since before `older_than_ns`.
    pub fn expire(&mut self, older_than_ns: u64, out: &mut Vec<Exchange>) {
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ts < older_than_ns)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.on_close(id, out);
        }
    }

    fn evict_oldest(&mut self, out: &mut Vec<Exchange>) {
        if let Some(id) = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_ts)
            .map(|(&id, _)| id)
        {
            self.stats.evicted_conns += 1;
            self.on_close(id, out);
        }
    }
}

fn finish_conn(mut conn: Conn, out: &mut Vec<Exchange>, stats: &mut StreamStats) {
    for txn in conn.txns.iter_mut() {
        if txn.status.is_some() {
            txn.req_done = true;
            txn.resp_done = true;
        }
    }
    complete(&mut conn, out, stats);
    stats.unanswered += conn.txns.len() as u64;
}

/// Frames `call`'s bytes as requests (`is_req`) or responses.
fn feed(conn: &mut Conn, is_req: bool, call: &Call, stats: &mut StreamStats) {
    let total = call.total;
    let mut pos: u64 = 0;
    while pos < total {
        let known = call.data.get(pos as usize..).unwrap_or(&[]);
        let side = if is_req {
            &mut conn.req
        } else {
            &mut conn.resp
        };
        match &mut side.frame {
            Frame::Idle => {
                let starts = if is_req {
                    is_request_start(known)
                } else {
                    is_response_start(known)
                };
                if !starts {
                    stats.unparsed_calls += 1;
                    tracing::debug!(
                        "httpflow: conn {:#x}: {} call of {} bytes at {pos} is no message start: {:?}",
                        call.conn,
                        if is_req { "request" } else { "response" },
                        call.total,
                        String::from_utf8_lossy(&known[..known.len().min(24)])
                    );
                    return;
                }
                side.frame = Frame::Head(Vec::new());
            }
            Frame::Head(buf) => {
                let prev = buf.len();
                let room = MAX_HEAD - prev;
                buf.extend_from_slice(&known[..known.len().min(room)]);
                let appended = buf.len() - prev;
                let head = std::mem::take(buf);
                let remaining = total - pos;
                let cut = (appended as u64) < remaining;
                if is_req {
                    match parse::request(&head) {
                        Parsed::Complete(h) => {
                            let used = (h.head_len - prev) as u64;
                            start_request(
                                conn,
                                h.method,
                                h.target,
                                false,
                                call.ts_ns,
                                h.head_len as u64,
                                stats,
                            );
                            conn.req.frame = body_frame(h.body);
                            pos += used;
                            settle(conn, true, call.ts_ns);
                        }
                        Parsed::Partial if cut || head.len() >= MAX_HEAD => {
                            let (method, target) =
                                parse::request_line_prefix(&head).unwrap_or_default();
                            start_request(
                                conn,
                                method,
                                target,
                                true,
                                call.ts_ns,
                                prev as u64 + remaining,
                                stats,
                            );
                            conn.req.frame = Frame::Open;
                            pos = total;
                        }
                        Parsed::Partial => {
                            conn.req.frame = Frame::Head(head);
                            pos = total;
                        }
                        Parsed::Invalid => {
                            conn.req.frame = Frame::Idle;
                            stats.unparsed_calls += 1;
                            return;
                        }
                    }
                } else {
                    let head_request = conn
                        .txns
                        .iter()
                        .find(|t| t.status.is_none())
                        .is_some_and(|t| t.method == "HEAD");
                    match parse::response(&head, head_request) {
                        Parsed::Complete(h) => {
                            let used = (h.head_len - prev) as u64;
                            start_response(
                                conn,
                                h.status,
                                h.version,
                                false,
                                call.ts_ns,
                                h.head_len as u64,
                                stats,
                            );
                            conn.resp.frame = body_frame(h.body);
                            pos += used;
                            settle(conn, false, call.ts_ns);
                        }
                        Parsed::Partial if cut || head.len() >= MAX_HEAD => {
                            let (status, version) =
                                parse::response_line_prefix(&head).unwrap_or((0, "1.1"));
                            start_response(
                                conn,
                                status,
                                version,
                                true,
                                call.ts_ns,
                                prev as u64 + remaining,
                                stats,
                            );
                            conn.resp.frame = Frame::Open;
                            pos = total;
                        }
                        Parsed::Partial => {
                            conn.resp.frame = Frame::Head(head);
                            pos = total;
                        }
                        Parsed::Invalid => {
                            conn.resp.frame = Frame::Idle;
                            stats.unparsed_calls += 1;
                            return;
                        }
                    }
                }
            }
            Frame::Body(rem) => {
                let take = (*rem).min(total - pos);
                *rem -= take;
                pos += take;
                add_bytes(conn, is_req, take, call.ts_ns);
                settle(conn, is_req, call.ts_ns);
            }
            Frame::Chunked(chunked) => match chunked.feed(known, total - pos) {
                ChunkStep::More => {
                    add_bytes(conn, is_req, total - pos, call.ts_ns);
                    pos = total;
                }
                ChunkStep::Done(used) => {
                    side.frame = Frame::Body(0);
                    add_bytes(conn, is_req, used as u64, call.ts_ns);
                    pos += used as u64;
                    settle(conn, is_req, call.ts_ns);
                }
                ChunkStep::Lost => {
                    side.frame = Frame::Open;
                    add_bytes(conn, is_req, total - pos, call.ts_ns);
                    pos = total;
                }
            },
            Frame::Open => {
                let next = if is_req {
                    is_request_start(known)
                } else {
                    is_response_start(known)
                };
                if pos == 0 && next {
                    side.frame = Frame::Body(0);
                    settle(conn, is_req, call.ts_ns);
                    continue;
                }
                add_bytes(conn, is_req, total - pos, call.ts_ns);
                pos = total;
            }
        }
    }
}

fn body_frame(body: BodyLen) -> Frame {
    match body {
        BodyLen::Length(n) => Frame::Body(n),
        BodyLen::Chunked => Frame::Chunked(Chunked::new()),
        BodyLen::UntilClose => Frame::Open,
    }
}

/// Ends the current message when its body is complete (`Body(0)`).
fn settle(conn: &mut Conn, is_req: bool, _ts: u64) {
    let side = if is_req {
        &mut conn.req
    } else {
        &mut conn.resp
    };
    if !matches!(side.frame, Frame::Body(0)) {
        return;
    }
    side.frame = Frame::Idle;
    let Some(seq) = side.txn.take() else { return };
    if let Some(txn) = conn.txns.iter_mut().find(|t| t.seq == seq) {
        if is_req {
            txn.req_done = true;
        } else if txn.status.is_some() {
            txn.resp_done = true;
        }
    }
}

fn add_bytes(conn: &mut Conn, is_req: bool, n: u64, ts: u64) {
    let side = if is_req { &conn.req } else { &conn.resp };
    let Some(seq) = side.txn else { return };
    if let Some(txn) = conn.txns.iter_mut().find(|t| t.seq == seq) {
        if is_req {
            txn.req_bytes += n;
            txn.req_end_ts = ts;
        } else {
            txn.resp_bytes += n;
        }
    }
}

fn start_request(
    conn: &mut Conn,
    method: String,
    target: String,
    truncated: bool,
    ts: u64,
    bytes: u64,
    stats: &mut StreamStats,
) {
    if conn.txns.len() >= MAX_PENDING {
        conn.txns.pop_front();
        stats.unanswered += 1;
    }
    let seq = conn.next_seq;
    conn.next_seq += 1;
    conn.txns.push_back(Txn {
        seq,
        method,
        target,
        truncated,
        req_end_ts: ts,
        req_bytes: bytes,
        req_done: false,
        status: None,
        first_resp_ts: 0,
        resp_bytes: 0,
        resp_done: false,
    });
    conn.req.txn = Some(seq);
}

fn start_response(
    conn: &mut Conn,
    status: u16,
    version: &'static str,
    truncated: bool,
    ts: u64,
    bytes: u64,
    stats: &mut StreamStats,
) {
    let Some(txn) = conn.txns.iter_mut().find(|t| t.status.is_none()) else {
        tracing::debug!("httpflow: response {status} at {ts} with no request pending");
        stats.orphan_responses += 1;
        conn.resp.txn = None;
        return;
    };
    txn.resp_bytes += bytes;
    txn.truncated |= truncated;
    if status == 101 {
        conn.upgraded = true;
    }
    if (100..200).contains(&status) && status != 101 {
        // Interim: its bytes belong to the exchange, the final response is still to come.
        conn.resp.txn = None;
        return;
    }
    txn.status = Some((status, version));
    txn.first_resp_ts = ts;
    conn.resp.txn = Some(txn.seq);
}

/// Moves finished exchanges (request and response both complete) from the front of the queue.
fn complete(conn: &mut Conn, out: &mut Vec<Exchange>, stats: &mut StreamStats) {
    while conn.txns.front().is_some_and(|t| t.req_done && t.resp_done) {
        let txn = conn.txns.pop_front().expect("checked");
        let (status, version) = txn.status.expect("resp_done implies a status");
        let outgoing = conn.req_write == Some(true);
        let (bytes_read, bytes_written) = if outgoing {
            (txn.resp_bytes, txn.req_bytes)
        } else {
            (txn.req_bytes, txn.resp_bytes)
        };
        stats.exchanges += 1;
        out.push(Exchange {
            meta: conn.meta.clone(),
            outgoing,
            method: txn.method,
            target: txn.target,
            version,
            status,
            latency_ns: txn.first_resp_ts.saturating_sub(txn.req_end_ts),
            bytes_read,
            bytes_written,
            truncated: txn.truncated,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ConnMeta {
        ConnMeta {
            ends: SocketEnds {
                sport: 40000,
                dport: 80,
                family: 2,
                netns: 1,
                ..Default::default()
            },
            pid: 7,
            comm: [0; 16],
        }
    }

    struct Conv {
        s: Streams,
        out: Vec<Exchange>,
        ts: u64,
        capture: usize,
    }

    impl Conv {
        fn new() -> Self {
            Conv {
                s: Streams::new(16),
                out: Vec::new(),
                ts: 1000,
                capture: 1024,
            }
        }
        fn call(&mut self, write: bool, bytes: &[u8]) {
            self.ts += 1000;
            let n = bytes.len().min(self.capture);
            let call = Call {
                conn: 1,
                ts_ns: self.ts,
                write,
                total: bytes.len() as u64,
                data: &bytes[..n],
            };
            self.s.on_call(&call, meta, &mut self.out);
        }
        /// A call of `total` bytes of which only `data` is known.
        fn big(&mut self, write: bool, data: &[u8], total: u64) {
            self.ts += 1000;
            let call = Call {
                conn: 1,
                ts_ns: self.ts,
                write,
                total,
                data,
            };
            self.s.on_call(&call, meta, &mut self.out);
        }
    }

    const GET: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn client_get_with_sizes_and_latency() {
        let mut c = Conv::new();
        c.call(true, GET);
        c.call(false, OK);
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert!(e.outgoing);
        assert_eq!((e.method.as_str(), e.target.as_str()), ("GET", "/a?x=1"));
        assert_eq!((e.status, e.version), (200, "1.1"));
        assert_eq!(e.bytes_written, GET.len() as u64);
        assert_eq!(e.bytes_read, OK.len() as u64);
        assert_eq!(e.latency_ns, 1000);
        assert!(!e.truncated);
    }

    #[test]
    fn server_side_body_in_several_reads_beyond_capture() {
        let mut c = Conv::new();
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n";
        c.big(false, head, head.len() as u64 + 1000);
        for _ in 0..15 {
            c.big(false, b"zzzz", 65536);
        }
        c.big(false, b"zzzz", 1048576 - 1000 - 15 * 65536);
        assert!(c.out.is_empty());
        c.call(true, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert!(!e.outgoing);
        assert_eq!(e.bytes_read, head.len() as u64 + 1048576);
        assert_eq!(e.status, 201);
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let mut c = Conv::new();
        for _ in 0..3 {
            c.call(true, GET);
            c.call(false, OK);
        }
        // Three pipelined requests in one write, three responses in one read.
        let mut reqs = Vec::new();
        for _ in 0..3 {
            reqs.extend_from_slice(GET);
        }
        c.call(true, &reqs);
        let mut resps = Vec::new();
        for _ in 0..3 {
            resps.extend_from_slice(OK);
        }
        c.call(false, &resps);
        assert_eq!(c.out.len(), 6);
        assert!(c.out.iter().all(|e| e.bytes_read == OK.len() as u64));
        assert!(c.out.iter().all(|e| e.bytes_written == GET.len() as u64));
    }

    #[test]
    fn request_split_across_writes() {
        let mut c = Conv::new();
        let req = b"PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc";
        for chunk in req.chunks(7) {
            c.call(true, chunk);
        }
        c.call(false, OK);
        assert_eq!(c.out.len(), 1);
        assert_eq!(c.out[0].method, "PUT");
        assert_eq!(c.out[0].bytes_written, req.len() as u64);
    }

    #[test]
    fn expect_continue() {
        let mut c = Conv::new();
        let head = b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        c.call(true, head);
        c.call(false, cont);
        c.call(true, b"body");
        let start = c.ts;
        c.call(false, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert_eq!(e.status, 500);
        assert_eq!(e.bytes_written, head.len() as u64 + 4);
        assert_eq!(e.bytes_read, cont.len() as u64 + 40);
        assert_eq!(e.latency_ns, c.ts - start);
    }

    #[test]
    fn chunked_response_and_head_request() {
        let mut c = Conv::new();
        c.call(true, b"HEAD / HTTP/1.1\r\n\r\n");
        c.call(false, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n");
        c.call(true, b"GET /c HTTP/1.1\r\n\r\n");
        c.call(
            false,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        c.call(false, b"3\r\nabc\r\n");
        assert_eq!(c.out.len(), 1);
        c.call(false, b"0\r\n\r\n");
        assert_eq!(c.out.len(), 2);
        assert_eq!(c.out[1].bytes_read, 47 + 8 + 5);
    }

    #[test]
    fn head_cut_by_capture_is_truncated_and_framing_resumes() {
        let mut c = Conv::new();
        c.capture = 64;
        let mut req = b"GET /".to_vec();
        req.extend(std::iter::repeat_n(b'p', 200));
        req.extend_from_slice(b" HTTP/1.1\r\nHost: h\r\n\r\n");
        c.call(true, &req);
        c.call(false, OK);
        c.call(true, GET);
        c.call(false, OK);
        assert_eq!(c.out.len(), 2);
        assert!(c.out[0].truncated);
        assert_eq!(c.out[0].target.len(), 60);
        assert_eq!(c.out[0].bytes_written, req.len() as u64);
        assert!(!c.out[1].truncated);
    }

    #[test]
    fn close_ends_an_open_response_and_drops_unanswered() {
        let mut c = Conv::new();
        c.call(true, GET);
        c.call(false, b"HTTP/1.0 200 OK\r\n\r\nsome");
        c.call(false, b"more");
        assert!(c.out.is_empty());
        c.s.on_close(1, &mut c.out);
        assert_eq!(c.out.len(), 1);
        assert_eq!(c.out[0].bytes_read, 19 + 8);
        assert_eq!(c.out[0].version, "1.0");
        let mut c = Conv::new();
        c.call(true, GET);
        c.s.on_close(1, &mut c.out);
        assert!(c.out.is_empty());
        assert_eq!(c.s.stats.unanswered, 1);
    }

    #[test]
    fn a_seeded_connection_pairs_the_kernel_request_first() {
        // The kernel parsed GET /a (34 bytes, unanswered) and saw a second request start: it
        // hands the connection over with the first as a seed, then the raw calls.
        let mut c = Conv::new();
        c.s.on_seed(
            1,
            meta(),
            Seed {
                method: "GET".into(),
                target: "/a".into(),
                truncated: false,
                write: true,
                bytes: 34,
                ts_ns: 1500,
            },
        );
        c.call(true, b"GET /b HTTP/1.1\r\n\r\n");
        let two = [OK, OK].concat();
        c.call(false, &two);
        assert_eq!(c.out.len(), 2);
        assert_eq!(c.out[0].target, "/a");
        assert_eq!(c.out[0].bytes_written, 34);
        assert_eq!(c.out[0].bytes_read, OK.len() as u64);
        assert_eq!(c.out[0].latency_ns, c.ts - 1500);
        assert_eq!(c.out[1].target, "/b");
        assert!(c.out.iter().all(|e| e.outgoing && e.status == 200));
    }

    #[test]
    fn non_http_never_starts_a_connection() {
        let mut c = Conv::new();
        c.call(true, b"\x16\x03\x01\x00\xa5random");
        c.call(false, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(c.out.is_empty());
        assert_eq!(c.s.tracked(), 0);
    }
}
