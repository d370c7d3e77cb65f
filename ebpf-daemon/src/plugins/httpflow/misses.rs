//! Calls the kernel did not give to our programs: a tracepoint program is skipped (and its
//! `recursion_misses` counted) when another BPF program is running on the same CPU. Since the
//! syscall tracepoints became preemptible (faultable, kernel 6.1x+), a program preempted on a
//! busy CPU makes the next syscalls there skip ours: seen on 7.2, where it loses requests.
//! aya has no accessor for the counter, so it is read with BPF_OBJ_GET_INFO_BY_FD.
//!
//! The fentry tier runs twin programs on each hook (a preempted run holds only one of them): a
//! call is lost only when both twins were skipped for it, so its possible losses are bounded by
//! the smaller of the twins' counts, and the skips the other twin covered are logged at info.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::Ebpf;
use tracing::{info, warn};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Offset of `recursion_misses` (u64) in `struct bpf_prog_info` (uapi, stable).
const RECURSION_MISSES: usize = 208;

pub struct Misses {
    /// Groups of programs that each see the same calls (one program, or twins).
    groups: &'static [&'static [&'static str]],
    reported: u64,
    covered: u64,
}

impl Misses {
    pub fn new(groups: &'static [&'static [&'static str]]) -> Self {
        Misses {
            groups,
            reported: 0,
            covered: 0,
        }
    }

    /// Logs the growth of the possible losses (per group, the smallest miss count of its
    /// programs) since the last call, and of the skips a twin covered.
    pub fn report(&mut self, ebpf: &Ebpf) {
        let (mut total, mut skipped) = (0, 0);
        for group in self.groups {
            let counts: Vec<u64> = group
                .iter()
                .filter_map(|name| ebpf.program(name)?.fd().ok())
                .map(|fd| recursion_misses(fd.as_fd().as_raw_fd()))
                .collect();
            total += counts.iter().copied().min().unwrap_or(0);
            skipped += counts.iter().sum::<u64>();
        }
        let covered = skipped.saturating_sub(total);
        if covered > self.covered && self.groups.iter().any(|g| g.len() > 1) {
            info!(
                "httpflow: {} program runs skipped by the kernel (a preempted run of the same \
                 program on that CPU) and covered by their twin (total {covered})",
                covered - self.covered
            );
            self.covered = covered;
        }
        if total > self.reported {
            warn!(
                "httpflow: {} calls missed: the kernel skipped the program while another BPF \
                 program ran on that CPU (total {total})",
                total - self.reported
            );
            self.reported = total;
        }
    }
}

fn recursion_misses(fd: i32) -> u64 {
    let mut info = [0u8; 256];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = [0u8; 128];
    let head = InfoAttr {
        bpf_fd: fd as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: plain bytes of a repr(C) struct into a zeroed bpf_attr-sized buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&head as *const InfoAttr).cast::<u8>(),
            attr.as_mut_ptr(),
            size_of::<InfoAttr>(),
        )
    };
    // SAFETY: the bpf syscall with a valid attr buffer and info buffer of the stated sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if ret != 0 {
        return 0;
    }
    u64::from_ne_bytes(
        info[RECURSION_MISSES..RECURSION_MISSES + 8]
            .try_into()
            .expect("8 bytes"),
    )
}
