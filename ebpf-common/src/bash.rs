//! ebpf-bash: one event per line that bash's readline returns.

/// Size of the line buffer in an event, including room for the terminating NUL.
pub const BASH_LINE_BUF: usize = 4096;
/// Longest command line kept, in bytes. Longer lines are cut to this length and flagged with
/// [`BASH_FLAG_TRUNCATED`]. (The reference kept 128 bytes.)
pub const BASH_LINE_MAX: usize = BASH_LINE_BUF - 1;

/// The line was longer than [`BASH_LINE_MAX`] and was cut.
pub const BASH_FLAG_TRUNCATED: u32 = 1;

/// Name of the ring buffer map carrying [`BashEvent`]s.
pub const BASH_EVENTS_MAP: &str = "BASH_EVENTS";
/// Name of the per-CPU counter array (indices [`BASH_STAT_RINGBUF_FULL`], [`BASH_STAT_READ_FAILED`]).
pub const BASH_STATS_MAP: &str = "BASH_STATS";
/// Name of the uretprobe program.
pub const BASH_PROGRAM: &str = "bash_readline";

/// Events lost because the ring buffer was full.
pub const BASH_STAT_RINGBUF_FULL: u32 = 0;
/// Lines that could not be read from the process's memory.
pub const BASH_STAT_READ_FAILED: u32 = 1;
/// Number of counters in [`BASH_STATS_MAP`].
pub const BASH_STAT_COUNT: u32 = 2;

/// A command line returned by readline in a bash process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BashEvent {
    /// `bpf_ktime_get_boot_ns()` when the line was returned.
    pub boot_ns: u64,
    /// Process id (tgid) of the bash process.
    pub pid: u32,
    /// Real uid of the bash process.
    pub uid: u32,
    /// Bytes of `line` that hold the command (no terminating NUL).
    pub len: u32,
    /// `BASH_FLAG_*` bits.
    pub flags: u32,
    /// The command line, `len` bytes of it valid.
    pub line: [u8; BASH_LINE_BUF],
}

crate::assert_size!(BashEvent, 24 + BASH_LINE_BUF);

#[cfg(feature = "user")]
// SAFETY: plain old data, repr(C), no padding holes that could hold uninitialised bytes we read.
unsafe impl aya::Pod for BashEvent {}
