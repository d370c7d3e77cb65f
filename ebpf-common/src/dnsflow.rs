//! ebpf-net's `dnsflow`: a socket filter on a packet socket that lets only DNS through.

/// Name of the socket filter program.
pub const DNSFLOW_PROGRAM: &str = "dnsflow";
/// Name of the per-CPU counter array.
pub const DNSFLOW_STATS_MAP: &str = "DNSFLOW_STATS";

/// The DNS port: a packet passes when either of its ports is this one.
pub const DNS_PORT: u16 = 53;
/// Most bytes of one packet copied to userspace (from the IP header on). A DNS message over UDP
/// rarely exceeds 4 KiB (the usual EDNS buffer); TCP segments can carry more, and a cut one is
/// noticed by the daemon (IP length larger than what it got) and counted.
pub const DNSFLOW_SNAPLEN: u32 = 16 * 1024;

/// DNS packets passed to userspace.
pub const DNSFLOW_STAT_PASSED: u32 = 0;
/// IPv6 packets with extension headers before the transport header: not parsed, not passed.
pub const DNSFLOW_STAT_IPV6_EXT: u32 = 1;
/// IPv4 fragments after the first (no transport header): not passed.
pub const DNSFLOW_STAT_FRAGMENT: u32 = 2;
/// DNS packets longer than [`DNSFLOW_SNAPLEN`], passed cut.
pub const DNSFLOW_STAT_CUT: u32 = 3;
/// Number of counters in [`DNSFLOW_STATS_MAP`].
pub const DNSFLOW_STAT_COUNT: u32 = 4;
