//! Scripts of a run: the pre- and post-job scripts (local and remote), and running a script on
//! the source host for other steps (the SME events).
//!
//! Owns: how a script is started, bounded in time (`scriptTimeout`) and logged. Must never: run
//! a script from outside scriptDir, or leave a predictable file on the host.

use std::fs;
use std::process::Command;

use crate::backup::ctx::Ctx;
use crate::error::{IoContext, Result};
use crate::transport::{die_with_parent, shell_quote, SshTarget};

/// Pre/post-job scripts, all of them in alphabetical order of name, local ones called as
/// `SCRIPT HOST JOB 'SSHCMD'`, remote ones copied into a private directory that `mktemp -d`
/// makes on the source and run there; each ends within scriptTimeout seconds or is stopped.
/// `local_key` names the scripts in messages.
pub fn run_scripts(ctx: &Ctx, local_key: &str, local: &[String], remote: &[String]) -> Result<()> {
    let mut all: Vec<(String, bool)> = local.iter().map(|s| (s.clone(), false)).collect();
    all.extend(remote.iter().map(|s| (s.clone(), true)));
    all.sort();
    for (name, remote) in all {
        if name.contains("..") || name.starts_with('/') {
            bail!(
                "{local_key} '{name}' of job {}: expected a script name inside {}",
                ctx.job.name,
                ctx.cfg.script_dir().display()
            );
        }
        let script = ctx.cfg.script_dir().join(&name);
        if !script.is_file() {
            bail!("script {} of job {} does not exist or is not a file", script.display(), ctx.job.name);
        }
        let target = ctx.source();
        let host = &ctx.job.host;
        match (remote, target) {
            (true, Some(t)) => {
                let body = fs::read(&script).ctx(|| format!("cannot read {}", script.display()))?;
                remote_script(ctx, &t, &name, &body)?;
            }
            (_, target) => {
                ctx.log.info(format!("Executing script {name}"));
                let sshcmd =
                    target.as_ref().map(|t| format!("{} {}", t.ssh_bin, t.options().join(" "))).unwrap_or_default();
                let mut c = Command::new(&script);
                c.arg(host).arg(&ctx.job.name).arg(sshcmd);
                run_logged(ctx, c, &[], &format!("cannot run script {}", script.display()), |code| {
                    format!("script {name} of job {} failed with exit {code}", ctx.job.name)
                })?;
            }
        }
    }
    Ok(())
}

/// Run a command with `input` on its stdin and its output in the log, within `scriptTimeout`
/// (the whole process group is killed past it); returns its stdout. A non-zero exit is the
/// error `failed(exit code)`.
pub fn run_logged(
    ctx: &Ctx,
    mut c: Command,
    input: &[u8],
    cannot: &str,
    failed: impl Fn(i32) -> String,
) -> Result<Vec<u8>> {
    let limit = ctx.job.scripts.timeout;
    die_with_parent(&mut c);
    let what = cannot.strip_prefix("cannot run ").unwrap_or(cannot);
    let out = crate::transport::output_within(c, Some(input.to_vec()), limit, what, "scriptTimeout")?;
    log_output(ctx, &out.stdout, &out.stderr);
    if !out.status.success() {
        bail!("{}", failed(out.status.code().unwrap_or(-1)));
    }
    Ok(out.stdout)
}

/// Affa's way to run a script on the source host, run as `SCRIPT HOST JOB` within
/// `scriptTimeout`. It goes into a private directory made atomically on the host (mktemp -d,
/// mode 0700): no predictable name in /tmp that a user of the host could plant a symlink at.
/// Returns its stdout.
pub fn remote_script(ctx: &Ctx, t: &SshTarget, name: &str, body: &[u8]) -> Result<Vec<u8>> {
    let host = &ctx.job.host;
    ctx.log.info(format!("Executing script {name} on {host}"));
    let limit = ctx.job.scripts.timeout;
    let remote_cmd = format!(
        "umask 077; d=$(mktemp -d /tmp/affa-XXXXXXXXXX) || exit 125; cat > \"$d/script\" && chmod 700 \"$d/script\" && \"$d/script\" {h} {j}; rc=$?; rm -rf \"$d\"; exit $rc",
        h = shell_quote(host),
        j = shell_quote(&ctx.job.name)
    );
    let out =
        t.run_within(&remote_cmd, Some(body.to_vec()), limit, "scriptTimeout", &format!("remote script {name}"))?;
    log_output(ctx, &out.stdout, &out.stderr);
    if !out.status.success() {
        bail!("remote script {name} failed on {host} with exit {}", out.status.code().unwrap_or(-1));
    }
    Ok(out.stdout)
}

fn log_output(ctx: &Ctx, stdout: &[u8], stderr: &[u8]) {
    for l in String::from_utf8_lossy(stdout).lines().chain(String::from_utf8_lossy(stderr).lines()) {
        ctx.log.info(format!("  {l}"));
    }
}
