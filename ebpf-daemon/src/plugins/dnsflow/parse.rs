//! Packet and DNS decoding, through well-kept crates: `etherparse` for the IP/UDP/TCP headers
//! (the packet socket hands us the packet from its IP header on), `simple-dns` for the DNS wire
//! format (zero-copy, a single small dependency, fuzzed upstream; hickory-proto would pull in a
//! resolver's worth of code for the same decoding). Every error is a value: bad input is counted
//! by the caller and skipped.

use std::net::IpAddr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use simple_dns::{Packet, PacketFlag, rdata::RData};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// TCP header facts the stream reassembly needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment {
    pub seq: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
}

/// One captured UDP datagram or TCP segment to or from port 53.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPacket<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub transport: Transport,
    /// `Some` for TCP.
    pub tcp: Option<TcpSegment>,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Not IP, or IP without a UDP/TCP header we can read (headers or lengths inconsistent).
    Malformed,
    /// IP, but neither UDP nor TCP.
    NotUdpTcp,
}

/// Decodes an IPv4 or IPv6 packet (no link-layer header).
pub fn ip_packet(data: &[u8]) -> Result<IpPacket<'_>, PacketError> {
    let sliced = SlicedPacket::from_ip(data).map_err(|_| PacketError::Malformed)?;
    let (src, dst) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
        ),
        _ => return Err(PacketError::Malformed),
    };
    match sliced.transport {
        Some(TransportSlice::Udp(udp)) => Ok(IpPacket {
            src,
            dst,
            sport: udp.source_port(),
            dport: udp.destination_port(),
            transport: Transport::Udp,
            tcp: None,
            payload: udp.payload(),
        }),
        Some(TransportSlice::Tcp(tcp)) => Ok(IpPacket {
            src,
            dst,
            sport: tcp.source_port(),
            dport: tcp.destination_port(),
            transport: Transport::Tcp,
            tcp: Some(TcpSegment {
                seq: tcp.sequence_number(),
                syn: tcp.syn(),
                fin: tcp.fin(),
                rst: tcp.rst(),
            }),
            payload: tcp.payload(),
        }),
        _ => Err(PacketError::NotUdpTcp),
    }
}

/// What dnsflow needs from a DNS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    pub response: bool,
    /// The header's 4-bit RCODE (the crate folds unassigned values into one variant).
    pub rcode: u8,
    /// The first question's name, without the trailing dot.
    pub question: Option<String>,
    /// A and AAAA answers with their TTL in seconds (responses only).
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Decodes one DNS message (no TCP length prefix). Any error means malformed.
pub fn dns_message(data: &[u8]) -> Result<DnsMessage, simple_dns::SimpleDnsError> {
    let packet = match Packet::parse(data) {
        Ok(packet) => packet,
        Err(err) => return header_only_response(data).ok_or(err),
    };
    let response = packet.has_flags(PacketFlag::RESPONSE);
    let question = packet
        .questions
        .first()
        .map(|q| q.qname.to_string().trim_end_matches('.').to_string());
    let addresses = if response {
        packet
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some((IpAddr::from(a.address.to_be_bytes()), rr.ttl)),
                RData::AAAA(aaaa) => Some((IpAddr::from(aaaa.address.to_be_bytes()), rr.ttl)),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(DnsMessage {
        id: packet.id(),
        response,
        // Parsing succeeded, so the 12-byte header is there.
        rcode: data[3] & 0x0f,
        question,
        addresses,
    })
}

/// A response the decoder refuses (a record it cannot read in a later section, say) still
/// answers its query: its header gives the id and rcode to match and count it, without names or
/// addresses. Only for a response with at most one question, so junk is still malformed.
fn header_only_response(data: &[u8]) -> Option<DnsMessage> {
    let header = data.get(..12)?;
    let response = header[2] & 0x80 != 0;
    let questions = u16::from_be_bytes([header[4], header[5]]);
    if !response || questions > 1 {
        return None;
    }
    Some(DnsMessage {
        id: u16::from_be_bytes([header[0], header[1]]),
        response: true,
        rcode: header[3] & 0x0f,
        question: None,
        addresses: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{CLASS, Name, QCLASS, QTYPE, Question, ResourceRecord, TYPE, rdata};

    pub fn response(id: u16, name: &str, ips: &[IpAddr], rcode: simple_dns::RCODE) -> Vec<u8> {
        let mut packet = Packet::new_reply(id);
        *packet.rcode_mut() = rcode;
        let qname = Name::new_unchecked(name);
        packet.questions.push(Question::new(
            qname.clone(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        for ip in ips {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(rdata::A::from(*v4)),
                IpAddr::V6(v6) => RData::AAAA(rdata::AAAA::from(*v6)),
            };
            packet
                .answers
                .push(ResourceRecord::new(qname.clone(), CLASS::IN, 300, rdata));
        }
        packet.build_bytes_vec().unwrap()
    }

    #[test]
    fn response_with_answers() {
        let ips: [IpAddr; 2] = ["10.1.2.3".parse().unwrap(), "fd00::1".parse().unwrap()];
        let bytes = response(0x1234, "www.example.test", &ips, simple_dns::RCODE::NoError);
        let msg = dns_message(&bytes).unwrap();
        assert_eq!(msg.id, 0x1234);
        assert!(msg.response);
        assert_eq!(msg.rcode, 0);
        assert_eq!(msg.question.as_deref(), Some("www.example.test"));
        assert_eq!(msg.addresses, vec![(ips[0], 300), (ips[1], 300)]);
    }

    #[test]
    fn nxdomain_rcode_and_query() {
        let bytes = response(7, "nope.test", &[], simple_dns::RCODE::NameError);
        assert_eq!(dns_message(&bytes).unwrap().rcode, 3);
        let query = Packet::new_query(9).build_bytes_vec().unwrap();
        let msg = dns_message(&query).unwrap();
        assert!(!msg.response);
        assert_eq!(msg.question, None);
    }

    #[test]
    fn response_with_an_unreadable_record_still_counts() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let mut bytes = response(0x4321, "odd.test", &[ip], simple_dns::RCODE::ServerFailure);
        bytes[11] += 1; // one more additional record than the message holds
        assert!(Packet::parse(&bytes).is_err());
        let msg = dns_message(&bytes).unwrap();
        assert_eq!((msg.id, msg.response, msg.rcode), (0x4321, true, 2));
        assert!(msg.addresses.is_empty());
        // A query that does not decode stays malformed.
        bytes[2] &= 0x7f;
        assert!(dns_message(&bytes).is_err());
    }

    #[test]
    fn short_and_garbage_are_errors() {
        assert!(dns_message(&[]).is_err());
        assert!(dns_message(&[0; 5]).is_err());
        assert!(ip_packet(&[0x45, 0, 0]).is_err());
        assert!(ip_packet(&[]).is_err());
    }
}
