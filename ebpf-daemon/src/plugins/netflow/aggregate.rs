//! From cumulative per-connection counters to per-interval `netflow` rows (contract §1.3, §2.2).
//!
//! The kernel keeps cumulative counters per socket; a connection is identified by its socket
//! address *and* the time tracking began (`start_ns`), because the kernel reuses socket memory.
//! Each interval, a connection contributes its growth since the previous interval; a closed one
//! its last growth and `tcp_closed = 1`, then it is forgotten. `tcp_established = 1` is counted
//! once, only for handshakes seen while the probes were attached.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ebpf_common::netflow::{
    AF_INET6, CONN_F_CONNECTING, CONN_F_ESTABLISHED, CONN_F_FINAL, CONN_F_INCOMING,
    CONN_F_OUTGOING, ClosedConn, ConnInfo, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    lineproto::{Field, Point},
    plugins::{GlobalTags, endpoints::Endpoints},
};

#[derive(Debug, Clone, Copy)]
pub struct NetflowOptions {
    /// Client-side ports at or above this fold to `*` (the reference's default 0 folds them all).
    pub ephemeral_port_min: u16,
    /// Report connections with a loopback end (left out by default, as the reference does).
    pub include_loopback: bool,
    pub ipv6_disabled: bool,
    pub include_udp: bool,
}

/// One entry of the kernel's connection map.
#[derive(Debug, Clone, Copy)]
pub struct ConnSample {
    pub sock: u64,
    pub info: ConnInfo,
}

/// What the kernel records cannot tell: process names and listening ports.
pub trait Resolver {
    /// Name of `pid` given its kernel `comm`; "" when unknown (the tag is then left out).
    fn process_name(&mut self, pid: u32, comm: &[u8; 16]) -> String;
    /// True when `port` is a listening TCP port (or a bound, unconnected UDP port) in `pid`'s
    /// network namespace: the direction of connections whose handshake we did not see.
    fn is_listening(&mut self, pid: u32, protocol: u16, port: u16) -> bool;
    /// The domain name DNS answers gave for `ip` (dnsflow's cache), if any.
    fn domain(&mut self, ip: IpAddr) -> Option<String>;
    /// The address network namespace `netns` sends from to reach `peer` (its routing's choice),
    /// for a UDP socket bound to no address; `pid` used the socket (0 if unknown).
    fn local_address(&mut self, netns: u32, pid: u32, peer: IpAddr) -> Option<IpAddr>;
}

/// Counts of one interval, for the daemon's debug log and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntervalStats {
    pub live: usize,
    pub closed: usize,
    pub rows: usize,
    /// Left out by a filter (loopback, zero address or port, UDP, IPv6).
    pub filtered: usize,
}

pub struct IntervalOutput {
    pub points: Vec<Point>,
    /// Map keys the caller must delete: closed entries still in the map, and idle ones.
    pub delete: Vec<u64>,
    pub stats: IntervalStats,
}

type ConnId = (u64, u64);

#[derive(Debug, Clone, Default)]
struct Seen {
    sent: u64,
    recv: u64,
    retrans: u32,
    established_reported: bool,
    /// The remote's domain name, once DNS named it: kept for the connection's life, so a
    /// long-lived connection keeps its `dst_domain` after the DNS record's TTL runs out.
    domain: Option<String>,
}

pub struct Tracker {
    options: NetflowOptions,
    seen: HashMap<ConnId, Seen>,
    /// Closed in the last two intervals: a close can be both in the ring buffer and still in the
    /// map (flagged) for a moment, and must count once.
    closed_recently: [HashSet<ConnId>; 2],
}

impl Tracker {
    pub fn new(options: NetflowOptions) -> Self {
        Self {
            options,
            seen: HashMap::new(),
            closed_recently: [HashSet::new(), HashSet::new()],
        }
    }

    /// Connections remembered between intervals.
    pub fn tracked(&self) -> usize {
        self.seen.len()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn interval(
        &mut self,
        live: &[ConnSample],
        closed: &[ClosedConn],
        resolver: &mut dyn Resolver,
        tags: &GlobalTags,
        timestamp_ns: i64,
        now_ns: u64,
        idle_ns: u64,
    ) -> IntervalOutput {
        let mut rows: BTreeMap<RowKey, RowValues> = BTreeMap::new();
        let mut delete = Vec::new();
        let mut stats = IntervalStats::default();
        let mut alive: HashSet<ConnId> = HashSet::new();
        self.closed_recently.swap(0, 1);
        self.closed_recently[0].clear();

        let mut finals: Vec<(u64, ConnInfo)> = closed.iter().map(|c| (c.sock, c.info)).collect();
        for sample in live {
            let info = &sample.info;
            if info.flags & CONN_F_FINAL != 0 {
                finals.push((sample.sock, *info));
                delete.push(sample.sock);
                continue;
            }
            if now_ns.saturating_sub(info.last_ns) > idle_ns {
                // Idle for hours: report what is left and stop tracking (UDP sockets have no
                // close event at every tier).
                let id = (sample.sock, info.start_ns);
                let (delta, domain) = self.take(id, info);
                self.add(&mut rows, &mut stats, resolver, info, delta, domain);
                delete.push(sample.sock);
                continue;
            }
            stats.live += 1;
            let id = (sample.sock, info.start_ns);
            alive.insert(id);
            let delta = self.advance(id, info);
            let known = self.seen.get(&id).and_then(|seen| seen.domain.clone());
            let domain = self.add(&mut rows, &mut stats, resolver, info, delta, known);
            if let Some(seen) = self.seen.get_mut(&id) {
                seen.domain = domain;
            }
        }
        for (sock, info) in finals {
            let id = (sock, info.start_ns);
            if self.closed_recently.iter().any(|set| set.contains(&id)) {
                continue;
            }
            self.closed_recently[0].insert(id);
            stats.closed += 1;
            let (mut delta, domain) = self.take(id, &info);
            // A connect() that never established (refused, timed out) closed no connection.
            let failed_connect =
                info.flags & CONN_F_CONNECTING != 0 && info.flags & CONN_F_ESTABLISHED == 0;
            delta.closed = info.protocol == IPPROTO_TCP && !failed_connect;
            self.add(&mut rows, &mut stats, resolver, &info, delta, domain);
        }
        // Entries that left the map without a close record (evicted) are forgotten. The caller
        // drains the ring buffer after walking the map, so a close record never trails its entry.
        self.seen.retain(|id, _| alive.contains(id));

        stats.rows = rows.len();
        let points = rows
            .into_iter()
            .map(|(key, values)| row_point(&key, &values, tags, timestamp_ns))
            .collect();
        IntervalOutput {
            points,
            delete,
            stats,
        }
    }

    /// Growth of a live connection since the last interval.
    fn advance(&mut self, id: ConnId, info: &ConnInfo) -> Delta {
        let seen = self.seen.entry(id).or_default();
        let delta = Delta::between(seen, info);
        *seen = Seen {
            sent: info.bytes_sent,
            recv: info.bytes_recv,
            retrans: info.retransmits,
            established_reported: seen.established_reported || delta.established,
            domain: seen.domain.take(),
        };
        delta
    }

    /// Last growth of a connection that ends now, and its remembered domain; it is forgotten.
    fn take(&mut self, id: ConnId, info: &ConnInfo) -> (Delta, Option<String>) {
        let seen = self.seen.remove(&id).unwrap_or_default();
        (Delta::between(&seen, info), seen.domain)
    }

    fn add(
        &self,
        rows: &mut BTreeMap<RowKey, RowValues>,
        stats: &mut IntervalStats,
        resolver: &mut dyn Resolver,
        info: &ConnInfo,
        delta: Delta,
        known_domain: Option<String>,
    ) -> Option<String> {
        // Before the filters: most connections are idle in most intervals, and the key may
        // need the resolver (a /proc read).
        if delta.sent == 0 && delta.recv == 0 && !delta.established && !delta.closed {
            return known_domain;
        }
        let Some(mut key) = self.row_key(info, resolver) else {
            stats.filtered += 1;
            return known_domain;
        };
        key.dst_domain = known_domain.or_else(|| resolver.domain(key.dst_ip));
        let domain = key.dst_domain.clone();
        key.process_name = if info.pid == 0 {
            String::new()
        } else {
            resolver.process_name(info.pid, &info.comm)
        };
        let row = rows.entry(key).or_default();
        row.bytes_written += delta.sent;
        row.bytes_read += delta.recv;
        row.retransmits += u64::from(delta.retrans);
        row.established += u64::from(delta.established);
        row.closed += u64::from(delta.closed);
        if info.protocol == IPPROTO_TCP {
            row.rtt_sum += u64::from(info.srtt_us);
            row.rtt_var_sum += u64::from(info.rtt_var_us);
            row.rtt_count += 1;
        }
        domain
    }

    /// The row a connection belongs to, or None when a filter leaves it out.
    fn row_key(&self, info: &ConnInfo, resolver: &mut dyn Resolver) -> Option<RowKey> {
        let opts = &self.options;
        let transport = match info.protocol {
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP if opts.include_udp => "udp",
            _ => return None,
        };
        let dst = address(&info.daddr);
        if info.sport == 0 || info.dport == 0 || dst.is_unspecified() {
            return None;
        }
        if !opts.include_loopback && dst.is_loopback() {
            return None;
        }
        let src = match address(&info.saddr) {
            // A UDP socket bound to no address (0.0.0.0, ::) has none in the kernel: each
            // datagram leaves from the address the routing picks for its peer.
            src if src.is_unspecified() && info.protocol == IPPROTO_UDP => {
                resolver.local_address(info.netns, info.pid, dst)?
            }
            src => src,
        };
        if src.is_unspecified() || (!opts.include_loopback && src.is_loopback()) {
            return None;
        }
        let v4 = matches!((src, dst), (IpAddr::V4(_), IpAddr::V4(_)));
        if !v4 && opts.ipv6_disabled {
            return None;
        }
        let outgoing = if info.flags & CONN_F_OUTGOING != 0 {
            true
        } else if info.flags & CONN_F_INCOMING != 0 {
            false
        } else {
            !resolver.is_listening(info.pid, info.protocol, info.sport)
        };
        let fold = |port: u16| {
            if port >= opts.ephemeral_port_min {
                "*".to_string()
            } else {
                port.to_string()
            }
        };
        let (src_port, dst_port) = if outgoing {
            (fold(info.sport), info.dport.to_string())
        } else {
            (info.sport.to_string(), fold(info.dport))
        };
        Some(RowKey {
            src_ip: src,
            dst_ip: dst,
            src_port,
            dst_port,
            transport,
            ipv4: v4 || info.family != AF_INET6,
            outgoing,
            pid: info.pid,
            process_name: String::new(),
            netns: info.netns,
            dst_domain: None,
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    sent: u64,
    recv: u64,
    retrans: u32,
    established: bool,
    /// A TCP connection that closed in this interval.
    closed: bool,
}

impl Delta {
    fn between(seen: &Seen, now: &ConnInfo) -> Delta {
        let went_down = now.bytes_sent < seen.sent
            || now.bytes_recv < seen.recv
            || now.retransmits < seen.retrans;
        let established = now.flags & CONN_F_ESTABLISHED != 0 && !seen.established_reported;
        if went_down {
            // Cannot happen for one connection id; never report a negative delta.
            return Delta {
                established,
                ..Delta::default()
            };
        }
        Delta {
            sent: now.bytes_sent - seen.sent,
            recv: now.bytes_recv - seen.recv,
            retrans: now.retransmits - seen.retrans,
            established,
            closed: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    src_port: String,
    dst_port: String,
    transport: &'static str,
    ipv4: bool,
    outgoing: bool,
    pid: u32,
    process_name: String,
    netns: u32,
    /// Known only when DNS answers named `dst_ip`; never sent empty.
    dst_domain: Option<String>,
}

#[derive(Debug, Default)]
struct RowValues {
    bytes_read: u64,
    bytes_written: u64,
    retransmits: u64,
    established: u64,
    closed: u64,
    rtt_sum: u64,
    rtt_var_sum: u64,
    rtt_count: u64,
}

/// An address from the kernel's 16 bytes; IPv4-mapped and IPv4-compatible ones as IPv4.
pub(crate) fn address(bytes: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*bytes);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    // IPv4-compatible (::a.b.c.d), but not :: and ::1.
    if bytes[..12].iter().all(|&b| b == 0)
        && u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) > 1
    {
        return IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]));
    }
    IpAddr::V6(v6)
}

fn row_point(key: &RowKey, v: &RowValues, tags: &GlobalTags, timestamp_ns: i64) -> Point {
    let ends = Endpoints {
        src_ip: key.src_ip,
        src_port: &key.src_port,
        dst_ip: key.dst_ip,
        dst_port: &key.dst_port,
        outgoing: key.outgoing,
    };
    let point = ends
        .tag(Point::new("netflow", timestamp_ns))
        .tag("family", if key.ipv4 { "IPv4" } else { "IPv6" })
        .tag("transport", key.transport)
        .tag("netns", key.netns.to_string());
    let mut point = ends.byte_fields(point, v.bytes_read, v.bytes_written);
    // Unknown pid or name: left out rather than sent empty.
    if key.pid != 0 {
        point.tags.push(("pid".into(), key.pid.to_string()));
    }
    if !key.process_name.is_empty() {
        point
            .tags
            .push(("process_name".into(), key.process_name.clone()));
    }
    if let Some(domain) = &key.dst_domain {
        point.tags.push(("dst_domain".into(), domain.clone()));
        point.tags.push(("server_domain".into(), domain.clone()));
    }
    if key.transport == "tcp" {
        let count = v.rtt_count.max(1);
        point = point
            .field("retransmits", int(v.retransmits))
            .field("rtt", int(v.rtt_sum / count))
            .field("rtt_var", int(v.rtt_var_sum / count))
            .field("tcp_established", int(v.established))
            .field("tcp_closed", int(v.closed));
    }
    tags.apply(&mut point);
    point
}

fn int(v: u64) -> Field {
    Field::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use ebpf_common::netflow::AF_INET;

    use super::*;

    struct FakeResolver {
        listening: Vec<u16>,
    }

    impl Resolver for FakeResolver {
        fn process_name(&mut self, _pid: u32, comm: &[u8; 16]) -> String {
            let len = comm.iter().position(|&b| b == 0).unwrap_or(16);
            String::from_utf8_lossy(&comm[..len]).into_owned()
        }
        fn domain(&mut self, ip: IpAddr) -> Option<String> {
            (ip == IpAddr::from([10, 0, 0, 3])).then(|| "named.test".to_string())
        }

        fn is_listening(&mut self, _pid: u32, _protocol: u16, port: u16) -> bool {
            self.listening.contains(&port)
        }

        /// Routes 10.0.0.0/24 from 10.0.0.9, nothing else.
        fn local_address(&mut self, _netns: u32, _pid: u32, peer: IpAddr) -> Option<IpAddr> {
            match peer {
                IpAddr::V4(ip) if ip.octets()[..3] == [10, 0, 0] => Some([10, 0, 0, 9].into()),
                _ => None,
            }
        }
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&a);
        b
    }

    fn conn(sport: u16, dport: u16, flags: u32) -> ConnInfo {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        ConnInfo {
            saddr: mapped([10, 0, 0, 1]),
            daddr: mapped([10, 0, 0, 2]),
            sport,
            dport,
            family: AF_INET,
            protocol: IPPROTO_TCP,
            pid: 42,
            netns: 4026531840,
            comm,
            start_ns: 1000,
            last_ns: 1000,
            srtt_us: 100,
            rtt_var_us: 10,
            flags,
            ..ConnInfo::default()
        }
    }

    fn options() -> NetflowOptions {
        NetflowOptions {
            ephemeral_port_min: 0,
            include_loopback: false,
            ipv6_disabled: false,
            include_udp: true,
        }
    }

    fn run(tracker: &mut Tracker, live: &[ConnSample], closed: &[ClosedConn]) -> Vec<Point> {
        let tags = GlobalTags::from_pairs(&[("host", "h"), ("service", "ebpf")]);
        let mut resolver = FakeResolver {
            listening: vec![80],
        };
        tracker
            .interval(live, closed, &mut resolver, &tags, 7, 2000, u64::MAX)
            .points
    }

    fn field(p: &Point, k: &str) -> i64 {
        match p.fields.iter().find(|(key, _)| key == k) {
            Some((_, Field::Int(v))) => *v,
            other => panic!("{k}: {other:?}"),
        }
    }

    fn tag<'a>(p: &'a Point, k: &str) -> Option<&'a str> {
        p.tags
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    const EST_OUT: u32 = CONN_F_ESTABLISHED | CONN_F_OUTGOING;
    /// A socket that reached CLOSE and was destroyed.
    const FINAL: u32 = ebpf_common::netflow::CONN_F_CLOSED | CONN_F_FINAL;

    fn record(sock: u64, info: ConnInfo) -> ClosedConn {
        ClosedConn {
            sock,
            info,
            ..ClosedConn::default()
        }
    }

    #[test]
    fn reads_after_close_count_until_the_socket_is_destroyed() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_recv = 100;
        run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        // A reset: CLOSE, but what arrived before it is still read.
        c.flags |= ebpf_common::netflow::CONN_F_CLOSED;
        c.bytes_recv = 300;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(field(&p[0], "bytes_read"), 200);
        assert_eq!(field(&p[0], "tcp_closed"), 0);
        assert_eq!(t.tracked(), 1);
        c.bytes_recv = 350;
        c.flags |= CONN_F_FINAL;
        let p = run(&mut t, &[], &[record(1, c)]);
        assert_eq!(field(&p[0], "bytes_read"), 50);
        assert_eq!(field(&p[0], "tcp_closed"), 1);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn failed_connect_closes_no_connection() {
        let mut t = Tracker::new(options());
        let c = conn(40000, 80, CONN_F_CONNECTING | FINAL);
        assert!(run(&mut t, &[], &[record(1, c)]).is_empty());
    }

    #[test]
    fn deltas_over_intervals_add_up_and_close_is_counted_once() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_sent = 100;
        c.bytes_recv = 1000;
        let p1 = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(
            (field(&p1[0], "bytes_written"), field(&p1[0], "bytes_read")),
            (100, 1000)
        );
        assert_eq!(field(&p1[0], "tcp_established"), 1);
        c.bytes_sent = 250;
        c.retransmits = 2;
        let p2 = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(
            (field(&p2[0], "bytes_written"), field(&p2[0], "bytes_read")),
            (150, 0)
        );
        assert_eq!(field(&p2[0], "tcp_established"), 0);
        assert_eq!(field(&p2[0], "retransmits"), 2);
        // No activity: no row.
        assert!(run(&mut t, &[ConnSample { sock: 1, info: c }], &[]).is_empty());
        c.bytes_recv = 1500;
        c.flags |= FINAL;
        let p4 = run(&mut t, &[], &[record(1, c)]);
        assert_eq!(field(&p4[0], "bytes_read"), 500);
        assert_eq!(field(&p4[0], "tcp_closed"), 1);
        assert_eq!(t.tracked(), 0);
        // The same close seen again (map entry not yet deleted) does not count twice.
        assert!(run(&mut t, &[ConnSample { sock: 1, info: c }], &[]).is_empty());
    }

    #[test]
    fn opened_and_closed_within_an_interval() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT | FINAL);
        c.bytes_sent = 10;
        c.bytes_recv = 20;
        let p = run(&mut t, &[], &[record(9, c)]);
        assert_eq!(p.len(), 1);
        assert_eq!(
            [
                field(&p[0], "bytes_written"),
                field(&p[0], "bytes_read"),
                field(&p[0], "tcp_established"),
                field(&p[0], "tcp_closed")
            ],
            [10, 20, 1, 1]
        );
    }

    #[test]
    fn pre_existing_connection_is_not_newly_established() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, 0);
        c.bytes_sent = 5;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(field(&p[0], "tcp_established"), 0);
        assert_eq!(
            tag(&p[0], "direction"),
            Some("outgoing"),
            "port 40000 is not listening"
        );
    }

    #[test]
    fn tuple_reuse_is_a_new_connection() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_sent = 100;
        run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        let mut reused = c;
        reused.start_ns = 5000;
        reused.bytes_sent = 30;
        let p = run(
            &mut t,
            &[ConnSample {
                sock: 1,
                info: reused,
            }],
            &[],
        );
        assert_eq!(field(&p[0], "bytes_written"), 30);
        assert_eq!(field(&p[0], "tcp_established"), 1);
    }

    #[test]
    fn client_ports_fold_and_rows_merge() {
        let mut t = Tracker::new(options());
        let mut a = conn(40000, 80, EST_OUT);
        a.bytes_sent = 1;
        a.srtt_us = 100;
        let mut b = conn(40001, 80, EST_OUT);
        b.bytes_sent = 2;
        b.srtt_us = 300;
        let p = run(
            &mut t,
            &[
                ConnSample { sock: 1, info: a },
                ConnSample { sock: 2, info: b },
            ],
            &[],
        );
        assert_eq!(p.len(), 1);
        assert_eq!(tag(&p[0], "src_port"), Some("*"));
        assert_eq!(field(&p[0], "bytes_written"), 3);
        assert_eq!(field(&p[0], "rtt"), 200);
        assert_eq!(field(&p[0], "tcp_established"), 2);
    }

    #[test]
    fn incoming_folds_the_client_port_and_server_type_is_the_servers() {
        let mut t = Tracker::new(NetflowOptions {
            ephemeral_port_min: 10001,
            ..options()
        });
        let mut c = conn(80, 50000, CONN_F_ESTABLISHED | CONN_F_INCOMING);
        c.daddr = mapped([8, 8, 8, 8]);
        c.bytes_recv = 7;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(tag(&p[0], "direction"), Some("incoming"));
        assert_eq!(
            (tag(&p[0], "src_port"), tag(&p[0], "dst_port")),
            (Some("80"), Some("*"))
        );
        assert_eq!(tag(&p[0], "server_ip_type"), Some("private"));
        assert_eq!(tag(&p[0], "client_ip_type"), Some("other"));
        assert_eq!(field(&p[0], "client_sent"), 7);
        // Below the ephemeral floor a client port is kept.
        let mut low = conn(80, 5000, CONN_F_ESTABLISHED | CONN_F_INCOMING);
        low.bytes_recv = 1;
        let p = run(&mut t, &[ConnSample { sock: 2, info: low }], &[]);
        assert_eq!(tag(&p[0], "dst_port"), Some("5000"));
    }

    #[test]
    fn loopback_is_left_out_unless_included() {
        let mut c = conn(40000, 80, EST_OUT);
        c.saddr = mapped([127, 0, 0, 1]);
        c.daddr = mapped([127, 0, 0, 1]);
        c.bytes_sent = 1;
        assert!(
            run(
                &mut Tracker::new(options()),
                &[ConnSample { sock: 1, info: c }],
                &[]
            )
            .is_empty()
        );
        let p = run(
            &mut Tracker::new(NetflowOptions {
                include_loopback: true,
                ..options()
            }),
            &[ConnSample { sock: 1, info: c }],
            &[],
        );
        assert_eq!(tag(&p[0], "src_ip_type"), Some("loopback"));
    }

    #[test]
    fn ipv6_and_udp_rows() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 53, 0);
        c.family = AF_INET6;
        c.protocol = IPPROTO_UDP;
        c.saddr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        c.daddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        c.bytes_sent = 60;
        c.bytes_recv = 120;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(tag(&p[0], "family"), Some("IPv6"));
        assert_eq!(tag(&p[0], "transport"), Some("udp"));
        assert_eq!(tag(&p[0], "src_ip_type"), Some("private"));
        assert_eq!(tag(&p[0], "dst_ip_type"), Some("other"));
        let names: Vec<&str> = p[0].fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["bytes_read", "bytes_written", "client_sent", "server_sent"]
        );
        let disabled = run(
            &mut Tracker::new(NetflowOptions {
                ipv6_disabled: true,
                ..options()
            }),
            &[ConnSample { sock: 1, info: c }],
            &[],
        );
        assert!(disabled.is_empty());
    }

    /// An unconnected UDP socket bound to no address: its rows take the address the resolver
    /// (the namespace's routing) gives for the peer, whatever the socket's family.
    #[test]
    fn unbound_udp_source_is_the_routes() {
        let mut udp = conn(40000, 53, CONN_F_OUTGOING);
        udp.protocol = IPPROTO_UDP;
        udp.saddr = mapped([0, 0, 0, 0]);
        udp.bytes_sent = 60;
        udp.bytes_recv = 120;
        // Dual stack: an IPv6 socket bound to :: sending to an IPv4-mapped peer.
        let mut dual = udp;
        dual.family = AF_INET6;
        dual.saddr = Ipv6Addr::UNSPECIFIED.octets();
        dual.daddr = mapped([10, 0, 0, 3]);
        for (info, dst) in [(udp, "10.0.0.2"), (dual, "10.0.0.3")] {
            let p = run(
                &mut Tracker::new(options()),
                &[ConnSample { sock: 1, info }],
                &[],
            );
            assert_eq!(p.len(), 1, "{info:?}");
            assert_eq!(tag(&p[0], "src_ip"), Some("10.0.0.9"));
            assert_eq!(tag(&p[0], "dst_ip"), Some(dst));
            assert_eq!(tag(&p[0], "family"), Some("IPv4"));
            assert_eq!(tag(&p[0], "direction"), Some("outgoing"));
            assert_eq!(
                (field(&p[0], "bytes_written"), field(&p[0], "bytes_read")),
                (60, 120)
            );
        }
    }

    /// Left out as before: a TCP socket without an address, and a UDP peer with no route.
    #[test]
    fn unresolved_unbound_sources_are_filtered() {
        let mut tcp = conn(40000, 80, EST_OUT);
        tcp.saddr = mapped([0, 0, 0, 0]);
        tcp.bytes_sent = 1;
        let mut unrouted = conn(40000, 53, CONN_F_OUTGOING);
        unrouted.protocol = IPPROTO_UDP;
        unrouted.saddr = mapped([0, 0, 0, 0]);
        unrouted.daddr = mapped([192, 0, 2, 1]);
        unrouted.bytes_sent = 1;
        let tags = GlobalTags::from_pairs(&[]);
        let mut resolver = FakeResolver { listening: vec![] };
        let out = Tracker::new(options()).interval(
            &[
                ConnSample { sock: 1, info: tcp },
                ConnSample {
                    sock: 2,
                    info: unrouted,
                },
            ],
            &[],
            &mut resolver,
            &tags,
            0,
            0,
            u64::MAX,
        );
        assert!(out.points.is_empty());
        assert_eq!(out.stats.filtered, 2);
    }

    #[test]
    fn closed_flag_in_the_map_is_collected_and_deleted() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT | FINAL);
        c.bytes_sent = 3;
        let tags = GlobalTags::from_pairs(&[]);
        let mut resolver = FakeResolver { listening: vec![] };
        let out = t.interval(
            &[ConnSample { sock: 77, info: c }],
            &[],
            &mut resolver,
            &tags,
            0,
            0,
            u64::MAX,
        );
        assert_eq!(out.delete, [77]);
        assert_eq!(field(&out.points[0], "tcp_closed"), 1);
    }

    #[test]
    fn three_intervals_add_up_to_the_totals() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        let (mut sent, mut recv, mut retrans, mut est, mut closed) = (0, 0, 0, 0, 0);
        for (i, (s, r, x)) in [(10, 100, 0), (25, 400, 1), (25, 900, 3)]
            .iter()
            .enumerate()
        {
            c.bytes_sent = *s;
            c.bytes_recv = *r;
            c.retransmits = *x;
            let p = if i < 2 {
                run(&mut t, &[ConnSample { sock: 1, info: c }], &[])
            } else {
                run(&mut t, &[], &[record(1, c)])
            };
            for p in &p {
                sent += field(p, "bytes_written");
                recv += field(p, "bytes_read");
                retrans += field(p, "retransmits");
                est += field(p, "tcp_established");
                closed += field(p, "tcp_closed");
            }
        }
        assert_eq!((sent, recv, retrans, est, closed), (25, 900, 3, 1, 1));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn pre_existing_connection_closing_is_closed_but_not_established() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, FINAL);
        c.bytes_sent = 5;
        let p = run(&mut t, &[], &[record(1, c)]);
        assert_eq!(
            (field(&p[0], "tcp_established"), field(&p[0], "tcp_closed")),
            (0, 1)
        );
    }

    #[test]
    fn outgoing_ephemeral_floor_keeps_low_ports() {
        let mut t = Tracker::new(NetflowOptions {
            ephemeral_port_min: 10001,
            ..options()
        });
        let mut low = conn(5000, 80, EST_OUT);
        low.bytes_sent = 1;
        let mut high = conn(40000, 80, EST_OUT);
        high.bytes_sent = 1;
        let p = run(
            &mut t,
            &[
                ConnSample { sock: 1, info: low },
                ConnSample {
                    sock: 2,
                    info: high,
                },
            ],
            &[],
        );
        let mut ports: Vec<&str> = p.iter().filter_map(|p| tag(p, "src_port")).collect();
        ports.sort();
        assert_eq!(ports, ["*", "5000"]);
        assert!(
            p.iter()
                .all(|p| tag(p, "client_port") == tag(p, "src_port"))
        );
    }

    #[test]
    fn ipv4_mapped_and_compatible_are_reported_as_ipv4() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 443, EST_OUT);
        c.family = AF_INET6;
        c.saddr = mapped([192, 168, 1, 5]);
        // IPv4-compatible (::a.b.c.d).
        c.daddr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        c.bytes_sent = 1;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(tag(&p[0], "family"), Some("IPv4"));
        assert_eq!(tag(&p[0], "src_ip"), Some("192.168.1.5"));
        assert_eq!(tag(&p[0], "dst_ip"), Some("1.2.3.4"));
        assert_eq!(tag(&p[0], "dst_ip_type"), Some("other"));
        // Still IPv4 when IPv6 is disabled.
        let p = run(
            &mut Tracker::new(NetflowOptions {
                ipv6_disabled: true,
                ..options()
            }),
            &[ConnSample { sock: 1, info: c }],
            &[],
        );
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn mapped_loopback_and_zero_ports_are_filtered() {
        let mut t = Tracker::new(options());
        let mut lo = conn(40000, 80, EST_OUT);
        lo.daddr = mapped([127, 0, 0, 53]);
        lo.bytes_sent = 1;
        let mut lo6 = conn(40000, 80, EST_OUT);
        lo6.family = AF_INET6;
        lo6.saddr = Ipv6Addr::LOCALHOST.octets();
        lo6.daddr = Ipv6Addr::LOCALHOST.octets();
        lo6.bytes_sent = 1;
        let mut zero = conn(40000, 0, EST_OUT);
        zero.bytes_sent = 1;
        let tags = GlobalTags::from_pairs(&[]);
        let mut resolver = FakeResolver { listening: vec![] };
        let out = t.interval(
            &[
                ConnSample { sock: 1, info: lo },
                ConnSample { sock: 2, info: lo6 },
                ConnSample {
                    sock: 3,
                    info: zero,
                },
            ],
            &[],
            &mut resolver,
            &tags,
            0,
            0,
            u64::MAX,
        );
        assert!(out.points.is_empty());
        assert_eq!(out.stats.filtered, 3);
    }

    #[test]
    fn unknown_pid_and_name_are_left_out() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.pid = 0;
        c.comm = [0; 16];
        c.bytes_sent = 1;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(
            (tag(&p[0], "pid"), tag(&p[0], "process_name")),
            (None, None)
        );
    }

    #[test]
    fn idle_entry_is_reported_deleted_and_forgotten() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_sent = 10;
        run(&mut t, &[ConnSample { sock: 5, info: c }], &[]);
        c.bytes_sent = 15;
        let tags = GlobalTags::from_pairs(&[]);
        let mut resolver = FakeResolver { listening: vec![] };
        // last_ns 1000, now 10_000, idle after 5000 ns.
        let out = t.interval(
            &[ConnSample { sock: 5, info: c }],
            &[],
            &mut resolver,
            &tags,
            0,
            10_000,
            5000,
        );
        assert_eq!(out.delete, [5]);
        assert_eq!(field(&out.points[0], "bytes_written"), 5);
        assert_eq!(field(&out.points[0], "tcp_closed"), 0);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn vanished_entry_is_forgotten() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_sent = 10;
        run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        assert_eq!(t.tracked(), 1);
        assert!(run(&mut t, &[], &[]).is_empty());
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn dst_domain_only_when_known() {
        let mut t = Tracker::new(options());
        let mut named = conn(40000, 443, EST_OUT);
        named.daddr = mapped([10, 0, 0, 3]);
        named.bytes_sent = 5;
        let mut unnamed = conn(40001, 443, EST_OUT);
        unnamed.bytes_sent = 7;
        let p = run(
            &mut t,
            &[
                ConnSample {
                    sock: 1,
                    info: named,
                },
                ConnSample {
                    sock: 2,
                    info: unnamed,
                },
            ],
            &[],
        );
        assert_eq!(p.len(), 2);
        let row = |ip: &str| p.iter().find(|p| tag(p, "dst_ip") == Some(ip)).unwrap();
        assert_eq!(tag(row("10.0.0.3"), "dst_domain"), Some("named.test"));
        assert_eq!(tag(row("10.0.0.3"), "server_domain"), Some("named.test"));
        assert_eq!(tag(row("10.0.0.2"), "dst_domain"), None);
        assert_eq!(tag(row("10.0.0.2"), "server_domain"), None);
    }

    /// A long-lived connection keeps the name DNS gave its remote after the record expired.
    #[test]
    fn dst_domain_outlives_the_dns_record() {
        struct Forgetful(bool);
        impl Resolver for Forgetful {
            fn process_name(&mut self, _pid: u32, _comm: &[u8; 16]) -> String {
                String::new()
            }
            fn is_listening(&mut self, _pid: u32, _protocol: u16, _port: u16) -> bool {
                false
            }
            fn domain(&mut self, _ip: IpAddr) -> Option<String> {
                self.0.then(|| "named.test".to_string())
            }
            fn local_address(&mut self, _netns: u32, _pid: u32, _peer: IpAddr) -> Option<IpAddr> {
                None
            }
        }
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 443, EST_OUT);
        c.daddr = mapped([10, 0, 0, 3]);
        let mut resolver = Forgetful(true);
        let tags = GlobalTags::from_pairs(&[]);
        for (i, knows) in [true, false, false].into_iter().enumerate() {
            resolver.0 = knows;
            c.bytes_sent += 10;
            let out = t.interval(
                &[ConnSample { sock: 1, info: c }],
                &[],
                &mut resolver,
                &tags,
                1,
                c.last_ns,
                u64::MAX,
            );
            assert_eq!(out.points.len(), 1, "interval {i}");
            assert_eq!(
                tag(&out.points[0], "dst_domain"),
                Some("named.test"),
                "interval {i}"
            );
        }
    }

    #[test]
    fn exact_line() {
        let mut t = Tracker::new(options());
        let mut c = conn(40000, 80, EST_OUT);
        c.bytes_sent = 100;
        c.bytes_recv = 2000;
        let p = run(&mut t, &[ConnSample { sock: 1, info: c }], &[]);
        let mut line = String::new();
        p[0].encode(&mut line).unwrap();
        assert_eq!(
            line,
            "netflow,client_ip=10.0.0.1,client_ip_type=private,client_port=*,conn_side=client,direction=outgoing,\
             dst_ip=10.0.0.2,\
             dst_ip_type=private,dst_port=80,family=IPv4,host=h,netns=4026531840,pid=42,process_name=curl,\
             server_ip=10.0.0.2,server_ip_type=private,server_port=80,service=ebpf,src_ip=10.0.0.1,\
             src_ip_type=private,src_port=*,transport=tcp \
             bytes_read=2000i,bytes_written=100i,client_sent=100i,server_sent=2000i,retransmits=0i,rtt=100i,\
             rtt_var=10i,tcp_established=1i,tcp_closed=0i 7"
        );
    }
}
