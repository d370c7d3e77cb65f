//! Which hooks httpflow captures calls from. Syscall tracepoints exist everywhere, but on
//! kernels with full or lazy preemption (7.x) their programs run preemptibly and the kernel
//! skips a run on a CPU where another is preempted mid-way, losing calls. fentry/fexit on the
//! INET socket layer do not lose them (twin programs, see the probe) and run only for INET
//! socket calls, so `auto` takes them wherever BPF trampolines work.

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
        HttpflowTier::Auto => Ok(match fentry_support(features, btf) {
            Ok(()) => TierChoice {
                tier: HttpflowTier::Fentry,
                reason: "auto: BPF trampolines and inet_sendmsg/inet_recvmsg in the kernel's BTF"
                    .into(),
            },
            Err(why) => TierChoice {
                tier: HttpflowTier::Syscalls,
                reason: format!("auto; fentry: {why}"),
            },
        }),
    }
}

/// The tier to fall back to when the auto-chosen fentry tier fails to load or attach (a kernel
/// may load a trampoline program and still refuse to attach it).
pub fn fallback(
    chosen: &TierChoice,
    forced: HttpflowTier,
    err: &anyhow::Error,
) -> Option<TierChoice> {
    (forced == HttpflowTier::Auto && chosen.tier == HttpflowTier::Fentry).then(|| TierChoice {
        tier: HttpflowTier::Syscalls,
        reason: format!("auto; the fentry tier failed: {err:#}"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen(tier: HttpflowTier) -> TierChoice {
        TierChoice {
            tier,
            reason: "test".into(),
        }
    }

    #[test]
    fn only_an_auto_chosen_fentry_tier_falls_back_to_syscalls() {
        let err = anyhow::anyhow!("attach refused");
        let next = fallback(&chosen(HttpflowTier::Fentry), HttpflowTier::Auto, &err).unwrap();
        assert_eq!(next.tier, HttpflowTier::Syscalls);
        assert!(next.reason.contains("attach refused"), "{}", next.reason);
        // A forced tier fails as it is; syscalls has nothing to fall back to.
        assert!(fallback(&chosen(HttpflowTier::Fentry), HttpflowTier::Fentry, &err).is_none());
        assert!(fallback(&chosen(HttpflowTier::Syscalls), HttpflowTier::Auto, &err).is_none());
    }
}
