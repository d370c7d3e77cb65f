//! ebpf-net's dnsflow: a socket filter for the daemon's packet socket (SOCK_DGRAM, so the data
//! starts at the IP header on every kind of link). It passes DNS over UDP and TCP (either port
//! 53) and nothing else: no other packet is ever copied to userspace.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        macros::{map, socket_filter},
        maps::PerCpuArray,
        programs::SkBuffContext,
    };
    use ebpf_common::dnsflow::{
        DNS_PORT, DNSFLOW_SNAPLEN, DNSFLOW_STAT_COUNT, DNSFLOW_STAT_CUT, DNSFLOW_STAT_FRAGMENT,
        DNSFLOW_STAT_IPV6_EXT, DNSFLOW_STAT_PASSED,
    };

    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPPROTO_TCP: u8 = 6;
    const IPPROTO_UDP: u8 = 17;
    /// IPv6 next-header values of extension headers we do not walk.
    const IPV6_EXTENSIONS: [u8; 7] = [0, 43, 44, 50, 51, 60, 135];

    #[map]
    static DNSFLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DNSFLOW_STAT_COUNT, 0);

    fn count(index: u32) {
        if let Some(counter) = DNSFLOW_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *counter += 1 };
        }
    }

    /// Bytes of the packet to pass to userspace: 0 drops it.
    #[socket_filter]
    pub fn dnsflow(ctx: SkBuffContext) -> i64 {
        match transport_offset(&ctx) {
            Some(l4) if is_dns(&ctx, l4) => {
                count(DNSFLOW_STAT_PASSED);
                let len = ctx.skb.len();
                if len > DNSFLOW_SNAPLEN {
                    count(DNSFLOW_STAT_CUT);
                    i64::from(DNSFLOW_SNAPLEN)
                } else {
                    i64::from(len)
                }
            }
            _ => 0,
        }
    }

    /// Offset of the UDP or TCP header, for IPv4 and IPv6 packets that have one.
    fn transport_offset(ctx: &SkBuffContext) -> Option<usize> {
        // `protocol` is the EtherType in network byte order.
        match u16::from_be(ctx.skb.protocol() as u16) {
            ETH_P_IP => {
                let version_ihl: u8 = ctx.load(0).ok()?;
                if version_ihl >> 4 != 4 {
                    return None;
                }
                let fragment: u16 = u16::from_be(ctx.load(6).ok()?);
                if fragment & 0x1fff != 0 {
                    count(DNSFLOW_STAT_FRAGMENT);
                    return None;
                }
                let protocol: u8 = ctx.load(9).ok()?;
                if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
                    return None;
                }
                Some(usize::from(version_ihl & 0x0f) * 4)
            }
            ETH_P_IPV6 => {
                let version: u8 = ctx.load(0).ok()?;
                if version >> 4 != 6 {
                    return None;
                }
                let next: u8 = ctx.load(6).ok()?;
                if next == IPPROTO_TCP || next == IPPROTO_UDP {
                    Some(40)
                } else {
                    if IPV6_EXTENSIONS.contains(&next) {
                        count(DNSFLOW_STAT_IPV6_EXT);
                    }
                    None
                }
            }
            _ => None,
        }
    }

    /// Either port is 53 (UDP and TCP both start with the two ports).
    fn is_dns(ctx: &SkBuffContext, l4: usize) -> bool {
        let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
            return false;
        };
        let src = u16::from_be_bytes([ports[0], ports[1]]);
        let dst = u16::from_be_bytes([ports[2], ports[3]]);
        src == DNS_PORT || dst == DNS_PORT
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
