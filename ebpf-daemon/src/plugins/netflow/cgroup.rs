//! The cgroup v2 root that netflow's cgroup `sendmsg4/6` and `recvmsg4/6` programs attach to
//! (the peers of unconnected UDP sockets).
//!
//! Programs on the root of the cgroup v2 hierarchy see every socket of the host, also on hosts
//! that run cgroup v1: the v2 hierarchy always exists in the kernel (it has no controllers
//! there), every process belongs to its root unless moved, and sockets whose v1 `net_cls` /
//! `net_prio` data took the place of their v2 cgroup (kernels before 5.14) fall back to the root
//! too. So the hierarchy only needs a mount point to name it: an existing `cgroup2` mount (
//! `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` in hybrid mode), else one of our
//! own at [`PRIVATE_MOUNT`].
//!
//! Our own mount is left mounted on exit: it holds nothing (the hierarchy exists whether mounted
//! or not, and programs stay attached through their links, not through the mount), the next
//! start finds it in mountinfo and reuses it, and unmounting it could pull it from under another
//! instance or tool that found it meanwhile.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Where a cgroup2 file system is mounted when none is.
pub const PRIVATE_MOUNT: &str = "/run/datakit-ebpf/cgroup2";

/// A cgroup v2 root directory, and whether this start mounted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Root {
    pub path: PathBuf,
    pub mounted_now: bool,
}

/// The mount points of cgroup2 file systems that show the hierarchy's root (mountinfo's root
/// field `/`: not a bind mount of a sub-cgroup), in mountinfo order.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if dash < 5 || fields.get(dash + 1) != Some(&"cgroup2") || fields[3] != "/" {
            continue;
        }
        found.push(PathBuf::from(unescape(fields[4])));
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's mountinfo: `HOST_PROC/self/mountinfo` (the same file when HOST_PROC is the
/// host's procfs: `self` is us), else `/proc/self/mountinfo`.
fn read_mountinfo(host_proc: &Path) -> anyhow::Result<String> {
    let path = host_proc.join("self/mountinfo");
    std::fs::read_to_string(&path)
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .with_context(|| format!("reading {}", path.display()))
}

/// An already mounted cgroup v2 root, if any.
pub fn find(host_proc: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(cgroup2_mounts(&read_mountinfo(host_proc)?)
        .into_iter()
        .find(|path| path.is_dir()))
}

/// Whether the kernel has the cgroup2 file system at all.
pub fn kernel_has_cgroup2(host_proc: &Path) -> bool {
    [
        host_proc.join("filesystems"),
        PathBuf::from("/proc/filesystems"),
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    .next()
    .is_some_and(|text| {
        text.lines()
            .any(|line| line.split_whitespace().last() == Some("cgroup2"))
    })
}

/// The cgroup v2 root: a mounted one, else one mounted now at [`PRIVATE_MOUNT`].
pub fn find_or_mount(host_proc: &Path) -> anyhow::Result<Cgroup2Root> {
    if let Some(path) = find(host_proc)? {
        return Ok(Cgroup2Root {
            path,
            mounted_now: false,
        });
    }
    if !kernel_has_cgroup2(host_proc) {
        anyhow::bail!("the kernel has no cgroup2 file system");
    }
    let path = PathBuf::from(PRIVATE_MOUNT);
    std::fs::create_dir_all(&path).with_context(|| format!("creating {PRIVATE_MOUNT}"))?;
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("no cgroup2 mounted, and mounting one at {PRIVATE_MOUNT} failed"))?;
    Ok(Cgroup2Root {
        path,
        mounted_now: true,
    })
}

/// When this process is in a cgroup namespace of its own (a container not run with the host's),
/// its cgroup v2 "root" is the namespace's: programs attached there see only its sockets.
pub fn namespace_note(host_proc: &Path) -> Option<String> {
    let own = std::fs::read_link(host_proc.join("self/ns/cgroup")).ok()?;
    let init = std::fs::read_link(host_proc.join("1/ns/cgroup")).ok()?;
    (own != init).then(|| {
        format!(
            "this process is in a cgroup namespace of its own ({}, not pid 1's {}): only its sockets' unconnected UDP is seen; run in the host's cgroup namespace",
            own.display(),
            init.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_host_names_the_unified_mount() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts(text),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn unified_host_with_optional_fields_and_escapes() {
        let text = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
99 30 0:22 /kubepods/pod1 /var/lib/x rw shared:9 - cgroup2 cgroup2 rw
100 30 0:22 / /mnt/my\\040cg rw - cgroup2 none rw
";
        assert_eq!(
            cgroup2_mounts(text),
            vec![PathBuf::from("/sys/fs/cgroup"), PathBuf::from("/mnt/my cg")]
        );
    }

    #[test]
    fn v1_only_host_has_none() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert!(cgroup2_mounts(text).is_empty());
    }
}
