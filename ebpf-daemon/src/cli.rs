//! Command line of `datakit-ebpf` (contract §3.4, §3.6).
//!
//! DataKit launches the daemon with a fixed argument list and never restarts it if it exits, so the
//! parser is deliberately forgiving about everything DataKit has ever sent: the `run` subcommand may
//! be missing (DataKit < 1.27), bool flags may carry a separate value (`--ipv6-disabled true`),
//! stray positional `true`/`false` are dropped, and flags of features this daemon does not implement
//! are accepted. Values are kept raw here; `config` validates them so that errors name their source.

use std::{collections::HashMap, ffi::OsString, path::PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run the collector daemon.
    Run,
    /// Print kernel capabilities and which plugins could run, then exit.
    Check,
    /// Print the version and exit.
    Version,
    /// No arguments at all: print [`help_text`] and exit 0.
    Help,
}

/// A parsed command line.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub cli: CliArgs,
    /// Legacy forms that were accepted (logged once logging is up).
    pub warnings: Vec<String>,
}

/// Flags of `run` and `check`, as raw strings; `config::load` validates and merges them.
#[derive(Debug, Clone, Default, Args)]
#[command(after_help = COMPAT_NOTE)]
pub struct CliArgs {
    /// TOML file in DataKit's `[[inputs.ebpf]]` format (values below CLI and environment)
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// DataKit API address, `host:port` or URL [default: 0.0.0.0:9529]
    #[arg(long, value_name = "ADDR")]
    pub datakit_apiserver: Option<String>,
    /// Value of the `host` tag [default: a `host=` tag, else the system host name]
    #[arg(long)]
    pub hostname: Option<String>,
    /// Value of the `service` tag [default: ebpf]
    #[arg(long)]
    pub service: Option<String>,
    /// Extra tags `k=v`, separated by `;` (or `,` when every piece is `k=v`); repeatable; a malformed tag is skipped with a warning
    #[arg(long, value_name = "K=V;...")]
    pub tags: Vec<String>,
    /// Flush interval, Go syntax (`60s`, `1m30s`) [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// Plugins: ebpf-net, ebpf-bash (ebpf-conntrack, ebpf-trace, bpf-netlog are not implemented)
    #[arg(long, value_name = "LIST")]
    pub enabled: Vec<String>,
    /// PID file [default: /usr/local/datakit/externals/datakit-ebpf.pid in a DataKit install]
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<String>,
    /// Log file, `-` for stderr [default: /usr/local/datakit/externals/datakit-ebpf.log in a DataKit install]
    #[arg(long, value_name = "PATH")]
    pub log: Option<String>,
    /// trace, debug, info, warn or error [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Application protocols of ebpf-net: httpflow, httpflow-tls [default: httpflow]
    #[arg(long, value_name = "LIST")]
    pub l7net_enabled: Vec<String>,
    /// Application protocols to leave off (used only when --l7net-enabled is empty)
    #[arg(long, value_name = "LIST")]
    pub l7net_disabled: Vec<String>,
    /// Skip IPv6
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub ipv6_disabled: Option<bool>,
    /// Ports at or above this are folded to `*` in netflow [default: 0]
    #[arg(long = "ephemeral-port", alias = "ephemeral_port", value_name = "PORT")]
    pub ephemeral_port: Option<String>,
    /// Accepted for compatibility; no pprof server is provided
    #[arg(long, value_name = "HOST")]
    pub pprof_host: Option<String>,
    /// Accepted for compatibility; no pprof server is provided
    #[arg(long, value_name = "PORT")]
    pub pprof_port: Option<String>,

    // --- Our extensions ---
    /// Where points go: `-`/`stdout` (line protocol on stdout) or a DataKit address [default: --datakit-apiserver]
    #[arg(long, value_name = "-|stdout|ADDR")]
    pub output: Option<String>,
    /// Lowest accepted --interval (at least 1s) [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub min_interval: Option<String>,
    /// Points per write request, 1..=10000 [default: 256]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<String>,
    /// Points buffered for delivery while DataKit is unreachable [default: 100000]
    #[arg(long, value_name = "N")]
    pub queue_capacity: Option<String>,
    /// Send uncompressed request bodies
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub no_gzip: Option<bool>,
    /// Bash binary to instrument (repeatable) [default: /bin/bash]
    #[arg(long, value_name = "PATH")]
    pub bash_path: Vec<PathBuf>,
    /// External kernel BTF file, for kernels without /sys/kernel/btf/vmlinux
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,
    /// netflow attach tier: auto, fentry, tracepoint, classic-tracepoint or kprobe [default: auto, the best the kernel offers]
    #[arg(long, value_name = "TIER")]
    pub netflow_tier: Option<String>,
    /// How netflow's closed connections reach the daemon: auto, ring-buffer or perf-event-array [default: auto, the ring buffer where the kernel has one (5.8+)]
    #[arg(long, value_name = "MECHANISM")]
    pub netflow_closed_events: Option<String>,
    /// Connections netflow tracks at once (kernel map size; about 200 bytes each) [default: 65536]
    #[arg(long, value_name = "N")]
    pub netflow_max_conns: Option<String>,
    /// Count unconnected UDP sockets (sendto/recvfrom): on by default, through cgroup programs that run only for UDP calls carrying an address; given explicitly, also allows the fallback to syscall tracepoints (about 100 ns per send/recv call of every socket) where those cannot attach
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netflow_udp_unconnected: Option<bool>,
    /// Do not count unconnected UDP sockets (sendto/recvfrom): no cgroup programs, no syscall tracepoints
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netflow_udp_unconnected_disabled: Option<bool>,
    /// Leave netflow's UDP rows out: TCP only, as the reference sends (and no unconnected-UDP programs)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netflow_udp_disabled: Option<bool>,
    /// Report loopback connections in netflow (left out by default, as the reference does)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netflow_include_loopback: Option<bool>,
    /// Turn ebpf-net's dnsflow off: no DNS capture (its packet tap costs every packet a look), and no dst_domain on netflow rows
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub dnsflow_disabled: Option<bool>,
    /// dnsflow: a query unanswered this long is reported once with rcode=-1 [default: 6s]
    #[arg(long, value_name = "DURATION")]
    pub dnsflow_timeout: Option<String>,
    /// dnsflow reporting interval (at least --min-interval, or 30s if that is lower) [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub dnsflow_interval: Option<String>,
    /// httpflow: replace numeric and UUID-like path segments with `:id` (bounds the number of rows)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub httpflow_path_normalize: Option<bool>,
    /// httpflow capture tier: auto, syscalls or fentry [default: auto: fentry where BPF trampolines work, else syscalls]
    #[arg(long, value_name = "TIER")]
    pub httpflow_tier: Option<String>,

    // --- Accepted for compatibility, not implemented (a warning names them) ---
    #[arg(long, hide = true)]
    pub trace_server: Option<String>,
    #[arg(long, hide = true)]
    pub trace_protos: Vec<String>,
    #[arg(long, hide = true)]
    pub trace_protos_blacklist: Vec<String>,
    #[arg(long, hide = true)]
    pub trace_env_list: Vec<String>,
    #[arg(long, hide = true)]
    pub trace_name_list: Vec<String>,
    #[arg(long, hide = true)]
    pub trace_env_blacklist: Vec<String>,
    #[arg(long, hide = true)]
    pub trace_name_blacklist: Vec<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub conv_to_ddtrace: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub trace_allprocess: Option<bool>,
    #[arg(long, hide = true)]
    pub container_endpoints: Vec<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netlog_metric: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netlog_log: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub netlog_metric_only: Option<bool>,
    #[arg(long, hide = true)]
    pub netlog_protocols: Vec<String>,
    #[arg(long, hide = true)]
    pub res_cpu: Option<String>,
    #[arg(long, hide = true)]
    pub res_mem: Option<String>,
    #[arg(long, hide = true)]
    pub res_bandwidth: Option<String>,
    /// What DataKit sends for `net_limit` (the reference only knew --res-bandwidth, contract §6.2.1).
    #[arg(long, hide = true)]
    pub res_net: Option<String>,
    #[arg(long, hide = true)]
    pub sampling_rate: Option<String>,
    #[arg(long, hide = true)]
    pub sampling_rate_ptsperminute: Option<String>,
}

impl CliArgs {
    /// Flags that were given but whose feature this daemon does not implement, as `--name`.
    pub fn unimplemented_flags(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut note = |set: bool, name: &'static str| {
            if set {
                out.push(name);
            }
        };
        note(self.trace_server.is_some(), "--trace-server");
        note(!self.trace_protos.is_empty(), "--trace-protos");
        note(
            !self.trace_protos_blacklist.is_empty(),
            "--trace-protos-blacklist",
        );
        note(!self.trace_env_list.is_empty(), "--trace-env-list");
        note(!self.trace_name_list.is_empty(), "--trace-name-list");
        note(
            !self.trace_env_blacklist.is_empty(),
            "--trace-env-blacklist",
        );
        note(
            !self.trace_name_blacklist.is_empty(),
            "--trace-name-blacklist",
        );
        note(self.conv_to_ddtrace.is_some(), "--conv-to-ddtrace");
        note(self.trace_allprocess.is_some(), "--trace-allprocess");
        note(
            !self.container_endpoints.is_empty(),
            "--container-endpoints",
        );
        note(self.netlog_metric.is_some(), "--netlog-metric");
        note(self.netlog_log.is_some(), "--netlog-log");
        note(self.netlog_metric_only.is_some(), "--netlog-metric-only");
        note(!self.netlog_protocols.is_empty(), "--netlog-protocols");
        note(self.res_cpu.is_some(), "--res-cpu");
        note(self.res_mem.is_some(), "--res-mem");
        note(self.res_bandwidth.is_some(), "--res-bandwidth");
        note(self.res_net.is_some(), "--res-net");
        note(self.sampling_rate.is_some(), "--sampling-rate");
        note(
            self.sampling_rate_ptsperminute.is_some(),
            "--sampling-rate-ptsperminute",
        );
        note(self.pprof_host.is_some(), "--pprof-host");
        note(self.pprof_port.is_some(), "--pprof-port");
        out
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "datakit-ebpf",
    version,
    about = "eBPF network and bash collector for DataKit (drop-in replacement for its eBPF external input)",
    after_help = "Without a subcommand, flags are taken as `run` (older DataKits start it that way).",
    // A flag given twice takes its last value, as Go's pflag (the reference) does: DataKit can
    // repeat one (an `--interval` in the conf's args and its own).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
}

const COMPAT_NOTE: &str = "Also accepted for DataKit compatibility, and ignored with a warning: --trace-server, \
     --trace-protos, --trace-protos-blacklist, --trace-env-list, --trace-name-list, \
     --trace-env-blacklist, --trace-name-blacklist, --conv-to-ddtrace, --trace-allprocess, \
     --container-endpoints, --netlog-metric, --netlog-log, --netlog-metric-only, --netlog-protocols, \
     --res-cpu, --res-mem, --res-bandwidth, --res-net, --sampling-rate, --sampling-rate-ptsperminute.\n\
     Bool flags also take a value (--ipv6-disabled true); list flags take commas or repetition.\n\
     Precedence: command line > environment > --config file > defaults.";

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run the collector (what DataKit starts)
    Run(CliArgs),
    /// Print kernel capabilities and which plugins could run
    Check(CliArgs),
    /// Print the version
    Version,
}

/// The file's `args` array: the same flags, no subcommand, no program name.
#[derive(Debug, Parser)]
#[command(name = "args", no_binary_name = true, args_override_self = true)]
struct ArgsOnly {
    #[command(flatten)]
    args: CliArgs,
}

/// Go's `strconv.ParseBool`, case-insensitive (old DataKits wrote `--ipv6-disabled true`).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (true/false/1/0/t/f)")),
    }
}

/// Full help, for a bare `datakit-ebpf`.
pub fn help_text() -> String {
    Cli::command().render_help().to_string()
}

/// Parses a full argv (program name first). `Err` is clap's: `--help`/`--version` displays
/// (exit 0) and usage errors such as unknown flags (exit 2); call `.exit()` on it.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, clap::Error> {
    let mut argv: Vec<OsString> = args.into_iter().collect();
    if argv.is_empty() {
        argv.push("datakit-ebpf".into());
    }
    if argv.len() == 1 {
        return Ok(Invocation {
            command: Command::Help,
            cli: CliArgs::default(),
            warnings: Vec::new(),
        });
    }
    let mut warnings = Vec::new();
    let first = argv[1].to_string_lossy().into_owned();
    let known_top = [
        "run",
        "check",
        "version",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    let (head, rest) = if known_top.contains(&first.as_str()) {
        (argv[..2].to_vec(), argv[2..].to_vec())
    } else {
        // DataKit < 1.27 started the binary without `run`.
        (vec![argv[0].clone(), "run".into()], argv[1..].to_vec())
    };
    let mut full = head;
    full.extend(normalise(rest, &mut warnings));
    let cli = Cli::try_parse_from(full)?;
    let (command, cli) = match cli.command {
        Some(Sub::Run(a)) => (Command::Run, a),
        Some(Sub::Check(a)) => (Command::Check, a),
        Some(Sub::Version) => (Command::Version, CliArgs::default()),
        None => (Command::Help, CliArgs::default()),
    };
    Ok(Invocation {
        command,
        cli,
        warnings,
    })
}

/// Parses an argument list without program name or subcommand (the config file's `args`).
pub fn parse_arg_list(args: &[String], warnings: &mut Vec<String>) -> Result<CliArgs, clap::Error> {
    let normalised = normalise(args.iter().map(OsString::from).collect(), warnings);
    Ok(ArgsOnly::try_parse_from(normalised)?.args)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    /// Optional value; only a boolean-looking next token is taken as its value.
    Bool,
    /// Takes the next token verbatim, as Go's pflag does (even `-`-prefixed or empty).
    Value,
}

fn flag_kinds() -> HashMap<String, FlagKind> {
    let mut cmd = ArgsOnly::command();
    cmd.build();
    let mut map = HashMap::new();
    for arg in cmd.get_arguments() {
        let optional_value = arg
            .get_num_args()
            .is_some_and(|n| n.min_values() == 0 && n.takes_values());
        let kind = if optional_value {
            FlagKind::Bool
        } else if arg.get_action().takes_values() {
            FlagKind::Value
        } else {
            continue;
        };
        let mut names: Vec<&str> = arg.get_long().into_iter().collect();
        names.extend(arg.get_all_aliases().unwrap_or_default());
        for n in names {
            map.insert(n.to_string(), kind);
        }
    }
    map
}

/// Rewrites legacy argument forms into `--flag=value` so clap never has to guess.
fn normalise(args: Vec<OsString>, warnings: &mut Vec<String>) -> Vec<OsString> {
    let kinds = flag_kinds();
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            out.push(arg);
            out.extend(it);
            break;
        }
        if let Some(body) = s.strip_prefix("--") {
            if body.contains('=') {
                out.push(arg);
                continue;
            }
            match kinds.get(body) {
                Some(FlagKind::Bool) => {
                    let next_bool = it
                        .peek()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| parse_bool(n).is_ok());
                    if next_bool {
                        let v = it.next().unwrap_or_default();
                        let v = v.to_string_lossy();
                        out.push(format!("--{body}={v}").into());
                    } else {
                        out.push(arg);
                    }
                }
                Some(FlagKind::Value) => match it.next() {
                    Some(v) => {
                        let mut joined = OsString::from(format!("--{body}="));
                        joined.push(v);
                        out.push(joined);
                    }
                    None => out.push(arg),
                },
                None => out.push(arg),
            }
            continue;
        }
        if matches!(s.to_ascii_lowercase().as_str(), "true" | "false") {
            warnings.push(format!(
                "ignored stray command-line argument `{s}` (sent by older DataKit releases)"
            ));
            continue;
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(args: &[&str]) -> Invocation {
        parse(args.iter().map(OsString::from)).unwrap()
    }

    #[test]
    fn no_arguments_is_help() {
        assert_eq!(inv(&["datakit-ebpf"]).command, Command::Help);
        assert!(help_text().contains("run"));
    }

    #[test]
    fn subcommands() {
        assert_eq!(inv(&["x", "version"]).command, Command::Version);
        let i = inv(&["x", "check", "--enabled", "ebpf-bash"]);
        assert_eq!(i.command, Command::Check);
        assert_eq!(i.cli.enabled, ["ebpf-bash"]);
    }

    #[test]
    fn flags_without_subcommand_mean_run() {
        let i = inv(&["x", "--config", "ebpf.conf"]);
        assert_eq!(i.command, Command::Run);
        assert_eq!(
            i.cli.config.as_deref(),
            Some(std::path::Path::new("ebpf.conf"))
        );
    }

    #[test]
    fn bool_flags_bare_or_with_value() {
        let i = inv(&[
            "x",
            "run",
            "--ipv6-disabled",
            "--netlog-metric",
            "--conv-to-ddtrace",
            "false",
        ]);
        assert_eq!(i.cli.ipv6_disabled, Some(true));
        assert_eq!(i.cli.netlog_metric, Some(true));
        assert_eq!(i.cli.conv_to_ddtrace, Some(false));
        let i = inv(&[
            "x",
            "--ipv6-disabled",
            "true",
            "--trace-allprocess",
            "TRUE",
            "--netlog-metric-only=false",
        ]);
        assert_eq!(i.cli.ipv6_disabled, Some(true));
        assert_eq!(i.cli.trace_allprocess, Some(true));
        assert_eq!(i.cli.netlog_metric_only, Some(false));
        assert!(i.warnings.is_empty());
    }

    #[test]
    fn stray_positional_booleans_are_dropped_with_a_warning() {
        let i = inv(&["x", "run", "--enabled", "ebpf-net", "true"]);
        assert_eq!(i.cli.enabled, ["ebpf-net"]);
        assert_eq!(i.warnings.len(), 1);
        // A value that looks boolean still belongs to its flag.
        let i = inv(&["x", "run", "--hostname", "true"]);
        assert_eq!(i.cli.hostname.as_deref(), Some("true"));
        assert!(i.warnings.is_empty());
    }

    #[test]
    fn values_are_taken_verbatim_like_pflag() {
        let i = inv(&[
            "x",
            "run",
            "--output",
            "-",
            "--hostname",
            "",
            "--enabled",
            "ebpf-net",
        ]);
        assert_eq!(i.cli.output.as_deref(), Some("-"));
        assert_eq!(i.cli.hostname.as_deref(), Some(""));
    }

    #[test]
    fn both_ephemeral_spellings() {
        assert_eq!(
            inv(&["x", "run", "--ephemeral_port", "10001"])
                .cli
                .ephemeral_port
                .as_deref(),
            Some("10001")
        );
        assert_eq!(
            inv(&["x", "run", "--ephemeral-port", "10002"])
                .cli
                .ephemeral_port
                .as_deref(),
            Some("10002")
        );
        assert_eq!(
            inv(&["x", "run", "--ephemeral_port=3"])
                .cli
                .ephemeral_port
                .as_deref(),
            Some("3")
        );
    }

    #[test]
    fn unknown_flag_is_a_clap_error_with_exit_code_2() {
        let err = parse(["x", "run", "--bogus"].map(OsString::from)).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert_eq!(err.exit_code(), 2);
        let err = parse(["x", "--help"].map(OsString::from)).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        assert_eq!(err.exit_code(), 0);
    }

    #[test]
    fn legacy_and_unimplemented_flags_are_accepted() {
        let i = inv(&[
            "x",
            "run",
            "--res-net",
            "100MiB/s",
            "--res-cpu",
            "2.0",
            "--trace-server",
            "a:1",
            "--sampling-rate",
            "0.5",
            "--container-endpoints",
            "unix:///a",
            "--netlog-protocols",
            "http",
        ]);
        assert_eq!(
            i.cli.unimplemented_flags(),
            [
                "--trace-server",
                "--container-endpoints",
                "--netlog-protocols",
                "--res-cpu",
                "--res-net",
                "--sampling-rate"
            ]
        );
    }

    #[test]
    fn arg_list_from_file() {
        let mut w = Vec::new();
        let a = parse_arg_list(
            &["--datakit-apiserver".into(), "0.0.0.0:9529".into()],
            &mut w,
        )
        .unwrap();
        assert_eq!(a.datakit_apiserver.as_deref(), Some("0.0.0.0:9529"));
    }
}
