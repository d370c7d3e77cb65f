//! Samples to `dnsflow` rows (contract §1.4, §2.4): one row per client, server, transport and
//! rcode each interval, with the count, mean and largest latency.
//!
//! Seen from this host: when the host asks (or forwards a container's query), src is the
//! client and `direction=outgoing`; when the host itself is the server, src is the server and
//! `direction=incoming`, `conn_side=server` (the reference swapped src/dst too, but kept
//! `outgoing`). Ports other than 53 fold to `*`.

use std::collections::BTreeMap;

use super::matcher::{Exchange, Sample};
use crate::{
    lineproto::{Field, Point},
    plugins::{GlobalTags, endpoints::Endpoints},
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    exchange: Exchange,
    /// The host is the server.
    incoming: bool,
    rcode: i32,
}

#[derive(Debug, Default, Clone, Copy)]
struct RowValues {
    count: u64,
    latency_sum: u64,
    latency_max: u64,
}

#[derive(Default)]
pub struct Aggregator {
    rows: BTreeMap<RowKey, RowValues>,
}

impl Aggregator {
    /// Adds a sample; `incoming` when the server address is one of this host's.
    pub fn add(&mut self, sample: &Sample, incoming: bool) {
        let mut exchange = sample.exchange;
        // Ports fold before keying, so all of a client's queries share a row.
        exchange.client.1 = fold_port(exchange.client.1);
        exchange.server.1 = fold_port(exchange.server.1);
        let row = self
            .rows
            .entry(RowKey {
                exchange,
                incoming,
                rcode: sample.rcode,
            })
            .or_default();
        row.count += 1;
        row.latency_sum += sample.latency_ns;
        row.latency_max = row.latency_max.max(sample.latency_ns);
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows of the interval; the aggregator starts empty again.
    pub fn flush(&mut self, tags: &GlobalTags, timestamp_ns: i64) -> Vec<Point> {
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|(key, values)| row_point(&key, &values, tags, timestamp_ns))
            .collect()
    }
}

/// 0 stands for a folded port (`*`); 53 stays.
fn fold_port(port: u16) -> u16 {
    if port == ebpf_common::dnsflow::DNS_PORT {
        port
    } else {
        0
    }
}

fn port_tag(port: u16) -> String {
    if port == 0 {
        "*".into()
    } else {
        port.to_string()
    }
}

fn row_point(key: &RowKey, v: &RowValues, tags: &GlobalTags, timestamp_ns: i64) -> Point {
    let (client_ip, client_port) = (key.exchange.client.0.to_canonical(), key.exchange.client.1);
    let (server_ip, server_port) = (key.exchange.server.0.to_canonical(), key.exchange.server.1);
    let ((src_ip, src_port), (dst_ip, dst_port)) = if key.incoming {
        ((server_ip, server_port), (client_ip, client_port))
    } else {
        ((client_ip, client_port), (server_ip, server_port))
    };
    let mean = v.latency_sum.checked_div(v.count).unwrap_or(0);
    let (src_port, dst_port) = (port_tag(src_port), port_tag(dst_port));
    let ends = Endpoints {
        src_ip,
        src_port: &src_port,
        dst_ip,
        dst_port: &dst_port,
        outgoing: !key.incoming,
    };
    let mut point = ends
        .tag(Point::new("dnsflow", timestamp_ns))
        .tag("family", if server_ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .tag("transport", key.exchange.transport.name())
        .field("rcode", Field::Int(i64::from(key.rcode)))
        .field("count", int(v.count))
        .field("latency", int(mean))
        .field("latency_max", int(v.latency_max));
    tags.apply(&mut point);
    point
}

fn int(v: u64) -> Field {
    Field::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::dnsflow::{matcher::RCODE_TIMEOUT, parse::Transport};

    fn sample(client_port: u16, rcode: i32, latency_ns: u64) -> Sample {
        Sample {
            exchange: Exchange {
                transport: Transport::Udp,
                client: ("10.0.0.1".parse().unwrap(), client_port),
                server: ("8.8.8.8".parse().unwrap(), 53),
            },
            rcode,
            latency_ns,
        }
    }

    fn field(p: &Point, k: &str) -> i64 {
        match p.fields.iter().find(|(name, _)| name == k) {
            Some((_, Field::Int(v))) => *v,
            other => panic!("field {k}: {other:?}"),
        }
    }

    fn tag<'a>(p: &'a Point, k: &str) -> Option<&'a str> {
        p.tags.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn rows_per_rcode_with_mean_and_max() {
        let mut agg = Aggregator::default();
        agg.add(&sample(1000, 0, 100), false);
        agg.add(&sample(2000, 0, 300), false);
        agg.add(&sample(3000, 3, 50), false);
        agg.add(&sample(4000, RCODE_TIMEOUT, 0), false);
        let points = agg.flush(&GlobalTags::from_pairs(&[("host", "h")]), 1);
        assert_eq!(points.len(), 3);
        let ok = points.iter().find(|p| field(p, "rcode") == 0).unwrap();
        assert_eq!(
            (
                field(ok, "count"),
                field(ok, "latency"),
                field(ok, "latency_max")
            ),
            (2, 200, 300)
        );
        assert_eq!(tag(ok, "src_port"), Some("*"));
        assert_eq!(tag(ok, "dst_port"), Some("53"));
        assert_eq!(tag(ok, "direction"), Some("outgoing"));
        assert_eq!(tag(ok, "dst_ip_type"), Some("other"));
        assert_eq!(tag(ok, "host"), Some("h"));
        let lost = points.iter().find(|p| field(p, "rcode") == -1).unwrap();
        assert_eq!((field(lost, "count"), field(lost, "latency")), (1, 0));
        assert!(agg.is_empty());
    }

    #[test]
    fn host_as_server_is_incoming_with_src_the_server() {
        let mut agg = Aggregator::default();
        agg.add(&sample(1000, 0, 10), true);
        let p = &agg.flush(&GlobalTags::from_pairs(&[]), 1)[0];
        assert_eq!(tag(p, "src_ip"), Some("8.8.8.8"));
        assert_eq!(tag(p, "src_port"), Some("53"));
        assert_eq!(tag(p, "dst_port"), Some("*"));
        assert_eq!(tag(p, "direction"), Some("incoming"));
        assert_eq!(tag(p, "conn_side"), Some("server"));
        assert_eq!(tag(p, "client_ip"), Some("10.0.0.1"));
    }
}
