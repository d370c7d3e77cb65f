//! httpflow-tls: finds the OpenSSL libraries processes map (`/proc/<pid>/maps`, opened through
//! `/proc/<pid>/root` so a container's own library is found) and attaches the uprobes once per
//! library file (device and inode). A uprobe on a file applies to every process mapping it, so
//! processes started later that use an attached file are covered at once; files first mapped
//! later (a new container, a `dlopen`) are found by the next rescan.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use tracing::{debug, info, warn};

/// (entry program, return program, symbol). Each return program knows its direction, and
/// checks that the thread's record is of its kind of call.
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("httpflow_ssl_read", "httpflow_ssl_read_ret", "SSL_read"),
    ("httpflow_ssl_write", "httpflow_ssl_write_ret", "SSL_write"),
    (
        "httpflow_ssl_read_ex",
        "httpflow_ssl_read_ret",
        "SSL_read_ex",
    ),
    (
        "httpflow_ssl_write_ex",
        "httpflow_ssl_write_ret",
        "SSL_write_ex",
    ),
];

pub struct TlsAttacher {
    proc_root: PathBuf,
    own_pid: u32,
    /// (device, inode) of every library file already handled (attached or failed).
    seen: HashSet<(u64, u64)>,
    pub attached: usize,
}

impl TlsAttacher {
    /// Loads the uprobe programs (attached later, by [`TlsAttacher::scan`]).
    pub fn new(ebpf: &mut Ebpf, proc_root: PathBuf, own_pid: u32) -> anyhow::Result<Self> {
        let mut names: Vec<&str> = PROGRAMS.iter().flat_map(|(e, r, _)| [*e, *r]).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow::anyhow!("program {name} missing from the object"))?
                .try_into()?;
            program.load()?;
        }
        Ok(TlsAttacher {
            proc_root,
            own_pid,
            seen: HashSet::new(),
            attached: 0,
        })
    }

    /// Attaches to every OpenSSL library file mapped by a process and not handled yet.
    pub fn scan(&mut self, ebpf: &mut Ebpf) {
        let paths = mapped_libraries(&self.proc_root, self.own_pid);
        debug!("httpflow-tls: {} OpenSSL library mappings", paths.len());
        for (by_root, by_mapping) in paths {
            // The path through the process's root is the usual way in; the mapping's own
            // link is for when that path is not visible from here (a root that is not a
            // mount-namespace root: maps then names the file from the real root).
            let Some((path, meta)) = [by_root, by_mapping]
                .into_iter()
                .find_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m)))
            else {
                continue;
            };
            if !self.seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match attach(ebpf, &path) {
                Ok(symbols) => {
                    self.attached += 1;
                    info!(
                        "httpflow-tls: attached to {} ({})",
                        path.display(),
                        symbols.join(", ")
                    );
                }
                Err(err) => warn!("httpflow-tls: {}: {err:#}", path.display()),
            }
        }
    }
}

fn attach(ebpf: &mut Ebpf, path: &Path) -> anyhow::Result<Vec<&'static str>> {
    let mut symbols = Vec::new();
    for (entry, ret, symbol) in PROGRAMS {
        // The return probe first: a call entered between the two attaches then leaves no
        // record behind for a later return to pick up.
        let program: &mut UProbe = ebpf
            .program_mut(ret)
            .ok_or_else(|| anyhow::anyhow!("program {ret} missing"))?
            .try_into()?;
        // OpenSSL 1.1 has no _ex variants: a missing symbol is skipped.
        if let Err(err) = program.attach(symbol, path, UProbeScope::AllProcesses) {
            debug!("httpflow-tls: {symbol} in {}: {err}", path.display());
            continue;
        }
        let program: &mut UProbe = ebpf
            .program_mut(entry)
            .ok_or_else(|| anyhow::anyhow!("program {entry} missing"))?
            .try_into()?;
        program.attach(symbol, path, UProbeScope::AllProcesses)?;
        symbols.push(symbol);
    }
    if symbols.is_empty() {
        anyhow::bail!("none of SSL_read/SSL_write(_ex) found");
    }
    Ok(symbols)
}

/// For each `libssl.so*` file a process maps: its path through the process's root, and its
/// `/proc/<pid>/map_files/` link.
fn mapped_libraries(proc_root: &Path, own_pid: u32) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(entry.path().join("maps")) else {
            continue;
        };
        for (range, lib) in libssl_mappings(&maps) {
            found.push((
                entry.path().join("root").join(lib.trim_start_matches('/')),
                entry.path().join("map_files").join(range),
            ));
        }
    }
    found
}

/// (address range, path) of the first mapping of each distinct `libssl.so*` in a maps file.
fn libssl_mappings(maps: &str) -> Vec<(&str, &str)> {
    let mut seen = HashSet::new();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let path = fields.nth(4)?;
            let base = path.rsplit('/').next()?;
            (path.starts_with('/') && base.starts_with("libssl.so") && seen.insert(path))
                .then_some((range, path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000001000-7f0000002000 r-xp 00001000 08:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000002000-7f0000003000 r-xp 00001000 08:01 124 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f0000003000-7f0000004000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            libssl_mappings(maps),
            [(
                "7f0000000000-7f0000001000",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3"
            )]
        );
    }
}
