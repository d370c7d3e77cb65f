//! DNS over TCP (RFC 7766): each message carries a 2-byte length prefix; one segment may hold
//! several messages (a resolver's A+AAAA pair in one write), and one message may span segments.
//! Each direction of each connection is a byte stream rebuilt from sequence numbers.
//!
//! Bounded: at most `max_flows` streams (the least recently seen is evicted and counted), and a
//! stream never buffers more than one message (64 KiB + prefix). A gap (a lost or cut segment)
//! drops the partial message and waits for the next segment to start a message again.

use std::{collections::HashMap, net::IpAddr};

use super::parse::TcpSegment;

/// One direction of a TCP connection: (src, sport, dst, dport).
pub type FlowKey = (IpAddr, u16, IpAddr, u16);

/// Largest buffered stream: a whole message and its prefix.
const MAX_BUFFER: usize = 2 + u16::MAX as usize;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpStats {
    /// Streams evicted because the table was full.
    pub evicted: u64,
    /// Gaps in a stream (missed segments): the partial message was dropped.
    pub gaps: u64,
}

struct Stream {
    next_seq: u32,
    buffer: Vec<u8>,
    last_seen: u64,
}

pub struct TcpStreams {
    streams: HashMap<FlowKey, Stream>,
    max_flows: usize,
    tick: u64,
    pub stats: TcpStats,
}

impl TcpStreams {
    pub fn new(max_flows: usize) -> Self {
        Self {
            streams: HashMap::new(),
            max_flows: max_flows.max(1),
            tick: 0,
            stats: TcpStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Feeds one segment; returns the complete DNS messages (without prefix) it finished.
    pub fn segment(&mut self, key: FlowKey, seg: TcpSegment, payload: &[u8]) -> Vec<Vec<u8>> {
        self.tick += 1;
        if seg.rst {
            self.streams.remove(&key);
            return Vec::new();
        }
        // Data of a SYN segment (TCP Fast Open) starts one after the SYN's own number.
        let data_seq = seg.seq.wrapping_add(u32::from(seg.syn));
        let mut messages = Vec::new();
        if !payload.is_empty() {
            if !self.streams.contains_key(&key) && self.streams.len() >= self.max_flows {
                self.evict_oldest();
            }
            let tick = self.tick;
            let stream = self.streams.entry(key).or_insert_with(|| Stream {
                next_seq: data_seq,
                buffer: Vec::new(),
                last_seen: tick,
            });
            stream.last_seen = tick;
            // Signed distance from what we expect: negative is a retransmission or a second
            // copy of the segment (seen on another interface); positive is a gap.
            let ahead = data_seq.wrapping_sub(stream.next_seq) as i32;
            if ahead > 0 {
                self.stats.gaps += u64::from(!stream.buffer.is_empty());
                stream.buffer.clear();
                stream.next_seq = data_seq;
            }
            let skip = if ahead < 0 {
                ahead.unsigned_abs() as usize
            } else {
                0
            };
            if skip < payload.len() {
                let fresh = &payload[skip..];
                stream.next_seq = stream.next_seq.wrapping_add(fresh.len() as u32);
                stream.buffer.extend_from_slice(fresh);
                take_messages(&mut stream.buffer, &mut messages);
                if stream.buffer.len() > MAX_BUFFER {
                    // Cannot happen with a 2-byte prefix; keep the bound anyway.
                    stream.buffer.clear();
                    self.stats.gaps += 1;
                }
            }
        }
        if seg.fin {
            self.streams.remove(&key);
        }
        messages
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .streams
            .iter()
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| *k)
        {
            self.streams.remove(&oldest);
            self.stats.evicted += 1;
        }
    }

    /// Forgets a stream whose last message did not parse (it lost its framing).
    pub fn reset(&mut self, key: &FlowKey) {
        self.streams.remove(key);
    }
}

/// Moves every complete length-prefixed message out of `buffer`.
fn take_messages(buffer: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) {
    let mut start = 0;
    while buffer.len() - start >= 2 {
        let len = usize::from(u16::from_be_bytes([buffer[start], buffer[start + 1]]));
        if buffer.len() - start - 2 < len {
            break;
        }
        out.push(buffer[start + 2..start + 2 + len].to_vec());
        start += 2 + len;
    }
    buffer.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FlowKey {
        (
            "10.0.0.1".parse().unwrap(),
            40000,
            "10.0.0.2".parse().unwrap(),
            53,
        )
    }

    fn seg(seq: u32) -> TcpSegment {
        TcpSegment {
            seq,
            syn: false,
            fin: false,
            rst: false,
        }
    }

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn two_messages_in_one_segment() {
        let mut t = TcpStreams::new(8);
        let data = framed(&[b"first", b"second"]);
        let got = t.segment(key(), seg(100), &data);
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn one_message_across_segments_and_duplicate_copies() {
        let mut t = TcpStreams::new(8);
        let data = framed(&[b"a message split in three"]);
        assert!(t.segment(key(), seg(1), &data[..1]).is_empty());
        // The same segment again (seen on a second interface): ignored.
        assert!(t.segment(key(), seg(1), &data[..1]).is_empty());
        assert!(t.segment(key(), seg(2), &data[1..10]).is_empty());
        // Overlapping retransmission carrying the rest.
        let got = t.segment(key(), seg(5), &data[4..]);
        assert_eq!(got, vec![b"a message split in three".to_vec()]);
        assert_eq!(t.stats, TcpStats::default());
    }

    #[test]
    fn gap_drops_partial_message_and_resyncs() {
        let mut t = TcpStreams::new(8);
        let one = framed(&[b"0123456789"]);
        assert!(t.segment(key(), seg(10), &one[..5]).is_empty());
        let two = framed(&[b"next"]);
        let got = t.segment(key(), seg(1000), &two);
        assert_eq!(got, vec![b"next".to_vec()]);
        assert_eq!(t.stats.gaps, 1);
    }

    #[test]
    fn table_is_bounded() {
        let mut t = TcpStreams::new(2);
        for port in 0..5u16 {
            let k = (key().0, port, key().2, 53);
            t.segment(k, seg(0), &[0, 9, 1]);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.stats.evicted, 3);
    }

    #[test]
    fn fin_and_rst_forget_the_stream() {
        let mut t = TcpStreams::new(8);
        t.segment(key(), seg(0), &[0, 9, 1]);
        t.segment(
            key(),
            TcpSegment {
                rst: true,
                ..seg(3)
            },
            &[],
        );
        assert_eq!(t.len(), 0);
        let mut fin = seg(0);
        fin.fin = true;
        assert_eq!(t.segment(key(), fin, &framed(&[b"x"])), vec![b"x".to_vec()]);
        assert_eq!(t.len(), 0);
    }
}
