//! The address tags every ebpf-net measurement carries (contract §1.3–1.5): the two ends as this
//! host sees them (`src_*` is local, `dst_*` remote), and the same ends by role (`client_*`,
//! `server_*`), with `direction` and `conn_side` saying which local end played which role.

use std::net::IpAddr;

use crate::lineproto::{Field, Point};

/// One flow's ends. Ports are tag values: a number, or `*` once folded.
pub struct Endpoints<'a> {
    pub src_ip: IpAddr,
    pub src_port: &'a str,
    pub dst_ip: IpAddr,
    pub dst_port: &'a str,
    /// This host (src) is the client.
    pub outgoing: bool,
}

impl Endpoints<'_> {
    /// Adds the src/dst, client/server, ip-type, `direction` and `conn_side` tags.
    pub fn tag(&self, point: Point) -> Point {
        let src = (
            self.src_ip.to_string(),
            self.src_port,
            ip_type(&self.src_ip),
        );
        let dst = (
            self.dst_ip.to_string(),
            self.dst_port,
            ip_type(&self.dst_ip),
        );
        let (client, server) = if self.outgoing {
            (&src, &dst)
        } else {
            (&dst, &src)
        };
        point
            .tag("src_ip", src.0.clone())
            .tag("src_port", src.1)
            .tag("src_ip_type", src.2)
            .tag("dst_ip", dst.0.clone())
            .tag("dst_port", dst.1)
            .tag("dst_ip_type", dst.2)
            .tag("client_ip", client.0.clone())
            .tag("client_port", client.1)
            .tag("client_ip_type", client.2)
            .tag("server_ip", server.0.clone())
            .tag("server_port", server.1)
            .tag("server_ip_type", server.2)
            .tag(
                "direction",
                if self.outgoing {
                    "outgoing"
                } else {
                    "incoming"
                },
            )
            .tag("conn_side", if self.outgoing { "client" } else { "server" })
    }

    /// Adds `bytes_read`/`bytes_written` (this host's end) and the same bytes by role,
    /// `client_sent`/`server_sent`.
    pub fn byte_fields(&self, point: Point, read: u64, written: u64) -> Point {
        let (client_sent, server_sent) = if self.outgoing {
            (written, read)
        } else {
            (read, written)
        };
        let int = |v: u64| Field::Int(i64::try_from(v).unwrap_or(i64::MAX));
        point
            .field("bytes_read", int(read))
            .field("bytes_written", int(written))
            .field("client_sent", int(client_sent))
            .field("server_sent", int(server_sent))
    }
}

/// private → loopback → multicast → other, in the reference's order (contract §2.3, Go's
/// net.IP predicates).
pub fn ip_type(ip: &IpAddr) -> &'static str {
    let private = match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    if private {
        "private"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_multicast() {
        "multicast"
    } else {
        "other"
    }
}
