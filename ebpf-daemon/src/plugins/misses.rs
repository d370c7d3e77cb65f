//! Calls the kernel did not give to our programs: a tracing program is skipped (and its
//! `recursion_misses` counted) when a run of the same program is already in progress on that
//! CPU, and a kprobe or classic tracepoint one when any BPF program is. On kernels with lazy
//! or full preemption (7.2 in vm-test) programs run preemptibly, so a program preempted on a
//! busy CPU makes the next runs there skip it: httpflow and netflow lose calls that way. aya
//! has no accessor for the counter, so it is read with BPF_OBJ_GET_INFO_BY_FD.
//!
//! httpflow's fentry tier runs twin programs on each hook (a preempted run holds only one of
//! them): a call is lost only when both twins were skipped for it. Which calls each skipped is
//! not known, so only a bound is logged (per hook, the smaller of the twins' counts), at info;
//! the e2e tests' exact row counts are what show no call was lost.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::Ebpf;
use tracing::{info, warn};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Offset of `recursion_misses` (u64) in `struct bpf_prog_info` (uapi, stable).
const RECURSION_MISSES: usize = 208;

pub struct Misses {
    /// The plugin named in the log lines.
    plugin: &'static str,
    /// Groups of programs that each see the same calls (one program, or twins).
    groups: Vec<Vec<String>>,
    /// Calls certainly lost: misses of programs without a twin.
    lost: u64,
    /// Twin groups: at most this many calls lost (both twins skipped, maybe for different
    /// calls), and the skips certainly covered by the other twin.
    at_most: u64,
    covered: u64,
}

impl Misses {
    pub fn new(plugin: &'static str, groups: &[&[&str]]) -> Self {
        Self::of(
            plugin,
            groups
                .iter()
                .map(|g| g.iter().map(|n| n.to_string()).collect())
                .collect(),
        )
    }

    /// Every program of `ebpf`, each on its own (no twins); programs never loaded have no fd
    /// and count nothing.
    pub fn each_program(plugin: &'static str, ebpf: &Ebpf) -> Self {
        Self::of(
            plugin,
            ebpf.programs()
                .map(|(name, _)| vec![name.to_string()])
                .collect(),
        )
    }

    fn of(plugin: &'static str, groups: Vec<Vec<String>>) -> Self {
        Misses {
            plugin,
            groups,
            lost: 0,
            at_most: 0,
            covered: 0,
        }
    }

    /// Logs the growth of the counts since the last call: certain losses as a warning, the
    /// twins' bound and covered skips at info (each twin's count is known, not which calls).
    pub fn report(&mut self, ebpf: &Ebpf) {
        let (mut lost, mut at_most, mut skipped) = (0, 0, 0);
        for group in &self.groups {
            let counts: Vec<u64> = group
                .iter()
                .filter_map(|name| ebpf.program(name)?.fd().ok())
                .map(|fd| recursion_misses(fd.as_fd().as_raw_fd()))
                .collect();
            if group.len() == 1 {
                lost += counts.iter().sum::<u64>();
            } else {
                at_most += counts.iter().copied().min().unwrap_or(0);
                skipped += counts.iter().sum::<u64>();
            }
        }
        let covered = skipped.saturating_sub(at_most);
        if covered > self.covered || at_most > self.at_most {
            info!(
                "{}: {} program runs skipped by the kernel (a preempted run of the same \
                 program on that CPU), covered by their twin unless both twins were skipped for \
                 the same call (at most {} calls lost; totals {covered} covered, at most {at_most} \
                 lost)",
                self.plugin,
                covered - self.covered,
                at_most - self.at_most,
            );
            self.covered = covered;
            self.at_most = at_most;
        }
        if lost > self.lost {
            warn!(
                "{}: {} calls missed: the kernel skipped the program while another BPF \
                 program ran on that CPU (total {lost})",
                self.plugin,
                lost - self.lost
            );
            self.lost = lost;
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
