//! Mail: the error mail of a failed run, the retry notices, the warning and success mails, the
//! status mail (`--send-status`) and the mail test (`--mailtest`).
//!
//! Owns: composing those mails and delivering them, through SMTP (`smtpHost`, `smtpPort`,
//! `smtpTLS`, `smtpUser`, `smtpPassword`) or, when `smtpHost` is empty, the local
//! `sendmailBinary`, each within its deadline (`mailTimeout` plus the mail's bytes at
//! `transport::LEAST_RATE`). The SMTP session runs in a child, `affa --_smtp` ([`smtp_session`]),
//! killed at the deadline: lettre bounds only the pause between two reads and reads a reply line
//! whole, so a server that trickles bytes, or sends a line without end, would otherwise hold the
//! run for ever and grow its memory; the child's memory is capped too ([`SMTP_HELPER_MEMORY`]).
//! Must never: put a password into a mail (every configured secret is replaced by `<hidden>` in
//! subject and body, whatever the caller passes), send credentials over a plaintext connection
//! unless `smtpTLS=none` says so, pass a secret on a command line or in the environment (the
//! helper gets it on its stdin), wait for a mail past its deadline, or mangle the log lines it
//! quotes (Affa 3 replaced their spaces by underscores).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lettre::address::{Address, Envelope};
use lettre::message::{header::ContentType, Mailbox, Message};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{SmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

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

/// Send one plain-text mail to `to`, within its deadline. Returns where it went ("to a, b via
/// SMTP host:25").
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
    let formatted = msg.formatted();
    let limit = crate::transport::deadline(g.mail_timeout, formatted.len() as u64);
    let limit_is = format!(
        "the limit is mailTimeout={} s of [GlobalAffaConfig] plus 1 s per 256 KiB of the mail",
        g.mail_timeout.as_secs()
    );
    if g.smtp.host.is_empty() {
        sendmail(cfg, &from_s, to, formatted, limit, &limit_is)?;
    } else {
        smtp(cfg, msg.envelope(), formatted, limit, &limit_is)?;
    }
    Ok(format!("to {} via {}", to.join(", "), route(cfg)))
}

/// The mail handed to `sendmailBinary -i -f FROM -- TO...` on its stdin; killed (with its
/// process group) when it has not exited within `limit`.
fn sendmail(cfg: &Config, from: &str, to: &[String], mail: Vec<u8>, limit: Duration, limit_is: &str) -> Result<()> {
    let bin = cfg.settings.sendmail_bin.as_str();
    let mut c = Command::new(bin);
    c.arg("-i").arg("-f").arg(from).arg("--").args(to);
    c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    c.process_group(0);
    // Its own process group (killed as one at the deadline) is out of reach of a signal to
    // affa's: it dies with affa instead (a hung sendmail outlived a killed affa).
    crate::transport::die_with_parent(&mut c);
    let child = match c.spawn() {
        Ok(c) => c,
        // A fresh machine: no local mail transport, no SMTP server configured.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no mail transport: {bin} (sendmailBinary) does not exist and smtpHost is not set; set smtpHost (smtpPort, smtpUser) in [GlobalAffaConfig] or install a local MTA (apt-get install postfix), then check with affa --mailtest JOB"
        ),
        Err(e) => return Err(e).ctx(|| format!("cannot run sendmailBinary {bin}")),
    };
    // A sendmail that exits early (an error) closes the pipe: its exit status says why.
    let out = crate::transport::finish_within(child, Some(mail), limit, &format!("sendmailBinary {bin}"))?;
    let Some(status) = out.status else {
        bail!(
            Remote,
            "{bin} (sendmailBinary) did not finish within {} s and was stopped, the mail not sent ({limit_is})",
            limit.as_secs()
        );
    };
    if !status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            Remote,
            "{bin} failed with exit {}: {}",
            status.code().unwrap_or(-1),
            scrub(cfg, err.trim()).replace('\n', "; ")
        );
    }
    Ok(())
}

/// The most memory (`RLIMIT_DATA`) the SMTP helper may use: a reply line without end makes it
/// fail there instead of growing without bound until the deadline.
pub const SMTP_HELPER_MEMORY: u64 = 256 << 20;

/// The SMTP session, in the helper `affa --_smtp` ([`smtp_session`]): the parameters, the
/// password and the mail go on its stdin, it says each step and the outcome on its stdout. At
/// `limit` it is killed (the socket goes with it) and the error names the server and the step
/// it was in; once the server has accepted the mail (`sent`), the rest (QUIT) does not matter.
fn smtp(cfg: &Config, envelope: &Envelope, mail: Vec<u8>, limit: Duration, limit_is: &str) -> Result<()> {
    let g = &cfg.settings;
    let (host, port, user) = (g.smtp.host.as_str(), g.smtp.port, g.smtp.user.as_str());
    let tls = match g.smtp.tls.as_str() {
        "none" => "none",
        "tls" => "wrapper",
        // STARTTLS when offered; required when we would log in, so the password never
        // travels in clear text.
        _ if user.is_empty() => "opportunistic",
        _ => "required",
    };
    let mut request = vec![
        ("host", host.to_string()),
        ("port", port.to_string()),
        ("tls", tls.to_string()),
        ("hello", hostname()),
        ("idle", "60".to_string()),
    ];
    if !user.is_empty() {
        request.push(("user", user.to_string()));
        request.push(("password", smtp_password(cfg)?));
    }
    if let Some(f) = envelope.from() {
        request.push(("from", f.to_string()));
    }
    request.extend(envelope.to().iter().map(|t| ("to", t.to_string())));
    let mut input = Vec::new();
    for (k, v) in &request {
        if v.contains(['\n', '\r']) {
            bail!(Config, "the SMTP setting {k} holds a line break; expected one line");
        }
        input.extend_from_slice(format!("{k} {v}\n").as_bytes());
    }
    input.push(b'\n');
    input.extend_from_slice(&mail);

    let mut c = Command::new("/proc/self/exe");
    c.arg0("affa").arg("--_smtp");
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2) and
    // setrlimit(2), both async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let lim = libc::rlimit { rlim_cur: SMTP_HELPER_MEMORY, rlim_max: SMTP_HELPER_MEMORY };
            libc::setrlimit(libc::RLIMIT_DATA, &lim);
            Ok(())
        });
    }
    let child = c.spawn().ctx(|| "cannot start affa's SMTP helper (/proc/self/exe --_smtp)".to_string())?;
    let out = crate::transport::finish_within(child, Some(input), limit, &format!("the SMTP session with {host}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let step = text.lines().filter_map(|l| l.strip_prefix("step ")).next_back().unwrap_or("starting");
    let failed = |why: String| -> Result<()> {
        Err(Error::remote(format!("cannot send mail through {host}:{port}: {}", scrub(cfg, &why).replace('\n', "; "))))
    };
    match out.status {
        _ if text.lines().any(|l| l == "sent") => Ok(()),
        None => failed(format!(
            "the SMTP session did not finish within {} s and was closed at {step}, the mail not sent ({limit_is})",
            limit.as_secs()
        )),
        Some(s) => match text.lines().find_map(|l| l.strip_prefix("error ")) {
            Some(e) => failed(e.to_string()),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let err = String::from_utf8_lossy(&out.stderr);
                let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                let how = match s.signal() {
                    Some(sig) => format!("signal {sig}"),
                    None => format!("exit {}", s.code().unwrap_or(-1)),
                };
                failed(format!(
                    "the SMTP session ended abnormally ({how}) at {step} (its memory is limited to {} MiB: a reply without end?): {first}",
                    SMTP_HELPER_MEMORY >> 20
                ))
            }
        },
    }
}

/// `affa --_smtp`, the SMTP helper of [`send`]: reads `KEY VALUE` lines (host, port, tls,
/// hello, idle, user, password, from, to...), an empty line and the mail from `input`, and
/// delivers it with lettre. It tells its parent how far it got through `say`, one line each:
/// `step WHAT` before each step of the session (the parent names the step a session it had to
/// stop was in), `sent` once the server accepted the mail. Its parent kills it at the mail's
/// deadline; the idle timeout here only ends a silent server sooner.
pub fn smtp_session(input: &mut dyn Read, say: &mut dyn FnMut(&str)) -> Result<()> {
    let mut step = |s: &str| say(&format!("step {s}"));
    let mut data = Vec::new();
    input.read_to_end(&mut data).ctx(|| "cannot read the SMTP helper's input".to_string())?;
    let Some(end) = data.windows(2).position(|w| w == b"\n\n") else {
        bail!("the SMTP helper's input has no empty line after its settings; expected it from affa itself");
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let mail = &data[end + 2..];
    let mut get: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for l in head.lines() {
        let (k, v) = l.split_once(' ').unwrap_or((l, ""));
        get.entry(k).or_default().push(v);
    }
    let one = |k: &str| get.get(k).and_then(|v| v.first().copied()).unwrap_or("");
    let (host, tls, user) = (one("host"), one("tls"), one("user"));
    let port: u16 = one("port").parse().map_err(|_| Error::new("the SMTP helper got no port"))?;
    let idle = Duration::from_secs(one("idle").parse().unwrap_or(60));
    let hello = ClientId::Domain(one("hello").to_string());
    let addr = |a: &str| a.parse::<Address>().map_err(|e| Error::new(format!("'{a}' is not a mail address: {e}")));
    let from = get.get("from").and_then(|v| v.first()).map(|a| addr(a)).transpose()?;
    let to = get.get("to").into_iter().flatten().map(|a| addr(a)).collect::<Result<Vec<_>>>()?;
    let envelope = Envelope::new(from, to).map_err(|e| Error::new(format!("no envelope for the mail: {e}")))?;
    let params = || TlsParameters::new(host.to_string()).map_err(|e| Error::new(format!("TLS setup for {host}: {e}")));
    let smtp_err = |e: lettre::transport::smtp::Error| Error::remote(e.to_string());
    let wrapper = if tls == "wrapper" { Some(params()?) } else { None };
    step("the connection, the greeting and the answer to EHLO");
    let mut conn =
        SmtpConnection::connect((host, port), Some(idle), &hello, wrapper.as_ref(), None).map_err(smtp_err)?;
    match tls {
        "opportunistic" if conn.can_starttls() => {
            step("STARTTLS");
            conn.starttls(&params()?, &hello).map_err(smtp_err)?;
        }
        "required" => {
            step("STARTTLS");
            conn.starttls(&params()?, &hello).map_err(smtp_err)?;
        }
        _ => {}
    }
    if !user.is_empty() {
        step("the login (AUTH)");
        let creds = Credentials::new(user.to_string(), one("password").to_string());
        conn.auth(DEFAULT_MECHANISMS, &creds).map_err(smtp_err)?;
    }
    step("sending the mail (MAIL FROM, RCPT TO, DATA)");
    conn.send(&envelope, mail).map_err(smtp_err)?;
    say("sent");
    // QUIT, without waiting for more than its reply (the parent's deadline bounds it).
    conn.abort();
    Ok(())
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
