//! The OCI seccomp section compiled to a filter with libseccomp, as runc does (same library,
//! same action and operator names), so docker's and podman's default profiles behave alike.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterAttr, ScmpFilterContext,
    ScmpSyscall,
};

use crate::spec::{Seccomp, SeccompArg};

/// libseccomp's default errno for SCMP_ACT_ERRNO without `errnoRet`, as runc uses.
const EPERM: i32 = 1;

fn action(name: &str, errno_ret: Option<u32>) -> Result<ScmpAction, String> {
    let errno = errno_ret.map_or(EPERM, |e| e as i32);
    Ok(match name {
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(errno),
        "SCMP_ACT_TRACE" => ScmpAction::Trace(errno_ret.unwrap_or(EPERM as u32) as u16),
        other => ScmpAction::from_str(other, None)
            .map_err(|_| format!("seccomp: unknown action {other:?}"))?,
    })
}

fn compare(arg: &SeccompArg) -> Result<ScmpArgCompare, String> {
    let op = match arg.op.as_str() {
        "SCMP_CMP_NE" => ScmpCompareOp::NotEqual,
        "SCMP_CMP_LT" => ScmpCompareOp::Less,
        "SCMP_CMP_LE" => ScmpCompareOp::LessOrEqual,
        "SCMP_CMP_EQ" => ScmpCompareOp::Equal,
        "SCMP_CMP_GE" => ScmpCompareOp::GreaterEqual,
        "SCMP_CMP_GT" => ScmpCompareOp::Greater,
        // OCI: `value` is the mask and `valueTwo` the value to compare with.
        "SCMP_CMP_MASKED_EQ" => ScmpCompareOp::MaskedEqual(arg.value),
        other => return Err(format!("seccomp: unknown operator {other:?}")),
    };
    let datum = if matches!(op, ScmpCompareOp::MaskedEqual(_)) {
        arg.value_two
    } else {
        arg.value
    };
    Ok(ScmpArgCompare::new(arg.index, op, datum))
}

/// Builds the filter. Syscalls this kernel or libseccomp does not know are skipped, as runc
/// does (profiles name syscalls of newer kernels).
pub fn build(spec: &Seccomp) -> Result<ScmpFilterContext, String> {
    let e = |what: &str, err: libseccomp::error::SeccompError| format!("seccomp: {what}: {err}");
    let default = action(&spec.default_action, spec.default_errno_ret)?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|x| e("new filter", x))?;
    // The process may set no_new_privs itself (process.noNewPrivileges); the filter must not.
    ctx.set_ctl_nnp(false).map_err(|x| e("nnp", x))?;
    for a in &spec.architectures {
        let arch: ScmpArch = a
            .parse()
            .map_err(|_| format!("seccomp: unknown architecture {a:?}"))?;
        if let Err(x) = ctx.add_arch(arch) {
            // EEXIST: the native architecture is already in the filter.
            if x.errno() != Some(libseccomp::error::SeccompErrno::EEXIST) {
                return Err(e(&format!("add architecture {a}"), x));
            }
        }
    }
    for flag in &spec.flags {
        match flag.as_str() {
            "SECCOMP_FILTER_FLAG_LOG" => {
                ctx.set_filter_attr(ScmpFilterAttr::CtlLog, 1)
                    .map_err(|x| e(flag, x))?;
            }
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => {
                ctx.set_filter_attr(ScmpFilterAttr::CtlSsb, 1)
                    .map_err(|x| e(flag, x))?;
            }
            "SECCOMP_FILTER_FLAG_TSYNC" => {}
            other => return Err(format!("seccomp: unknown flag {other:?}")),
        }
    }
    for rule in &spec.syscalls {
        let act = action(&rule.action, rule.errno_ret)?;
        if act == default {
            // libseccomp refuses a rule whose action is the default one; it changes nothing.
            continue;
        }
        let conds = rule
            .args
            .iter()
            .map(compare)
            .collect::<Result<Vec<_>, _>>()?;
        for name in &rule.names {
            let Ok(sc) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let r = if conds.is_empty() {
                ctx.add_rule(act, sc)
            } else if has_repeated_index(&rule.args) {
                // libseccomp ANDs conditions on one rule but allows one per argument index;
                // runc turns repeated indexes into one rule per condition (an OR).
                conds
                    .iter()
                    .try_for_each(|c| ctx.add_rule_conditional(act, sc, &[*c]).map(drop))
                    .map(|_| &mut ctx)
            } else {
                ctx.add_rule_conditional(act, sc, &conds)
            };
            r.map_err(|x| e(&format!("rule for {name}"), x))?;
        }
    }
    Ok(ctx)
}

fn has_repeated_index(args: &[SeccompArg]) -> bool {
    args.iter()
        .enumerate()
        .any(|(i, a)| args[..i].iter().any(|b| b.index == a.index))
}

/// Builds and loads the filter into the calling thread (single-threaded helper).
pub fn apply(spec: &Seccomp) -> Result<(), String> {
    build(spec)?
        .load()
        .map_err(|e| format!("seccomp: load filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Seccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn builds_a_docker_style_profile() {
        let s = spec(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall_here"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 131072, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                           "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        build(&s).unwrap();
    }

    #[test]
    fn bad_names_are_one_line_errors() {
        let s = spec(serde_json::json!({"defaultAction": "SCMP_ACT_NOPE"}));
        assert!(build(&s).unwrap_err().contains("SCMP_ACT_NOPE"));
        let s = spec(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                          "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_WHAT"}]}]}));
        assert!(build(&s).unwrap_err().contains("SCMP_CMP_WHAT"));
    }
}
