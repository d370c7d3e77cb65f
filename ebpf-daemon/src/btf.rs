//! Facts from the running kernel's BTF (`/sys/kernel/btf/vmlinux`, or `--btf FILE`): the struct
//! field offsets the programs need, and which hooks exist. Rust eBPF gets no CO-RE relocations,
//! so offsets are read here at start and handed to the programs instead of being compiled in.
//!
//! Everything is computed once at load and the parsed BTF (several MB) is dropped.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, anyhow, bail};
use ebpf_common::{
    httpflow::{HttpOffsets, IterOffsets},
    netflow::NetOffsets,
};

mod raw;

use raw::{Btf, Kind};

/// Default location of the kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// BTF tracepoints (`btf_trace_<name>` typedefs) whose presence the tier choice needs.
const TRACEPOINTS: &[&str] = &[
    "sock_send_length",
    "sock_recv_length",
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_destroy_sock",
];

/// Kernel functions whose presence the tier choice needs (the fentry tier's fexit targets: the
/// INET socket layer every send and receive on a TCP or UDP socket goes through).
pub const FUNCTIONS: &[&str] = &[
    "inet_sendmsg",
    "inet6_sendmsg",
    "inet_recvmsg",
    "inet6_recvmsg",
    // httpflow's fentry tier: sendfile before 6.5.
    "inet_sendpage",
    TRAMPOLINE_PROBE,
];

/// The kernel function the fentry feature probe loads a trampoline program against (a test
/// stub every kernel with BPF trampolines has).
pub const TRAMPOLINE_PROBE: &str = "bpf_fentry_test1";

/// What the daemon needs to know from the kernel's BTF.
#[derive(Debug, Clone)]
pub struct KernelBtf {
    offsets: Result<NetOffsets, String>,
    http_offsets: Result<HttpOffsets, String>,
    iter_offsets: Result<IterOffsets, String>,
    /// BTF type ids in the running kernel: `btf_trace_<name>` typedefs and functions, for
    /// attaching tp_btf and fentry/fexit programs.
    tracepoints: HashMap<&'static str, u32>,
    functions: HashMap<&'static str, u32>,
}

impl KernelBtf {
    /// Parses `path`, or /sys/kernel/btf/vmlinux when None. Errors name the file.
    pub fn load(path: Option<&Path>) -> anyhow::Result<KernelBtf> {
        let path = path.unwrap_or(Path::new(VMLINUX_BTF));
        let btf = parse(path)?;
        // Attach ids are the running kernel's own: from its BTF even when offsets come from a
        // --btf file (a kernel with no BTF of its own has no tp_btf or fentry either).
        let running = if path == Path::new(VMLINUX_BTF) {
            None
        } else {
            parse(Path::new(VMLINUX_BTF)).ok()
        };
        let ids = running.as_ref().unwrap_or(&btf);
        let tracepoints = TRACEPOINTS
            .iter()
            .filter_map(|&tp| Some((tp, ids.find(&format!("btf_trace_{tp}"), |_| true)?)))
            .collect();
        let functions = FUNCTIONS
            .iter()
            .filter_map(|&f| Some((f, ids.find(f, |t| t.kind == Kind::Func)?)))
            .collect();
        drop(running);
        let offsets = net_offsets(&btf).map_err(|err| format!("{err:#}"));
        let http_offsets = http_offsets(&btf).map_err(|err| format!("{err:#}"));
        let iter_offsets = iter_offsets(&btf).map_err(|err| format!("{err:#}"));
        Ok(KernelBtf {
            offsets,
            http_offsets,
            iter_offsets,
            tracepoints,
            functions,
        })
    }

    /// Offsets for the netflow programs; the error names the struct and field that is missing or
    /// unusable.
    pub fn net_offsets(&self) -> anyhow::Result<NetOffsets> {
        self.offsets.clone().map_err(|err| anyhow!("{err}"))
    }

    /// Offsets for the httpflow programs (fd → socket walk and connection tuple).
    pub fn http_offsets(&self) -> anyhow::Result<HttpOffsets> {
        self.http_offsets.clone().map_err(|err| anyhow!("{err}"))
    }

    /// Offsets for httpflow's fentry tier (user buffer of a `struct msghdr`).
    pub fn iter_offsets(&self) -> anyhow::Result<IterOffsets> {
        self.iter_offsets.clone().map_err(|err| anyhow!("{err}"))
    }

    /// True when the kernel has the BTF-typed tracepoint `name` (one of [`TRACEPOINTS`]).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.tracepoints.contains_key(name)
    }

    /// The BTF id a tp_btf program attaches to for `name` (one of [`TRACEPOINTS`]).
    pub fn tracepoint_id(&self, name: &str) -> anyhow::Result<u32> {
        self.tracepoints
            .get(name)
            .copied()
            .with_context(|| format!("the kernel's BTF has no tracepoint btf_trace_{name}"))
    }

    /// The BTF id an fentry/fexit program attaches to for `name` (one of [`FUNCTIONS`]).
    pub fn function_id(&self, name: &str) -> anyhow::Result<u32> {
        self.functions
            .get(name)
            .copied()
            .with_context(|| format!("the kernel's BTF has no function {name}"))
    }

    /// True when the kernel's BTF describes the function `name` (one of [`FUNCTIONS`]): fentry
    /// and fexit programs attach by BTF id.
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }
}

/// Reads and indexes a BTF file (raw BTF, as /sys/kernel/btf/vmlinux).
fn parse(path: &Path) -> anyhow::Result<Btf> {
    let data =
        std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
    Btf::parse(data).with_context(|| format!("parsing BTF from {}", path.display()))
}

fn net_offsets(btf: &Btf) -> anyhow::Result<NetOffsets> {
    // The sock_common fields are read through a `struct sock *`: go through `__sk_common`.
    let common =
        |field: &str, size: usize| field_offset(btf, "sock", &format!("__sk_common.{field}"), size);
    Ok(NetOffsets {
        skc_daddr: common("skc_daddr", 4)?,
        skc_rcv_saddr: common("skc_rcv_saddr", 4)?,
        skc_dport: common("skc_dport", 2)?,
        skc_num: common("skc_num", 2)?,
        skc_family: common("skc_family", 2)?,
        skc_v6_daddr: common("skc_v6_daddr", 16)?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr", 16)?,
        skc_net: common("skc_net", 8)?,
        sk_protocol: field_offset(btf, "sock", "sk_protocol", 2)?,
        sk_type: field_offset(btf, "sock", "sk_type", 2)?,
        tcp_srtt_us: field_offset(btf, "tcp_sock", "srtt_us", 4)?,
        tcp_mdev_us: field_offset(btf, "tcp_sock", "mdev_us", 4)?,
        tcp_total_retrans: field_offset(btf, "tcp_sock", "total_retrans", 4)?,
        net_ns_inum: field_offset(btf, "net", "ns.inum", 4)?,
        socket_sk: field_offset(btf, "socket", "sk", 8)?,
    })
}

fn http_offsets(btf: &Btf) -> anyhow::Result<HttpOffsets> {
    let net = net_offsets(btf)?;
    Ok(HttpOffsets {
        task_files: field_offset(btf, "task_struct", "files", 8)?,
        files_fdt: field_offset(btf, "files_struct", "fdt", 8)?,
        fdt_max_fds: field_offset(btf, "fdtable", "max_fds", 4)?,
        fdt_fd: field_offset(btf, "fdtable", "fd", 8)?,
        file_inode: field_offset(btf, "file", "f_inode", 8)?,
        file_private_data: field_offset(btf, "file", "private_data", 8)?,
        inode_mode: field_offset(btf, "inode", "i_mode", 2)?,
        socket_sk: field_offset(btf, "socket", "sk", 8)?,
        skc_daddr: net.skc_daddr,
        skc_rcv_saddr: net.skc_rcv_saddr,
        skc_dport: net.skc_dport,
        skc_num: net.skc_num,
        skc_family: net.skc_family,
        skc_v6_daddr: net.skc_v6_daddr,
        skc_v6_rcv_saddr: net.skc_v6_rcv_saddr,
        skc_net: net.skc_net,
        sk_protocol: net.sk_protocol,
        sk_type: net.sk_type,
        net_ns_inum: net.net_ns_inum,
        _pad: 0,
    })
}

/// `struct iov_iter` as the fentry tier reads it. Only kernels with `u8 iter_type` (5.14+) are
/// supported: before, `type` mixed the kind with direction bits.
fn iter_offsets(btf: &Btf) -> anyhow::Result<IterOffsets> {
    let iter = btf
        .find("iov_iter", |t| t.is_complete_struct())
        .ok_or_else(|| anyhow!("the kernel's BTF has no struct iov_iter"))?;
    let iter_size = btf
        .size_of(iter)
        .map_err(|err| anyhow!("struct iov_iter: {err:#}"))? as usize;
    // 6.4 renamed `iov` to `__iov` (and made ITER_UBUF share its slot).
    let iter_iov = field_offset(btf, "iov_iter", "__iov", 8)
        .or_else(|_| field_offset(btf, "iov_iter", "iov", 8))?;
    let values = enum_values(btf, "iter_type")?;
    let value = |name: &str| values.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let type_iovec =
        value("ITER_IOVEC").ok_or_else(|| anyhow!("enum iter_type has no ITER_IOVEC"))?;
    // ITER_UBUF (6.0+): a single user buffer, what most send/recv calls use since.
    let (type_ubuf, iter_ubuf) = match value("ITER_UBUF") {
        Some(v) => (v, field_offset(btf, "iov_iter", "ubuf", 8)?),
        None => (u32::MAX, 0),
    };
    Ok(IterOffsets {
        msghdr_msg_iter: field_offset(btf, "msghdr", "msg_iter", iter_size)?,
        iter_type: field_offset(btf, "iov_iter", "iter_type", 1)?,
        iter_iov_offset: field_offset(btf, "iov_iter", "iov_offset", 8)?,
        iter_ubuf,
        iter_iov,
        type_ubuf,
        type_iovec,
        _pad: 0,
    })
}

/// (name, value) of every member of `enum <name>`.
fn enum_values(btf: &Btf, name: &str) -> anyhow::Result<Vec<(String, u32)>> {
    let id = btf
        .find(name, |t| t.kind == Kind::Enum)
        .ok_or_else(|| anyhow!("the kernel's BTF has no enum {name}"))?;
    btf.enum_values(id)
}

/// Byte offset of `path` (dotted member names; anonymous structs and unions are looked into)
/// inside `struct <name>`, checking that the field is `size` bytes and not a bitfield.
fn field_offset(btf: &Btf, name: &str, path: &str, size: usize) -> anyhow::Result<u32> {
    let what = format!("struct {name}.{path}");
    let id = btf
        .find(name, |t| t.is_complete_struct())
        .ok_or_else(|| anyhow!("the kernel's BTF has no struct {name}"))?;
    let field = btf
        .offset_of(id, path)
        .map_err(|err| anyhow!("{what}: {err:#}"))?;
    if field.bitfield_bits != 0 || field.bit_offset % 8 != 0 {
        bail!("{what} is a bitfield on this kernel; it cannot be read as a plain field");
    }
    let actual = btf
        .size_of(field.type_id)
        .map_err(|err| anyhow!("{what}: {err:#}"))?;
    if actual as usize != size {
        bail!("{what} is {actual} bytes on this kernel, expected {size}");
    }
    Ok(field.bit_offset / 8)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn kernel_btf() -> Option<Btf> {
        if !Path::new(VMLINUX_BTF).exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "the CI kernel must have BTF"
            );
            eprintln!("SKIPPED: no {VMLINUX_BTF}");
            return None;
        }
        Some(parse(Path::new(VMLINUX_BTF)).unwrap())
    }

    /// Independent check: gcc's offsetof over the C header bpftool generates from the same BTF.
    #[test]
    fn offsets_match_gcc_offsetof_on_this_kernel() {
        let Some(btf) = kernel_btf() else { return };
        let offsets = net_offsets(&btf).expect("offsets");
        let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(bpftool) = bpftool else {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "bpftool missing in CI"
            );
            eprintln!("SKIPPED: bpftool not installed");
            return;
        };
        let dir = std::env::temp_dir().join(format!("btf-offsets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = Command::new(bpftool)
            .args(["btf", "dump", "file", VMLINUX_BTF, "format", "c"])
            .output()
            .unwrap();
        assert!(header.status.success());
        std::fs::write(dir.join("vmlinux.h"), header.stdout).unwrap();
        let fields = [
            ("sock", "__sk_common.skc_daddr", offsets.skc_daddr),
            ("sock", "__sk_common.skc_rcv_saddr", offsets.skc_rcv_saddr),
            ("sock", "__sk_common.skc_dport", offsets.skc_dport),
            ("sock", "__sk_common.skc_num", offsets.skc_num),
            ("sock", "__sk_common.skc_family", offsets.skc_family),
            ("sock", "__sk_common.skc_v6_daddr", offsets.skc_v6_daddr),
            (
                "sock",
                "__sk_common.skc_v6_rcv_saddr",
                offsets.skc_v6_rcv_saddr,
            ),
            ("sock", "__sk_common.skc_net", offsets.skc_net),
            ("sock", "sk_protocol", offsets.sk_protocol),
            ("sock", "sk_type", offsets.sk_type),
            ("tcp_sock", "srtt_us", offsets.tcp_srtt_us),
            ("tcp_sock", "mdev_us", offsets.tcp_mdev_us),
            ("tcp_sock", "total_retrans", offsets.tcp_total_retrans),
            ("net", "ns.inum", offsets.net_ns_inum),
            ("socket", "sk", offsets.socket_sk),
        ];
        let http = http_offsets(&btf).expect("http offsets");
        let mut fields: Vec<(&str, &str, u32)> = fields
            .into_iter()
            .chain([
                ("task_struct", "files", http.task_files),
                ("files_struct", "fdt", http.files_fdt),
                ("fdtable", "max_fds", http.fdt_max_fds),
                ("fdtable", "fd", http.fdt_fd),
                ("file", "f_inode", http.file_inode),
                ("file", "private_data", http.file_private_data),
                ("inode", "i_mode", http.inode_mode),
                ("socket", "sk", http.socket_sk),
            ])
            .collect();
        // httpflow's fentry tier (5.14+ layouts; `iov` became `__iov` in 6.4).
        if let Ok(iter) = iter_offsets(&btf) {
            let iov = if field_offset(&btf, "iov_iter", "__iov", 8).is_ok() {
                "__iov"
            } else {
                "iov"
            };
            fields.extend([
                ("msghdr", "msg_iter", iter.msghdr_msg_iter),
                ("iov_iter", "iter_type", iter.iter_type),
                ("iov_iter", "iov_offset", iter.iter_iov_offset),
                ("iov_iter", iov, iter.iter_iov),
            ]);
            if iter.type_ubuf != u32::MAX {
                fields.push(("iov_iter", "ubuf", iter.iter_ubuf));
            }
        }
        let mut program = String::from(
            "#include \"vmlinux.h\"\nint printf(const char *, ...);\nint main(void) {\n",
        );
        for (st, field, _) in &fields {
            program.push_str(&format!(
                "  printf(\"%lu\\n\", (unsigned long)__builtin_offsetof(struct {st}, {field}));\n"
            ));
        }
        program.push_str("  return 0;\n}\n");
        std::fs::write(dir.join("offsets.c"), program).unwrap();
        let built = Command::new("gcc")
            .args(["-w", "-o"])
            .arg(dir.join("offsets"))
            .arg(dir.join("offsets.c"))
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = Command::new(dir.join("offsets")).output().unwrap();
        let gcc: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        for ((st, field, ours), theirs) in fields.iter().zip(&gcc) {
            assert_eq!(ours, theirs, "struct {st}.{field}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hooks_are_found() {
        if kernel_btf().is_none() {
            return;
        }
        let k = KernelBtf::load(None).unwrap();
        // On every kernel of the matrix (sock_send_length only from 6.3).
        assert!(k.has_tracepoint("inet_sock_set_state"));
        assert!(k.has_tracepoint("tcp_retransmit_skb"));
        // inet_sendpage is gone since 6.5.
        for function in FUNCTIONS.iter().filter(|f| **f != "inet_sendpage") {
            assert!(k.has_function(function), "{function}");
        }
        assert!(k.iter_offsets().is_ok(), "{:?}", k.iter_offsets());
        assert!(!k.has_function("no_such_function"));
        assert!(!k.has_tracepoint("no_such_tracepoint"));
        assert!(k.net_offsets().is_ok());
    }

    #[test]
    fn missing_member_is_named() {
        let Some(btf) = kernel_btf() else { return };
        let err = field_offset(&btf, "sock", "__sk_common.no_such_field", 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock.__sk_common.no_such_field: no member `no_such_field`"
        );
        let err = field_offset(&btf, "sock", "sk_protocol", 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock.sk_protocol is 2 bytes on this kernel, expected 4"
        );
        let err = field_offset(&btf, "no_such_struct", "x", 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel's BTF has no struct no_such_struct"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = KernelBtf::load(Some(Path::new("/nonexistent/vmlinux"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/vmlinux"),
            "{err:#}"
        );
    }
}
