//! Facts from the running kernel's BTF (`/sys/kernel/btf/vmlinux`, or `--btf FILE`): the struct
//! field offsets the programs need, and which hooks exist. Rust eBPF gets no CO-RE relocations,
//! so offsets are read here at start and handed to the programs instead of being compiled in.
//!
//! Everything is computed once at load and the parsed BTF (several MB) is dropped.

use std::{collections::HashSet, path::Path};

use anyhow::{Context as _, anyhow, bail};
use btf_rs::{Btf, Type};
use ebpf_common::{httpflow::HttpOffsets, netflow::NetOffsets};

/// Default location of the kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// BTF tracepoints (`btf_trace_<name>` typedefs) whose presence the tier choice needs.
const TRACEPOINTS: &[&str] = &[
    "sock_send_length",
    "sock_recv_length",
    "inet_sock_set_state",
    "tcp_retransmit_skb",
];

/// What the daemon needs to know from the kernel's BTF.
#[derive(Debug, Clone)]
pub struct KernelBtf {
    offsets: Result<NetOffsets, String>,
    http_offsets: Result<HttpOffsets, String>,
    tracepoints: HashSet<&'static str>,
}

impl KernelBtf {
    /// Parses `path`, or /sys/kernel/btf/vmlinux when None. Errors name the file.
    pub fn load(path: Option<&Path>) -> anyhow::Result<KernelBtf> {
        let path = path.unwrap_or(Path::new(VMLINUX_BTF));
        let btf = Btf::from_file(path)
            .map_err(|err| anyhow!("{err}"))
            .with_context(|| format!("reading BTF from {}", path.display()))?;
        let tracepoints = TRACEPOINTS
            .iter()
            .copied()
            .filter(|tp| !ids(&btf, &format!("btf_trace_{tp}")).is_empty())
            .collect();
        let offsets = net_offsets(&btf).map_err(|err| format!("{err:#}"));
        let http_offsets = http_offsets(&btf).map_err(|err| format!("{err:#}"));
        Ok(KernelBtf {
            offsets,
            http_offsets,
            tracepoints,
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

    /// True when the kernel has the BTF-typed tracepoint `name` (one of [`TRACEPOINTS`]).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.tracepoints.contains(name)
    }
}

fn ids(btf: &Btf, name: &str) -> Vec<u32> {
    btf.resolve_ids_by_name(name).unwrap_or_default()
}

fn net_offsets(btf: &Btf) -> anyhow::Result<NetOffsets> {
    // The sock_common fields are read through a `struct sock *`: go through `__sk_common`.
    let common =
        |field: &str, size: usize| field_offset(btf, "sock", &["__sk_common", field], size);
    Ok(NetOffsets {
        skc_daddr: common("skc_daddr", 4)?,
        skc_rcv_saddr: common("skc_rcv_saddr", 4)?,
        skc_dport: common("skc_dport", 2)?,
        skc_num: common("skc_num", 2)?,
        skc_family: common("skc_family", 2)?,
        skc_v6_daddr: common("skc_v6_daddr", 16)?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr", 16)?,
        skc_net: common("skc_net", 8)?,
        sk_protocol: field_offset(btf, "sock", &["sk_protocol"], 2)?,
        sk_type: field_offset(btf, "sock", &["sk_type"], 2)?,
        tcp_srtt_us: field_offset(btf, "tcp_sock", &["srtt_us"], 4)?,
        tcp_mdev_us: field_offset(btf, "tcp_sock", &["mdev_us"], 4)?,
        tcp_total_retrans: field_offset(btf, "tcp_sock", &["total_retrans"], 4)?,
        net_ns_inum: field_offset(btf, "net", &["ns", "inum"], 4)?,
    })
}

fn http_offsets(btf: &Btf) -> anyhow::Result<HttpOffsets> {
    let net = net_offsets(btf)?;
    Ok(HttpOffsets {
        task_files: field_offset(btf, "task_struct", &["files"], 8)?,
        files_fdt: field_offset(btf, "files_struct", &["fdt"], 8)?,
        fdt_max_fds: field_offset(btf, "fdtable", &["max_fds"], 4)?,
        fdt_fd: field_offset(btf, "fdtable", &["fd"], 8)?,
        file_inode: field_offset(btf, "file", &["f_inode"], 8)?,
        file_private_data: field_offset(btf, "file", &["private_data"], 8)?,
        inode_mode: field_offset(btf, "inode", &["i_mode"], 2)?,
        socket_sk: field_offset(btf, "socket", &["sk"], 8)?,
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

/// Byte offset of `path` (member names, each searched through anonymous structs and unions)
/// inside `struct <name>`, checking that the field is `size` bytes and not a bitfield.
fn field_offset(btf: &Btf, name: &str, path: &[&str], size: usize) -> anyhow::Result<u32> {
    let what = format!("struct {name}.{}", path.join("."));
    let mut current = find_struct(btf, name)?;
    let mut bits: u32 = 0;
    let mut field_type = None;
    for (i, member_name) in path.iter().enumerate() {
        let (member_bits, member, member_type) = find_member(btf, &current, member_name)?
            .ok_or_else(|| anyhow!("{what}: the kernel's BTF has no member `{member_name}`"))?;
        if member.bitfield_size().is_some_and(|b| b != 0) {
            bail!("{what} is a bitfield on this kernel; it cannot be read as a plain field");
        }
        bits += member_bits;
        if i + 1 < path.len() {
            current = match member_type {
                Type::Struct(s) | Type::Union(s) => s,
                other => bail!(
                    "{what}: `{member_name}` is a {}, not a struct",
                    other.name()
                ),
            };
        } else {
            field_type = Some(member_type);
        }
    }
    if !bits.is_multiple_of(8) {
        bail!("{what} is not byte aligned");
    }
    let actual = type_size(btf, field_type.as_ref().expect("path is not empty"))?;
    if actual != size {
        bail!("{what} is {actual} bytes on this kernel, expected {size}");
    }
    Ok(bits / 8)
}

fn find_struct(btf: &Btf, name: &str) -> anyhow::Result<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("the kernel's BTF has no struct {name}"))
}

/// The member `name` of `parent`, looking inside anonymous members: (bit offset from the start
/// of `parent`, the member, its type with typedefs and qualifiers resolved).
fn find_member(
    btf: &Btf,
    parent: &btf_rs::Struct,
    name: &str,
) -> anyhow::Result<Option<(u32, btf_rs::Member, Type)>> {
    for member in &parent.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let member_type = resolve(
            btf,
            btf.resolve_chained_type(member)
                .map_err(|e| anyhow!("{e}"))?,
        )?;
        if member_name == name {
            return Ok(Some((member.bit_offset(), member.clone(), member_type)));
        }
        if member_name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &member_type
            && let Some((bits, found, found_type)) = find_member(btf, inner, name)?
        {
            return Ok(Some((member.bit_offset() + bits, found, found_type)));
        }
    }
    Ok(None)
}

/// Follows typedefs and qualifiers to the underlying type.
fn resolve(btf: &Btf, mut t: Type) -> anyhow::Result<Type> {
    for _ in 0..32 {
        match &t {
            Type::Typedef(_)
            | Type::Volatile(_)
            | Type::Const(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                let inner = t.as_btf_type().expect("qualifiers are BTF types");
                t = btf
                    .resolve_chained_type(inner)
                    .map_err(|e| anyhow!("{e}"))?;
            }
            _ => return Ok(t),
        }
    }
    bail!("type chain too long")
}

fn type_size(btf: &Btf, t: &Type) -> anyhow::Result<usize> {
    Ok(match t {
        Type::Int(i) => i.size(),
        Type::Ptr(_) => 8,
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Enum(e) => e.size(),
        Type::Enum64(e) => e.size(),
        Type::Array(a) => {
            let elem = resolve(
                btf,
                btf.resolve_chained_type(a).map_err(|e| anyhow!("{e}"))?,
            )?;
            type_size(btf, &elem)? * a.len()
        }
        other => bail!("no size for a {}", other.name()),
    })
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
        Some(Btf::from_file(VMLINUX_BTF).unwrap())
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
        ];
        let http = http_offsets(&btf).expect("http offsets");
        let fields: Vec<(&str, &str, u32)> = fields
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
        assert!(k.has_tracepoint("sock_send_length"));
        assert!(k.has_tracepoint("inet_sock_set_state"));
        assert!(!k.has_tracepoint("no_such_tracepoint"));
        assert!(k.net_offsets().is_ok());
    }

    #[test]
    fn missing_member_is_named() {
        let Some(btf) = kernel_btf() else { return };
        let err = field_offset(&btf, "sock", &["__sk_common", "no_such_field"], 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock.__sk_common.no_such_field: the kernel's BTF has no member `no_such_field`"
        );
        let err = field_offset(&btf, "sock", &["sk_protocol"], 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock.sk_protocol is 2 bytes on this kernel, expected 4"
        );
        let err = find_struct(&btf, "no_such_struct").unwrap_err();
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
