//! affa on a terminal (issue 18): the binary runs on a real pseudo-terminal (util-linux
//! `script`), as a person runs it by hand. Every path that behaves differently there is run both
//! ways: on the pty it must succeed, show its phases and progress, end every progress line
//! before the next message (checked on the screen a terminal would show), end with a summary,
//! and read typed answers; piped it must stay quiet (cron's behaviour).

use crate::common;

use std::fs;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::esx::{fill, sha256_file, Esx, MB};
use common::*;

const COLS: usize = 100;

/// What a command did on the pty: its exit code, the bytes the terminal received, and the
/// screen those bytes leave (rows of text, as a terminal of COLS columns shows them).
struct Pty {
    code: i32,
    raw: String,
    screen: Vec<String>,
}

impl Pty {
    fn text(&self) -> String {
        self.screen.join("\n")
    }
    fn ok(&self) -> &Pty {
        assert_eq!(self.code, 0, "affa failed on the terminal:\n{}", self.text());
        self
    }
    fn failed(&self) -> &Pty {
        assert_ne!(self.code, 0, "affa should have failed:\n{}", self.text());
        assert!(!self.raw.contains("panicked"), "panic:\n{}", self.text());
        self
    }
    /// Progress was drawn: a rate ("123.45 MiB/s") in what the terminal received.
    fn drew_progress(&self, label: &str) -> &Pty {
        let drawn = self.raw.split(['\r', '\n']).any(|seg| seg.contains("B/s") && seg.contains(label));
        assert!(drawn, "no progress with '{label}' was drawn:\n{:?}", self.raw);
        self
    }
    /// Nothing of a progress line is left on the screen, and each of `rows` is a whole row of
    /// its own, in this order (a half-drawn progress line under a message would change the row).
    fn shows(&self, rows: &[&str]) -> &Pty {
        for r in &self.screen {
            assert!(
                !r.contains("B/s") && !r.contains(" eta "),
                "a progress line was left on the screen: {r:?}\n{}",
                self.text()
            );
        }
        let mut at = 0;
        for want in rows {
            match self.screen[at..].iter().position(|r| r == want) {
                Some(i) => at += i + 1,
                None => panic!("row {want:?} missing (or out of order, or not clean) on the screen:\n{}", self.text()),
            }
        }
        self
    }
    /// The rows that start with `prefix`.
    fn rows(&self, prefix: &str) -> Vec<&String> {
        self.screen.iter().filter(|r| r.starts_with(prefix)).collect()
    }
    fn last_row(&self) -> &str {
        self.screen.iter().rev().find(|r| !r.trim().is_empty()).map(|s| s.as_str()).unwrap_or("")
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Run `affa --config-dir CONF ARGS` on a pseudo-terminal; with `answer` (WORD, TYPED), type
/// TYPED once the question (`Type 'WORD' to continue: `) is on the screen, as a person would.
fn on_pty(affa: &Affa, now: Option<&str>, args: &[&str], answer: Option<(&str, &str)>) -> Pty {
    let typed = answer.map(|(word, typed)| (format!("Type '{word}' to continue: "), format!("{typed}\n")));
    typing(affa, now, args, typed.as_ref().map(|(w, t)| (w.as_str(), t.as_str())))
}

/// Run affa on a pseudo-terminal; with `input` (SEEN, KEYS), type KEYS once SEEN was shown.
fn typing(affa: &Affa, now: Option<&str>, args: &[&str], input: Option<(&str, &str)>) -> Pty {
    typing_env(affa, now, args, input, &[])
}

fn typing_env(affa: &Affa, now: Option<&str>, args: &[&str], input: Option<(&str, &str)>, env: &[(&str, &str)]) -> Pty {
    let mut words =
        vec![env!("CARGO_BIN_EXE_affa").to_string(), "--config-dir".into(), affa.conf.display().to_string()];
    words.extend(args.iter().map(|a| a.to_string()));
    let line =
        format!("stty cols {COLS} rows 50; exec {}", words.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" "));
    let mut c = Command::new("script");
    c.args(["-qefc", &line, "/dev/null"])
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    match now {
        Some(n) => c.env("AFFA_FAKE_NOW", n),
        None => c.env_remove("AFFA_FAKE_NOW"),
    };
    c.envs(env.iter().copied());
    let mut child = c.spawn().expect("util-linux script");
    let mut stdin = child.stdin.take();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    // Without an answer stdin closes now: a question would read end-of-file.
    let mut pending = input;
    if pending.is_none() {
        stdin = None;
    }
    let start = Instant::now();
    let code = loop {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(20)) {
            raw.extend_from_slice(&b);
        }
        while let Ok(b) = rx.try_recv() {
            raw.extend_from_slice(&b);
        }
        if let Some((seen, keys)) = pending {
            if String::from_utf8_lossy(&raw).contains(seen) {
                stdin.as_mut().unwrap().write_all(keys.as_bytes()).unwrap();
                pending = None;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        if start.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            panic!("affa {args:?} on the terminal did not finish:\n{}", String::from_utf8_lossy(&raw));
        }
    };
    drop(stdin);
    reader.join().unwrap();
    while let Ok(b) = rx.try_recv() {
        raw.extend_from_slice(&b);
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let screen = screen(&raw, COLS);
    Pty { code, raw, screen }
}

/// The screen a terminal `cols` wide shows after `raw`: carriage return, line feed, auto-wrap,
/// erase in line, cursor up/down/column; colours ignored. A progress line that was not cleared
/// before the next message stays visible in the row that message lands in. Rows filled by
/// wrapping one long line are joined again, so a line is compared whole.
fn screen(raw: &str, cols: usize) -> Vec<String> {
    let mut rows: Vec<Vec<char>> = vec![Vec::new()];
    // Row i continues row i-1 (auto-wrap).
    let mut cont: Vec<bool> = vec![false];
    let (mut r, mut c) = (0usize, 0usize);
    let chars: Vec<char> = raw.chars().collect();
    let mut i = 0;
    let grow = |rows: &mut Vec<Vec<char>>, cont: &mut Vec<bool>, r: usize| {
        while rows.len() <= r {
            rows.push(Vec::new());
            cont.push(false);
        }
    };
    while i < chars.len() {
        let ch = chars[i];
        if ch == '\x1b' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            let mut params = String::new();
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';' || chars[j] == '?') {
                params.push(chars[j]);
                j += 1;
            }
            let n: usize = params.parse().unwrap_or(1).max(1);
            match chars.get(j) {
                Some('A') => r = r.saturating_sub(n),
                Some('B') => {
                    r += n;
                    grow(&mut rows, &mut cont, r);
                }
                Some('C') => c += n,
                Some('D') => c = c.saturating_sub(n),
                Some('G') => c = n - 1,
                Some('K') => match params.as_str() {
                    "" | "0" => rows[r].truncate(c),
                    "1" => {
                        for x in rows[r].iter_mut().take(c + 1) {
                            *x = ' ';
                        }
                    }
                    _ => {
                        rows[r].clear();
                        cont[r] = false;
                    }
                },
                Some('J') if params == "2" => {
                    for row in rows.iter_mut() {
                        row.clear();
                    }
                }
                _ => {}
            }
            i = j + 1;
            continue;
        }
        match ch {
            '\r' => c = 0,
            '\n' => {
                r += 1;
                c = 0;
                grow(&mut rows, &mut cont, r);
            }
            '\x08' => c = c.saturating_sub(1),
            '\x07' => {}
            _ => {
                if c >= cols {
                    r += 1;
                    c = 0;
                    grow(&mut rows, &mut cont, r);
                    cont[r] = true;
                }
                let row = &mut rows[r];
                while row.len() < c {
                    row.push(' ');
                }
                if c < row.len() {
                    row[c] = ch;
                } else {
                    row.push(ch);
                }
                c += 1;
            }
        }
        i += 1;
    }
    let mut lines: Vec<String> = Vec::new();
    for (row, cont) in rows.into_iter().zip(cont) {
        let text: String = row.into_iter().collect();
        match lines.last_mut() {
            Some(l) if cont => l.push_str(&text),
            _ => lines.push(text),
        }
    }
    lines.into_iter().map(|l| l.trim_end().to_string()).collect()
}

/// Piped (cron, a script): nothing on stdout or stderr.
fn quiet(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "piped output is not quiet:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn screen_emulation_keeps_an_uncleared_progress_line() {
    // The checks above rest on this: a message printed over a bar without clearing it leaves
    // the bar's tail in the message's row; cleared first, the row is the message alone.
    let bad = screen("[=====>   ] 10.00 MiB/s eta 3s\rdone\n", 40);
    assert_eq!(bad[0], "done==>   ] 10.00 MiB/s eta 3s");
    let good = screen("[=====>   ] 10.00 MiB/s eta 3s\r\x1b[2Kdone\n", 40);
    assert_eq!(good[0], "done");
    // A line longer than the terminal wraps; the rows it fills are one line again.
    assert_eq!(screen("abcdef\nxy\n", 4), ["abcdef", "xy", ""]);
    assert_eq!(screen("abcdef\r\x1b[2K\x1b[1A\r\x1b[2Kxy\n", 4), ["xy", ""]);
}

/// An ordinary job over ssh with a chunked `disk.img`.
struct Host {
    sshd: Sshd,
    affa: Affa,
    src: tempfile::TempDir,
}

/// The job on the shared sshd.
fn host(extra: &str) -> Host {
    host_on(Sshd::shared(), extra)
}

/// The job on `sshd` (a private one for a test that stops its sshd).
fn host_on(mut sshd: Sshd, extra: &str) -> Host {
    let affa = Affa::new();
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::create_dir_all(src.path().join("docs")).unwrap();
    fs::write(src.path().join("docs/a.txt"), "alpha\n").unwrap();
    fill(&src.path().join("docs/b.bin"), 8 * MB, &[(0, 8 * MB)], 3);
    fill(&src.path().join("disk.img"), 48 * MB, &[(0, 24 * MB), (40 * MB, 8 * MB)], 5);
    let global = fs::read_to_string(affa.conf.join("00-global.conf")).unwrap();
    // A fresh machine: no sendmail, no SMTP server.
    affa.write_conf("00-global.conf", &format!("{global}sendmailBinary=/nonexistent/sendmail\n"));
    let job = affa.ssh_job(
        "web",
        &sshd,
        &format!("Include={}\nchunkFiles=*.img\nscheduledKeep=2\nchunkTransport=rsync\n{extra}", src.path().display()),
    );
    affa.write_conf("web.conf", &job);
    ok(&affa.send_key(&mut sshd, "web"));
    Host { sshd, affa, src }
}

#[test]
fn a_run_on_a_terminal_shows_phases_progress_and_a_summary_and_piped_stays_quiet() {
    let h = host("");
    let user = whoami();
    let img = format!("{}/disk.img", h.src.path().display());
    let t = on_pty(&h.affa, Some("2026-06-01T10:00:00"), &["--run", "web"], None);
    let archive = h.affa.job_dir("web").join("scheduled.0");
    t.ok().drew_progress("rsync").drew_progress("chunking").shows(&[
        "Starting job web scheduled (127.0.0.1)",
        &format!("==> Checking the connection to {user}@127.0.0.1"),
        "==> copying the files of 127.0.0.1 (1 of 2)",
        "==> copying the files to chunk (2 of 2)",
        &format!("==> chunking {} (1 of 1)", img.trim_start_matches('/')),
        "==> rotating the archives",
        "Completed job web scheduled",
        "job web done",
        &format!("  archive      {}", archive.display()),
        "  rotated      scheduled.running -> scheduled.0",
    ]);
    for k in ["  duration     0:00:", "  transferred  ", "  files        ", "  pool growth  "] {
        assert_eq!(t.rows(k).len(), 1, "no summary row {k:?}:\n{}", t.text());
    }
    assert!(t.rows("  pool growth  ")[0].contains("dedup ratio"), "{}", t.text());
    assert!(t.raw.contains("\x1b[1m==> rotating the archives"), "phases are bold on a colour terminal");
    // The archive is right: the chunked image is rebuilt byte for byte.
    let s0 = archive.join(img.trim_start_matches('/'));
    assert!(s0.with_file_name("disk.img.affa-manifest").exists());
    assert_eq!(
        fs::read(archive.join(format!("{}/docs/b.bin", h.src.path().display()).trim_start_matches('/'))).unwrap(),
        fs::read(h.src.path().join("docs/b.bin")).unwrap()
    );

    // The same run piped: quiet, and the log gets the same lines either way.
    fs::write(h.src.path().join("docs/a.txt"), "alpha 2\n").unwrap();
    quiet(&h.affa.affa_at("2026-06-01T11:00:00", &["--run", "web"]));
    assert_eq!(archive_names(&h.affa.job_dir("web")), ["scheduled.0", "scheduled.1"]);
    let log = fs::read_to_string(h.affa.state.join("log/web.log")).unwrap();
    assert_eq!(log.matches("copying the files to chunk (2 of 2)").count(), 2, "{log}");
    assert_eq!(log.matches("rotating the archives").count(), 2, "{log}");
    assert_eq!(log.matches("running: rsync").count(), 4, "{log}");
    // Only the terminal run asked rsync for progress, before the `--`.
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("--info=progress2")).collect();
    assert_eq!(progress.len(), 2, "{log}");
    for l in progress {
        assert!(l.find("--info=progress2").unwrap() < l.find(" -- ").unwrap(), "{l}");
    }
}

#[test]
fn a_failed_run_ends_with_its_cause_and_a_missing_mail_transport_is_one_warning() {
    let mut h = host_on(Sshd::start(), "chattyOnSuccess=1\n");
    // Success with a mail to send and no way to send it: one warning line that says how to
    // configure mail, and the run succeeds.
    let t = on_pty(&h.affa, Some("2026-06-01T10:00:00"), &["--run", "web"], None);
    t.ok();
    let warnings = t.rows("WARNING:");
    assert_eq!(warnings.len(), 1, "{}", t.text());
    let w = warnings[0];
    assert!(w.contains("success mail") && w.contains("smtpHost") && w.contains("--mailtest"), "{w}");
    assert_eq!(archive_names(&h.affa.job_dir("web")), ["scheduled.0"]);

    // A failed run: the warning about the error mail, then, last, the cause.
    h.sshd.stop();
    let before = tree_hashes(&h.affa.job_dir("web"));
    let t = on_pty(&h.affa, Some("2026-06-01T11:00:00"), &["--run", "web"], None);
    t.failed();
    let warnings = t.rows("WARNING:");
    assert_eq!(warnings.len(), 1, "{}", t.text());
    assert!(warnings[0].contains("error mail") && warnings[0].contains("no mail transport"), "{}", t.text());
    let last = t.last_row();
    assert!(last.starts_with("affa: error: cannot connect to 127.0.0.1:"), "last row: {last}\n{}", t.text());
    assert!(t.raw.contains("\x1b[1;31maffa: error:\x1b[0m"), "the error is red on a colour terminal");
    assert_eq!(tree_hashes(&h.affa.job_dir("web")), before);
    // NO_COLOR: the same lines, no colour.
    let t = typing_env(&h.affa, Some("2026-06-01T11:30:00"), &["--run", "web"], None, &[("NO_COLOR", "1")]);
    t.failed().shows(&[&format!("==> Checking the connection to {}@127.0.0.1", whoami())]);
    assert!(t.last_row().starts_with("affa: error: cannot connect to 127.0.0.1:"), "{}", t.text());
    assert!(!t.raw.contains("\x1b[1m") && !t.raw.contains("\x1b[1;31m") && !t.raw.contains("\x1b[33m"), "{:?}", t.raw);

    // Piped: the error line alone, no colour.
    let o = h.affa.affa_at("2026-06-01T12:00:00", &["--run", "web"]);
    let err = fail(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("affa: error: cannot connect to 127.0.0.1:"), "{err}");
}

#[test]
fn restore_asks_on_the_terminal_and_does_only_what_was_answered() {
    let h = host("");
    ok(&h.affa.affa_at("2026-06-01T10:00:00", &["--run", "web"]));
    let img = h.src.path().join("disk.img");
    let a = h.src.path().join("docs/a.txt");
    let want = (sha256_file(&img), fs::read(&a).unwrap());
    fill(&img, 48 * MB, &[(MB, MB)], 99);
    fs::write(&a, "changed\n").unwrap();
    let changed = tree_hashes(h.src.path());
    let q = "Type 'proceed' to continue: ";

    let t = on_pty(&h.affa, None, &["--full-restore", "web", "--preserve-newer=no"], Some(("proceed", "no")));
    t.failed().shows(&[&format!("{q}no"), "affa: error: cancelled: nothing was changed"]);
    assert_eq!(tree_hashes(h.src.path()), changed, "a cancelled restore changed files");

    let t = on_pty(&h.affa, None, &["--full-restore", "web", "--preserve-newer=no"], Some(("proceed", "proceed")));
    t.ok().drew_progress("rebuilding chunked files").drew_progress("hashing the archive");
    t.shows(&[&format!("{q}proceed")]);
    assert!(t.last_row().starts_with("verified ") && t.last_row().contains("match"), "{}", t.text());
    assert_eq!((sha256_file(&img), fs::read(&a).unwrap()), want, "not restored");

    // Piped, without --yes: refused, nothing asked.
    fs::write(&a, "changed again\n").unwrap();
    let err = fail(&h.affa.affa(&["--full-restore", "web", "--preserve-newer=no"]));
    assert!(err.contains("refusing without confirmation"), "{err}");
    assert_eq!(fs::read(&a).unwrap(), b"changed again\n");
}

#[test]
fn cleanup_delete_and_move_ask_on_the_terminal() {
    let h = host("");
    ok(&h.affa.affa_at("2026-06-01T10:00:00", &["--run", "web"]));
    ok(&h.affa.affa_at("2026-06-01T11:00:00", &["--run", "web"]));
    let conf = h.affa.conf.join("web.conf");
    let text = fs::read_to_string(&conf).unwrap();
    h.affa.write_conf("web.conf", &text.replace("scheduledKeep=2", "scheduledKeep=1"));
    let dir = h.affa.job_dir("web");
    let cancelled = "affa: error: cancelled: nothing was changed";

    let t = on_pty(&h.affa, None, &["--cleanup", "web"], Some(("proceed", "n")));
    t.failed().shows(&["This deletes 1 archive(s) of job web: scheduled.1", cancelled]);
    assert_eq!(archive_names(&dir), ["scheduled.0", "scheduled.1"]);
    let t = on_pty(&h.affa, None, &["--cleanup", "web"], Some(("proceed", "proceed")));
    t.ok().shows(&["job web: deleted scheduled.1"]);
    assert_eq!(archive_names(&dir), ["scheduled.0"]);

    let new_root = h.affa.tmp.path().join("root2");
    fs::create_dir_all(&new_root).unwrap();
    let nr = new_root.display().to_string();
    let t = on_pty(&h.affa, None, &["--move-archive", "web", &nr], Some(("proceed", "later")));
    t.failed().shows(&[cancelled]);
    assert!(dir.join("scheduled.0").is_dir());
    on_pty(&h.affa, None, &["--move-archive", "web", &nr], Some(("proceed", "proceed"))).ok();
    assert!(!dir.exists() && new_root.join("web/scheduled.0").is_dir());

    let t = on_pty(&h.affa, None, &["--delete-job", "web"], Some(("proceed", "")));
    t.failed().shows(&[cancelled]);
    assert!(fs::read_to_string(&conf).unwrap().contains("[web]"));
    on_pty(&h.affa, None, &["--delete-job", "web"], Some(("proceed", "proceed"))).ok();
    assert!(!fs::read_to_string(&conf).unwrap_or_default().contains("[web]"));
}

/// The README's first command, in a test: an ESXi VM backed up on a terminal, verified,
/// rebuilt, and restored under a new name after typing `proceed`; the pin question of
/// `--send-key` answered.
#[test]
fn esxi_on_a_terminal() {
    let e = Esx::start(96 * MB, &[(0, 4 * MB)], "chunkFiles=*-flat.vmdk\nscheduledKeep=2\nchunkTransport=rsync\n", "");
    let snap = "BEXI-esx-20260504210000";
    let t = on_pty(&e.affa, Some("2026-05-04T21:00:00"), &["--run", "esx"], None);
    t.ok().drew_progress("rsync").drew_progress("chunking").shows(&[
        "==> ESXi: connecting to 127.0.0.1",
        &format!("==> ESXi: creating snapshot {snap}"),
        "==> copying the disks in vmfs/volumes/datastore1/vm1 (1 of 2)",
        "==> chunking vmfs/volumes/datastore1/vm1/vm1-flat.vmdk (1 of 2)",
        "==> copying the disks in vmfs/volumes/ds2/vm1 (2 of 2)",
        "==> chunking vmfs/volumes/ds2/vm1/vm1_1-flat.vmdk (2 of 2)",
        &format!("==> ESXi: removing snapshot {snap}"),
        "==> ESXi: copying the configuration files",
        "==> rotating the archives",
        "job esx done",
    ]);
    assert!(t.rows("  pool growth  ")[0].contains("dedup ratio"), "{}", t.text());
    assert!(e.sim.snapshots("vm1").is_empty());
    let frozen = e.frozen();

    let t = on_pty(&e.affa, None, &["--verify", "esx", "--all"], None);
    t.ok().drew_progress("verify scheduled.0").shows(&[]);
    assert_eq!(t.rows("scheduled.0: OK (2 chunked file(s), ").len(), 1, "{}", t.text());
    let plain = e.affa.tmp.path().join("plain");
    let t = on_pty(&e.affa, None, &["--unchunk", "esx", "scheduled.0", "--to", &plain.display().to_string()], None);
    let d0 = plain.join("vmfs/volumes/datastore1/vm1/vm1-flat.vmdk");
    t.ok().drew_progress("unchunk").shows(&[&format!("{} (96.0M), verified", d0.display())]);
    assert_eq!(sha256_file(&d0), frozen[0]);

    let args = ["--full-restore", "esx", "--to-dir", "vm1-r", "--register", "vm1-r"];
    let t = on_pty(&e.affa, None, &args, Some(("proceed", "yes")));
    t.failed().shows(&["affa: error: cancelled: nothing was changed"]);
    assert!(!e.ds1.join("vm1-r").exists());
    let t = on_pty(&e.affa, None, &args, Some(("proceed", "proceed")));
    t.ok().drew_progress("rebuilding chunked files").drew_progress("rsync").drew_progress("hashing the archive");
    assert_eq!(sha256_file(&e.ds1.join("vm1-r/vm1-flat.vmdk")), frozen[0]);
    assert_eq!(sha256_file(&e.ds2.join("vm1-r/vm1_1-flat.vmdk")), frozen[1]);

    // Piped, the same commands print their results and no progress.
    let o = e.affa.affa(&["--verify", "esx", "--all"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));

    // --send-key asks before it pins a certificate.
    let conf = e.affa.conf.join("esx.conf");
    let pinned = fs::read_to_string(&conf).unwrap();
    let unpinned: String =
        pinned.lines().filter(|l| !l.starts_with("ESXiThumbprint=")).map(|l| format!("{l}\n")).collect();
    e.affa.write_conf("esx.conf", &unpinned);
    let t = on_pty(&e.affa, None, &["--send-key", "esx"], Some(("yes", "no")));
    t.failed();
    assert!(!fs::read_to_string(&conf).unwrap().contains("ESXiThumbprint="));
    let t = on_pty(&e.affa, None, &["--send-key", "esx"], Some(("yes", "yes")));
    t.ok();
    assert!(fs::read_to_string(&conf).unwrap().contains(&format!("ESXiThumbprint={}", e.sim.thumbprint)));
}

/// Ctrl-C in the middle of a disk's transfer, as a person presses it: the terminal echoes `^C` where
/// the bar is; the bar still goes before the next line, the snapshot is removed, the last line
/// names the signal, and the next run resumes.
#[test]
fn ctrl_c_on_a_terminal_removes_the_snapshot_and_leaves_a_clean_screen() {
    let e =
        Esx::start(48 * MB, &[(0, 4 * MB)], "chunkFiles=*-flat.vmdk\nBandwidthLimit=2000\nchunkTransport=rsync\n", "");
    let t = typing(&e.affa, Some("2026-05-04T21:00:00"), &["--run", "esx"], Some(("MiB/4", "\x03")));
    t.failed().shows(&[
        "==> copying the disks in vmfs/volumes/datastore1/vm1 (1 of 2)",
        "==> ESXi: removing snapshot BEXI-esx-20260504210000",
    ]);
    let last = t.last_row();
    assert!(
        last.starts_with(
            "affa: error: ESXi VM vm1: copying vmfs/volumes/datastore1/vm1 (chunked) interrupted by SIGINT"
        ),
        "last row: {last}\n{}",
        t.text()
    );
    assert!(e.sim.snapshots("vm1").is_empty(), "snapshot left: {:?}", e.sim.snapshots("vm1"));
    assert!(archive_names(&e.affa.job_dir("esx")).is_empty());
    let conf = e.affa.conf.join("esx.conf");
    let text = fs::read_to_string(&conf).unwrap();
    e.affa.write_conf("esx.conf", &text.replace("BandwidthLimit=2000\n", ""));
    quiet(&e.affa.affa_at("2026-05-04T21:10:00", &["--run", "esx"]));
    assert_eq!(archive_names(&e.affa.job_dir("esx")), ["scheduled.0"]);
}
