//! Calls the kernel did not give to our programs: a tracepoint program is skipped (and its
//! `recursion_misses` counted) when another BPF program is running on the same CPU. Since the
//! syscall tracepoints became preemptible (faultable, kernel 6.1x+), a program preempted on a
//! busy CPU makes the next syscalls there skip ours: seen on 7.2, where it loses requests.
//! aya has no accessor for the counter, so it is read with BPF_OBJ_GET_INFO_BY_FD.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::Ebpf;
use tracing::warn;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Offset of `recursion_misses` (u64) in `struct bpf_prog_info` (uapi, stable).
const RECURSION_MISSES: usize = 208;

pub struct Misses {
    programs: &'static [&'static str],
    reported: u64,
}

impl Misses {
    pub fn new(programs: &'static [&'static str]) -> Self {
        Misses {
            programs,
            reported: 0,
        }
    }

    /// Logs the growth of the programs' summed miss counters since the last call.
    pub fn report(&mut self, ebpf: &Ebpf) {
        let total: u64 = self
            .programs
            .iter()
            .filter_map(|name| ebpf.program(name)?.fd().ok())
            .map(|fd| recursion_misses(fd.as_fd().as_raw_fd()))
            .sum();
        if total > self.reported {
            warn!(
                "httpflow: {} syscalls missed: the kernel skipped the program while another BPF \
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
