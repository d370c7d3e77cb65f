//! Queries matched to responses (contract §2.4): by transaction id, transport, and client and
//! server address and port. A query not answered within the timeout gives one `rcode = -1`
//! sample; a response gives one sample with its rcode and latency. (The reference also counted
//! every query as an extra rcode-0, 0 ns sample; not here.)
//!
//! The same packet can be captured more than once (on a veth and then on a bridge): a repeated
//! query keeps the first timestamp, and a second copy of a response finds nothing left to match
//! (counted as unmatched). A resolver's retry with the same id is the same query.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use super::parse::Transport;

/// Rcode of a query that got no answer within the timeout.
pub const RCODE_TIMEOUT: i32 = -1;

/// Who asked whom, over what: the part of the match key that rows are built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exchange {
    pub transport: Transport,
    pub client: (IpAddr, u16),
    pub server: (IpAddr, u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct QueryKey {
    id: u16,
    exchange: Exchange,
}

/// One answered or timed-out query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub exchange: Exchange,
    pub rcode: i32,
    pub latency_ns: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MatchStats {
    /// Outstanding queries dropped because the table was full.
    pub evicted: u64,
    /// Responses without an outstanding query (its copy was answered already, the query
    /// predates the capture, or it timed out).
    pub unmatched: u64,
    /// Queries seen again while outstanding (second capture copy, or a retry with the same id).
    pub repeated: u64,
}

pub struct Matcher {
    /// Outstanding queries and their capture time (ns, CLOCK_REALTIME).
    pending: HashMap<QueryKey, u64>,
    /// The same queries in arrival order, for timeouts and evictions; entries already answered
    /// are skipped when they come up.
    order: VecDeque<(QueryKey, u64)>,
    max_pending: usize,
    timeout_ns: u64,
    pub stats: MatchStats,
}

impl Matcher {
    pub fn new(max_pending: usize, timeout_ns: u64) -> Self {
        Self {
            pending: HashMap::new(),
            order: VecDeque::new(),
            max_pending: max_pending.max(1),
            timeout_ns,
            stats: MatchStats::default(),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn query(&mut self, id: u16, exchange: Exchange, ts_ns: u64) {
        let key = QueryKey { id, exchange };
        if self.pending.contains_key(&key) {
            self.stats.repeated += 1;
            return;
        }
        while self.pending.len() >= self.max_pending {
            let Some((old, ts)) = self.order.pop_front() else {
                break;
            };
            if self.pending.get(&old) == Some(&ts) {
                self.pending.remove(&old);
                self.stats.evicted += 1;
            }
        }
        self.pending.insert(key, ts_ns);
        self.order.push_back((key, ts_ns));
        self.compact();
    }

    pub fn response(
        &mut self,
        id: u16,
        exchange: Exchange,
        rcode: u8,
        ts_ns: u64,
    ) -> Option<Sample> {
        let key = QueryKey { id, exchange };
        let Some(asked) = self.pending.remove(&key) else {
            self.stats.unmatched += 1;
            return None;
        };
        Some(Sample {
            exchange,
            rcode: i32::from(rcode),
            latency_ns: ts_ns.saturating_sub(asked),
        })
    }

    /// Queries older than the timeout at `now_ns`: one `rcode = -1` sample each, then forgotten.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Sample> {
        let mut out = Vec::new();
        while let Some(&(key, ts)) = self.order.front() {
            if self.pending.get(&key) == Some(&ts) {
                if now_ns.saturating_sub(ts) < self.timeout_ns {
                    break;
                }
                self.pending.remove(&key);
                out.push(Sample {
                    exchange: key.exchange,
                    rcode: RCODE_TIMEOUT,
                    latency_ns: 0,
                });
            }
            self.order.pop_front();
        }
        out
    }

    /// Keeps `order` from growing with answered entries between two expiries.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.max_pending + 64 {
            let pending = &self.pending;
            self.order.retain(|(k, ts)| pending.get(k) == Some(ts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ex(port: u16) -> Exchange {
        Exchange {
            transport: Transport::Udp,
            client: ("10.0.0.1".parse().unwrap(), port),
            server: ("10.0.0.2".parse().unwrap(), 53),
        }
    }

    #[test]
    fn one_sample_per_answer_with_latency() {
        let mut m = Matcher::new(16, 6 * S);
        m.query(1, ex(1000), 100);
        m.query(1, ex(1000), 150); // second copy
        let s = m.response(1, ex(1000), 3, 600).unwrap();
        assert_eq!((s.rcode, s.latency_ns), (3, 500));
        assert_eq!(m.response(1, ex(1000), 3, 610), None); // second copy
        assert_eq!(m.stats.repeated, 1);
        assert_eq!(m.stats.unmatched, 1);
        assert!(m.expire(100 * S).is_empty());
    }

    #[test]
    fn distinct_ids_in_flight() {
        let mut m = Matcher::new(16, 6 * S);
        for id in 0..5 {
            m.query(id, ex(1000), u64::from(id));
        }
        for id in (0..5).rev() {
            let s = m.response(id, ex(1000), 0, 1000).unwrap();
            assert_eq!(s.latency_ns, 1000 - u64::from(id));
        }
        assert_eq!(m.pending(), 0);
    }

    #[test]
    fn timeout_reported_once() {
        let mut m = Matcher::new(16, 6 * S);
        m.query(1, ex(1000), S);
        m.query(2, ex(1000), 5 * S);
        assert!(m.expire(6 * S).is_empty());
        let timed_out = m.expire(7 * S);
        assert_eq!(timed_out.len(), 1);
        assert_eq!(timed_out[0].rcode, RCODE_TIMEOUT);
        assert!(m.expire(8 * S).is_empty());
        assert_eq!(m.response(1, ex(1000), 0, 9 * S), None);
        assert_eq!(m.expire(11 * S).len(), 1);
    }

    #[test]
    fn bounded_with_counted_evictions() {
        let mut m = Matcher::new(4, 6 * S);
        for port in 0..10 {
            m.query(1, ex(port), u64::from(port));
        }
        assert_eq!(m.pending(), 4);
        assert_eq!(m.stats.evicted, 6);
        // The newest are kept.
        assert!(m.response(1, ex(9), 0, 20).is_some());
        assert!(m.response(1, ex(0), 0, 20).is_none());
    }

    #[test]
    fn order_stays_bounded_when_everything_is_answered() {
        let mut m = Matcher::new(4, 6 * S);
        for i in 0..10_000u64 {
            m.query(i as u16, ex(1), i);
            m.response(i as u16, ex(1), 0, i + 1);
        }
        assert!(m.order.len() <= 2 * 4 + 65);
    }
}
