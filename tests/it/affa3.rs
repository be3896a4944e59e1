//! An Affa 3 installation moving over (issue 15), against the real counterparts: several job
//! files with one broken, Affa 3's own values and options, the cron self-refresh, script-readable
//! output, and the SME Server, USB-disk and rsync-daemon keys (a stand-in `signal-event` on the
//! test sshd's PATH, a loop-mounted filesystem image, a real `rsync --daemon` on 127.0.0.1).

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------- helpers

/// The global section every test starts from, plus extra global keys.
fn global(a: &Affa, extra: &str) {
    a.write_conf(
        "00-global.conf",
        &format!(
            "[GlobalAffaConfig]\nlockDir={s}/lock\nlogDir={s}/log\nsshDir={s}/ssh\nscriptDir={s}/scripts\nRootDir={r}\n\
             cronFile={s}/cron.d/affa\nmetricsFile={s}/nodir/affa.prom\nsambaConfDir={s}/samba\nsmbConf={s}/smb.conf\n\
             sendmailBinary={m}\n{extra}",
            s = a.state.display(),
            r = a.root.display(),
            m = mail_recorder(a).display()
        ),
    );
}

/// A sendmail stand-in that keeps each message as N.msg (and its arguments as N.args).
fn mail_recorder(a: &Affa) -> PathBuf {
    let out = a.tmp.path().join("mail");
    let sm = a.tmp.path().join("sendmail.sh");
    if !sm.exists() {
        fs::create_dir_all(&out).unwrap();
        executable(
            &sm,
            &format!(
                "#!/bin/sh\nn=$(ls {o}/*.msg 2>/dev/null | wc -l)\nprintf '%s\\n' \"$@\" > {o}/$n.args\ncat > {o}/$n.msg\n",
                o = out.display()
            ),
        );
    }
    sm
}

/// A quoted-printable body as text (soft line breaks joined, `=XX` decoded).
fn unqp(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace("=\n", "");
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' && i + 2 < b.len() && u8::from_str_radix(&s[i + 1..i + 3], 16).is_ok() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The messages sent so far: (arguments, message decoded).
fn mails(a: &Affa) -> Vec<(String, String)> {
    let out = a.tmp.path().join("mail");
    (0..)
        .map_while(|n| {
            let m = fs::read_to_string(out.join(format!("{n}.msg"))).ok()?;
            Some((fs::read_to_string(out.join(format!("{n}.args"))).unwrap(), unqp(&m)))
        })
        .collect()
}

fn executable(p: &Path, body: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A source tree for local (remoteHostName=localhost) jobs.
fn source() -> tempfile::TempDir {
    let src = tempfile::Builder::new().prefix("affa-src").tempdir().unwrap();
    fs::create_dir_all(src.path().join("data/sub")).unwrap();
    fs::write(src.path().join("data/hello.txt"), "hello from affa\n").unwrap();
    fs::write(src.path().join("data/sub/more.txt"), "more\n").unwrap();
    src
}

fn local_job(name: &str, src: &Path, extra: &str) -> String {
    format!("[{name}]\nremoteHostName=localhost\nInclude={}/data\n{extra}", src.display())
}

fn log_of(a: &Affa, job: &str) -> String {
    fs::read_to_string(a.state.join(format!("log/{job}.log"))).unwrap_or_default()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------- 1. one bad file, one job

#[test]
fn a_broken_job_fails_alone_and_loudly() {
    let a = Affa::new();
    global(&a, "EmailAddress=global-admin@example.com\n");
    let src = source();
    a.write_conf("alpha.conf", &local_job("alpha", src.path(), ""));
    // Affa 3's own SME samples carry status=enbabled; a misspelt key; a job in the same file
    // that is fine; a section name that is no job name.
    a.write_conf(
        "broken.conf",
        &format!(
            "{}{}{}[bad name]\nremoteHostName=x\n",
            local_job("beta", src.path(), "EmailAddress=beta-admin@example.com\nstatus=enbabled\n"),
            local_job("gamma", src.path(), "remotUser=root\n"),
            local_job("delta", src.path(), "")
        ),
    );
    let broken = a.conf.join("broken.conf");

    // Every other job runs.
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "alpha"]));
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "delta"]));
    assert_eq!(archive_names(&a.job_dir("alpha")), ["scheduled.0"]);
    assert_eq!(archive_names(&a.job_dir("delta")), ["scheduled.0"]);
    assert!(mails(&a).is_empty(), "{:?}", mails(&a));

    // The broken one fails with one line naming file, line, key, value and what is expected...
    let e = fail(&a.affa_at("2026-03-02T10:00:00", &["--silent", "--run", "beta"]));
    let expected =
        format!("{}:5: key 'status' has the value 'enbabled', expected enabled or disabled", broken.display());
    assert_eq!(e, format!("affa: error: {expected}\n"));
    assert!(!a.job_dir("beta").exists(), "a broken job must not touch its RootDir");
    // ...in its log, and in one error mail to the recipients its section names.
    assert!(log_of(&a, "beta").contains(&expected), "{}", log_of(&a, "beta"));
    let m = mails(&a);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].0.ends_with("--\nbeta-admin@example.com\n"), "{}", m[0].0);
    assert!(m[0].1.contains("job beta") && m[0].1.contains("FAILED") && m[0].1.contains(&expected), "{}", m[0].1);
    // gamma: the misspelt key; its mail goes to the global recipients.
    let e = fail(&a.affa(&["--silent", "--run", "gamma"]));
    assert!(e.contains("unknown key 'remotUser' in [gamma] (did you mean 'remoteUser'?)"), "{e}");
    assert!(mails(&a)[1].0.ends_with("--\nglobal-admin@example.com\n"), "{:?}", mails(&a)[1]);

    // NRPE: critical for the broken job, as for a failed run; fine for the others.
    let o = a.affa_at("2026-03-02T11:00:00", &["--nrpe", "beta"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("CRITICAL: Failed jobs: beta (configuration error)"), "{}", stdout(&o));
    assert_eq!(a.affa_at("2026-03-02T11:00:00", &["--nrpe", "alpha"]).status.code(), Some(0));

    // --configcheck still reports every error of every file, one line each.
    let o = a.affa(&["--configcheck"]);
    let err = fail(&o);
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("unknown key 'remotUser'"), "{err}");
    assert!(err.contains("job name 'bad name' is not valid"), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(stdout(&o).contains("2 job(s) will not run (beta, gamma); the other 2 job(s) run"), "{}", stdout(&o));

    // --status lists every job; cron still starts the broken ones, so they keep failing loudly.
    let st = ok(&a.affa_at("2026-03-02T11:00:00", &["--status"]));
    assert!(st.lines().any(|l| l.contains("beta") && l.contains("configuration error")), "{st}");
    ok(&a.affa(&["--make-cronjobs"]));
    let cron = fs::read_to_string(a.state.join("cron.d/affa")).unwrap();
    for j in ["alpha", "beta", "gamma", "delta"] {
        assert!(cron.contains(&format!("--silent --run {j}\n")), "{j}: {cron}");
    }

    // A broken [GlobalAffaConfig] is the one error that stops every job.
    global(&a, "sendStatus=sometimes\n");
    let e = fail(&a.affa(&["--run", "alpha"]));
    assert!(e.contains("00-global.conf") && e.contains("key 'sendStatus' has the value 'sometimes'"), "{e}");
}

// ---------------------------------------------------------------- 2. Affa 3's values

#[test]
fn affa3_values_are_accepted_as_affa3_reads_them() {
    let mut sshd = Sshd::shared();
    let a = Affa::new();
    global(&a, "");
    let src = source();
    // scheduledKeep=0 counts as 1, negative keeps as 0; negative nice levels; NRPEtrigger=-1
    // turns NRPE off for the job.
    a.write_conf(
        "local.conf",
        &local_job("loc", src.path(), "scheduledKeep=0\ndailyKeep=-1\nweeklyKeep=-7\nmonthlyKeep=0\nyearlyKeep=-1\nlocalNice=-5\nNRPEtrigger=-1\n"),
    );
    a.write_conf(
        "remote.conf",
        &a.ssh_job("rem", &sshd, &format!("Include={}/data\nremoteNice=-3\nscheduledKeep=-2\n", src.path().display())),
    );
    ok(&a.affa(&["--configcheck"]));
    ok(&a.send_key(&mut sshd, "rem"));
    for (day, n) in [("2026-03-02T10:00:00", 1), ("2026-03-03T10:00:00", 2), ("2026-03-10T10:00:00", 3)] {
        ok(&a.affa_at(day, &["--run", "loc"]));
        ok(&a.affa_at(day, &["--run", "rem"]));
        // One scheduled archive (keep 1), no daily or weekly ones (keep 0).
        assert_eq!(archive_names(&a.job_dir("loc")), ["scheduled.0"], "run {n}");
    }
    let rem = archive_names(&a.job_dir("rem"));
    assert_eq!(rem.iter().filter(|n| n.starts_with("scheduled.")).collect::<Vec<_>>(), ["scheduled.0"], "{rem:?}");
    assert_eq!(
        fs::read_to_string(
            a.job_dir("loc").join("scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("data/hello.txt")
        )
        .unwrap(),
        "hello from affa\n"
    );
    let log = log_of(&a, "loc");
    assert!(log.contains("running: nice -n -5 rsync "), "{log}");
    let log = log_of(&a, "rem");
    assert!(log.contains("--rsync-path=/bin/nice -n -3 /usr/bin/rsync"), "{log}");
    // NRPEtrigger=-1: not monitored, even when it is long overdue.
    let o = a.affa_at("2026-04-01T10:00:00", &["--nrpe", "loc"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = a.affa_at("2026-04-01T10:00:00", &["--nrpe"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("rem (last success") && !stdout(&o).contains("loc"), "{}", stdout(&o));
}

// ---------------------------------------------------------------- 3. Affa 3's internal options

#[test]
fn affa3_internal_options_and_the_cron_self_refresh() {
    let mut sshd = Sshd::shared();
    let a = Affa::new();
    let nagios = a.tmp.path().join("nagios");
    fs::create_dir_all(&nagios).unwrap();
    fs::write(nagios.join("nrpe.cfg"), "server_port=5666\ninclude_dir=/etc/nagios/nrpe.d\n").unwrap();
    let restarts = a.tmp.path().join("restarts");
    global(
        &a,
        &format!(
            "affaBinary={}\nnrpeConfig={}/nrpe.cfg\nnrpeRestart=echo restarted >> {}\n",
            env!("CARGO_BIN_EXE_affa"),
            nagios.display(),
            restarts.display()
        ),
    );
    let src = source();
    a.write_conf("loc.conf", &local_job("loc", src.path(), "NRPEtrigger=-1\n"));
    a.write_conf("rem.conf", &a.ssh_job("rem", &sshd, &format!("Include={}/data\n", src.path().display())));

    // Bash completion (Affa 3's profile.d/affa.sh): the option is field 3 of the usage lines
    // that contain " affa CUR"; a line with JOB offers the job names of --_jobs.
    let sh = |cmd: &str| {
        let o = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("AFFA", env!("CARGO_BIN_EXE_affa"))
            .env("CONF", &a.conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(sh("$AFFA --_shorthelp | grep ' affa --li' | awk '{print $3}'"), "--list-archives\n");
    assert_eq!(sh("$AFFA --_shorthelp | grep -- '--cleanup.*JOB' | wc -l").trim(), "1");
    assert_eq!(
        sh("$AFFA --_shorthelp | awk '{print $3}' | grep -c '^--'").trim(),
        sh("$AFFA --_shorthelp | wc -l").trim()
    );
    assert_eq!(ok(&a.affa(&["--_jobs"])), "loc\nrem\n");

    // --show-config-pathes, text and CSV.
    let p = ok(&a.affa(&["--show-config-pathes"]));
    assert_eq!(p, format!("loc: {}\nrem: {}\n", a.conf.join("loc.conf").display(), a.conf.join("rem.conf").display()));
    let p = ok(&a.affa(&["--show-config-pathes", "--csv", "rem"]));
    assert_eq!(p, format!("job;configpath\nrem;{}\n", a.conf.join("rem.conf").display()));

    // --debug: Debug=yes for the run (ssh logs at DEBUG1).
    ok(&a.send_key(&mut sshd, "rem"));
    ok(&a.affa(&["--debug", "--run", "rem"]));
    assert!(log_of(&a, "rem").contains("LogLevel=DEBUG1"), "{}", log_of(&a, "rem"));

    // --init-nrpe: the command file next to nrpe.cfg, included once, NRPE restarted when
    // something changed; the commands in it work. NRPEtrigger=-1 leaves loc out.
    let out = ok(&a.affa(&["--init-nrpe"]));
    assert!(out.contains("NRPE restarted"), "{out}");
    let own = fs::read_to_string(nagios.join("affa-nrpe.cfg")).unwrap();
    let affa = format!("{} --config-dir {}", env!("CARGO_BIN_EXE_affa"), fs::canonicalize(&a.conf).unwrap().display());
    for l in [
        format!("command[check_affa]=sudo {affa} --nrpe\n"),
        format!("command[affa_jobsnrpe]=sudo {affa} --_jobsnrpe\n"),
        format!("command[affa_diskusagenrpe]=sudo {affa} --disk-usage --csv\n"),
        format!("command[check_affa_rem]=sudo {affa} --nrpe rem\n"),
    ] {
        assert!(own.contains(&l), "{l} in\n{own}");
    }
    assert!(!own.contains("check_affa_loc"), "{own}");
    ok(&a.affa(&["--init-nrpe"]));
    let main = fs::read_to_string(nagios.join("nrpe.cfg")).unwrap();
    assert_eq!(
        main,
        format!("server_port=5666\ninclude_dir=/etc/nagios/nrpe.d\ninclude={}/affa-nrpe.cfg\n", nagios.display())
    );
    assert_eq!(fs::read_to_string(&restarts).unwrap(), "restarted\n", "restarted only when something changed");
    // NRPE runs the commands as root through sudo; here we are root already.
    let run = |name: &str| {
        let line = own.lines().find(|l| l.starts_with(&format!("command[{name}]="))).unwrap();
        let cmd = line.split_once("]=sudo ").unwrap().1;
        std::process::Command::new("/bin/sh").arg("-c").arg(cmd).output().unwrap()
    };
    let o = run("check_affa_rem");
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&run("affa_jobsnrpe")), "rem\n#OK\n");
    assert!(stdout(&run("affa_diskusagenrpe")).starts_with("RootDir;RootDirFilesystemAvail;RootDirFilesystemUsed\n"));

    // --delete-job --revoke-key: the key leaves the host, then the job goes.
    let key = fs::read_to_string(a.state.join("ssh/id_ed25519_affa.pub")).unwrap();
    assert!(fs::read_to_string(&sshd.authorized_keys).unwrap().contains(key.trim()));
    let out = ok(&a.affa(&["--delete-job", "--revoke-key", "rem", "--yes"]));
    assert!(out.contains("affa's key removed") && out.contains("job rem deleted"), "{out}");
    assert!(!fs::read_to_string(&sshd.authorized_keys).unwrap().contains(key.trim()));
    assert!(!a.job_dir("rem").exists());
    assert!(fail(&a.affa(&["--revoke-key", "--status"])).contains("cannot be used together"));

    // The cron file refreshes itself: Affa 3's line every 15 minutes; nothing is rewritten
    // while nothing changed; an edited file, or a file added (even an old one), is applied.
    // --delete-job just edited the configuration: the cron file written next gets a later mtime
    // than that edit only once the (coarse) file clock has passed it, or the refresh below
    // rightly takes the configuration for newer than the cron file (failed once in CI).
    let probe = a.tmp.path().join("mtime-probe");
    let newest_conf = fs::read_dir(&a.conf).unwrap().flatten().filter_map(|e| e.metadata().ok()?.modified().ok()).max();
    wait_until(Duration::from_secs(5), "the file clock to pass the configuration's mtime", || {
        fs::write(&probe, "").unwrap();
        Some(fs::metadata(&probe).unwrap().modified().unwrap()) > newest_conf
    });
    ok(&a.affa(&["--make-cronjobs"]));
    let cron = a.state.join("cron.d/affa");
    let text = fs::read_to_string(&cron).unwrap();
    assert!(text.ends_with(&format!("*/15 * * * * root {affa} --silent --_cronupdate\n")), "{text}");
    let mtime = || fs::metadata(&cron).unwrap().modified().unwrap();
    let before = mtime();
    // A rewrite from now on would get a later mtime (file times follow a coarse clock).
    wait_until(Duration::from_secs(5), "the file clock to pass the cron file's mtime", || {
        fs::write(&probe, "").unwrap();
        fs::metadata(&probe).unwrap().modified().unwrap() > before
    });
    let o = a.affa(&["--_cronupdate"]);
    assert_eq!(ok(&o), "");
    assert!(o.stderr.is_empty());
    assert_eq!(mtime(), before, "rewritten without a change");
    a.write_conf("loc.conf", &local_job("loc", src.path(), "TimeSchedule=0415\n"));
    assert_eq!(ok(&a.affa(&["--_cronupdate"])), "");
    assert!(fs::read_to_string(&cron).unwrap().contains("15 4 * * * root"), "edit not applied");
    a.write_conf("new.conf", &local_job("newjob", src.path(), "TimeSchedule=0545\n"));
    let st = std::process::Command::new("touch").args(["-d", "2001-01-01"]).arg(a.conf.join("new.conf")).status();
    assert!(st.unwrap().success());
    ok(&a.affa(&["--_cronupdate"]));
    assert!(fs::read_to_string(&cron).unwrap().contains("45 5 * * * root"), "new file not applied");
}

// ---------------------------------------------------------------- 4. subdirectories

#[test]
fn configurations_in_subdirectories_are_read() {
    let a = Affa::new();
    global(&a, "");
    let src = source();
    fs::create_dir_all(a.conf.join("hosts/web")).unwrap();
    a.write_conf("hosts/web/www.conf", &local_job("www", src.path(), "TimeSchedule=0310\n"));
    a.write_conf("hosts/db.conf", &local_job("db", src.path(), ""));
    // Not a configuration file.
    a.write_conf("hosts/notes.txt", "[nope]\nremoteHostName=x\n");
    assert_eq!(ok(&a.affa(&["--_jobs"])), "db\nwww\n");
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "www"]));
    assert_eq!(archive_names(&a.job_dir("www")), ["scheduled.0"]);
    ok(&a.affa(&["--make-cronjobs"]));
    assert!(fs::read_to_string(a.state.join("cron.d/affa")).unwrap().contains("10 3 * * * root"));
    // Edits go to the file in the subdirectory.
    ok(&a.affa(&["--rename-job", "www", "web"]));
    assert!(fs::read_to_string(a.conf.join("hosts/web/www.conf")).unwrap().contains("[web]"));
    assert_eq!(ok(&a.affa(&["--_jobs"])), "db\nweb\n");
    // An error in a subdirectory's file is reported with its path, and stops its job only.
    a.write_conf("hosts/db.conf", &local_job("db", src.path(), "dailyKeep=x\n"));
    let e = fail(&a.affa(&["--configcheck"]));
    assert!(e.contains(&format!("{}:4: key 'dailyKeep'", a.conf.join("hosts/db.conf").display())), "{e}");
    ok(&a.affa_at("2026-03-02T11:00:00", &["--run", "web"]));
}

// ---------------------------------------------------------------- 5. script-readable output

#[test]
fn csv_columns_and_nrpe_labels_are_affa3s() {
    let a = Affa::new();
    global(&a, "");
    let src = source();
    let big: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(src.path().join("data/big.bin"), big).unwrap();
    a.write_conf(
        "jobs.conf",
        &[local_job("web", src.path(), ""), local_job("db", src.path(), "status=disabled\n")].concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&a.affa_at("2026-03-02T14:00:00", &["--run", "web"]));
    let jd = a.job_dir("web");
    // An incomplete archive; an Affa 3 archive with freedup's keys; an Affa 2 archive.
    fs::create_dir_all(jd.join("weekly.3")).unwrap();
    fs::create_dir_all(jd.join("monthly.0")).unwrap();
    fs::write(
        jd.join("monthly.0/.AFFA3-REPORT"),
        "[Report]\nDate=202601312230\nExecutionTime=75\nNumberOfFiles=1200\nTotalFileSize=5000000\nTotalBytesSent=300\n\
         TotalBytesReceived=4000\nRootDirFilesystemUsed=1000\nRootDirFilesystemAvail=9000\nRootDirFilesystemUsage=10.0\n\
         ExitStatus=0\nDedup=yes\nDedupTotalFiles=1200\nDedupReplacedFiles=17\nDedupSavedBytes=4096\nDedupExectime=3\n",
    )
    .unwrap();
    fs::create_dir_all(jd.join("yearly.1")).unwrap();
    let affa2 = jd.join("yearly.1/.AFFA-REPORT");
    fs::write(
        &affa2,
        "# Affa 2 report\nDate: 200812012230\nExecution Time: 612 seconds\nNumber of files: 41,230\n\
         File list size: 1234\nTotal file size: 9,876,543 bytes\nTotal bytes sent: 1,024\nTotal bytes received: 7,777\n\
         Source: host.example\n",
    )
    .unwrap();
    let st = std::process::Command::new("touch").args(["-d", "2008-12-01 22:40"]).arg(&affa2).status();
    assert!(st.unwrap().success());

    let csv = ok(&a.affa(&["--list-archives", "--csv", "web"]));
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(';').collect()).collect();
    assert_eq!(
        csv.lines().next().unwrap(),
        "Archive;Count;Date;Files;Size;RootDirFilesystemAvail;RootDirFilesystemUsed;valid;TotalBytesSent;TotalBytesReceived;\
         ExecutionTime;DedupTotalFiles;DedupReplacedFiles;DedupSavedBytes;DedupExectime;DedupDate;Job;LogicalSize;PoolBytesAdded;DedupRatio;\
         DiskRead;DiskHostBytesRead;DiskBytesSent"
    );
    assert!(rows.iter().all(|r| r.len() == 23), "{csv}");
    // Not an ESXi job: no disk columns' values.
    assert!(rows[1..].iter().all(|r| r[20..] == ["", "", ""]), "{csv}");
    // Affa 3's order: yearly first, the highest index first, scheduled.0 last.
    let names: Vec<String> = rows[1..].iter().map(|r| format!("{}.{}", r[0], r[1])).collect();
    assert_eq!(names, ["yearly.00001", "monthly.00000", "weekly.00003", "daily.00000", "scheduled.00000"]);
    // The Affa 2 archive, converted as Affa 3 does (and kept converted).
    assert_eq!(rows[1][2..11], ["200812012230", "41230", "9876543", "", "", "yes", "1024", "7777", "612"]);
    let conv = fs::read_to_string(jd.join("yearly.1/.AFFA3-REPORT")).unwrap();
    assert!(
        conv.starts_with("; converted from .AFFA-REPORT (Affa V2)\n[Report]\nDate=200812012230\nExecutionTime=612\n"),
        "{conv}"
    );
    assert!(!conv.contains("FileListSize") && !conv.contains("Source"), "{conv}");
    assert_eq!(
        fs::metadata(jd.join("yearly.1")).unwrap().modified().unwrap(),
        fs::metadata(&affa2).unwrap().modified().unwrap()
    );
    // Affa 3's archive with freedup's columns.
    assert_eq!(
        rows[2][2..16],
        [
            "202601312230",
            "1200",
            "5000000",
            "9000",
            "1000",
            "yes",
            "300",
            "4000",
            "75",
            "1200",
            "17",
            "4096",
            "3",
            "202601312230"
        ]
    );
    // The incomplete one: zeros, valid=no.
    assert_eq!(rows[3][2..16], ["0", "0", "0", "0", "0", "no", "0", "0", "0", "", "", "", "", ""]);
    // affa's own: the date and values of its report, the job at the end.
    let r0 = fs::read_to_string(jd.join("scheduled.0/.AFFA3-REPORT")).unwrap();
    let val = |k: &str| r0.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap().to_string();
    assert_eq!(
        rows[5][..11],
        [
            "scheduled",
            "00000",
            "202603021400",
            &val("NumberOfFiles"),
            &val("TotalFileSize"),
            &val("RootDirFilesystemAvail"),
            &val("RootDirFilesystemUsed"),
            "yes",
            &val("TotalBytesSent"),
            &val("TotalBytesReceived"),
            &val("ExecutionTime")
        ]
    );
    assert_eq!(rows[5][16..18], ["web", "0"]);

    // --status --csv: Affa 3's columns, rows in reverse job order, never run = 19700101000000,
    // no lock = 0.
    let st = ok(&a.affa_at("2026-03-02T15:00:00", &["--status", "--csv"]));
    let lines: Vec<&str> = st.lines().collect();
    assert_eq!(lines[0], "Job;Enabled;Last;Next;Size;RootDirFilesystemAvail;RootDirFilesystemUsed;NumberOfArchives;lockpid;ProcessState;BackupTime;DedupTotalFiles;DedupReplacedFiles;DedupSavedBytes;DedupExectime;DedupDate;ConfigError");
    assert_eq!(
        lines[1],
        format!(
            "web;yes;202603021400;22:30;{};{};{}; 1, 1, 1, 1, 1;0;;{};;;;;;",
            val("TotalFileSize"),
            val("RootDirFilesystemAvail"),
            val("RootDirFilesystemUsed"),
            val("ExecutionTime")
        )
    );
    assert_eq!(lines[2], "db;no;19700101000000;22:30;0;0;0; 0, 0, 0, 0, 0;0;;;;;;;;");

    // A running job: its pid and "running rsync"; killed: "rsync interrupted".
    a.write_conf(
        "jobs.conf",
        &[local_job("web", src.path(), "BandwidthLimit=1\n"), local_job("db", src.path(), "status=disabled\n")]
            .concat(),
    );
    fs::write(src.path().join("data/big.bin"), vec![7u8; 300_000]).unwrap();
    let mut child =
        a.cmd().env("AFFA_FAKE_NOW", "2026-03-02T16:00:00").args(["--silent", "--run", "web"]).spawn().unwrap();
    let row = wait_for(Duration::from_secs(20), "--status --csv to show web running rsync", || {
        let st = ok(&a.affa(&["--status", "--csv"]));
        Some(st.lines().nth(1).unwrap().to_string()).filter(|row| row.contains(";running rsync;"))
    });
    assert_eq!(row.split(';').nth(8), Some(child.id().to_string().as_str()), "{row}");
    signal(child.id(), rustix::process::Signal::TERM);
    child.wait().unwrap();
    let st = ok(&a.affa(&["--status", "--csv"]));
    assert!(st.lines().nth(1).unwrap().contains(";0;rsync interrupted;"), "{st}");
    let st = ok(&a.affa(&["--status"]));
    assert!(st.contains("rsync interrupted"), "{st}");

    // --nrpe: Affa 3's perfdata labels, then the ages.
    a.write_conf("jobs.conf", &[local_job("web", src.path(), ""), local_job("db", src.path(), "")].concat());
    let o = a.affa_at("2026-03-02T15:00:00", &["--nrpe"]);
    let line = stdout(&o);
    let perf = line.split_once(" | ").unwrap().1;
    let size: f64 = val("TotalFileSize").parse::<f64>().unwrap() / 1073741824.0;
    let min: f64 = val("ExecutionTime").parse::<f64>().unwrap() / 60.0;
    assert!(
        perf.starts_with(&format!(
            "Jobs failed=2;;;; Jobs total=2;;;; Jobs checked=2;;;; Total Execution Time={min:.1}min;;;; Total Size={size:.3}GByte;;;; 'db_age'=U 'web_age'="
        )),
        "{line}"
    );
    let o = a.affa_at("2026-03-02T15:00:00", &["--nrpe", "web"]);
    assert!(
        stdout(&o).contains(&format!(" | Execution Time={min:.1}min;;;; Size={size:.3}GByte;;;; 'web_age'=")),
        "{}",
        stdout(&o)
    );
}

// ---------------------------------------------------------------- 6. SME Server, USB disk, rsync daemon

/// A stand-in for SME Server's `signal-event` in `dir`: it records each call in `dir/calls`;
/// `pre-backup` writes a "database dump" into `dump_to`, `post-backup` removes it; with
/// `dir/fail` present it fails.
fn signal_event(dir: &Path, dump_to: &Path) {
    executable(
        &dir.join("signal-event"),
        &format!(
            "#!/bin/sh\necho \"$*\" >> {d}/calls\n[ -e {d}/fail ] && {{ echo 'signal-event: pre-backup failed' >&2; exit 3; }}\n\
             case \"$1\" in\n  pre-backup) n=$(wc -l < {d}/calls); echo \"dump $n\" > {f} ;;\n  post-backup) rm -f {f} ;;\nesac\nexit 0\n",
            d = dir.display(),
            f = dump_to.display()
        ),
    );
}

#[test]
fn sme_server_events_run_on_the_host_around_the_transfer() {
    let _one_at_a_time = sme_paths();
    let bin = tempfile::Builder::new().prefix("affa-sme-bin").tempdir().unwrap();
    let src = source();
    let dump = src.path().join("data/mysql.dump");
    signal_event(bin.path(), &dump);
    let mut sshd = Sshd::start_with(&format!("SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin\n", bin.path().display()));
    let a = Affa::new();
    global(&a, "");
    // SME's backup set is added to the sources (here: the parts of it this machine has); /root
    // is left out by an (anchored) Exclude, as an Affa 3 user trims the set.
    a.write_conf(
        "sme.conf",
        &a.ssh_job("sme", &sshd, &format!("SMEServer=yes\nInclude={}/data\nExclude=/root\n", src.path().display())),
    );
    ok(&a.send_key(&mut sshd, "sme"));
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "sme"]));
    let calls = fs::read_to_string(bin.path().join("calls")).unwrap();
    assert_eq!(calls, "pre-backup desktop\npost-backup\n");
    // The dump of the pre-backup event is in the archive (it ran before the transfer), and the
    // post-backup event ran after it (the dump is gone from the host, not from the archive).
    let s0 = a.job_dir("sme").join("scheduled.0");
    let rel = |p: &Path| s0.join(p.strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(rel(&dump)).unwrap(), "dump 1\n");
    assert!(!dump.exists());
    assert_eq!(fs::read(rel(Path::new("/etc/passwd"))).unwrap(), fs::read("/etc/passwd").unwrap());
    assert!(!s0.join("root").exists());
    // Restore knows the added sources: they are in the archive's setup copy.
    let setup = fs::read_to_string(s0.join(".sme-setup.ini")).unwrap();
    assert!(setup.contains("Include=/etc/passwd\n"), "{setup}");
    let log = log_of(&a, "sme");
    assert!(log.contains("Executing script SME/signal-pre-backup on 127.0.0.1"), "{log}");

    // A failing pre-backup event fails the run before the transfer; nothing moves.
    fs::write(bin.path().join("fail"), "").unwrap();
    let e = fail(&a.affa_at("2026-03-02T11:00:00", &["--run", "sme"]));
    assert!(e.contains("remote script SME/signal-pre-backup failed on 127.0.0.1 with exit 3"), "{e}");
    assert_eq!(archive_names(&a.job_dir("sme")), ["scheduled.0"]);
    assert!(log_of(&a, "sme").contains("signal-event: pre-backup failed"));
    fs::remove_file(bin.path().join("fail")).unwrap();

    // Affa 3's own scripts in scriptDir/SME/ are used when present; with
    // remoteHostName=localhost they run here.
    executable(
        &a.state.join("scripts/SME/signal-pre-backup"),
        &format!("#!/bin/sh\necho \"own $1 $2\" >> {}/calls\n", bin.path().display()),
    );
    a.write_conf("sme.conf", &local_job("sme", src.path(), "SMEServer=yes\nExclude=/root\n"));
    let o = a
        .cmd()
        .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.path().display()))
        .env("AFFA_FAKE_NOW", "2026-03-02T12:00:00")
        .args(["--run", "sme"])
        .output()
        .unwrap();
    ok(&o);
    let calls = fs::read_to_string(bin.path().join("calls")).unwrap();
    assert!(calls.ends_with("pre-backup desktop\nown localhost sme\npost-backup\n"), "{calls}");
}

/// A filesystem image on a loop device, standing for a USB disk; detached when dropped.
struct UsbDisk {
    dev: String,
    _dir: tempfile::TempDir,
}

impl UsbDisk {
    fn new() -> UsbDisk {
        let dir = tempfile::Builder::new().prefix("affa-usb").tempdir().unwrap();
        let img = dir.path().join("usb.img");
        fs::write(&img, vec![0u8; 32 << 20]).unwrap();
        let st = std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-L", "AFFAUSB"]).arg(&img).status();
        assert!(st.unwrap().success(), "mkfs.ext4 (e2fsprogs)");
        let o = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
        assert!(o.status.success(), "losetup: {}", String::from_utf8_lossy(&o.stderr));
        UsbDisk { dev: String::from_utf8(o.stdout).unwrap().trim().to_string(), _dir: dir }
    }
}

impl Drop for UsbDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dev).output();
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn mounted_at(point: &Path) -> Option<String> {
    let m = fs::read_to_string("/proc/self/mounts").unwrap();
    let p = point.display().to_string();
    m.lines().find(|l| l.split(' ').nth(1) == Some(p.as_str())).map(String::from)
}

#[test]
fn a_usb_disk_is_mounted_for_the_run_and_unmounted_after() {
    let disk = UsbDisk::new();
    let a = Affa::new();
    global(&a, "");
    let src = source();
    let point = a.tmp.path().join("mnt/usb");
    let job = |extra: &str| {
        local_job(
            "usb",
            src.path(),
            &format!("RootDir={p}\nAutomountDevice={}\nAutomountPoint={p}\n{extra}", disk.dev, p = point.display()),
        )
    };
    a.write_conf("usb.conf", &job("AutomountOptions=-o noatime\n"));
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "usb"]));
    let log = log_of(&a, "usb");
    assert!(log.contains(&format!("Mounting {} to {}", disk.dev, point.display())), "{log}");
    assert!(log.contains(&format!("Unmounted {}", point.display())), "{log}");
    // Unmounted: the point is an empty directory (mode 0700); the archive is on the disk.
    assert_eq!(mounted_at(&point), None);
    assert_eq!(fs::read_dir(&point).unwrap().count(), 0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&point).unwrap().permissions().mode() & 0o777, 0o700);
    let check = a.tmp.path().join("check");
    fs::create_dir_all(&check).unwrap();
    assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&check).status().unwrap().success());
    let hello = check.join("usb/scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("data/hello.txt");
    assert_eq!(fs::read_to_string(&hello).unwrap(), "hello from affa\n");
    assert!(std::process::Command::new("umount").arg(&check).status().unwrap().success());

    // AutoUnmount=no: it stays mounted, with the options; the next run uses it as it is.
    a.write_conf("usb.conf", &job("AutomountOptions=-o noatime\nAutoUnmount=no\n"));
    ok(&a.affa_at("2026-03-03T10:00:00", &["--run", "usb"]));
    let m = mounted_at(&point).expect("still mounted");
    assert!(m.starts_with(&disk.dev) && m.contains("noatime"), "{m}");
    ok(&a.affa_at("2026-03-04T10:00:00", &["--run", "usb"]));
    assert_eq!(archive_names(&point.join("usb")), ["daily.0", "daily.1", "scheduled.0"]);
    assert!(std::process::Command::new("umount").arg(&point).status().unwrap().success());
    // --disk-usage mounts the disk for the moment (as Affa 3) and reads the disk's own figures
    // (a 32 MiB filesystem), then unmounts it.
    let du = ok(&a.affa(&["--disk-usage", "--csv"]));
    let row =
        du.lines().find(|l| l.starts_with(&format!("\"{}\";", point.display()))).unwrap_or_else(|| panic!("{du}"));
    let avail: u64 = row.split(';').nth(1).unwrap().parse().unwrap_or_else(|_| panic!("{row}"));
    assert!(avail > 1000 && avail < 32 * 1024, "{row}");
    assert_eq!(mounted_at(&point), None);
    // The commands that change the archives mount the disk for their time too: a rename
    // renamed the section alone (the archives stayed on the disk under the old name, for the
    // next job of that name to take over), a delete deleted nothing on the disk.
    let on_disk = |rel: &str| -> bool {
        assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&check).status().unwrap().success());
        let there = check.join(rel).exists();
        assert!(std::process::Command::new("umount").arg(&check).status().unwrap().success());
        there
    };
    a.write_conf("usb.conf", &job(""));
    ok(&a.affa(&["--rename-job", "usb", "usb2"]));
    assert_eq!(mounted_at(&point), None, "left mounted after --rename-job");
    assert!(on_disk("usb2/scheduled.0") && !on_disk("usb"), "the archives were not renamed on the disk");
    ok(&a.affa(&["--delete-job", "usb2", "--yes"]));
    assert_eq!(mounted_at(&point), None, "left mounted after --delete-job");
    assert!(!on_disk("usb2"), "the archives were not deleted from the disk");

    // A device that cannot be mounted fails the run with one line, before anything else.
    a.write_conf(
        "usb.conf",
        &local_job(
            "usb",
            src.path(),
            &format!("RootDir={p}\nAutomountDevice=/dev/affa-no-such-disk\nAutomountPoint={p}\n", p = point.display()),
        ),
    );
    let e = fail(&a.affa_at("2026-03-05T10:00:00", &["--run", "usb"]));
    assert!(e.contains("cannot mount AutomountDevice /dev/affa-no-such-disk on") && e.lines().count() == 1, "{e}");
    // A job whose disk is dead is not deleted (its archives are there), and the message says
    // how to remove it anyway.
    let e = fail(&a.affa(&["--delete-job", "usb", "--yes"]));
    assert!(
        e.contains("job usb not deleted")
            && e.contains("delete the section [usb] from")
            && e.contains("cannot mount AutomountDevice"),
        "{e}"
    );
    assert!(fs::read_to_string(a.conf.join("usb.conf")).unwrap().contains("[usb]"));
    // Half a pair is a configuration error of that job.
    a.write_conf("usb.conf", &local_job("usb", src.path(), "AutomountDevice=/dev/sdz1\n"));
    assert!(fail(&a.affa(&["--run", "usb"])).contains("has AutomountDevice without AutomountPoint"));
}

/// Two jobs on one USB disk (the usual Affa set-up): the first run to end leaves the disk
/// mounted while the other runs (a lazy unmount under it sent its archive to the empty
/// directory below the mount point, on the system disk); the last one out unmounts it.
#[test]
fn a_usb_disk_shared_by_two_jobs_stays_mounted_until_the_last_run_ends() {
    let disk = UsbDisk::new();
    let a = Affa::new();
    global(&a, "");
    let src = source();
    let point = a.tmp.path().join("mnt/usb");
    let scripts = a.state.join("scripts");
    fs::create_dir_all(&scripts).unwrap();
    let (started, go) = (a.state.join("started"), a.state.join("go"));
    fs::write(
        scripts.join("hold.sh"),
        format!(
            "#!/bin/sh\ntouch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.1; done\nexit 0\n",
            started.display(),
            go.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(scripts.join("hold.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let job = |name: &str, extra: &str| {
        local_job(
            name,
            src.path(),
            &format!("RootDir={p}\nAutomountDevice={}\nAutomountPoint={p}\n{extra}", disk.dev, p = point.display()),
        )
    };
    a.write_conf("jobs.conf", &format!("{}\n{}", job("first", ""), job("second", "preJobCommand=hold.sh\n")));
    // The second job's run mounts the disk and waits in its preJobCommand.
    let second = a
        .cmd()
        .env("AFFA_FAKE_NOW", "2026-03-02T10:00:00")
        .args(["--run", "second"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "the second job's run to reach its preJobCommand", || {
        started.exists().then_some(())
    });
    // The first job runs from start to end meanwhile: the disk is in use, it stays mounted.
    ok(&a.affa_at("2026-03-02T10:00:05", &["--run", "first"]));
    let log = log_of(&a, "first");
    assert!(!log.contains("Mounting"), "mounted twice: {log}");
    assert!(log.contains(&format!("left {} mounted: another affa run or command uses it", point.display())), "{log}");
    assert!(mounted_at(&point).is_some_and(|m| m.starts_with(&disk.dev)), "unmounted under the second job's run");
    // The second run goes on and ends: its archive is on the disk, and it unmounts the disk.
    fs::write(&go, "").unwrap();
    let out = second.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(log_of(&a, "second").contains(&format!("Unmounted {}", point.display())), "{}", log_of(&a, "second"));
    assert_eq!(mounted_at(&point), None, "left mounted by the last run");
    assert_eq!(fs::read_dir(&point).unwrap().count(), 0, "written below the mount point instead of on the disk");
    let check = a.tmp.path().join("check");
    fs::create_dir_all(&check).unwrap();
    assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&check).status().unwrap().success());
    for j in ["first", "second"] {
        let hello =
            check.join(j).join("scheduled.0").join(src.path().strip_prefix("/").unwrap()).join("data/hello.txt");
        assert_eq!(fs::read_to_string(&hello).ok().as_deref(), Some("hello from affa\n"), "{j}'s archive on the disk");
    }
    assert!(std::process::Command::new("umount").arg(&check).status().unwrap().success());

    // A shared job (SambaShare=yes) on the disk: while the disk is away it is not shared, and
    // that is no failure (with AutoUnmount=yes the disk is away most of the time); while it is
    // mounted, it is.
    fs::write(a.state.join("smb.conf"), "[global]\n").unwrap();
    a.write_conf("jobs.conf", &job("first", "SambaShare=yes\nSambaValidUser=root\n"));
    let out = ok(&a.affa(&["--samba-shares"]));
    assert!(
        out.contains(&format!("job first: not shared while its AutomountDevice {} is not mounted", disk.dev)),
        "{out}"
    );
    assert!(!a.state.join("samba/affa-job-first.conf").exists());
    assert_eq!(mounted_at(&point), None);
    assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&point).status().unwrap().success());
    let out = ok(&a.affa(&["--samba-shares"]));
    assert!(out.contains("Samba shares: first"), "{out}");
    assert!(a.state.join("samba/affa-job-first.conf").exists());
    // Away again: the share, and its mount that kept the disk in use, go.
    let pinned =
        || fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.contains("samba-mounts/first"));
    assert!(pinned());
    assert!(std::process::Command::new("umount").arg("-l").arg(&point).status().unwrap().success());
    ok(&a.affa(&["--samba-shares"]));
    assert!(!a.state.join("samba/affa-job-first.conf").exists());
    assert!(!pinned(), "the share's mount of the unmounted disk was left");
    // A run that mounts the disk and unmounts it after (AutoUnmount=yes) removes the share's
    // mount of the disk first: the disk is released, not kept in use by the share.
    assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&point).status().unwrap().success());
    ok(&a.affa(&["--samba-shares"]));
    assert!(pinned());
    assert!(std::process::Command::new("umount").arg(&point).status().is_ok());
    ok(&a.affa_at("2026-03-03T10:00:00", &["--run", "first"]));
    assert!(log_of(&a, "first").contains(&format!("Unmounted {}", point.display())), "{}", log_of(&a, "first"));
    assert!(!pinned(), "the share's mount kept the disk in use after the run unmounted it");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.lines().any(|l| l.starts_with(&format!("{} ", disk.dev))), "the disk is still mounted: {mounts}");

    // A mount made by hand that got the ID of a mount affa recorded (a killed run's record: the
    // kernel gives mount IDs again) is never unmounted by affa.
    assert!(std::process::Command::new("mount").arg(&disk.dev).arg(&point).status().unwrap().success());
    let id = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&point.display().to_string()))
        .and_then(|l| l.split(' ').next().map(String::from))
        .expect("the point in mountinfo");
    let records: Vec<PathBuf> = fs::read_dir(a.state.join("lock"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.to_string_lossy().ends_with(".m") && p.file_name().unwrap().to_string_lossy().starts_with(".automount.")
        })
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    fs::write(&records[0], format!("affa-automount 1\n{id} unmount\n")).unwrap();
    ok(&a.affa_at("2026-03-04T10:00:00", &["--run", "first"]));
    assert!(mounted_at(&point).is_some(), "affa unmounted a disk mounted by hand");
    assert!(std::process::Command::new("umount").arg(&point).status().unwrap().success());
}

/// The commands that read a job's archives mount its USB disk for their time, as the ones that
/// change them do: without it `--list-archives` showed no archives and `--full-restore` found
/// none; with the disk mounted by another job's run, that run unmounted it (lazily) under them
/// when it ended. `--mount` holds the disk for the life of its mount.
#[test]
fn a_usb_disk_is_mounted_for_the_commands_that_read_it_and_stays_mounted_under_them() {
    let disk = UsbDisk::new();
    let a = Affa::new();
    global(&a, "");
    let src = source();
    let point = a.tmp.path().join("mnt/usb");
    let away = a.tmp.path().join("mnt/away");
    let usb = local_job(
        "usb",
        src.path(),
        &format!("RootDir={p}\nAutomountDevice={}\nAutomountPoint={p}\n", disk.dev, p = point.display()),
    );
    a.write_conf("usb.conf", &usb);
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "usb"]));
    assert_eq!(mounted_at(&point), None);

    // Listed and restored from the disk, which is unmounted again after.
    let list = ok(&a.affa(&["--list-archives", "usb"]));
    assert!(list.contains("| S 0 ") && list.contains("2026-03-02 10:00"), "{list}");
    assert_eq!(mounted_at(&point), None, "left mounted after --list-archives");
    let hello = src.path().join("data/hello.txt");
    fs::remove_file(&hello).unwrap();
    ok(&a.affa(&["--full-restore", "usb", "--yes"]));
    assert_eq!(fs::read_to_string(&hello).ok().as_deref(), Some("hello from affa\n"), "not restored");
    assert_eq!(mounted_at(&point), None, "left mounted after --full-restore");
    assert_eq!(fs::read_dir(&point).unwrap().count(), 0, "written below the mount point");

    // `--mount` holds the disk: a run that ends meanwhile leaves it mounted, the mounted archive
    // reads on; the disk is unmounted when the mount ends.
    if Path::new("/dev/fuse").exists() {
        let dir = a.tmp.path().join("browse");
        fs::create_dir_all(&dir).unwrap();
        ok(&a.affa(&["--mount", "usb", "scheduled.0", dir.to_str().unwrap()]));
        let through = dir.join(src.path().strip_prefix("/").unwrap()).join("data/hello.txt");
        assert_eq!(fs::read_to_string(&through).unwrap(), "hello from affa\n");
        ok(&a.affa_at("2026-03-03T10:00:00", &["--run", "usb"]));
        let log = log_of(&a, "usb");
        assert!(
            log.contains(&format!("left {} mounted: another affa run or command uses it", point.display())),
            "{log}"
        );
        assert!(mounted_at(&point).is_some_and(|m| m.starts_with(&disk.dev)), "unmounted under the mount");
        assert_eq!(fs::read_to_string(&through).unwrap(), "hello from affa\n");
        ok(&a.affa(&["--umount", dir.to_str().unwrap()]));
        wait_until(Duration::from_secs(20), "the disk to be unmounted after the mount ended", || {
            mounted_at(&point).is_none()
        });
    }

    // A job whose disk is away: its listing fails with the mount's error, the others are
    // listed; the scrub says its pool waits for the disk, and that is no failure.
    a.write_conf(
        "away.conf",
        &local_job(
            "away",
            src.path(),
            &format!("RootDir={p}\nAutomountDevice=LABEL=AFFA-AWAY-0\nAutomountPoint={p}\n", p = away.display()),
        ),
    );
    let o = a.affa(&["--list-archives"]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("Job: usb") && stdout(&o).contains("| S 0 "), "{}", stdout(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("job away: cannot mount AutomountDevice LABEL=AFFA-AWAY-0"), "{e}");
    let scrub = ok(&a.affa(&["--scrub"]));
    assert!(
        scrub.contains(&format!(
            "pool of {}: not scrubbed, its AutomountDevice LABEL=AFFA-AWAY-0 is not connected",
            away.display()
        )),
        "{scrub}"
    );
    assert_eq!(mounted_at(&point), None, "left mounted after --list-archives and --scrub");
}

/// A real `rsync --daemon` on 127.0.0.1 serving `path` as module AFFA to user affa with
/// `password`. Stopped when dropped (before its directory goes: fields drop in order).
struct RsyncDaemon {
    _daemon: Daemon,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RsyncDaemon {
    fn start(path: &Path, password: &str) -> RsyncDaemon {
        let dir = tempfile::Builder::new().prefix("affa-rsyncd").tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        fs::write(&secrets, format!("affa:{password}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&secrets, fs::Permissions::from_mode(0o600)).unwrap();
        let conf = dir.path().join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = root\ngid = root\npid file = {d}/pid\nlog file = {d}/log\n\
                 [AFFA]\npath = {p}\nread only = yes\nauth users = affa\nsecrets file = {s}\n",
                d = dir.path().display(),
                p = path.display(),
                s = secrets.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let mut c = std::process::Command::new("rsync");
        c.args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()));
        let log = dir.path().join("rsyncd.out");
        let daemon = Daemon::start(&c, &log);
        wait_listening(port, Duration::from_secs(10), "the rsync daemon", &log);
        RsyncDaemon { _daemon: daemon, port, _dir: dir }
    }
}

#[test]
fn a_host_with_an_rsync_daemon_is_pulled_without_ssh() {
    let src = source();
    let daemon = RsyncDaemon::start(src.path(), "Rs-s3cret");
    let a = Affa::new();
    global(&a, "");
    let job = |pw: &str, extra: &str| {
        format!(
            "[win]\nremoteHostName=127.0.0.1\nrsyncdMode=yes\nrsyncdPort={}\nrsyncdPassword={pw}\nInclude=/data\nrsyncCompress=no\n{extra}",
            daemon.port
        )
    };
    a.write_conf("win.conf", &job("Rs-s3cret", ""));
    ok(&a.affa(&["--check-connections", "win"]));
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "win"]));
    let s0 = a.job_dir("win").join("scheduled.0");
    assert_eq!(tree_hashes(&s0.join("data")), tree_hashes(&src.path().join("data")));
    // Unchanged files are hard links to the previous archive.
    ok(&a.affa_at("2026-03-02T11:00:00", &["--run", "win"]));
    let s1 = a.job_dir("win").join("daily.0");
    assert_eq!(inode(&s0.join("data/hello.txt")), inode(&s1.join("data/hello.txt")));
    // The password is in no log, no setup copy, no file left behind.
    let log = log_of(&a, "win");
    assert!(log.contains(&format!("rsync://affa@127.0.0.1:{}/AFFA/data", daemon.port)), "{log}");
    assert!(!log.contains("Rs-s3cret"));
    assert!(!fs::read_to_string(s0.join(".win-setup.ini")).unwrap().contains("Rs-s3cret"));
    assert!(!a.job_dir("win").join(".rsyncd-password").exists());
    // No ssh key is needed; a wrong password fails the run with one line, archives untouched.
    assert!(ok(&a.affa(&["--send-key", "win"])).contains("no ssh key needed"));
    a.write_conf("win.conf", &job("wrong", ""));
    let e = fail(&a.affa_at("2026-03-02T12:00:00", &["--run", "win"]));
    assert!(
        e.contains("rsync daemon connection to rsync://affa@127.0.0.1")
            && e.contains("check rsyncdUser, rsyncdPassword"),
        "{e}"
    );
    assert_eq!(archive_names(&a.job_dir("win")), ["daily.0", "scheduled.0"]);
    assert!(fail(&a.affa(&["--full-restore", "win", "--yes"])).contains("rsyncdMode=yes"));
    // What needs ssh is refused, for that job only.
    a.write_conf("win.conf", &job("Rs-s3cret", "preJobCommandRemote=x.sh\n"));
    assert!(fail(&a.affa(&["--run", "win"])).contains("rsyncdMode=yes with pre/postJobCommandRemote, which needs ssh"));
}

/// The SME tests back up SME's standard set from this machine (`/home/e-smith` among it) and one
/// of them creates and removes `/home/e-smith`: one at a time.
static SME_PATHS: Mutex<()> = Mutex::new(());

fn sme_paths() -> MutexGuard<'static, ()> {
    SME_PATHS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes `/home/e-smith` at the end if the test created it (SME's path of the package list).
struct SmeDbDir(bool);

impl Drop for SmeDbDir {
    fn drop(&mut self) {
        if self.0 {
            let _ = fs::remove_dir_all("/home/e-smith");
        }
    }
}

#[test]
fn sme_watchdog_and_package_check() {
    let _one_at_a_time = sme_paths();
    if Path::new("/home/e-smith").exists() {
        eprintln!("skipped: /home/e-smith exists on this machine (an SME Server?)");
        return;
    }
    let _cleanup = SmeDbDir(true);
    let bin = tempfile::Builder::new().prefix("affa-sme-bin").tempdir().unwrap();
    let src = source();
    signal_event(bin.path(), &src.path().join("data/dump"));
    // The host's rpm, sendmail and (for the watchdog) date.
    executable(&bin.path().join("rpm"), "#!/bin/sh\nprintf 'bash 5.2-1\\nfoo 1.0-1\\nzlib 1.3-2\\n'\n");
    executable(&bin.path().join("sendmail"), &format!("#!/bin/sh\ncat >> {}/mails\n", bin.path().display()));
    executable(
        &bin.path().join("date"),
        "#!/bin/sh\ncase \"$1\" in\n  +%H) echo \"$FAKE_HOUR\" ;;\n  *) echo \"$FAKE_NOW\" ;;\nesac\n",
    );
    let mut sshd = Sshd::start_with(&format!("SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin\n", bin.path().display()));
    let a = Affa::new();
    let wd = a.tmp.path().join("cron.hourly");
    global(&a, &format!("watchdogDir={}\nEmailAddress=admin@example.com\n", wd.display()));
    a.write_conf(
        "sme.conf",
        &a.ssh_job(
            "sme",
            &sshd,
            &format!(
                "SMEServer=yes\nWatchdog=yes\nRPMCheck=yes\nInclude={}/data\nExclude=/root\nTimeSchedule=2230\nchunkFiles=*.img\nchunkSize=1M\n",
                src.path().display()
            ),
        ),
    );
    ok(&a.send_key(&mut sshd, "sme"));
    // This server's own package list: bash of another version, no foo.
    let here = tempfile::Builder::new().prefix("affa-here-bin").tempdir().unwrap();
    executable(&here.path().join("rpm"), "#!/bin/sh\nprintf 'bash 5.1-9\\nzlib 1.3-2\\n'\n");
    let run = |now: &str| {
        a.cmd()
            .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", here.path().display()))
            .env("AFFA_FAKE_NOW", now)
            .args(["--run", "sme"])
            .output()
            .unwrap()
    };
    // A chunked file inside SME's own backup set (not below an Include path): chunked into the
    // archive, not left out of both transfers.
    fs::create_dir_all("/home/e-smith/files/ibays").unwrap();
    let img: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write("/home/e-smith/files/ibays/disk.img", &img).unwrap();
    ok(&run("2026-03-02T10:00:00"));
    let out = a.tmp.path().join("unchunked");
    ok(&a.affa(&["--unchunk", "sme", "scheduled.0", "--to", out.to_str().unwrap()]));
    let back =
        fs::read(out.join("home/e-smith/files/ibays/disk.img")).expect("the chunked file of SME's set is missing");
    assert!(back == img, "the chunked file of SME's set differs");

    // The package list of the host is in the archive; the differences are in rpms-missing.txt
    // and mailed once.
    let s0 = a.job_dir("sme").join("scheduled.0");
    assert_eq!(
        fs::read_to_string(s0.join("home/e-smith/db/affa-rpmlist")).unwrap(),
        "bash 5.2-1\nfoo 1.0-1\nzlib 1.3-2\n"
    );
    let missing = fs::read_to_string(a.job_dir("sme").join("rpms-missing.txt")).unwrap();
    assert!(missing.contains("but they are missing on this backup host:\n* \nfoo-1.0-1\n"), "{missing}");
    assert!(missing.contains("but the version does not match:\n* \nbash-5.2-1\n"), "{missing}");
    assert!(!missing.contains("zlib"), "{missing}");
    let m = mails(&a);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].1.contains("packages of 127.0.0.1 missing on the backup server") && m[0].1.contains("foo-1.0-1"),
        "{}",
        m[0].1
    );
    ok(&run("2026-03-03T10:00:00"));
    assert_eq!(mails(&a).len(), 1, "the same differences are mailed once");

    // The watchdog on the host: named after the job and the backup server's address as the
    // host sees it; trigger = the next scheduled run (22:30) + 10 minutes.
    let script = wd.join("affa-watchdog-sme-127.0.0.1");
    let text = fs::read_to_string(&script).unwrap();
    assert!(text.contains("\nTRIGGER=202603032240\n"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&script).unwrap().permissions().mode() & 0o777, 0o700);
    let hourly = |path: &Path, now: &str, hour: &str| {
        let st = std::process::Command::new(path)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
            .env("FAKE_NOW", now)
            .env("FAKE_HOUR", hour)
            .status()
            .unwrap();
        assert!(st.success());
    };
    let host_mails = || fs::read_to_string(bin.path().join("mails")).unwrap_or_default();
    // Before the trigger: silent.
    hourly(&script, "202603032200", "22");
    assert_eq!(host_mails(), "");
    // Past it (no run replaced the script): one mail, then it becomes the reminder.
    hourly(&script, "202603032300", "23");
    let hm = host_mails();
    assert!(hm.contains("To: admin@example.com\nSubject: Error: Scheduled affa job 'sme' did not run on "), "{hm}");
    assert!(!script.exists());
    let reminder = wd.join("affa-watchdog-sme-127.0.0.1-reminder");
    assert!(reminder.exists());
    // The reminder speaks daily at the trigger's hour only.
    hourly(&reminder, "202603040100", "01");
    assert_eq!(host_mails(), hm);
    hourly(&reminder, "202603042240", "22");
    assert!(
        host_mails().len() > hm.len() && host_mails().contains("Subject: Error: (Reminder) Scheduled affa job 'sme'")
    );
    // --mailtest: the host mails too, as its watchdog would.
    let before = host_mails();
    let out = ok(&a.affa(&["--mailtest", "sme"]));
    assert!(out.contains("watchdog test mail of job sme sent by 127.0.0.1 to admin@example.com"), "{out}");
    assert!(host_mails()[before.len()..].contains("Subject: affa watchdog test mail from 127.0.0.1 for job sme"));
    // The next run removes the reminder and installs a new watchdog.
    ok(&run("2026-03-04T23:00:00"));
    assert!(!reminder.exists());
    assert!(fs::read_to_string(&script).unwrap().contains("\nTRIGGER=202603052240\n"));
}

// ---------------------------------------------------------------- 7. out of scope, said clearly

#[test]
fn rise_and_undo_rise_are_refused_pointing_to_full_restore() {
    let a = Affa::new();
    for opt in ["--rise", "--undo-rise"] {
        let e = fail(&a.affa(&[opt, "web"]));
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.starts_with(&format!("affa: error: {opt} is not supported:")) && e.contains("affa --full-restore JOB"),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------- 8. Affa 3's looks

#[test]
fn list_archives_show_property_and_report_look_like_affa3() {
    let a = Affa::new();
    global(&a, "");
    let src = source();
    a.write_conf(
        "jobs.conf",
        &[
            local_job("web", src.path(), "Description=web server\nEmailAddress=root\nEmailAddress=admin@example.com\ndailyKeep=1\nTimeSchedule=0215\nTimeSchedule=1400\n"),
            local_job("db", src.path(), "status=disabled\n"),
        ]
        .concat(),
    );
    ok(&a.affa_at("2026-03-02T10:00:00", &["--run", "web"]));
    ok(&a.affa_at("2026-03-03T10:00:00", &["--run", "web"]));
    fs::create_dir_all(a.job_dir("web").join("daily.4")).unwrap();
    let l = ok(&a.affa(&["--list-archives", "web"]));
    let lines: Vec<&str> = l.lines().collect();
    let rule = format!("+{}+", "-".repeat(112));
    let boxed = |t: &str| format!("| {t:<110} |");
    assert_eq!(lines[0], format!("affa {} on {}", env!("CARGO_PKG_VERSION"), affa::notify::hostname()));
    assert_eq!(lines[1], rule);
    assert_eq!(lines[2], boxed("Job: web"));
    assert_eq!(lines[3], boxed("Description: web server"));
    assert_eq!(lines[4], boxed(&format!("Directory: {}/", a.job_dir("web").display())));
    assert_eq!(lines[5], boxed("Hostname: localhost"));
    assert_eq!(lines[6], boxed("Email: root"));
    assert_eq!(lines[7], boxed("       admin@example.com"));
    assert_eq!(lines[8], boxed("Archives with an index greater than the Keep value are tagged with '*'"));
    assert_eq!(lines[9], rule);
    assert_eq!(lines[10], "| Run   | Completion date                           |    buTime | ddTime | ddYld | Files |  Size |  Sent | Recvd |");
    assert_eq!(lines[11], rule);
    assert!(lines[12].starts_with("|*D 4  | Incomplete!                                |         - |      - |     - |     - |     - |     - |     - |"), "{l}");
    assert!(
        lines[13].starts_with("| D 0  | Mon 2026-03-02 10:00                       |     0m00s |      - |     - |"),
        "{l}"
    );
    assert_eq!(lines[14], rule);
    assert!(lines[15].starts_with("| S 0  | Tue 2026-03-03 10:00                       |     0m00s |"), "{l}");
    assert_eq!(lines[16], rule);
    assert!(lines.iter().all(|l| l.chars().count() == 114 || l.starts_with("affa ")), "{l}");

    // --show-property: the key, then each job's value (multi-valued on one line).
    let p = ok(&a.affa(&["--show-property", "timeschedule"]));
    assert!(
        p.contains("\nValues of property TimeSchedule\ndb               : 2230\nweb              : 0215 1400\n"),
        "{p}"
    );
    let p = ok(&a.affa(&["--show-property", "EmailAddress"]));
    assert!(
        p.ends_with("db               : root\nweb              : root\nweb              : admin@example.com\n"),
        "{p}"
    );

    // .AFFA3-REPORT: Affa 3's keys in Affa 3's order, affa's own after them.
    let r = fs::read_to_string(a.job_dir("web").join("scheduled.0/.AFFA3-REPORT")).unwrap();
    let keys: Vec<&str> = r.lines().skip(1).map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(&keys[..2], ["Date", "ExecutionTime"], "{r}");
    let tail = [
        "RootDirFilesystemUsed",
        "RootDirFilesystemAvail",
        "RootDirFilesystemUsage",
        "ExitStatus",
        "Dedup",
        "AffaVersion",
    ];
    assert_eq!(&keys[keys.len() - 6..], tail, "{r}");
    assert!(
        keys[2..keys.len() - 6]
            .iter()
            .all(|k| ["NumberOf", "Total", "Literal", "Matched"].iter().any(|p| k.starts_with(p))),
        "{r}"
    );
}
