//! From exchanges to `httpflow` rows per interval (contract §1.5, §2.5): one row per
//! connection ends, process, method, path, version and status; `latency` is the mean.

use std::{collections::BTreeMap, net::IpAddr};

use super::{parse::path_of, stream::Exchange};
use crate::{
    lineproto::{Field, Point},
    plugins::{GlobalTags, endpoints::Endpoints, netflow::aggregate::address},
};

#[derive(Debug, Clone, Copy)]
pub struct HttpOptions {
    /// Client-side ports at or above this fold to `*` (as netflow).
    pub ephemeral_port_min: u16,
    /// Keep exchanges between two loopback addresses (left out by default, as the reference).
    pub include_loopback: bool,
    /// Longest `path` reported, in bytes.
    pub path_max: usize,
    /// Replace numeric and UUID-like path segments with `:id`.
    pub path_normalize: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    src_port: String,
    dst_port: String,
    ipv4: bool,
    outgoing: bool,
    pid: u32,
    process_name: String,
    netns: u32,
    method: String,
    path: String,
    version: &'static str,
    status: u16,
}

#[derive(Debug, Default)]
struct RowValues {
    count: u64,
    latency_sum: u64,
    bytes_read: u64,
    bytes_written: u64,
    truncated: bool,
}

pub struct Aggregator {
    options: HttpOptions,
    rows: BTreeMap<RowKey, RowValues>,
    /// Exchanges left out by a filter (loopback, zero address or port, DataKit's own).
    pub filtered: u64,
}

impl Aggregator {
    pub fn new(options: HttpOptions) -> Self {
        Aggregator {
            options,
            rows: BTreeMap::new(),
            filtered: 0,
        }
    }

    /// Adds one exchange; `process_name` resolves the pid's name.
    pub fn add(&mut self, e: &Exchange, process_name: &str) {
        let (src, dst) = (address(&e.meta.ends.saddr), address(&e.meta.ends.daddr));
        let loopback = src.is_loopback() && dst.is_loopback();
        if e.meta.ends.sport == 0
            || e.meta.ends.dport == 0
            || src.is_unspecified()
            || dst.is_unspecified()
            || (loopback && !self.options.include_loopback)
            || process_name.starts_with("datakit")
        {
            tracing::debug!(
                "httpflow: exchange left out: {src}:{} -> {dst}:{}, pid {} ({process_name}), {} {}",
                e.meta.ends.sport,
                e.meta.ends.dport,
                e.meta.pid,
                e.method,
                e.target
            );
            self.filtered += 1;
            return;
        }
        let fold = |port: u16| {
            if port >= self.options.ephemeral_port_min {
                "*".to_string()
            } else {
                port.to_string()
            }
        };
        let (src_port, dst_port) = if e.outgoing {
            (fold(e.meta.ends.sport), e.meta.ends.dport.to_string())
        } else {
            (e.meta.ends.sport.to_string(), fold(e.meta.ends.dport))
        };
        let key = RowKey {
            ipv4: matches!(src, IpAddr::V4(_)) && matches!(dst, IpAddr::V4(_)),
            src_ip: src,
            dst_ip: dst,
            src_port,
            dst_port,
            outgoing: e.outgoing,
            pid: e.meta.pid,
            process_name: process_name.to_string(),
            netns: e.meta.ends.netns,
            method: e.method.clone(),
            path: path_of(
                &e.target,
                self.options.path_max,
                self.options.path_normalize,
            ),
            version: e.version,
            status: e.status,
        };
        let v = self.rows.entry(key).or_default();
        v.count += 1;
        v.latency_sum += e.latency_ns;
        v.bytes_read += e.bytes_read;
        v.bytes_written += e.bytes_written;
        v.truncated |= e.truncated;
    }

    /// The interval's rows; the aggregator starts over.
    pub fn take(&mut self, tags: &GlobalTags, timestamp_ns: i64) -> Vec<Point> {
        std::mem::take(&mut self.rows)
            .iter()
            .map(|(k, v)| row_point(k, v, tags, timestamp_ns))
            .collect()
    }
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
        .tag(Point::new("httpflow", timestamp_ns))
        .tag("family", if key.ipv4 { "IPv4" } else { "IPv6" })
        .tag("transport", "tcp")
        .tag("netns", key.netns.to_string())
        .tag("dst_nat_ip", "N/A")
        .tag("dst_nat_port", "N/A")
        .field("method", Field::Str(key.method.clone()))
        .field("path", Field::Str(key.path.clone()))
        .field("http_version", Field::Str(key.version.to_string()))
        .field("status_code", Field::Int(i64::from(key.status)))
        .field("latency", int(v.latency_sum / v.count.max(1)))
        .field("count", int(v.count));
    let mut point = ends
        .byte_fields(point, v.bytes_read, v.bytes_written)
        .field("truncated", Field::Bool(v.truncated));
    if key.pid != 0 {
        point.tags.push(("pid".into(), key.pid.to_string()));
    }
    if !key.process_name.is_empty() {
        point
            .tags
            .push(("process_name".into(), key.process_name.clone()));
    }
    tags.apply(&mut point);
    point
}

fn int(v: u64) -> Field {
    Field::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::httpflow::stream::ConnMeta;

    fn exchange(path: &str, status: u16, latency: u64) -> Exchange {
        let mut saddr = [0u8; 16];
        saddr[10] = 0xff;
        saddr[11] = 0xff;
        let mut daddr = saddr;
        saddr[12..].copy_from_slice(&[10, 0, 0, 1]);
        daddr[12..].copy_from_slice(&[10, 0, 0, 2]);
        Exchange {
            meta: ConnMeta {
                ends: ebpf_common::httpflow::SocketEnds {
                    saddr,
                    daddr,
                    sport: 41000,
                    dport: 8080,
                    family: 2,
                    netns: 4026531840,
                    _pad: 0,
                },
                pid: 42,
                comm: [0; 16],
            },
            outgoing: true,
            method: "GET".into(),
            target: path.into(),
            version: "1.1",
            status,
            latency_ns: latency,
            bytes_read: 100,
            bytes_written: 10,
            truncated: false,
        }
    }

    fn options() -> HttpOptions {
        HttpOptions {
            ephemeral_port_min: 0,
            include_loopback: false,
            path_max: 256,
            path_normalize: false,
        }
    }

    #[test]
    fn rows_merge_and_mean_latency() {
        let mut agg = Aggregator::new(options());
        agg.add(&exchange("/a?x=1", 200, 100), "curl");
        agg.add(&exchange("/a?y=2", 200, 300), "curl");
        agg.add(&exchange("/a", 404, 50), "curl");
        agg.add(&exchange("/a", 404, 50), "datakit");
        let tags = GlobalTags::from_pairs(&[("host", "h")]);
        let points = agg.take(&tags, 1);
        assert_eq!(points.len(), 2);
        let mut line = String::new();
        points[0].encode(&mut line).unwrap();
        assert_eq!(
            line,
            "httpflow,client_ip=10.0.0.1,client_ip_type=private,client_port=*,conn_side=client,\
             direction=outgoing,dst_ip=10.0.0.2,dst_ip_type=private,dst_nat_ip=N/A,\
             dst_nat_port=N/A,dst_port=8080,family=IPv4,host=h,netns=4026531840,pid=42,\
             process_name=curl,server_ip=10.0.0.2,server_ip_type=private,server_port=8080,\
             src_ip=10.0.0.1,src_ip_type=private,src_port=*,transport=tcp \
             method=\"GET\",path=\"/a\",http_version=\"1.1\",status_code=200i,latency=200i,\
             count=2i,bytes_read=200i,bytes_written=20i,client_sent=20i,server_sent=200i,truncated=false 1"
        );
        assert_eq!(agg.filtered, 1);
        assert!(agg.take(&tags, 2).is_empty());
    }

    #[test]
    fn normalised_paths_merge() {
        let mut agg = Aggregator::new(HttpOptions {
            path_normalize: true,
            ..options()
        });
        agg.add(&exchange("/u/1", 200, 1), "c");
        agg.add(&exchange("/u/2", 200, 1), "c");
        let points = agg.take(&GlobalTags::from_pairs(&[]), 1);
        assert_eq!(points.len(), 1);
    }
}
