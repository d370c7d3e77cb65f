//! ebpf-bash: a uretprobe on bash's readline (or `readline_internal_teardown`, see the daemon's
//! `plugins::bash`) that copies each returned command line into a ring buffer.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        helpers::{
            bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
            bpf_probe_read_user, generated,
        },
        macros::{map, uretprobe},
        maps::{PerCpuArray, RingBuf},
        programs::RetProbeContext,
    };
    use ebpf_common::bash::{
        BASH_FLAG_TRUNCATED, BASH_LINE_BUF, BASH_STAT_COUNT, BASH_STAT_READ_FAILED,
        BASH_STAT_RINGBUF_FULL, BashEvent,
    };

    /// 256 KiB: about 60 full-size lines; bash lines arrive at human speed.
    #[map]
    static BASH_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    #[map]
    static BASH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BASH_STAT_COUNT, 0);

    fn count(index: u32) {
        if let Some(counter) = BASH_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *counter += 1 };
        }
    }

    #[uretprobe]
    pub fn bash_readline(ctx: RetProbeContext) -> u32 {
        let line: *const u8 = ctx.ret();
        if !line.is_null() {
            capture(line);
        }
        0
    }

    fn capture(line: *const u8) {
        let Some(mut entry) = BASH_EVENTS.reserve::<BashEvent>(0) else {
            count(BASH_STAT_RINGBUF_FULL);
            return;
        };
        let event = entry.as_mut_ptr();
        // SAFETY: `event` points at a reserved ring-buffer slot of the right size; the helper
        // writes at most BASH_LINE_BUF bytes into `line` and NUL-terminates it.
        let copied = unsafe {
            generated::bpf_probe_read_user_str(
                (*event).line.as_mut_ptr().cast(),
                BASH_LINE_BUF as u32,
                line.cast(),
            )
        };
        // `copied` counts the NUL; 1 means an empty line (Enter on an empty prompt): not a command.
        if copied <= 1 {
            if copied < 0 {
                count(BASH_STAT_READ_FAILED);
            }
            entry.discard(0);
            return;
        }
        let len = (copied - 1) as u32;
        let mut flags = 0;
        if copied as usize == BASH_LINE_BUF {
            // The buffer is full: the line was cut unless the byte after the kept part is its NUL.
            // SAFETY: reading one byte of user memory through the checked helper.
            let next = unsafe { bpf_probe_read_user(line.wrapping_add(BASH_LINE_BUF - 1)) };
            if !matches!(next, Ok(0u8)) {
                flags |= BASH_FLAG_TRUNCATED;
            }
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        // SAFETY: plain stores into the reserved slot.
        unsafe {
            (*event).boot_ns = bpf_ktime_get_boot_ns();
            (*event).pid = (pid_tgid >> 32) as u32;
            // The low half is the real uid (the reference used the gid half by mistake).
            (*event).uid = bpf_get_current_uid_gid() as u32;
            (*event).len = len;
            (*event).flags = flags;
        }
        entry.submit(0);
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
