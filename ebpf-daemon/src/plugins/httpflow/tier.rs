//! Which hooks httpflow captures calls from. Syscall tracepoints exist everywhere, but since
//! they became faultable (6.14+) their programs run preemptibly and the kernel skips a run on a
//! CPU where another is preempted mid-way, losing calls. fentry/fexit on the INET socket layer
//! lose far fewer (twin programs, see the probe); they are opt-in until a TLS attribution
//! problem seen on 7.2 is explained (README "httpflow", Known gaps).

use crate::{btf::KernelBtf, config::HttpflowTier, kernel::KernelFeatures};

/// The fentry tier's targets (IPv6 ones may be missing when IPv6 is a module not loaded).
pub const FENTRY_FUNCTIONS: [&str; 2] = ["inet_sendmsg", "inet_recvmsg"];

/// The tier chosen for this kernel and why.
#[derive(Debug, Clone)]
pub struct TierChoice {
    pub tier: HttpflowTier,
    pub reason: String,
}

/// The forced tier, or the best this kernel supports. Errors say why the forced tier cannot run.
pub fn choose_tier(
    features: &KernelFeatures,
    btf: &KernelBtf,
    forced: HttpflowTier,
) -> Result<TierChoice, String> {
    match forced {
        HttpflowTier::Fentry => fentry_support(features, btf)
            .map(|()| TierChoice {
                tier: HttpflowTier::Fentry,
                reason: "forced by --httpflow-tier".into(),
            })
            .map_err(|why| format!("fentry tier forced but unusable: {why}")),
        HttpflowTier::Syscalls => Ok(TierChoice {
            tier: HttpflowTier::Syscalls,
            reason: "forced by --httpflow-tier".into(),
        }),
        // Not fentry yet: on 7.2 it attributes some OpenSSL plain text wrongly (README).
        HttpflowTier::Auto => Ok(TierChoice {
            tier: HttpflowTier::Syscalls,
            reason: match fentry_support(features, btf) {
                Ok(()) => {
                    "auto; fentry would run here but is opt-in (--httpflow-tier fentry)".into()
                }
                Err(why) => format!("auto; fentry: {why}"),
            },
        }),
    }
}

fn fentry_support(features: &KernelFeatures, btf: &KernelBtf) -> Result<(), String> {
    if !features.fentry.available {
        return Err(format!("no BPF trampolines ({})", features.fentry.detail));
    }
    let missing: Vec<&str> = FENTRY_FUNCTIONS
        .into_iter()
        .filter(|f| !btf.has_function(f))
        .collect();
    if !missing.is_empty() {
        return Err(format!("kernel BTF lacks {}", missing.join(", ")));
    }
    btf.iter_offsets()
        .map(|_| ())
        .map_err(|err| format!("struct iov_iter: {err:#}"))
}
