//! HTTP/1 message heads, parsed with `httparse`; plus what httparse cannot give for a head cut
//! off by the capture (the method and the start of the target from the request line).

/// Most headers a head may carry; a head with more is treated as cut off.
const MAX_HEADERS: usize = 64;

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Length(u64),
    Chunked,
    /// Until the connection closes (a response with neither length nor chunking).
    UntilClose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub head_len: usize,
    pub body: BodyLen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// `1.0` or `1.1`.
    pub version: &'static str,
    pub head_len: usize,
    pub body: BodyLen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Complete(T),
    /// More bytes are needed.
    Partial,
    Invalid,
}

/// True when `data` can be the start of a request (a known method and a space).
pub fn is_request_start(data: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"PUT ",
        b"POST ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| data.starts_with(m))
}

/// True when `data` can be the start of a response.
pub fn is_response_start(data: &[u8]) -> bool {
    data.starts_with(b"HTTP/1.")
}

pub fn request(data: &[u8]) -> Parsed<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(data) {
        Ok(httparse::Status::Complete(head_len)) => {
            let body = body_len(req.headers).unwrap_or(BodyLen::Length(0));
            let body = if body == BodyLen::UntilClose {
                BodyLen::Length(0)
            } else {
                body
            };
            Parsed::Complete(RequestHead {
                method: req.method.unwrap_or_default().to_string(),
                target: req.path.unwrap_or_default().to_string(),
                head_len,
                body,
            })
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// `head_request`: the response answers a HEAD request (it has no body whatever it says).
pub fn response(data: &[u8], head_request: bool) -> Parsed<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(data) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = resp.code.unwrap_or(0);
            let no_body = head_request || status < 200 || status == 204 || status == 304;
            let body = if no_body {
                BodyLen::Length(0)
            } else {
                body_len(resp.headers).unwrap_or(BodyLen::UntilClose)
            };
            Parsed::Complete(ResponseHead {
                status,
                version: if resp.version == Some(0) {
                    "1.0"
                } else {
                    "1.1"
                },
                head_len,
                body,
            })
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// `Transfer-Encoding: chunked` wins over `Content-Length` (RFC 9112 §6.3); None without either.
fn body_len(headers: &[httparse::Header]) -> Option<BodyLen> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = String::from_utf8_lossy(h.value);
            if value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            {
                return Some(BodyLen::Chunked);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        }
    }
    length.map(BodyLen::Length)
}

/// Method and target from a request line cut off by the capture: the target is what was
/// captured of it.
pub fn request_line_prefix(data: &[u8]) -> Option<(String, String)> {
    if !is_request_start(data) {
        return None;
    }
    let space = data.iter().position(|&b| b == b' ')?;
    let rest = &data[space + 1..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(rest.len());
    Some((
        String::from_utf8_lossy(&data[..space]).into_owned(),
        String::from_utf8_lossy(&rest[..end]).into_owned(),
    ))
}

/// Status and version from a status line cut off by the capture.
pub fn response_line_prefix(data: &[u8]) -> Option<(u16, &'static str)> {
    let version = match data.get(..9)? {
        b"HTTP/1.0 " => "1.0",
        b"HTTP/1.1 " => "1.1",
        _ => return None,
    };
    let code = std::str::from_utf8(data.get(9..12)?).ok()?.parse().ok()?;
    Some((code, version))
}

/// Incremental chunked-body framing: only the size lines need to be seen; chunk data is
/// skipped by count, so it may lie beyond the capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// Reading a size line (bytes so far).
    Size(Vec<u8>),
    /// Chunk data plus its CRLF still to come.
    Data(u64),
    /// Reading trailer lines after the last chunk (bytes of the current line).
    Trailer(Vec<u8>),
}

/// Longest size or trailer line accepted.
const MAX_LINE: usize = 4096;

pub enum ChunkStep {
    /// All `n` bytes were consumed; the body goes on.
    More,
    /// The body ended after `used` bytes of the input.
    Done(usize),
    /// The framing could not be followed (bad line, or bytes needed but not captured).
    Lost,
}

impl Chunked {
    pub fn new() -> Self {
        Chunked::Size(Vec::new())
    }

    /// Feeds `total` bytes of which the first `data.len()` are known.
    pub fn feed(&mut self, data: &[u8], total: u64) -> ChunkStep {
        let mut pos: u64 = 0;
        while pos < total {
            match self {
                Chunked::Data(rem) => {
                    let take = (*rem).min(total - pos);
                    *rem -= take;
                    pos += take;
                    if *rem == 0 {
                        *self = Chunked::Size(Vec::new());
                    }
                }
                Chunked::Size(line) | Chunked::Trailer(line) => {
                    let Some(&b) = data.get(pos as usize) else {
                        return ChunkStep::Lost;
                    };
                    pos += 1;
                    line.push(b);
                    if line.len() > MAX_LINE {
                        return ChunkStep::Lost;
                    }
                    if b != b'\n' {
                        continue;
                    }
                    let text = String::from_utf8_lossy(line).trim().to_string();
                    if matches!(self, Chunked::Trailer(_)) {
                        if text.is_empty() {
                            return ChunkStep::Done(pos as usize);
                        }
                        *self = Chunked::Trailer(Vec::new());
                        continue;
                    }
                    let hex = text.split(';').next().unwrap_or("").trim();
                    let Ok(size) = u64::from_str_radix(hex, 16) else {
                        return ChunkStep::Lost;
                    };
                    *self = if size == 0 {
                        Chunked::Trailer(Vec::new())
                    } else {
                        Chunked::Data(size + 2)
                    };
                }
            }
        }
        ChunkStep::More
    }
}

/// The `path` field: the target without query or fragment, scheme and host removed from an
/// absolute-form target, cut to `max_len` bytes; numeric and UUID-like segments replaced by
/// `:id` when `normalize`.
pub fn path_of(target: &str, max_len: usize, normalize: bool) -> String {
    let mut path = target;
    if let Some(rest) = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        path = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    if let Some(i) = path.find(['?', '#']) {
        path = &path[..i];
    }
    let mut out = if normalize {
        path.split('/')
            .map(|seg| if is_id(seg) { ":id" } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    } else {
        path.to_string()
    };
    if out.len() > max_len {
        let mut cut = max_len;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// A segment that names one object rather than a route: all digits, a UUID, or a long hex id.
fn is_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    if seg.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = seg.split('-').collect();
    if parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| hex(p))
    {
        return true;
    }
    seg.len() >= 16 && hex(seg) && seg.bytes().any(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let Parsed::Complete(head) =
            request(b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        else {
            panic!()
        };
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/up?x=1");
        assert_eq!(head.head_len, 53);
        assert_eq!(head.body, BodyLen::Length(5));
        assert_eq!(request(b"GET / HTTP/1.1\r\nHost"), Parsed::Partial);
        assert_eq!(request(b"\x16\x03\x01\x02\x00"), Parsed::Invalid);
        let Parsed::Complete(head) = request(
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
        ) else {
            panic!()
        };
        assert_eq!(head.body, BodyLen::Chunked);
    }

    #[test]
    fn response_heads() {
        let Parsed::Complete(head) = response(
            b"HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\n",
            false,
        ) else {
            panic!()
        };
        assert_eq!((head.status, head.version), (404, "1.0"));
        assert_eq!(head.body, BodyLen::Length(9));
        let Parsed::Complete(head) = response(b"HTTP/1.1 200 OK\r\n\r\n", false) else {
            panic!()
        };
        assert_eq!(head.body, BodyLen::UntilClose);
        let Parsed::Complete(head) =
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
        else {
            panic!()
        };
        assert_eq!(head.body, BodyLen::Length(0));
        let Parsed::Complete(head) = response(b"HTTP/1.1 100 Continue\r\n\r\n", false) else {
            panic!()
        };
        assert_eq!((head.status, head.body), (100, BodyLen::Length(0)));
    }

    #[test]
    fn cut_request_line() {
        assert_eq!(
            request_line_prefix(b"GET /aaaa"),
            Some(("GET".into(), "/aaaa".into()))
        );
        assert_eq!(
            request_line_prefix(b"TRACE /t HTTP/1.1\r\n"),
            Some(("TRACE".into(), "/t".into()))
        );
        assert_eq!(request_line_prefix(b"FOO /x"), None);
        assert_eq!(
            response_line_prefix(b"HTTP/1.1 503 Serv"),
            Some((503, "1.1"))
        );
        assert_eq!(response_line_prefix(b"HTTP/1.1 50"), None);
    }

    #[test]
    fn chunked_framing_across_calls() {
        let body = b"5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\nNEXT";
        for split in 1..body.len() - 4 {
            let mut c = Chunked::new();
            let (a, b) = body.split_at(split);
            match c.feed(a, a.len() as u64) {
                ChunkStep::More => {}
                _ => panic!("split {split}"),
            }
            match c.feed(b, b.len() as u64) {
                ChunkStep::Done(used) => assert_eq!(used, b.len() - 4, "split {split}"),
                _ => panic!("split {split}"),
            }
        }
        // Chunk data beyond the capture is skipped by count.
        let mut c = Chunked::new();
        assert!(matches!(c.feed(b"100000\r\n", 8), ChunkStep::More));
        assert!(matches!(c.feed(b"xx", 0x100000), ChunkStep::More));
        assert!(matches!(c.feed(b"\r\n0\r\n\r\n", 7), ChunkStep::Done(7)));
        // A size line that was not captured loses the framing.
        let mut c = Chunked::new();
        assert!(matches!(c.feed(b"", 10), ChunkStep::Lost));
    }

    #[test]
    fn paths() {
        assert_eq!(path_of("/a/b?q=1", 256, false), "/a/b");
        assert_eq!(path_of("http://h:8/x?y", 256, false), "/x");
        assert_eq!(path_of("https://h", 256, false), "/");
        assert_eq!(path_of("/abcdef", 4, false), "/abc");
        assert_eq!(
            path_of(
                "/users/12345/orders/0f8fad5b-d9cb-469f-a165-70867728950e/x",
                256,
                true
            ),
            "/users/:id/orders/:id/x"
        );
        assert_eq!(
            path_of("/blob/deadbeef00112233/v2", 256, true),
            "/blob/:id/v2"
        );
        assert_eq!(path_of("/v2/api", 256, true), "/v2/api");
    }
}
