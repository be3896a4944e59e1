//! Mail: the error mail of a failed run, the retry notices, the warning and success mails, the
//! status mail (`--send-status`) and the mail test (`--mailtest`).
//!
//! Owns: composing those mails and delivering them, through SMTP (`smtpHost`, `smtpPort`,
//! `smtpTLS`, `smtpUser`, `smtpPassword`) or, when `smtpHost` is empty, the local
//! `sendmailBinary`. Must never: put a password into a mail (every configured secret is replaced
//! by `<hidden>` in subject and body, whatever the caller passes), send credentials over a
//! plaintext connection unless `smtpTLS=none` says so, or mangle the log lines it quotes (Affa 3
//! replaced their spaces by underscores).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::SmtpTransport;
use lettre::Transport;

use crate::config::{Config, Job};
use crate::error::{Error, IoContext, Result};

pub use affa_core::hostname;

/// The recipients of a job's mails: every `EmailAddress` value, each split on commas and
/// white space (Affa 3 also accepted a comma-separated list), duplicates dropped.
pub fn recipients(job: &Job) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in &job.mail.to {
        for r in v.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()) {
            if !out.iter().any(|o| o == r) {
                out.push(r.to_string());
            }
        }
    }
    out
}

/// An address for the mail headers: a bare local name (`root`) becomes `root@HOSTNAME`.
fn header_address(r: &str) -> String {
    if r.contains('@') {
        r.to_string()
    } else {
        format!("{r}@{}", hostname())
    }
}

fn sender(cfg: &Config) -> String {
    let f = &cfg.settings.mail_from;
    if f.is_empty() {
        format!("affa@{}", hostname())
    } else {
        f.to_string()
    }
}

/// `text` with every configured secret replaced by `<hidden>`.
pub fn scrub(cfg: &Config, text: &str) -> String {
    let mut t = text.to_string();
    for s in cfg.secrets() {
        t = t.replace(&s, "<hidden>");
    }
    t
}

/// How mail leaves this machine, for messages: "SMTP host:port" or "sendmail /usr/sbin/sendmail".
pub fn route(cfg: &Config) -> String {
    let g = &cfg.settings;
    if g.smtp.host.is_empty() {
        format!("sendmail {}", g.sendmail_bin)
    } else {
        format!("SMTP {}:{}", g.smtp.host, g.smtp.port)
    }
}

/// The SMTP password, refusing a configuration file that others may read.
fn smtp_password(cfg: &Config) -> Result<String> {
    let pw = cfg.settings.smtp.password.clone();
    if !pw.is_empty() {
        use std::os::unix::fs::PermissionsExt;
        let f = &cfg.global.origin.file;
        if let Ok(md) = std::fs::metadata(f) {
            let mode = md.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} holds smtpPassword but group or others may read it (mode {mode:o}); run: chmod 600 {}",
                    f.display(),
                    f.display()
                );
            }
        }
    }
    Ok(pw)
}

/// Send one plain-text mail to `to`. Returns where it went ("to a, b via SMTP host:25").
pub fn send(cfg: &Config, to: &[String], subject: &str, body: &str) -> Result<String> {
    if to.is_empty() {
        bail!("no mail recipients; set EmailAddress");
    }
    let subject = scrub(cfg, subject).replace(['\r', '\n'], " ");
    let mut body = scrub(cfg, body);
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let from_s = sender(cfg);
    let from: Mailbox =
        from_s.parse().map_err(|e| Error::config(format!("mailFrom '{from_s}' is not a mail address: {e}")))?;
    let mut b = Message::builder()
        .from(from)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .message_id(Some(format!("<affa.{}.{}@{}>", std::process::id(), unique(), hostname())));
    for r in to {
        let a = header_address(r);
        let mb: Mailbox =
            a.parse().map_err(|e| Error::config(format!("EmailAddress '{r}' is not a mail address: {e}")))?;
        b = b.to(mb);
    }
    let msg = b.body(body).map_err(|e| Error::new(format!("cannot build the mail: {e}")))?;
    let g = &cfg.settings;
    let host = g.smtp.host.as_str();
    if host.is_empty() {
        let bin = g.sendmail_bin.as_str();
        let mut c = Command::new(bin);
        c.arg("-i").arg("-f").arg(&from_s).arg("--").args(to);
        c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(c) => c,
            // A fresh machine: no local mail transport, no SMTP server configured.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no mail transport: {bin} (sendmailBinary) does not exist and smtpHost is not set; set smtpHost (smtpPort, smtpUser) in [GlobalAffaConfig] or install a local MTA (apt-get install postfix), then check with affa --mailtest JOB"
            ),
            Err(e) => return Err(e).ctx(|| format!("cannot run sendmailBinary {bin}")),
        };
        {
            let mut stdin = child.stdin.take().unwrap();
            // A sendmail that exits early (an error) closes the pipe: its exit status says why.
            if let Err(e) = stdin.write_all(&msg.formatted()) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e).ctx(|| format!("cannot write the mail to {bin}"));
                }
            }
        }
        let out = child.wait_with_output().ctx(|| format!("cannot wait for {bin}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{bin} failed with exit {}: {}",
                out.status.code().unwrap_or(-1),
                scrub(cfg, err.trim()).replace('\n', "; ")
            );
        }
    } else {
        let port = g.smtp.port;
        let user = g.smtp.user.as_str();
        let params =
            || TlsParameters::new(host.to_string()).map_err(|e| Error::new(format!("TLS setup for {host}: {e}")));
        let tls = match g.smtp.tls.as_str() {
            "none" => Tls::None,
            "tls" => Tls::Wrapper(params()?),
            // STARTTLS when offered; required when we would log in, so the password never
            // travels in clear text.
            _ if user.is_empty() => Tls::Opportunistic(params()?),
            _ => Tls::Required(params()?),
        };
        let mut t = SmtpTransport::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(60)))
            .hello_name(ClientId::Domain(hostname()));
        if !user.is_empty() {
            t = t.credentials(Credentials::new(user.to_string(), smtp_password(cfg)?));
        }
        t.build().send(&msg).map_err(|e| {
            Error::new(format!("cannot send mail through {host}:{port}: {}", scrub(cfg, &e.to_string())))
        })?;
    }
    Ok(format!("to {} via {}", to.join(", "), route(cfg)))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::SeqCst) << 48)
}

pub fn job_host(job: &Job) -> &str {
    &job.host
}

fn quote_log(body: &mut String, log_file: Option<&Path>, lines: &[String]) {
    match log_file {
        Some(p) => body.push_str(&format!("\nLog of the run ({}):\n", p.display())),
        None => body.push_str("\nLog of the run:\n"),
    }
    for l in lines {
        body.push_str(l);
        body.push('\n');
    }
}

/// Subject of the error mail of a failed run.
pub fn error_subject(job: &Job) -> String {
    format!("affa: job {} on {} FAILED", job.name, job_host(job))
}

/// The one error mail of a failed run (after its last retry): the error and the run's log lines
/// exactly as they were written.
pub fn error_mail(
    cfg: &Config,
    job: &Job,
    error: &str,
    attempts: u32,
    log_file: Option<&Path>,
    lines: &[String],
) -> Result<String> {
    let mut body = format!(
        "The affa backup job {} of {} failed on the backup server {}.\n\nError: {error}\n",
        job.name,
        job_host(job),
        hostname()
    );
    if attempts > 1 {
        body.push_str(&format!(
            "Attempts: {attempts} (RetryAttempts={}, RetryAfter={} s); all failed.\n",
            job.retry.attempts, job.retry.after
        ));
    }
    body.push_str(&format!("Earlier archives are untouched. See affa --status and affa --log-tail {}.\n", job.name));
    quote_log(&mut body, log_file, lines);
    send(cfg, &recipients(job), &error_subject(job), &body)
}

/// RetryNotification=yes: a short notice that attempt `attempt` of `of` failed and a retry
/// follows in `after` seconds. It is not the error mail (that comes once, if the last attempt
/// fails too).
pub fn retry_notice(cfg: &Config, job: &Job, error: &str, attempt: u32, of: u32, after: u64) -> Result<String> {
    let subject =
        format!("affa: job {} on {} failed, retry {} of {} in {} s", job.name, job_host(job), attempt, of - 1, after);
    let body = format!(
        "Attempt {attempt} of {of} of the affa job {} of {} failed on {}:\n{error}\n\nIt is started again in {after} s. \
         You get the error mail with the log only if the last attempt fails too. (RetryNotification=no stops these notices.)\n",
        job.name,
        job_host(job),
        hostname()
    );
    send(cfg, &recipients(job), &subject, &body)
}

/// A run that succeeded with warnings (DiskSpaceWarn, vanished files).
pub fn warning_mail(
    cfg: &Config,
    job: &Job,
    warnings: &[String],
    log_file: Option<&Path>,
    lines: &[String],
) -> Result<String> {
    let subject = format!("affa: job {} on {} WARNING", job.name, job_host(job));
    let mut body =
        format!("The affa job {} of {} completed on {} with warnings:\n", job.name, job_host(job), hostname());
    for w in warnings {
        body.push_str(&format!("  {w}\n"));
    }
    quote_log(&mut body, log_file, lines);
    send(cfg, &recipients(job), &subject, &body)
}

/// A success mail (chattyOnSuccess > 0, or after failed attempts that were notified).
pub fn success_mail(
    cfg: &Config,
    job: &Job,
    archive: Option<&Path>,
    note: &str,
    log_file: Option<&Path>,
    lines: &[String],
) -> Result<String> {
    let subject = format!("affa: job {} on {} completed", job.name, job_host(job));
    let mut body =
        format!("The affa job {} of {} completed successfully on {}.\n", job.name, job_host(job), hostname());
    if let Some(a) = archive {
        body.push_str(&format!("New archive: {}\n", a.display()));
    }
    if !note.is_empty() {
        body.push_str(note);
        body.push('\n');
    }
    quote_log(&mut body, log_file, lines);
    send(cfg, &recipients(job), &subject, &body)
}
