//! Operations end to end with real parts: the cron file, retries and mails against a real SMTP
//! server (Debian's python3-aiosmtpd), the sendmail path, --nrpe and --metrics, Samba shares
//! read back with smbclient from a private smbd, resuming interrupted jobs, and --install.

use crate::common;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::smb::{smbclient, smbclient_until_ok, start_smbd};
use common::*;

// ---------------------------------------------------------------- helpers

/// A private SMTP server (aiosmtpd) that saves each message as NNN.rcpt/.subject/.body/.raw.
/// (Fields drop in this order: the server stops before its directory goes.)
struct Smtp {
    _daemon: Daemon,
    port: u16,
    dir: tempfile::TempDir,
}

const SMTP_PY: &str = r#"
import sys, os, threading, email
from email import policy
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
out, port = sys.argv[1], int(sys.argv[2])
cred = sys.argv[3] if len(sys.argv) > 3 else ""
class H:
    n = 0
    async def handle_DATA(self, server, session, envelope):
        H.n += 1
        msg = email.message_from_bytes(envelope.content, policy=policy.default)
        base = os.path.join(out, "%03d" % H.n)
        parts = [("raw", envelope.content), ("rcpt", ("\n".join(envelope.rcpt_tos) + "\n").encode()),
                 ("from", envelope.mail_from.encode()), ("subject", str(msg["subject"]).encode()),
                 ("body", msg.get_content().replace("\r\n", "\n").encode())]
        for ext, data in parts:
            with open(base + "." + ext + ".tmp", "wb") as f:
                f.write(data)
        for ext, _ in parts:
            os.rename(base + "." + ext + ".tmp", base + "." + ext)
        return "250 OK"
def auth(server, session, envelope, mechanism, auth_data):
    ok = cred and auth_data.login.decode() + ":" + auth_data.password.decode() == cred
    if ok:
        open(os.path.join(out, "auth-ok"), "w").close()
    return AuthResult(success=bool(ok))
kw = {}
if cred:
    kw = dict(authenticator=auth, auth_required=True, auth_require_tls=False)
c = Controller(H(), hostname="127.0.0.1", port=port, **kw)
c.start()
open(os.path.join(out, "ready"), "w").close()
threading.Event().wait()
"#;

impl Smtp {
    fn start(cred: Option<&str>) -> Smtp {
        let dir = tempfile::Builder::new().prefix("affa-smtp").tempdir().unwrap();
        let port = free_port();
        fs::write(dir.path().join("server.py"), SMTP_PY).unwrap();
        let mail = dir.path().join("mail");
        fs::create_dir(&mail).unwrap();
        let mut c = Command::new("/usr/bin/python3");
        c.arg(dir.path().join("server.py")).arg(&mail).arg(port.to_string());
        if let Some(cr) = cred {
            c.arg(cr);
        }
        let log = dir.path().join("server.log");
        let daemon = Daemon::start(&c, &log);
        let up = poll(Duration::from_secs(20), Duration::from_millis(50), || {
            (mail.join("ready").exists() && TcpStream::connect(("127.0.0.1", port)).is_ok()).then_some(())
        });
        assert!(
            up.is_some(),
            "SMTP server did not start (apt-get install python3-aiosmtpd): {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Smtp { _daemon: daemon, port, dir }
    }

    fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// The messages received so far: (rcpt lines, subject, body, raw).
    fn messages(&self) -> Vec<Msg> {
        let mut names: Vec<String> = fs::read_dir(self.mail_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".body"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| {
                let base = self.mail_dir().join(n.trim_end_matches(".body"));
                let r = |e: &str| fs::read_to_string(base.with_extension(e)).unwrap();
                Msg {
                    rcpt: r("rcpt").lines().map(String::from).collect(),
                    from: r("from"),
                    subject: r("subject"),
                    body: r("body"),
                    raw: r("raw"),
                }
            })
            .collect()
    }

    fn global(&self) -> String {
        format!("smtpHost=127.0.0.1\nsmtpPort={}\nsmtpTLS=none\n", self.port)
    }
}

#[derive(Debug)]
struct Msg {
    rcpt: Vec<String>,
    from: String,
    subject: String,
    body: String,
    raw: String,
}

/// The test's global section plus extra global keys (which replace the base ones).
fn global(a: &Affa, extra: &str) {
    let base = format!(
        "lockDir={s}/lock\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nRootDir={r}\n\
         cronFile={s}/cron.d/affa\nmetricsFile={s}/nodir/affa.prom\nsambaConfDir={s}/samba\nsmbConf={s}/smb.conf\n",
        s = a.state.display(),
        r = a.root.display()
    );
    let overridden: Vec<&str> = extra.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    let kept: String = base
        .lines()
        .filter(|l| !overridden.contains(&l.split_once('=').unwrap().0))
        .map(|l| format!("{l}\n"))
        .collect();
    a.write_conf("00-global.conf", &format!("[GlobalAffaConfig]\n{kept}{extra}"));
}

/// A source tree for local (remoteHostName=localhost) jobs.
fn source() -> tempfile::TempDir {
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::create_dir_all(src.path().join("data/sub")).unwrap();
    fs::write(src.path().join("data/hello.txt"), "hello from affa\n").unwrap();
    let bin: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(src.path().join("data/sub/blob.bin"), bin).unwrap();
    src
}

fn local_job(name: &str, src: &Path, extra: &str) -> String {
    format!("[{name}]\nremoteHostName=localhost\nInclude={}/data\n{extra}", src.display())
}

fn script(a: &Affa, name: &str, body: &str) {
    let dir = a.state.join("scripts");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

fn log_of(a: &Affa, job: &str) -> String {
    fs::read_to_string(a.state.join(format!("log/{job}.log"))).unwrap_or_default()
}

// ---------------------------------------------------------------- cron

#[test]
fn cron_file_is_exactly_the_expected_one() {
    let a = Affa::new();
    global(&a, "affaBinary=/usr/sbin/affa\nsendStatus=daily\n");
    a.write_conf(
        "jobs.conf",
        "[web]\nremoteHostName=web.example\nTimeSchedule=0130\nTimeSchedule=1345\nkillAt=0700\nresumeKilledAt=2000\n\
         [db]\nremoteHostName=db.example\nstatus=disabled\nTimeSchedule=0300\n\
         [vm]\nremoteHostName=esx.example\n",
    );
    let out = ok(&a.affa(&["--make-cronjobs"]));
    let cron = a.state.join("cron.d/affa");
    assert!(out.contains(&format!("{} written: 9 cron line(s)", cron.display())), "{out}");
    let conf = fs::canonicalize(&a.conf).unwrap();
    let affa = format!("/usr/sbin/affa --config-dir {}", conf.display());
    // Line 2: a hash of the list of configuration files (--_cronupdate compares it).
    let text = fs::read_to_string(&cron).unwrap();
    let list = text.lines().nth(1).unwrap_or_default().to_string();
    assert!(list.starts_with("# configuration files: ") && list.len() == 23 + 32, "{text}");
    let expected = format!(
        "# {s}/cron.d/affa: written by affa from {c}/*.conf; a change there is applied within 15 minutes (--_cronupdate), or at once by affa --make-cronjobs.\n\
         {list}\n\
         SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         \n# job vm\n30 22 * * * root {affa} --silent --run vm\n\
         \n# job web\n30 1 * * * root {affa} --silent --run web\n45 13 * * * root {affa} --silent --run web\n\
         0 7 * * * root {affa} --silent --kill web >/dev/null\n\
         0 20 * * * root test -d {r}/web/scheduled.running && {affa} --silent --run web\n\
         \n# restart the jobs a shutdown interrupted (resumeAfterBoot=yes)\n@reboot root {affa} --silent --resume-interrupted >/dev/null\n\
         \n# status mail (sendStatus=daily)\n0 5 * * * root {affa} --silent --send-status >/dev/null\n\
         \n# read back 1/16 of every chunk pool and check it (scrubDays, scrubTime; damage is reported on stderr)\n0 12 * * * root {affa} --silent --scrub >/dev/null\n\
         \n# apply configuration changes (Affa 3's self-refresh)\n*/15 * * * * root {affa} --silent --_cronupdate\n",
        s = a.state.display(),
        c = conf.display(),
        r = a.root.display(),
    );
    assert_eq!(fs::read_to_string(&cron).unwrap(), expected);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&cron).unwrap().permissions().mode() & 0o777, 0o644);

    // globalStatus=enabled overrides the job's status=disabled; the metrics line appears once
    // the metrics directory exists; sendStatus=never has no line.
    fs::create_dir_all(a.state.join("prom")).unwrap();
    global(
        &a,
        &format!(
            "affaBinary=/usr/sbin/affa\nglobalStatus=enabled\nsendStatus=never\nmetricsFile={}/prom/affa.prom\n",
            a.state.display()
        ),
    );
    ok(&a.affa(&["--make-cronjobs"]));
    let text = fs::read_to_string(&cron).unwrap();
    assert!(text.contains(&format!("0 3 * * * root {affa} --silent --run db\n")), "{text}");
    assert!(text.contains(&format!("*/10 * * * * root {affa} --silent --metrics >/dev/null\n")), "{text}");
    assert!(!text.contains("--send-status"), "{text}");

    // globalStatus=disabled: no job lines at all (the status mail stays).
    global(&a, "affaBinary=/usr/sbin/affa\nglobalStatus=disabled\n");
    ok(&a.affa(&["--make-cronjobs"]));
    let text = fs::read_to_string(&cron).unwrap();
    assert!(!text.contains("--run") && !text.contains("--kill") && !text.contains("@reboot"), "{text}");
    assert!(text.contains("# globalStatus=disabled: no job runs from cron.\n"), "{text}");
    assert!(text.contains(&format!("0 5 * * 0 root {affa} --silent --send-status >/dev/null\n")), "{text}");

    // --show-schedule: 30-minute slots; 01:30 is slot 3, 13:45 slot 27, killAt 07:00 slot 14,
    // resumeKilledAt 20:00 slot 40.
    global(&a, "");
    let s = ok(&a.affa(&["--show-schedule"]));
    let line = s.lines().find(|l| l.starts_with("web ")).unwrap_or_else(|| panic!("{s}"));
    let bar: Vec<char> = line[25..25 + 48].chars().collect();
    assert_eq!(bar[3], 'S', "{line}");
    assert_eq!(bar[27], 'S', "{line}");
    assert_eq!(bar[14], 'K', "{line}");
    assert_eq!(bar[40], 'R', "{line}");
    assert_eq!(bar.iter().filter(|c| **c == '.').count(), 44, "{line}");
    assert!(!s.contains("\ndb "), "{s}");
    assert!(s.contains("1 disabled job(s) not shown"), "{s}");
    let s = ok(&a.affa(&["--show-schedule", "--all"]));
    assert!(s.contains("db (disabled)"), "{s}");
}

// ---------------------------------------------------------------- retries and mail

#[test]
fn failing_job_runs_three_times_and_sends_one_error_mail() {
    let smtp = Smtp::start(None);
    let a = Affa::new();
    global(&a, &smtp.global());
    let src = source();
    script(&a, "fail.sh", "#!/bin/sh\necho 'disk  not   ready'\necho 'token S3cretPw'\nexit 1\n");
    let job = |notify: &str| {
        local_job(
            "web",
            src.path(),
            &format!(
                "preJobCommand=fail.sh\nRetryAttempts=2\nRetryAfter=1\nRetryNotification={notify}\n\
                 EmailAddress=ops@example.com\nEmailAddress=backup@example.com, root\nrsyncdPassword=S3cretPw\n"
            ),
        )
    };
    a.write_conf("web.conf", &job("no"));
    let t = Instant::now();
    let e = fail(&a.affa(&["--silent", "--run", "web"]));
    assert!(e.contains("script fail.sh of job web failed with exit 1"), "{e}");
    assert!(t.elapsed() >= Duration::from_secs(2), "RetryAfter=1 twice");
    let log = log_of(&a, "web");
    assert_eq!(log.matches("Starting job web scheduled").count(), 3, "{log}");
    assert!(log.contains("attempt 1 of 3 failed; retry 1 of 2 in 1 s"), "{log}");
    assert!(log.contains("error mail sent to ops@example.com, backup@example.com, root via SMTP 127.0.0.1:"), "{log}");

    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    let m = &msgs[0];
    let host = affa::notify::hostname();
    assert_eq!(m.rcpt, ["ops@example.com".to_string(), "backup@example.com".into(), format!("root@{host}")]);
    assert_eq!(m.from, format!("affa@{host}"));
    assert_eq!(m.subject, "affa: job web on localhost FAILED");
    assert!(m.body.contains("Error: script fail.sh of job web failed with exit 1"), "{}", m.body);
    assert!(m.body.contains("Attempts: 3 (RetryAttempts=2, RetryAfter=1 s); all failed."), "{}", m.body);
    // The log lines of all three attempts, exactly as written (spaces kept), secrets hidden.
    let before_mail: Vec<&str> = log.lines().take_while(|l| !l.contains("error mail sent")).collect();
    assert!(before_mail.len() >= 9, "{log}");
    for l in &before_mail {
        if l.contains("S3cretPw") {
            assert!(m.body.contains(&l.replace("S3cretPw", "<hidden>")), "line {l:?} not in the mail:\n{}", m.body);
        } else {
            assert!(m.body.contains(&format!("{l}\n")), "line {l:?} not in the mail:\n{}", m.body);
        }
    }
    assert_eq!(m.body.matches("  disk  not   ready\n").count(), 3, "{}", m.body);
    assert!(!m.raw.contains("S3cretPw") && !m.raw.contains("disk__not"), "{}", m.raw);

    // RetryNotification=yes: a short notice per retried attempt, still one error mail.
    a.write_conf("web.conf", &job("yes"));
    fail(&a.affa(&["--silent", "--run", "web"]));
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    assert_eq!(msgs[1].subject, "affa: job web on localhost failed, retry 1 of 2 in 1 s");
    assert_eq!(msgs[2].subject, "affa: job web on localhost failed, retry 2 of 2 in 1 s");
    assert_eq!(msgs[3].subject, "affa: job web on localhost FAILED");
    assert_eq!(msgs.iter().filter(|m| m.subject.ends_with("FAILED")).count(), 2);

    // Without --silent (interactive use): no retries, still the error mail.
    fail(&a.affa(&["--run", "web"]));
    assert_eq!(log_of(&a, "web").matches("Starting job web scheduled").count(), 7);
    assert_eq!(smtp.messages().len(), 5);
    assert_eq!(smtp.messages()[4].subject, "affa: job web on localhost FAILED");
    assert!(!smtp.messages()[4].body.contains("Attempts:"));
}

/// scripts/test.sh builds affa (and this test) linked statically against glibc
/// (scripts/static-env.sh: the affa the packages ship, one .rpm for EL7's glibc 2.17 to EL9). A
/// static glibc loads no NSS module for host names: `files` and `dns` are built in. affa started
/// with an empty environment (as `env -i`; cron gives little more) finds its SMTP server by
/// name, `localhost` from /etc/hosts, and the mail arrives.
#[test]
fn mailtest_resolves_the_smtp_host_by_name_with_an_empty_environment() {
    let exe = env!("CARGO_BIN_EXE_affa");
    if cfg!(target_feature = "crt-static") {
        // The static build: affa is static too (no program interpreter), as `file` says.
        assert_eq!(affa::install::not_static_elf(&fs::read(exe).unwrap()), None, "{exe} is dynamically linked");
        let f = Command::new("file").arg("-L").arg(exe).output().unwrap();
        let f = String::from_utf8_lossy(&f.stdout);
        assert!(f.contains("statically linked") || f.contains("static-pie linked"), "{f}");
    }
    let smtp = Smtp::start(None);
    let a = Affa::new();
    global(&a, &format!("smtpHost=localhost\nsmtpPort={}\nsmtpTLS=none\n", smtp.port));
    a.write_conf("web.conf", "[web]\nremoteHostName=web.example\nEmailAddress=admin@example.com\n");
    let o = a.cmd().env_clear().args(["--mailtest", "web"]).output().unwrap();
    let out = ok(&o);
    assert_eq!(out.trim(), format!("test mail for job web sent to admin@example.com via SMTP localhost:{}", smtp.port));
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(msgs[0].rcpt, ["admin@example.com"]);
    assert_eq!(msgs[0].subject, "affa: test mail for job web on web.example");
}

#[test]
fn mailtest_through_smtp_with_login_never_shows_the_password() {
    let smtp = Smtp::start(Some("affa-user:pw-Zq81x!"));
    let a = Affa::new();
    global(&a, &format!("{}smtpUser=affa-user\nsmtpPassword=pw-Zq81x!\nmailFrom=backup@example.com\n", smtp.global()));
    a.write_conf("web.conf", "[web]\nremoteHostName=web.example\nEmailAddress=admin@example.com\n");
    let out = ok(&a.affa(&["--mailtest", "web"]));
    assert_eq!(out.trim(), format!("test mail for job web sent to admin@example.com via SMTP 127.0.0.1:{}", smtp.port));
    assert!(smtp.mail_dir().join("auth-ok").exists(), "no login");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpt, ["admin@example.com"]);
    assert_eq!(msgs[0].from, "backup@example.com");
    assert_eq!(msgs[0].subject, "affa: test mail for job web on web.example");
    assert!(msgs[0].body.contains("Mail goes out via SMTP 127.0.0.1:"), "{}", msgs[0].body);
    assert!(!msgs[0].raw.contains("pw-Zq81x"), "{}", msgs[0].raw);

    // A password file that others may read is refused.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(a.conf.join("00-global.conf"), fs::Permissions::from_mode(0o644)).unwrap();
    let e = fail(&a.affa(&["--mailtest", "web"]));
    assert!(e.contains("holds smtpPassword but group or others may read it") && e.contains("chmod 600"), "{e}");
    fs::set_permissions(a.conf.join("00-global.conf"), fs::Permissions::from_mode(0o600)).unwrap();

    // starttls with a login: the server offers no STARTTLS, so nothing is sent in clear.
    global(
        &a,
        &format!(
            "smtpHost=127.0.0.1\nsmtpPort={}\nsmtpTLS=starttls\nsmtpUser=affa-user\nsmtpPassword=pw-Zq81x!\n",
            smtp.port
        ),
    );
    let e = fail(&a.affa(&["--mailtest", "web"]));
    assert!(e.contains("cannot send mail through 127.0.0.1:"), "{e}");
    assert!(!e.contains("pw-Zq81x"), "{e}");
    assert_eq!(smtp.messages().len(), 1);
}

#[test]
fn sendmail_path_success_mails_count_down_and_status_mail() {
    let a = Affa::new();
    let out = a.tmp.path().join("sendmail-out");
    fs::create_dir_all(&out).unwrap();
    let sm = a.tmp.path().join("sendmail.sh");
    fs::write(
        &sm,
        format!(
            "#!/bin/sh\nn=$(ls {o}/*.msg 2>/dev/null | wc -l)\nprintf '%s\\n' \"$@\" > {o}/$n.args\ncat > {o}/$n.msg\n",
            o = out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&sm, fs::Permissions::from_mode(0o755)).unwrap();
    global(&a, &format!("sendmailBinary={}\nEmailAddress=status@example.com\n", sm.display()));
    let src = source();
    a.write_conf("web.conf", &local_job("web", src.path(), "chattyOnSuccess=2\nEmailAddress=root\n"));

    let msg = |n: usize| fs::read_to_string(out.join(format!("{n}.msg"))).unwrap();
    let args = |n: usize| fs::read_to_string(out.join(format!("{n}.args"))).unwrap();
    let host = affa::notify::hostname();

    ok(&a.affa(&["--mailtest", "web"]));
    assert_eq!(args(0), format!("-i\n-f\naffa@{host}\n--\nroot\n"));
    assert!(msg(0).contains("Subject: affa: test mail for job web on localhost"), "{}", msg(0));
    assert!(msg(0).contains(&format!("To: root@{host}")), "{}", msg(0));

    ok(&a.affa_at("2026-03-02T10:00:00", &["--silent", "--run", "web"]));
    assert!(msg(1).contains("Subject: affa: job web on localhost completed"), "{}", msg(1));
    assert!(msg(1).contains("Completed job web scheduled"), "{}", msg(1));
    let conf = fs::read_to_string(a.conf.join("web.conf")).unwrap();
    assert!(conf.contains("chattyOnSuccess=1\n") && !conf.contains("chattyOnSuccess=2"), "{conf}");
    ok(&a.affa_at("2026-03-02T11:00:00", &["--silent", "--run", "web"]));
    ok(&a.affa_at("2026-03-02T12:00:00", &["--silent", "--run", "web"]));
    assert!(fs::read_to_string(a.conf.join("web.conf")).unwrap().contains("chattyOnSuccess=0\n"));
    assert!(!out.join("3.msg").exists(), "a third success mail with chattyOnSuccess=0");

    // --send-status: status, disk usage and the archive lists, to the global EmailAddress.
    ok(&a.affa_at("2026-03-02T12:30:00", &["--send-status"]));
    let m = msg(3);
    assert_eq!(args(3), format!("-i\n-f\naffa@{host}\n--\nstatus@example.com\n"));
    assert!(m.contains(&format!("Subject: affa: status of {host}")), "{m}");
    assert!(
        m.contains("Disk usage:")
            && m.contains("Archives:")
            && m.contains("| Job: web ")
            && m.contains("| Hostname: localhost "),
        "{m}"
    );

    // A sendmail that fails does not fail the run; the log says why.
    fs::write(&sm, "#!/bin/sh\necho 'mail system down' >&2\nexit 75\n").unwrap();
    a.write_conf("web.conf", &local_job("web", src.path(), "chattyOnSuccess=1\n"));
    ok(&a.affa_at("2026-03-02T13:00:00", &["--silent", "--run", "web"]));
    let log = log_of(&a, "web");
    assert!(
        log.contains("cannot send the success mail:") && log.contains("failed with exit 75: mail system down"),
        "{log}"
    );
}

/// An SMTP server of the test's own: each connection gets `greeting`, then a `2` a second for
/// ever, or (`flood` > 0) `flood` bytes of `A` as fast as they go and then silence until the
/// client goes. Neither ever ends a reply line.
fn bad_smtp(greeting: &'static [u8], flood: usize) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || -> std::io::Result<()> {
                use std::io::{Read, Write};
                c.write_all(greeting)?;
                if flood > 0 {
                    let block = vec![b'A'; 1 << 20];
                    for _ in 0..flood.div_ceil(1 << 20) {
                        c.write_all(&block)?;
                    }
                    let _ = c.read(&mut [0u8; 1]);
                    return Ok(());
                }
                loop {
                    c.write_all(b"2")?;
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    port
}

/// A run's output (it must end within `secs`) and how long it took.
fn run_within(a: &Affa, now: &str, args: &[&str], secs: u64) -> (Output, Duration) {
    let mut c = a.cmd();
    c.env("AFFA_FAKE_NOW", now).args(args);
    output_within(c, secs)
}

/// The job's archive `scheduled.0` holds the source's data, byte for byte, and verifies.
fn archive_is_the_source(a: &Affa, job: &str, src: &Path) {
    let data = a.job_dir(job).join("scheduled.0").join(src.strip_prefix("/").unwrap()).join("data");
    assert_eq!(tree_hashes(&data), tree_hashes(&src.join("data")));
    ok(&a.affa(&["--verify", job]));
}

/// An SMTP server that trickles its greeting (a byte a second, never a whole line): lettre's
/// idle timeout never fired and its reply line grew without bound, so --mailtest never ended,
/// and neither did a run with a mail to send (a retry notice held the retry; under cron the
/// process stayed for ever). Each mail now has a deadline (mailTimeout=2 here, plus 1 s per
/// 256 KiB): the SMTP session, in a child, is killed there. --mailtest fails on one line naming
/// the server and the step, exit 1; runs whose success mail, retry notice and error mail cannot
/// go end with the exit their backup gives (0, and 1 for the failing job, retried), their
/// archive complete and the next run not held. A server that floods a reply line without end
/// (300 MiB) stops the child at its memory limit, not affa's memory.
#[test]
fn an_smtp_server_that_trickles_or_floods_its_reply_holds_neither_a_mail_nor_a_run() {
    let trickle = bad_smtp(b"22", 0);
    let a = Affa::new();
    global(&a, &format!("smtpHost=127.0.0.1\nsmtpPort={trickle}\nsmtpTLS=none\nmailTimeout=2\n"));
    let src = source();
    a.write_conf("web.conf", &local_job("web", src.path(), "chattyOnSuccess=1\nEmailAddress=admin@example.com\n"));
    let late = format!(
        "cannot send mail through 127.0.0.1:{trickle}: the SMTP session did not finish within 3 s and was closed at the connection, the greeting and the answer to EHLO, the mail not sent (the limit is mailTimeout=2 s of [GlobalAffaConfig] plus 1 s per 256 KiB of the mail)"
    );
    let mut c = a.cmd();
    c.args(["--mailtest", "web"]);
    let (o, took) = output_within(c, 60);
    let e = fail(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&late), "{e}");
    assert!(took < Duration::from_secs(15), "--mailtest took {took:?}");

    for now in ["2026-03-02T10:00:00", "2026-03-02T11:00:00"] {
        let (o, took) = run_within(&a, now, &["--silent", "--run", "web"], 60);
        ok(&o);
        assert!(took < Duration::from_secs(20), "the run took {took:?}");
        archive_is_the_source(&a, "web", src.path());
    }
    let log = log_of(&a, "web");
    assert_eq!(log.matches(&format!("cannot send the success mail: {late}")).count(), 2, "{log}");
    assert!(fs::read_to_string(a.conf.join("web.conf")).unwrap().contains("chattyOnSuccess=1\n"));

    // A failing job: its retry notice does not hold the retry, its error mail not the end.
    script(&a, "fail.sh", "#!/bin/sh\nexit 1\n");
    a.write_conf(
        "web.conf",
        &local_job("web", src.path(), "preJobCommand=fail.sh\nRetryAttempts=1\nRetryAfter=1\nRetryNotification=yes\n"),
    );
    let (o, took) = run_within(&a, "2026-03-02T12:00:00", &["--silent", "--run", "web"], 60);
    let e = fail(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(e.contains("script fail.sh of job web failed with exit 1"), "{e}");
    assert!(took < Duration::from_secs(30), "the run took {took:?}");
    let log = log_of(&a, "web");
    assert_eq!(log.matches("Starting job web scheduled").count(), 4, "{log}");
    assert!(log.contains(&format!("cannot send the retry notice: {late}")), "{log}");
    assert!(log.contains(&format!("cannot send the error mail: {late}")), "{log}");

    // 300 MiB of one reply line as fast as they go.
    let flood = bad_smtp(b"220-", 300 << 20);
    global(&a, &format!("smtpHost=127.0.0.1\nsmtpPort={flood}\nsmtpTLS=none\nmailTimeout=30\n"));
    let mut c = a.cmd();
    c.args(["--mailtest", "web"]);
    let (o, took) = output_within(c, 90);
    let e = fail(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains(&format!("cannot send mail through 127.0.0.1:{flood}: the SMTP session ended abnormally"))
            && e.contains("its memory is limited to 256 MiB"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "--mailtest took {took:?}");
}

/// A sendmailBinary that never exits: --mailtest, then every run with a mail to send, waited for
/// it for ever. It is now killed (with its process group) at the mail's deadline (mailTimeout=2
/// here, plus 1 s per 256 KiB): --mailtest fails on one line naming it, exit 1; runs succeed
/// (exit 0) with their archive complete, the next run not held, the log naming the mail that
/// did not go.
#[test]
fn a_sendmail_that_never_exits_is_stopped_at_the_mail_deadline() {
    let a = Affa::new();
    let pids = a.tmp.path().join("sendmail-pids");
    let sm = a.tmp.path().join("sendmail.sh");
    fs::write(&sm, format!("#!/bin/sh\necho $$ >> {}\nexec sleep 1000\n", pids.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&sm, fs::Permissions::from_mode(0o755)).unwrap();
    global(&a, &format!("sendmailBinary={}\nmailTimeout=2\n", sm.display()));
    let src = source();
    a.write_conf("web.conf", &local_job("web", src.path(), "chattyOnSuccess=1\n"));
    let late = format!(
        "{} (sendmailBinary) did not finish within 3 s and was stopped, the mail not sent (the limit is mailTimeout=2 s of [GlobalAffaConfig] plus 1 s per 256 KiB of the mail)",
        sm.display()
    );
    let mut c = a.cmd();
    c.args(["--mailtest", "web"]);
    let (o, took) = output_within(c, 60);
    let e = fail(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&late), "{e}");
    assert!(took < Duration::from_secs(15), "--mailtest took {took:?}");

    for now in ["2026-03-02T10:00:00", "2026-03-02T11:00:00"] {
        let (o, took) = run_within(&a, now, &["--silent", "--run", "web"], 60);
        ok(&o);
        assert!(took < Duration::from_secs(20), "the run took {took:?}");
        archive_is_the_source(&a, "web", src.path());
    }
    assert_eq!(log_of(&a, "web").matches(&format!("cannot send the success mail: {late}")).count(), 2);
    let started: Vec<u32> = fs::read_to_string(&pids).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(started.len(), 3);
    for pid in started {
        wait_until(Duration::from_secs(5), "the stopped sendmail to be gone", || !alive(pid));
    }
}

// ---------------------------------------------------------------- monitoring

fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') {
            assert!(l.starts_with("# HELP ") || l.starts_with("# TYPE "), "{l}");
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name in {l:?}");
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {l:?}");
            for pair in series[name_end + 1..series.len() - 1].split(',') {
                let (k, val) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {l:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{l:?}");
                assert!(val.starts_with('"') && val.ends_with('"') && val.len() >= 2, "{l:?}");
            }
        }
        v.push((series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l:?}"))));
    }
    v
}

#[test]
fn nrpe_and_metrics_for_fresh_stale_and_interrupted_jobs() {
    let a = Affa::new();
    global(&a, &format!("metricsFile={}/prom/affa.prom\nsendmailBinary=/bin/true\n", a.state.display()));
    let src = source();
    a.write_conf(
        "jobs.conf",
        &[
            local_job("fresh", src.path(), ""),
            local_job("stale", src.path(), ""),
            local_job("intr", src.path(), "NRPEtrigger=48\n"),
            local_job("off", src.path(), "status=disabled\n"),
        ]
        .concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "fresh"]));
    ok(&a.affa_at("2026-03-01T08:00:00", &["--run", "stale"]));
    ok(&a.affa_at("2026-03-02T09:00:00", &["--run", "intr"]));
    fs::create_dir_all(a.job_dir("intr").join("scheduled.running")).unwrap();
    let now = "2026-03-02T12:00:00";

    let o = a.affa_at(now, &["--nrpe", "fresh"]);
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{line}");
    // Affa 3's perfdata labels first (issue 15), then the job's age.
    assert_eq!(
        line,
        "OK: 1 job(s) backed up in time: fresh | Execution Time=0.0min;;;; Size=0.000GByte;;;; 'fresh_age'=7200s;;86400;0;\n"
    );

    let o = a.affa_at(now, &["--nrpe", "stale"]);
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert_eq!(
        line,
        "CRITICAL: Failed jobs: stale (last success 28.0 h ago) | Execution Time=0.0min;;;; Size=0.000GByte;;;; 'stale_age'=100800s;;86400;0;\n"
    );

    let o = a.affa_at(now, &["--nrpe", "intr"]);
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.starts_with("CRITICAL: Failed jobs: intr (interrupted) |"), "{line}");

    // All enabled jobs (not 'off', which never ran).
    let o = a.affa_at(now, &["--nrpe"]);
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(
        line.starts_with("CRITICAL: Failed jobs: intr (interrupted), stale (last success 28.0 h ago) | "),
        "{line}"
    );
    assert!(!line.contains("off"), "{line}");
    // A job that never succeeded, and an unknown job.
    let o = a.affa_at(now, &["--nrpe", "off"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "CRITICAL: Failed jobs: off (no successful run) | Execution Time=0.0min;;;; Size=0.000GByte;;;; 'off_age'=U\n"
    );
    let o = a.affa_at(now, &["--nrpe", "nosuch"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("UNKNOWN: no job named 'nosuch'"));
    // Later, fresh is stale too.
    let o = a.affa_at("2026-03-03T11:00:00", &["--nrpe", "fresh"]);
    assert_eq!(o.status.code(), Some(2));

    // Metrics: a chunk pool to count, then the file parsed back.
    fs::create_dir_all(a.root.join(".affa-pool/ab")).unwrap();
    fs::write(a.root.join(".affa-pool/ab/chunk"), [1u8; 10]).unwrap();
    let out = ok(&a.affa_at(now, &["--metrics"]));
    let path = a.state.join("prom/affa.prom");
    assert!(out.contains(&format!("{} written", path.display())), "{out}");
    let text = fs::read_to_string(&path).unwrap();
    let m = parse_metrics(&text);
    let get = |s: &str| m.iter().find(|(k, _)| k == s).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    use chrono::TimeZone;
    let ts = |s: &str| {
        chrono::Local
            .from_local_datetime(&chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap())
            .unwrap()
            .timestamp() as f64
    };
    assert_eq!(get("affa_last_success_timestamp_seconds{job=\"fresh\"}"), ts("2026-03-02 10:00"));
    assert_eq!(get("affa_last_success_timestamp_seconds{job=\"stale\"}"), ts("2026-03-01 08:00"));
    assert!(!text.contains("affa_last_success_timestamp_seconds{job=\"off\"}"));
    assert_eq!(get("affa_archives{job=\"fresh\",level=\"scheduled\"}"), 1.0);
    assert_eq!(get("affa_archives{job=\"fresh\",level=\"daily\"}"), 0.0);
    assert_eq!(get("affa_interrupted{job=\"intr\"}"), 1.0);
    assert_eq!(get("affa_interrupted{job=\"fresh\"}"), 0.0);
    assert_eq!(get("affa_running{job=\"fresh\"}"), 0.0);
    assert_eq!(get("affa_job_enabled{job=\"off\"}"), 0.0);
    assert!(get("affa_last_total_file_size_bytes{job=\"fresh\"}") >= 70_000.0);
    assert!(get("affa_last_bytes_received{job=\"fresh\"}") > 0.0);
    assert!(get("affa_last_duration_seconds{job=\"fresh\"}") >= 0.0);
    let root = a.root.display();
    assert_eq!(get(&format!("affa_pool_size_bytes{{root_dir=\"{root}\"}}")), 10.0);
    assert_eq!(get(&format!("affa_pool_files{{root_dir=\"{root}\"}}")), 1.0);
    assert!(get(&format!("affa_rootdir_avail_bytes{{root_dir=\"{root}\"}}")) > 0.0);
    assert_eq!(get("affa_metrics_generated_timestamp_seconds"), ts("2026-03-02 12:00"));
    // Every family has HELP and TYPE.
    for (series, _) in &m {
        let name = series.split('{').next().unwrap();
        assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{name}");
    }
    // A run rewrites the metrics file (its directory exists).
    fs::remove_file(&path).unwrap();
    ok(&a.affa_at("2026-03-02T13:00:00", &["--run", "fresh"]));
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("affa_archives{job=\"fresh\",level=\"scheduled\"} 1\n"), "{text}");
    assert!(text.contains("affa_archives{job=\"fresh\",level=\"daily\"} 1\n"), "{text}");
}

// ---------------------------------------------------------------- resume

#[test]
fn resume_interrupted_and_kill_resume_start_the_jobs_in_the_background() {
    let a = Affa::new();
    global(&a, "sendmailBinary=/bin/true\n");
    let src = source();
    a.write_conf(
        "jobs.conf",
        &[
            local_job("boot", src.path(), ""),
            local_job("stay", src.path(), "resumeAfterBoot=no\n"),
            local_job("later", src.path(), ""),
        ]
        .concat(),
    );
    for j in ["boot", "stay"] {
        fs::create_dir_all(a.job_dir(j).join("scheduled.running")).unwrap();
    }
    let out = ok(&a.affa_at("2026-03-02T10:00:00", &["--resume-interrupted"]));
    assert!(out.contains("job boot resumed in the background (pid "), "{out}");
    assert!(out.contains("job stay was interrupted; not resumed (resumeAfterBoot=no)"), "{out}");
    assert!(!out.contains("later"), "{out}");
    let lock = a.state.join("lock");
    wait_until(Duration::from_secs(60), "the resumed run of boot", || {
        a.job_dir("boot").join("scheduled.0").exists() && affa::lock::holder(&lock, "boot").is_none()
    });
    assert!(!a.job_dir("boot").join("scheduled.running").exists());
    assert!(fs::read_to_string(a.job_dir("boot").join("scheduled.0/.AFFA3-REPORT"))
        .unwrap()
        .contains("Date=202603021000"));
    assert!(a.job_dir("stay").join("scheduled.running").exists());

    // --kill JOB --resume=1: not running, so nothing to stop; it runs again after a second.
    let t = Instant::now();
    let out = ok(&a.affa(&["--kill", "later", "--resume=1"]));
    assert!(out.contains("job later is not running") && out.contains("job later runs again in 1 s (pid "), "{out}");
    wait_until(Duration::from_secs(60), "the resumed run of later", || {
        a.job_dir("later").join("scheduled.0").exists() && affa::lock::holder(&lock, "later").is_none()
    });
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert!(log_of(&a, "later").contains("--kill --resume=1: job later runs again in 1 s"));
}

// ---------------------------------------------------------------- samba

#[test]
fn samba_share_of_the_archives_is_readable_with_smbclient() {
    if !is_root() {
        eprintln!("skipped: smbd needs root");
        return;
    }
    let smbd = start_smbd();
    let smb_conf = smbd.dir.path().join("smb.conf");
    let a = Affa::new();
    let _mounts = common::smb::ShareMounts(a.state.join("lock/samba-mounts"));
    global(&a, &format!("sendmailBinary=/bin/true\nsmbConf={}\n", smb_conf.display()));
    let src = source();
    a.write_conf(
        "jobs.conf",
        &[local_job("web", src.path(), "SambaShare=yes\nSambaValidUser=root\n"), local_job("db", src.path(), "")]
            .concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    // Chunk store internals must not show.
    fs::create_dir_all(a.job_dir("web").join("scheduled.0/.affa-chunks/ab")).unwrap();
    fs::write(a.job_dir("web").join("scheduled.0/.affa-chunks/ab/c"), "x").unwrap();

    let out = ok(&a.affa(&["--samba-shares"]));
    assert_eq!(out, "Samba shares: web; Samba reloaded\n");
    let shares = a.state.join("samba");
    let include = format!("include = {}/affa-shares.conf", shares.display());
    let conf = fs::read_to_string(&smb_conf).unwrap();
    assert_eq!(conf.matches(&include).count(), 1, "{conf}");
    assert!(fs::read_to_string(shares.join("affa-job-web.conf")).unwrap().contains("read only = yes"));
    assert!(!shares.join("affa-job-db.conf").exists());

    let rel = src.path().strip_prefix("/").unwrap().join("data/sub/blob.bin");
    let got = a.tmp.path().join("got.bin");
    let o = smbclient_until_ok(&smbd, "web", &format!("get scheduled.0/{} {}", rel.display(), got.display()));
    assert!(
        o.status.success(),
        "smbclient get: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(fs::read(&got).unwrap(), fs::read(src.path().join("data/sub/blob.bin")).unwrap());
    let o = smbclient(&smbd, "web", "ls scheduled.0/*");
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && listing.contains(".AFFA3-REPORT") && !listing.contains(".affa-chunks"), "{listing}");
    // Read-only.
    fs::write(a.tmp.path().join("up.txt"), "x").unwrap();
    let o = smbclient(&smbd, "web", &format!("put {} up.txt", a.tmp.path().join("up.txt").display()));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("NT_STATUS_ACCESS_DENIED") || !o.status.success(),
        "put was allowed"
    );
    assert!(!a.job_dir("web").join("up.txt").exists());

    // Again: nothing changes, the include line stays single.
    let out = ok(&a.affa(&["--samba-shares"]));
    assert!(out.ends_with("unchanged\n"), "{out}");
    // No longer shared: its file goes, the include stays (once).
    a.write_conf("jobs.conf", &local_job("web", src.path(), ""));
    let out = ok(&a.affa(&["--make-cronjobs"]));
    assert!(out.contains("no Samba shares; removed: web"), "{out}");
    assert!(!shares.join("affa-job-web.conf").exists());
    assert_eq!(fs::read_to_string(&smb_conf).unwrap().matches(&include).count(), 1);
    assert!(!fs::read_to_string(shares.join("affa-shares.conf")).unwrap().contains("include ="));
}

// ---------------------------------------------------------------- install

#[test]
fn install_into_a_prefix_gives_a_valid_configuration() {
    let p = tempfile::Builder::new().prefix("affa-prefix").tempdir().unwrap();
    let prefix = p.path();
    let o = Command::new(env!("CARGO_BIN_EXE_affa"))
        .args(["--install", "--prefix"])
        .arg(prefix)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = ok(&o);
    for f in [
        "usr/sbin/affa",
        "etc/affa/00-global.conf",
        "etc/affa/example-linux.conf",
        "etc/affa/example-esxi.conf",
        "etc/cron.d/affa",
        "etc/logrotate.d/affa",
        "usr/lib/tmpfiles.d/affa.conf",
    ] {
        assert!(prefix.join(f).is_file(), "{f} missing:\n{out}");
    }
    for d in ["etc/affa/scripts", "var/affa", "var/log/affa", "var/lock/affa"] {
        assert!(prefix.join(d).is_dir(), "{d} missing:\n{out}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(prefix.join("etc/affa/example-esxi.conf")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(prefix.join("usr/sbin/affa")).unwrap().permissions().mode() & 0o777, 0o755);
    let v = Command::new(prefix.join("usr/sbin/affa")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("affa "));

    // The samples pass --configcheck (Affa 3 shipped status=enbabled).
    let o = Command::new(env!("CARGO_BIN_EXE_affa"))
        .args(["--configcheck", "--config-dir"])
        .arg(prefix.join("etc/affa"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let check = ok(&o);
    assert!(check.contains("configuration OK: 2 job(s)"), "{check}");
    let samples = fs::read_to_string(prefix.join("etc/affa/example-linux.conf")).unwrap();
    assert!(samples.contains("status=disabled") && !samples.contains("enbabled"));

    // The cron file names the installed paths; the samples are disabled, so no job lines.
    let cron = fs::read_to_string(prefix.join("etc/cron.d/affa")).unwrap();
    assert!(cron.contains("@reboot root /usr/sbin/affa --silent --resume-interrupted >/dev/null\n"), "{cron}");
    assert!(cron.contains("0 5 * * 0 root /usr/sbin/affa --silent --send-status >/dev/null\n"), "{cron}");
    assert!(!cron.contains("--run") && !cron.contains("--config-dir"), "{cron}");
    let lr = fs::read_to_string(prefix.join("etc/logrotate.d/affa")).unwrap();
    assert!(
        lr.starts_with("# affa's logs") && lr.contains("/var/log/affa/*.log {\n") && lr.contains("missingok"),
        "{lr}"
    );
    // The lock directory is made at boot, root's and private, before a user could take its name.
    let tf = fs::read_to_string(prefix.join("usr/lib/tmpfiles.d/affa.conf")).unwrap();
    assert!(tf.lines().any(|l| l == "d /run/lock/affa 0700 root root -"), "{tf}");

    // Again: an edited configuration file is never overwritten.
    fs::write(prefix.join("etc/affa/example-linux.conf"), samples.replace("host.example.com", "mine.example.com"))
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_affa"))
        .args(["--install", "--prefix"])
        .arg(prefix)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains(&format!("kept {}", prefix.join("etc/affa/example-linux.conf").display())), "{out}");
    assert!(fs::read_to_string(prefix.join("etc/affa/example-linux.conf")).unwrap().contains("mine.example.com"));
}

/// A build tree of the test's own: a copy of the tested affa with a dynamically linked
/// `affa-agent` next to it, as a plain `cargo build --release` leaves one in target/release (the
/// static build of scripts/test.sh leaves the static agent there instead). The dynamic one is a
/// copy of the system's dynamically linked `true`.
fn tree_with_a_dynamic_agent() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new().prefix("affa-build-tree").tempdir().unwrap();
    let affa = t.path().join("affa");
    fs::copy(env!("CARGO_BIN_EXE_affa"), &affa).unwrap();
    let dynamic = t.path().join("affa-agent");
    fs::copy("/bin/true", &dynamic).unwrap();
    let elf = fs::read(&dynamic).unwrap();
    assert_eq!(
        affa::install::not_static_elf(&elf),
        Some("is dynamically linked (build the static agent: scripts/build-agent.sh)"),
        "/bin/true is expected to be dynamically linked"
    );
    (t, affa)
}

/// `--install` run from that build tree.
fn install(affa: &Path, prefix: &Path, extra: &[&std::ffi::OsStr]) -> Output {
    Command::new(affa).args(["--install", "--prefix"]).arg(prefix).args(extra).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn install_places_the_static_agent_the_man_pages_and_the_completions() {
    use std::os::unix::fs::PermissionsExt;
    let p = tempfile::Builder::new().prefix("affa-prefix").tempdir().unwrap();
    let prefix = p.path();
    let agent = prefix.join("usr/lib/affa/affa-agent");
    let (_tree, affa) = tree_with_a_dynamic_agent();
    let install = |prefix: &Path, extra: &[&std::ffi::OsStr]| install(&affa, prefix, extra);

    // The agent next to affa is a dynamically linked one: not installed, and said so.
    let out = ok(&install(prefix, &[]));
    assert!(out.contains("affa-agent not installed: ") && out.contains("is dynamically linked"), "{out}");
    assert!(!agent.exists());
    // Asked for by name, a dynamic agent is an error (one line, exit 1), nothing half done.
    let dynamic = affa.with_file_name("affa-agent");
    let o = install(prefix, &["--agent".as_ref(), dynamic.as_os_str()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("--agent {}: is dynamically linked", dynamic.display())), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let o = install(prefix, &["--agent".as_ref(), "/etc/hostname".as_ref()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--agent /etc/hostname: is not an ELF executable"));
    assert!(!agent.exists());

    // The static one: installed where affa looks for it (agentBinary's default), runnable.
    let st = common::static_agent();
    let out = ok(&install(prefix, &["--agent".as_ref(), st.as_os_str()]));
    assert!(out.contains(&format!("installed {}", agent.display())), "{out}");
    assert_eq!(fs::read(&agent).unwrap(), fs::read(&st).unwrap());
    assert_eq!(fs::metadata(&agent).unwrap().permissions().mode() & 0o777, 0o755);
    let v = Command::new(&agent).arg("--version").env_clear().output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("affa-agent "), "{v:?}");
    // Installed again from the default place (the dynamic one next to it): the installed one is
    // kept.
    let out = ok(&install(prefix, &[]));
    assert!(out.contains(&format!("kept {}", agent.display())), "{out}");
    assert_eq!(fs::read(&agent).unwrap(), fs::read(&st).unwrap());

    // The man pages and completions, made by the binary.
    for (f, want) in [
        ("usr/share/man/man8/affa.8", ".TH affa 8"),
        ("usr/share/man/man8/affa-agent.8", ".TH affa-agent 8"),
        ("usr/share/bash-completion/completions/affa", "affa --_jobs"),
        ("usr/share/zsh/vendor-completions/_affa", "#compdef affa"),
        ("usr/share/fish/vendor_completions.d/affa.fish", "complete -c affa"),
    ] {
        let t = fs::read_to_string(prefix.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(t.contains(want), "{f}: {want} missing");
        assert_eq!(fs::metadata(prefix.join(f)).unwrap().permissions().mode() & 0o777, 0o644, "{f}");
    }
    // The page documents every key of the table --show-default-config prints.
    let page = fs::read_to_string(prefix.join("usr/share/man/man8/affa.8")).unwrap();
    let defaults = ok(&Command::new(env!("CARGO_BIN_EXE_affa")).arg("--show-default-config").output().unwrap());
    let keys: Vec<&str> = defaults
        .lines()
        .filter(|l| !l.starts_with("# ") && !l.starts_with('['))
        .filter_map(|l| l.trim_start_matches('#').split('=').next())
        .filter(|k| !k.is_empty())
        .collect();
    assert!(keys.len() > 50, "{defaults}");
    for k in keys {
        let roff = k.replace('-', "\\-");
        assert!(page.contains(&format!("\\fB{roff}\\fR=")), "key {k} is not in man affa");
    }

    // The agent's page documents exactly the options the agent's own usage line names.
    let usage = Command::new(&st).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let usage = String::from_utf8_lossy(&usage.stderr).into_owned();
    // The options a text names (`--serve`); roff writes a dash as `\-`.
    let options = |t: &str| -> Vec<String> {
        let t = t.replace("\\-", "-");
        let mut v: Vec<String> = t
            .split("--")
            .skip(1)
            .map(|r| r.chars().take_while(|c| c.is_ascii_lowercase() || *c == '-').collect::<String>())
            .filter(|o| !o.is_empty())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let agent_page = fs::read_to_string(prefix.join("usr/share/man/man8/affa-agent.8")).unwrap();
    let section = &agent_page[agent_page.find(".SH OPTIONS").expect("an OPTIONS section")..];
    let section = &section[..section[4..].find(".SH").map_or(section.len(), |i| i + 4)];
    let usage_line = usage.lines().next().unwrap().split('(').next().unwrap();
    assert_eq!(options(section), options(usage_line), "{usage}\n{section}");
    assert_eq!(options(usage_line), ["serve", "version"]);
}

#[test]
fn setup_makes_the_state_directories_and_the_cron_file_of_the_configuration() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::Builder::new().prefix("affa-setup").tempdir().unwrap();
    let d = t.path();
    let etc = d.join("etc");
    fs::create_dir(&etc).unwrap();
    let global = format!(
        "[GlobalAffaConfig]\nlockDir={d}/lock\nlogDir={d}/log\nscriptDir={d}/scripts\ncronFile={d}/cron\nRootDir={d}/archives\n\
         [web]\nremoteHostName=web.example.com\nTimeSchedule=0215\nRootDir={d}/other\n\
         [usb]\nremoteHostName=usb.example.com\nAutomountDevice=LABEL=affa-usb\nAutomountPoint={d}/usb\nRootDir={d}/usb/affa\n\
         [usb2]\nremoteHostName=usb.example.com\nAutomountDevice=LABEL=affa-usb2\nAutomountPoint={d}/usb2\nRootDir={d}/usb2/affa\n",
        d = d.display()
    );
    // The mount point of the job's backup disk, without the disk (an upgrade while it is away);
    // another job's disk is there (a tmpfs stands for it).
    fs::create_dir(d.join("usb")).unwrap();
    fs::create_dir(d.join("usb2")).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "affa-test-usb2"]).arg(d.join("usb2")).status().unwrap();
    assert!(mounted.success(), "mount -t tmpfs");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _usb2 = Umount(d.join("usb2"));
    fs::write(etc.join("jobs.conf"), &global).unwrap();
    // An existing RootDir with an archive is left as it is.
    fs::create_dir_all(d.join("archives/old/daily.0")).unwrap();
    fs::set_permissions(d.join("archives"), fs::Permissions::from_mode(0o750)).unwrap();
    let setup = || {
        Command::new(env!("CARGO_BIN_EXE_affa"))
            .arg("--config-dir")
            .arg(&etc)
            .arg("--_setup")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = ok(&setup());
    let mode = |p: &str| fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("lock"), mode("log"), mode("scripts"), mode("other")), (0o700, 0o750, 0o700, 0o700), "{out}");
    assert_eq!(mode("archives"), 0o750, "an existing directory is never changed");
    // A RootDir on a disk that is not mounted is not made on the disk below it (the next run
    // would fill the root file system): said, and left for the run's own check.
    assert!(!d.join("usb/affa").exists(), "--_setup made a RootDir where the backup disk is not mounted");
    assert!(out.contains(&format!("RootDir {}/usb/affa not created", d.display())), "{out}");
    assert!(d.join("usb2/affa").is_dir(), "a RootDir on a mounted AutomountPoint was not made:\n{out}");
    assert!(d.join("archives/old/daily.0").is_dir());
    let cron = fs::read_to_string(d.join("cron")).unwrap();
    let line = format!("15 2 * * * root /usr/sbin/affa --config-dir {} --silent --run web\n", etc.display());
    assert!(cron.contains(&line), "{cron}");
    // Again (an upgrade): the same schedule, nothing else changes.
    ok(&setup());
    assert!(fs::read_to_string(d.join("cron")).unwrap().contains(&line));

    // A RootDir that cannot be made (a file in its way), sorting before the others: the others
    // are made and the cron file is written all the same (a job added with it is scheduled);
    // the command fails naming it.
    fs::write(d.join("afile"), "x").unwrap();
    fs::remove_dir(d.join("other")).unwrap();
    let with_bad = format!(
        "{global}[bad]\nremoteHostName=bad.example.com\nTimeSchedule=0430\nRootDir={}/afile/affa\n",
        d.display()
    );
    fs::write(etc.join("jobs.conf"), &with_bad).unwrap();
    let o = setup();
    let err = fail(&o);
    assert!(
        err.starts_with(&format!("affa: error: RootDir {}/afile/affa not created: cannot create ", d.display()))
            && err.contains("the cron file")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(d.join("other").is_dir(), "the RootDir after the bad one was not made");
    let cron_bad = fs::read_to_string(d.join("cron")).unwrap();
    let bad_line = format!("30 4 * * * root /usr/sbin/affa --config-dir {} --silent --run bad\n", etc.display());
    assert!(cron_bad.contains(&bad_line), "{cron_bad}");
    fs::write(etc.join("jobs.conf"), &global).unwrap();
    ok(&setup());

    // A configuration it cannot read: exit 1, one line naming file, key and value; the cron
    // file stays as it was.
    fs::write(etc.join("jobs.conf"), global.replace("lockDir=", "lockDir=relative/")).unwrap();
    let o = setup();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("jobs.conf:2: key 'lockDir'"), "{err}");
    assert_eq!(fs::read_to_string(d.join("cron")).unwrap(), cron);
}

/// One job whose archives cannot be read, and one RootDir whose chunk pool cannot be scrubbed,
/// named first in the order affa goes through them: `--list-archives`, `--show-schedule` and
/// `--scrub` still do the rest, name what they could not read on stderr and exit 1 (the last two
/// stopped at the first error: nothing else was drawn or scrubbed).
#[test]
fn a_job_or_pool_that_cannot_be_read_does_not_hide_the_others() {
    let a = Affa::new();
    global(&a, "sendmailBinary=/bin/true\n");
    let src = source();
    // db's RootDir sorts before web's (a.root, ".../backup").
    let db_root = a.tmp.path().join("a-root");
    fs::create_dir_all(&db_root).unwrap();
    a.write_conf(
        "jobs.conf",
        &[
            local_job("db", src.path(), &format!("TimeSchedule=0300\nRootDir={}\n", db_root.display())),
            local_job("web", src.path(), "TimeSchedule=0130\n"),
        ]
        .concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    // db's job directory is a file: its archives cannot be read.
    fs::write(db_root.join("db"), "not a directory").unwrap();
    let expect = |o: &Output, what: &str| -> (String, String) {
        let (out, err) =
            (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
        assert_eq!(o.status.code(), Some(1), "{what}: {out}{err}");
        (out, err)
    };
    let (out, err) = expect(&a.affa(&["--list-archives"]), "--list-archives");
    assert!(out.contains("| Job: web ") && out.contains("| S 0 "), "{out}");
    assert!(err.starts_with("affa: error: job db: cannot read its archives: ") && err.lines().count() == 1, "{err}");
    let (out, err) = expect(&a.affa(&["--show-schedule"]), "--show-schedule");
    let line = |job: &str| {
        out.lines().find(|l| l.starts_with(&format!("{job} "))).unwrap_or_else(|| panic!("{out}")).to_string()
    };
    assert_eq!(line("db").chars().nth(25 + 6), Some('S'), "{out}");
    assert_eq!(line("web").chars().nth(25 + 3), Some('S'), "{out}");
    assert!(err.starts_with("affa: error: job db: cannot read its archives: ") && err.lines().count() == 1, "{err}");

    // Two pools; db's cannot be opened (its temp directory's name is taken by a file).
    fs::create_dir_all(db_root.join(".affa-pool")).unwrap();
    fs::write(db_root.join(".affa-pool/.tmp"), "x").unwrap();
    fs::create_dir_all(a.root.join(".affa-pool")).unwrap();
    let (out, err) = expect(&a.affa(&["--scrub", "--all"]), "--scrub");
    assert!(
        out.contains(&format!("pool {} (every entry): 0 chunk(s) checked", a.root.join(".affa-pool").display())),
        "{out}"
    );
    assert!(
        err.starts_with(&format!("affa: error: cannot scrub the pool of {}: ", db_root.display()))
            && err.lines().count() == 1,
        "{err}"
    );
}

/// A job whose configuration is broken, named first in the order of the jobs: the commands
/// that go through jobs one by one do the others, name it on stderr (or in their output) and
/// exit 1. Before, a named broken job stopped --list-archives, --check-connections and
/// --send-key before anything was done, and without names it was left out in silence (exit 0);
/// --resume-interrupted did not say that an interrupted job was not resumed.
#[test]
fn a_broken_job_is_named_and_the_other_jobs_are_done() {
    let a = Affa::new();
    global(&a, "sendmailBinary=/bin/true\n");
    let src = source();
    a.write_conf(
        "jobs.conf",
        &[local_job("a-broken", src.path(), "scheduledKeep=many\n"), local_job("web", src.path(), "")].concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    let expect_1 = |args: &[&str]| -> (String, String) {
        let o = a.affa(args);
        let (out, err) =
            (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
        assert_eq!(o.status.code(), Some(1), "{args:?}: {out}{err}");
        assert!(err.contains("a-broken"), "{args:?}: {err}");
        assert!(format!("{out}{err}").contains("key 'scheduledKeep'"), "{args:?}: {out}{err}");
        (out, err)
    };
    for args in [&["--list-archives"][..], &["--list-archives", "a-broken", "web"]] {
        let (out, _) = expect_1(args);
        assert!(out.contains("| Job: web "), "{args:?}: {out}");
    }
    let (out, _) = expect_1(&["--check-connections"]);
    assert!(out.contains("web                  OK (local)") && out.contains("a-broken             FAILED: "), "{out}");
    // A broken local job needs no key: skipped without names; named, its error.
    ok(&a.affa(&["--send-key"]));
    let e = fail(&a.affa(&["--send-key", "a-broken"]));
    assert!(e.contains("key 'scheduledKeep'"), "{e}");
    // Both interrupted: web is resumed, a-broken is named.
    for j in ["a-broken", "web"] {
        fs::create_dir_all(a.job_dir(j).join("scheduled.running")).unwrap();
    }
    let (out, err) = expect_1(&["--resume-interrupted"]);
    assert!(out.contains("job web resumed in the background (pid "), "{out}");
    assert!(err.contains("affa: error: job a-broken was interrupted; not resumed: "), "{err}");
    let lock = a.state.join("lock");
    wait_until(Duration::from_secs(60), "the resumed run of web", || {
        !a.job_dir("web").join("scheduled.running").exists() && affa::lock::holder(&lock, "web").is_none()
    });
}

/// `--send-key` without names, as a new user types it after the install: the disabled samples
/// are skipped (not tried: their hosts do not exist), a host that cannot be reached fails alone,
/// and the job after it in name order still gets its key; the command fails naming that job.
#[test]
fn send_key_without_names_skips_disabled_jobs_and_goes_on_past_a_dead_host() {
    let mut sshd = Sshd::shared();
    let affa = Affa::new();
    // A port nothing listens on (bound, then closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    affa.write_conf(
        "jobs.conf",
        &format!(
            "[a-dead]\nremoteHostName=127.0.0.1\nsshPort={dead}\nConnectionCheckTimeout=3\n\n{}\n[sample]\nremoteHostName=host.example.invalid\nstatus=disabled\n",
            affa.ssh_job("z-live", &sshd, "Include=/etc/hostname\n")
        ),
    );
    let sock = sshd.agent_socket();
    let o = affa.cmd().env("SSH_AUTH_SOCK", sock).arg("--send-key").output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "{out}{err}");
    assert!(out.contains("job sample: disabled (status=disabled), skipped"), "{out}");
    assert!(out.contains("job z-live: key installed in "), "{out}");
    assert!(err.contains("--send-key failed for 1 job(s): job a-dead: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("example.invalid") && !out.contains("example.invalid"), "the disabled sample was tried");
    // The live job's key works: its connection check passes without the ssh agent.
    ok(&affa.affa(&["--check-connections", "z-live"]));
}
