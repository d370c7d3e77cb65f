//! The parsing path under arbitrary and generated input (proptest), and the corpus of real
//! captured packets (tests/dns-corpus: dig, glibc and dnsmasq on a veth, captured from the IP
//! header on like the daemon's socket) replayed through the whole pipeline.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use etherparse::PacketBuilder;
use proptest::prelude::*;
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE};

use super::{Pipeline, domains::DomainCache, parse, tcp::TcpStreams};
use crate::{lineproto::Field, plugins::GlobalTags};

fn pipeline() -> Pipeline {
    Pipeline::new(Duration::from_secs(6), Arc::new(DomainCache::new(1024, 0)))
}

fn udp4(payload: &[u8], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn tcp6(payload: &[u8], seq: u32, sport: u16, dport: u16) -> Vec<u8> {
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    let b = PacketBuilder::ipv6(src, dst, 64).tcp(sport, dport, seq, 1024);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// A domain name of 1..4 labels of 1..20 letters and digits.
fn name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]{1,20}", 1..4).prop_map(|labels| labels.join("."))
}

fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    ]
}

/// A response built with the crate's writer (the independent side of the round trip).
fn build_response(id: u16, rcode: u8, name: &str, answers: &[(IpAddr, u32)]) -> Vec<u8> {
    let mut packet = Packet::new_reply(id);
    *packet.rcode_mut() = RCODE::from(u16::from(rcode));
    let qname = Name::new_unchecked(name);
    packet.questions.push(Question::new(
        qname.clone(),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    for &(ip, ttl) in answers {
        let rdata = match ip {
            IpAddr::V4(v4) => simple_dns::rdata::RData::A(v4.into()),
            IpAddr::V6(v6) => simple_dns::rdata::RData::AAAA(v6.into()),
        };
        packet
            .answers
            .push(ResourceRecord::new(qname.clone(), CLASS::IN, ttl, rdata));
    }
    packet.build_bytes_vec().unwrap()
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut p = pipeline();
        // As a whole packet, as a UDP DNS payload, and as TCP stream data.
        p.packet(&data, 1);
        p.packet(&udp4(&data, 40000, 53), 2);
        p.packet(&udp4(&data, 53, 40000), 3);
        p.packet(&tcp6(&data, 1, 40000, 53), 4);
        p.packet(&tcp6(&data, 1 + data.len() as u32, 40000, 53), 5);
        let _ = p.interval(10_000_000_000, &GlobalTags::from_pairs(&[]), 0);
    }

    #[test]
    fn dns_header_prefix_and_random_rest_never_panic(
        id in any::<u16>(),
        flags in any::<u16>(),
        counts in any::<[u16; 4]>(),
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut msg = id.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags.to_be_bytes());
        for c in counts {
            msg.extend_from_slice(&(c % 8).to_be_bytes());
        }
        msg.extend_from_slice(&rest);
        let _ = parse::dns_message(&msg);
        let mut p = pipeline();
        p.packet(&udp4(&msg, 53, 40000), 1);
    }

    #[test]
    fn generated_responses_round_trip(
        id in any::<u16>(),
        rcode in 0u8..11,
        name in name(),
        answers in prop::collection::vec((address(), any::<u32>()), 0..6),
    ) {
        let bytes = build_response(id, rcode, &name, &answers);
        let msg = parse::dns_message(&bytes).unwrap();
        prop_assert_eq!(msg.id, id);
        prop_assert!(msg.response);
        prop_assert_eq!(msg.rcode, rcode);
        prop_assert_eq!(msg.question.as_deref(), Some(name.as_str()));
        prop_assert_eq!(msg.addresses, answers);
    }

    #[test]
    fn tcp_stream_cut_anywhere_gives_back_every_message(
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        isn in any::<u32>(),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            stream.extend_from_slice(m);
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        points.dedup();
        let mut t = TcpStreams::new(4);
        let key = ("10.0.0.1".parse().unwrap(), 1, "10.0.0.2".parse().unwrap(), 53);
        let mut got = Vec::new();
        for w in points.windows(2) {
            let seg = parse::TcpSegment { seq: isn.wrapping_add(w[0] as u32), syn: false, fin: false, rst: false };
            got.extend(t.segment(key, seg, &stream[w[0]..w[1]]));
            // Every segment a second time (a second capture copy): ignored.
            got.extend(t.segment(key, seg, &stream[w[0]..w[1]]));
        }
        prop_assert_eq!(got, msgs);
    }
}

/// Rows of a replayed capture: (transport, rcode, count), sorted. `copies`: how many times each
/// packet is seen (2: as on a veth and then on the bridge it is plugged into).
fn replay(dir: &Path, copies: u64) -> (Vec<(String, i64, i64)>, super::Counters) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    let mut p = pipeline();
    for (i, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file).unwrap();
        for copy in 0..copies {
            p.packet(&bytes, 1_000_000 * (i as u64 + 1) + copy * 1000);
        }
    }
    let points = p.interval(u64::MAX / 2, &GlobalTags::from_pairs(&[]), 0);
    let mut rows: Vec<(String, i64, i64)> = points
        .iter()
        .map(|pt| {
            let int = |k: &str| match pt.fields.iter().find(|(n, _)| n == k) {
                Some((_, Field::Int(v))) => *v,
                _ => panic!("{k}"),
            };
            let transport = pt.tags.iter().find(|(k, _)| k == "transport").unwrap();
            (transport.1.clone(), int("rcode"), int("count"))
        })
        .collect();
    rows.sort();
    (rows, p.counters)
}

#[test]
fn captured_corpus_replays_to_the_expected_rows() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dns-corpus");
    let udp = |rcode, count| vec![("udp".to_string(), rcode, count)];
    let tcp = |rcode, count| vec![("tcp".to_string(), rcode, count)];
    let cases = [
        ("udp-v4-a", udp(0, 1)),
        ("udp-v6-aaaa", udp(0, 1)),
        ("udp-nxdomain", udp(3, 1)),
        ("udp-servfail", udp(2, 1)),
        ("udp-glibc-pair", udp(0, 2)),
        ("tcp-v4-a", tcp(0, 1)),
        // glibc's A and AAAA in one segment.
        ("tcp-glibc-pair", tcp(0, 2)),
    ];
    for (name, want) in cases {
        for copies in [1, 2] {
            let (rows, counters) = replay(&corpus.join(name), copies);
            assert_eq!(rows, want, "{name}, each packet seen {copies} times");
            assert_eq!(
                (counters.malformed_packets, counters.malformed_dns),
                (0, 0),
                "{name}"
            );
        }
    }
}

#[test]
fn corpus_packets_cut_at_every_length_never_panic() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dns-corpus");
    let mut p = pipeline();
    for dir in std::fs::read_dir(&corpus).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(file.unwrap().path()).unwrap();
            for len in 0..bytes.len() {
                p.packet(&bytes[..len], 1);
            }
        }
    }
    assert!(p.counters.malformed_packets > 0);
}
