//! Pulling from an rsync daemon instead of ssh (Affa 3's `rsyncdMode=yes`; e.g. a Windows host
//! running an rsync daemon): `rsync://[rsyncdUser@]HOST[:rsyncdPort]/rsyncdModule/PATH`.
//!
//! Owns: the daemon URL of a job, the password file for the transfer, the connection check.
//! Must never: put the password on a command line or in a log (it goes to rsync through
//! `--password-file`, a mode 0600 file in the job's private directory, removed after the run),
//! or leave that file inside an archive.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Job;
use crate::error::{Error, IoContext, Result};
use crate::transport::die_with_parent;

/// A job's rsync daemon, for one run; its password file is removed when it is dropped.
#[derive(Debug)]
pub struct Daemon {
    /// `rsync://[user@]host:port/module`
    pub url: String,
    pub password_file: Option<PathBuf>,
}

impl Daemon {
    /// The daemon of `job`; with rsyncdPassword, its password is written to a 0600 file in
    /// `private_dir` (RootDir/JOB, mode 0700) for the run.
    pub fn for_job(job: &Job, private_dir: &Path) -> Result<Daemon> {
        let d = job
            .rsyncd
            .as_ref()
            .ok_or_else(|| Error::new(format!("job {} is not an rsync daemon job (rsyncdMode=no)", job.name)))?;
        let host = &job.host;
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        let user = if d.user.is_empty() { String::new() } else { format!("{}@", d.user) };
        let url = format!("rsync://{user}{host}:{}/{}", d.port, d.module);
        let password = &d.password;
        if password.is_empty() {
            return Ok(Daemon { url, password_file: None });
        }
        let file = private_dir.join(".rsyncd-password");
        let _ = fs::remove_file(&file);
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| f.write_all(format!("{password}\n").as_bytes()))
            .ctx(|| format!("cannot write {}", file.display()))?;
        Ok(Daemon { url, password_file: Some(file) })
    }

    /// rsync's arguments for the daemon: the password file.
    pub fn args(&self) -> Vec<String> {
        self.password_file.iter().map(|f| format!("--password-file={}", f.display())).collect()
    }

    /// A source path in the module: `rsync://.../module/PATH`.
    pub fn source(&self, path: &str) -> String {
        format!("{}/{}", self.url, path.trim_start_matches('/'))
    }

    /// Affa 3's check before the run: can we list the module?
    pub fn check(&self, job: &Job) -> Result<()> {
        let (prog, lead) = crate::transport::rsync_program(job);
        let mut c = Command::new(&prog);
        c.args(&lead)
            .arg("--list-only")
            .arg(format!("--contimeout={}", job.ssh.connect_timeout))
            .args(self.args())
            .arg(format!("{}/", self.url))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut c);
        // Bounded (a daemon that accepts and then says nothing), and stopped by a signal.
        let limit = std::time::Duration::from_secs(2 * job.ssh.connect_timeout.max(1));
        let what = format!("the rsync daemon check of {}", self.url);
        let out = crate::transport::output_within(c, None, limit, &what, "ConnectionCheckTimeout")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no answer");
            bail!(
                Remote,
                "rsync daemon connection to {} (job {}) failed: {first}; check rsyncdUser, rsyncdPassword, rsyncdModule and rsyncdPort",
                self.url,
                job.name
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(f) = &self.password_file {
            let _ = fs::remove_file(f);
        }
    }
}
