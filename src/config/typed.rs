//! The typed settings of a job and of `[GlobalAffaConfig]`, parsed once when the configuration
//! is loaded: every later step reads fields, never a key by its name.
//!
//! Owns: turning the merged key values (already checked line by line by [`keys::check`], with
//! the same parsers) into typed fields, and the defaults that depend on other keys (ESXi's
//! remote rsync, the API host). Must never: parse a setting a second way (each key has one
//! parser, shared with the line check), or panic on a value (a value that does not parse is a
//! one-line error of its job, and the field takes the key's default).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::keys;
use super::Origin;
use crate::archive::{Keeps, Level};
use crate::chunk;

/// ssh to the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    /// remoteUser.
    pub user: String,
    /// sshPort.
    pub port: u16,
    /// localSSHBinary.
    pub ssh_bin: String,
    /// ConnectionCheckTimeout, seconds.
    pub connect_timeout: u64,
    /// RemoteAuthorizedKeysFile (ESXi jobs: /etc/ssh/keys-USER/authorized_keys unless given).
    pub authorized_keys: String,
}

/// The rsync of every transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rsync {
    /// BandwidthLimit, KB/s (0 = none).
    pub bwlimit: u64,
    /// rsyncTimeout, seconds (0 = none).
    pub timeout: u64,
    /// rsyncCompress.
    pub compress: bool,
    /// rsync--inplace.
    pub inplace: bool,
    /// rsync--modify-window (0 = not given).
    pub modify_window: u64,
    /// rsyncOptions, as written (split on whitespace when used).
    pub options: String,
    /// localNice, remoteNice (-19..=19).
    pub local_nice: i64,
    pub remote_nice: i64,
    /// localNiceBinary, localRsyncBinary, remoteNiceBinary.
    pub local_nice_bin: String,
    pub local_rsync_bin: String,
    pub remote_nice_bin: String,
    /// remoteRsyncBinary (ESXi jobs: /bin/rsync unless given).
    pub remote_rsync_bin: String,
}

/// rsyncdMode=yes: the source is an rsync daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rsyncd {
    pub module: String,
    /// Empty: anonymous.
    pub user: String,
    pub password: String,
    pub port: u16,
}

/// Pre/post job scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scripts {
    pub pre: Vec<String>,
    pub post: Vec<String>,
    pub pre_remote: Vec<String>,
    pub post_remote: Vec<String>,
    /// scriptTimeout.
    pub timeout: Duration,
}

/// Mail of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// EmailAddress values, as written (each may hold several addresses).
    pub to: Vec<String>,
    /// chattyOnSuccess: success mails still to send.
    pub chatty_on_success: u64,
    /// RetryNotification.
    pub retry_notification: bool,
}

/// Re-runs of a failed scheduled run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// RetryAttempts.
    pub attempts: u32,
    /// RetryAfter, seconds.
    pub after: u64,
}

/// AutomountDevice + AutomountPoint (both or neither: [`super::Job`]'s check; a job has
/// `automount` only with both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Automount {
    pub device: String,
    pub point: PathBuf,
    /// AutomountOptions, split on whitespace.
    pub options: Vec<String>,
    /// AutoUnmount.
    pub unmount: bool,
}

/// SMEServer=yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sme {
    pub rpm_check: bool,
    pub watchdog: bool,
}

/// DiskSpaceWarn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSpaceWarn {
    Strict,
    Normal,
    Risky,
    None,
}

impl DiskSpaceWarn {
    /// Warn when the free space is below the last backup's size times this.
    pub fn factor(self) -> Option<f64> {
        match self {
            DiskSpaceWarn::Strict => Some(1.0),
            DiskSpaceWarn::Normal => Some(0.5),
            DiskSpaceWarn::Risky => Some(0.1),
            DiskSpaceWarn::None => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DiskSpaceWarn::Strict => "strict",
            DiskSpaceWarn::Normal => "normal",
            DiskSpaceWarn::Risky => "risky",
            DiskSpaceWarn::None => "none",
        }
    }
    fn parse(v: &str) -> Option<Self> {
        [DiskSpaceWarn::Strict, DiskSpaceWarn::Normal, DiskSpaceWarn::Risky, DiskSpaceWarn::None]
            .into_iter()
            .find(|d| d.name() == v)
    }
}

/// ESXi=yes: the vSphere API and the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Esxi {
    /// ESXiVMName.
    pub vm_name: String,
    /// ESXiUsername.
    pub user: String,
    /// ESXiPassword (empty: ESXiPasswordFile holds it; read by [`super::Job::esxi_password`]).
    pub password: String,
    /// ESXiPasswordFile.
    pub password_file: Option<PathBuf>,
    /// The API host: ESXiHost, else remoteHostName.
    pub host: String,
    /// ESXiPort.
    pub port: u16,
    /// ESXiThumbprint, normalized (upper case, colons); None when not pinned yet.
    pub thumbprint: Option<String>,
    /// ESXiProtocol=http (allowed only with ESXiInsecureHttp=yes: [`super::Job`]'s check).
    pub plain_http: bool,
    /// ESXiSnapshotQuiesce, ESXiSnapshotMemory.
    pub quiesce: bool,
    pub memory: bool,
    /// ESXiSnapshotMode=vim-cmd: the vim-cmd program on the host (ESXiVimCmd); None = the API.
    pub vim_cmd: Option<String>,
    /// ESXiTaskTimeout.
    pub task_timeout: Duration,
    /// ESXiUserSnapshots=refuse.
    pub refuse_user_snapshots: bool,
    /// ESXiCBT.
    pub cbt: Cbt,
    /// ESXiCBTVerifyEvery (0: never).
    pub cbt_verify_every: u32,
}

/// ESXiCBT: whether a run uses Changed Block Tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cbt {
    /// Where the host allows it (enabling it on the VM), a full pass otherwise.
    Auto,
    /// A run that cannot use it fails.
    Yes,
    /// Never: the VM's tracking setting is not touched.
    No,
}

/// The chunk store settings of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunking {
    /// chunkFiles globs (empty: nothing is chunked).
    pub files: Vec<String>,
    /// chunkSize, chunkCompression.
    pub settings: chunk::Settings,
    /// chunkTransport.
    pub transport: ChunkTransport,
    /// remoteAgentPath (None: derived, see `remote_path` of the transport's agent module).
    pub remote_agent_path: Option<String>,
    /// agentDedupScope=pool: the agent may skip any chunk of the pool, not only the job's own.
    pub dedup_across_jobs: bool,
}

/// chunkTransport: how chunked files are read on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkTransport {
    /// The agent, rsync + staging where it cannot run (with a warning).
    Auto,
    /// The agent only: a run where it cannot run fails.
    Agent,
    /// rsync into the staging copy; the agent is never touched.
    Rsync,
}

impl ChunkTransport {
    pub fn name(self) -> &'static str {
        match self {
            ChunkTransport::Auto => "auto",
            ChunkTransport::Agent => "agent",
            ChunkTransport::Rsync => "rsync",
        }
    }
    fn parse(v: &str) -> Option<Self> {
        [ChunkTransport::Auto, ChunkTransport::Agent, ChunkTransport::Rsync].into_iter().find(|t| t.name() == v)
    }
}

/// The typed settings of one job (the key of each field is in its comment).
#[derive(Debug, Clone)]
pub struct Settings {
    /// remoteHostName.
    pub host: String,
    /// remoteHostName=localhost: a local copy, no ssh.
    pub local: bool,
    /// Description.
    pub description: String,
    /// status=enabled.
    pub enabled: bool,
    /// TimeSchedule, (hour, minute) each, as written.
    pub schedule: Vec<(u32, u32)>,
    /// Include values starting with `/`, as written.
    pub include_paths: Vec<String>,
    /// The source paths of the transfer: `include_paths`, `/` when none.
    pub sources: Vec<String>,
    /// Include values that are rsync patterns rather than paths.
    pub include_patterns: Vec<String>,
    /// Exclude.
    pub excludes: Vec<String>,
    /// RootDir.
    pub root_dir: PathBuf,
    /// scheduledKeep ... yearlyKeep, clamped as Affa 3 (scheduled >= 1, the others >= 0).
    pub keeps: Keeps,
    pub mail: Mail,
    pub retry: Retry,
    /// NRPEtrigger: hours without success before CRITICAL (0: no age check); None (negative)
    /// = not monitored.
    pub nrpe_trigger: Option<u64>,
    pub disk_space_warn: DiskSpaceWarn,
    pub ssh: Ssh,
    pub rsync: Rsync,
    /// Some with rsyncdMode=yes.
    pub rsyncd: Option<Rsyncd>,
    pub scripts: Scripts,
    /// killAt, resumeKilledAt.
    pub kill_at: Option<(u32, u32)>,
    pub resume_killed_at: Option<(u32, u32)>,
    /// resumeAfterBoot.
    pub resume_after_boot: bool,
    pub automount: Option<Automount>,
    /// sharedRootDir: RootDir is shared with other affa servers (the lock in RootDir/.affa-locks).
    pub shared_root_dir: bool,
    /// SambaShare.
    pub samba_share: bool,
    /// The users of SambaValidUser (several lines, each a comma- or space-separated list).
    pub samba_users: Vec<String>,
    /// Debug (also `--debug`).
    pub debug: bool,
    /// Some with SMEServer=yes.
    pub sme: Option<Sme>,
    /// Some with ESXi=yes.
    pub esxi: Option<Esxi>,
    pub chunk: Chunking,
    /// Some with offsiteTarget set.
    pub offsite: Option<Offsite>,
}

/// Where `affa --offsite` copies the job's archives (docs/FORMAT.md "Offsite bucket layout").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offsite {
    /// offsiteTarget's bucket.
    pub bucket: String,
    /// offsiteTarget's prefix, without leading or trailing `/` (empty: the bucket's root).
    pub prefix: String,
    /// offsiteTarget as written (for messages).
    pub target: String,
    /// offsiteEndpoint (empty: AWS's endpoint of the region).
    pub endpoint: String,
    /// offsiteRegion.
    pub region: String,
    /// offsiteCredentialsFile.
    pub credentials_file: PathBuf,
    /// offsiteKeyFile.
    pub key_file: PathBuf,
    /// offsiteScheduledKeep ... offsiteYearlyKeep, clamped as the local keeps.
    pub keeps: Keeps,
    /// offsiteCleanupGrace, in hours.
    pub cleanup_grace_hours: u64,
    /// offsiteAfterRun.
    pub after_run: bool,
    /// offsiteSchedule, (hour, minute) each.
    pub schedule: Vec<(u32, u32)>,
    /// offsiteParallel (1..=64).
    pub parallel: u32,
    /// offsiteBwLimit in KiB/s (0: none).
    pub bw_limit_kib: u64,
    /// offsiteTimeout: the floor of each request's deadline (plus its bytes at
    /// `transport::LEAST_RATE`).
    pub timeout: Duration,
}

/// The offsite keep key of a level (`offsiteDailyKeep`).
pub fn offsite_keep_key(l: Level) -> &'static str {
    match l {
        Level::Scheduled => "offsiteScheduledKeep",
        Level::Daily => "offsiteDailyKeep",
        Level::Weekly => "offsiteWeeklyKeep",
        Level::Monthly => "offsiteMonthlyKeep",
        Level::Yearly => "offsiteYearlyKeep",
    }
}

/// `[GlobalAffaConfig]`'s own keys, typed.
#[derive(Debug, Clone)]
pub struct Global {
    /// globalStatus: Some(true) enabled, Some(false) disabled, None = per job.
    pub status: Option<bool>,
    /// sendStatus: daily, weekly, monthly or never.
    pub send_status: String,
    pub lock_dir: PathBuf,
    pub log_dir: PathBuf,
    pub ssh_dir: PathBuf,
    pub script_dir: PathBuf,
    /// agentBinary as written (the default falls back to `affa-agent` next to affa:
    /// `local_binary` of the transport's agent module).
    pub agent_binary: PathBuf,
    pub smtp: Smtp,
    /// mailFrom (empty: affa@HOSTNAME).
    pub mail_from: String,
    pub sendmail_bin: String,
    /// mailTimeout: the floor of a mail's deadline (plus its bytes at `transport::LEAST_RATE`).
    pub mail_timeout: Duration,
    pub cron_file: PathBuf,
    /// scrubDays (0: no daily scrub).
    pub scrub_days: u64,
    /// scrubTime (hour, minute; None: no daily scrub).
    pub scrub_time: Option<(u32, u32)>,
    pub affa_binary: PathBuf,
    pub metrics_file: PathBuf,
    pub watchdog_dir: String,
    /// nrpeConfig (None: the distribution's).
    pub nrpe_config: Option<PathBuf>,
    /// nrpeRestart (empty: none).
    pub nrpe_restart: String,
    pub samba_conf_dir: PathBuf,
    pub smb_conf: PathBuf,
}

/// SMTP (empty host: the local sendmail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    /// none, starttls or tls.
    pub tls: String,
    pub user: String,
    pub password: String,
}

/// Reads typed values out of merged key values. A value that does not parse is an error of the
/// job (one line: file, key, value, what is expected) and the key's default is used instead.
pub(super) struct Reader<'a> {
    pub values: &'a BTreeMap<&'static str, Vec<String>>,
    pub origin: &'a Origin,
    pub job: &'a str,
    pub errors: Vec<String>,
}

impl Reader<'_> {
    fn def(key: &str) -> &'static keys::KeyDef {
        // The keys read here are literals of this file; the unit test `every_key_is_typed`
        // reads each of them.
        keys::lookup(key).unwrap_or_else(|| panic!("internal: unknown config key {key}"))
    }
    pub fn all(&self, key: &str) -> Vec<String> {
        self.values.get(Self::def(key).name).cloned().unwrap_or_default()
    }
    pub fn text(&self, key: &str) -> String {
        self.all(key).into_iter().next().unwrap_or_default()
    }
    fn error(&self, def: &keys::KeyDef, v: &str) -> String {
        format!(
            "{}: key '{}' of job [{}] has the value '{v}', expected {}",
            self.origin,
            def.name,
            self.job,
            keys::expected(def.kind)
        )
    }
    /// A value through the key's one parser ([`keys::parse`]).
    fn typed<T>(&mut self, key: &str, get: impl Fn(keys::Value) -> Option<T>) -> T {
        let def = Self::def(key);
        let v = self.text(key);
        match keys::parse(def.kind, &v).ok().and_then(&get) {
            Some(t) => t,
            None => {
                self.errors.push(self.error(def, &v));
                let d = def.default.first().copied().unwrap_or("");
                keys::parse(def.kind, d).ok().and_then(get).expect("internal: a key's default parses")
            }
        }
    }
    pub fn flag(&mut self, key: &str) -> bool {
        self.typed(key, |v| if let keys::Value::Bool(b) = v { Some(b) } else { None })
    }
    pub fn uint(&mut self, key: &str) -> u64 {
        self.typed(key, |v| if let keys::Value::Int(n) = v { u64::try_from(n).ok() } else { None })
    }
    pub fn int(&mut self, key: &str) -> i64 {
        self.typed(key, |v| if let keys::Value::Int(n) = v { Some(n) } else { None })
    }
    pub fn port(&mut self, key: &str) -> u16 {
        self.typed(key, |v| if let keys::Value::Int(n) = v { u16::try_from(n).ok() } else { None })
    }
    pub fn time(&mut self, key: &str) -> Option<(u32, u32)> {
        self.typed(key, |v| if let keys::Value::Time(t) = v { Some(t) } else { None })
    }
    /// Every value of a multi-valued time key (a bad one is left out, as an error).
    fn times(&mut self, key: &str) -> Vec<(u32, u32)> {
        let def = Self::def(key);
        let mut out = Vec::new();
        for v in self.all(key) {
            match keys::parse(def.kind, &v) {
                Ok(keys::Value::Time(Some(t))) => out.push(t),
                _ => self.errors.push(self.error(def, &v)),
            }
        }
        out
    }
    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.text(key))
    }
    fn opt_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.text(key)).filter(|s| !s.is_empty()).map(PathBuf::from)
    }
    fn word(&mut self, key: &str) -> String {
        self.typed(key, |v| if let keys::Value::Word(w) = v { Some(w.to_string()) } else { None })
    }
}

impl Settings {
    /// The typed settings of a job from its merged values (defaults < global < job); the keys
    /// set explicitly decide the ESXi defaults.
    pub(super) fn read(r: &mut Reader<'_>, explicit: &[&str]) -> Settings {
        let host = r.text("remoteHostName");
        let esxi_job = r.flag("ESXi");
        let keep = |r: &mut Reader<'_>, l: Level| {
            // Affa 3 clamps: scheduledKeep >= 1, the other keeps >= 0.
            let floor = if l == Level::Scheduled { 1 } else { 0 };
            r.int(l.keep_key()).clamp(floor, 10000) as u32
        };
        let keeps = Keeps(Level::ALL.map(|l| keep(r, l)));
        let includes = r.all("Include");
        let include_paths: Vec<String> = includes.iter().filter(|s| s.starts_with('/')).cloned().collect();
        let mut sources = include_paths.clone();
        if sources.is_empty() {
            sources.push("/".into());
        }
        let user = r.text("remoteUser");
        let ssh = Ssh {
            port: r.port("sshPort"),
            ssh_bin: r.text("localSSHBinary"),
            connect_timeout: r.uint("ConnectionCheckTimeout"),
            authorized_keys: if esxi_job && !explicit.contains(&"RemoteAuthorizedKeysFile") {
                format!("/etc/ssh/keys-{user}/authorized_keys")
            } else {
                r.text("RemoteAuthorizedKeysFile")
            },
            user,
        };
        let rsync = Rsync {
            bwlimit: r.uint("BandwidthLimit"),
            timeout: r.uint("rsyncTimeout"),
            compress: r.flag("rsyncCompress"),
            inplace: r.flag("rsync--inplace"),
            modify_window: r.uint("rsync--modify-window"),
            options: r.text("rsyncOptions"),
            local_nice: r.int("localNice"),
            remote_nice: r.int("remoteNice"),
            local_nice_bin: r.text("localNiceBinary"),
            local_rsync_bin: r.text("localRsyncBinary"),
            remote_nice_bin: r.text("remoteNiceBinary"),
            remote_rsync_bin: if esxi_job && !explicit.contains(&"remoteRsyncBinary") {
                "/bin/rsync".into()
            } else {
                r.text("remoteRsyncBinary")
            },
        };
        let rsyncd = r.flag("rsyncdMode").then(|| Rsyncd {
            module: r.text("rsyncdModule"),
            user: r.text("rsyncdUser"),
            password: r.text("rsyncdPassword"),
            port: r.port("rsyncdPort"),
        });
        let scripts = Scripts {
            pre: r.all("preJobCommand"),
            post: r.all("postJobCommand"),
            pre_remote: r.all("preJobCommandRemote"),
            post_remote: r.all("postJobCommandRemote"),
            timeout: Duration::from_secs(r.uint("scriptTimeout")),
        };
        let (device, point) = (r.text("AutomountDevice"), r.text("AutomountPoint"));
        let automount = (!device.is_empty() && !point.is_empty()).then(|| Automount {
            device,
            point: PathBuf::from(point),
            options: r.text("AutomountOptions").split_whitespace().map(String::from).collect(),
            unmount: r.flag("AutoUnmount"),
        });
        let sme = r.flag("SMEServer").then(|| Sme { rpm_check: r.flag("RPMCheck"), watchdog: r.flag("Watchdog") });
        let esxi = esxi_job.then(|| {
            let api_host = r.text("ESXiHost");
            Esxi {
                vm_name: r.text("ESXiVMName"),
                user: r.text("ESXiUsername"),
                password: r.text("ESXiPassword"),
                password_file: r.opt_path("ESXiPasswordFile"),
                host: if api_host.is_empty() { host.clone() } else { api_host },
                port: r.port("ESXiPort"),
                thumbprint: r.typed("ESXiThumbprint", |v| match v {
                    keys::Value::Thumbprint(t) => Some(t),
                    _ => None,
                }),
                plain_http: r.word("ESXiProtocol") == "http",
                quiesce: r.flag("ESXiSnapshotQuiesce"),
                memory: r.flag("ESXiSnapshotMemory"),
                vim_cmd: (r.word("ESXiSnapshotMode") == "vim-cmd").then(|| r.text("ESXiVimCmd")),
                task_timeout: Duration::from_secs(r.uint("ESXiTaskTimeout")),
                refuse_user_snapshots: r.word("ESXiUserSnapshots") == "refuse",
                cbt: match r.word("ESXiCBT").as_str() {
                    "yes" => Cbt::Yes,
                    "no" => Cbt::No,
                    _ => Cbt::Auto,
                },
                cbt_verify_every: r.uint("ESXiCBTVerifyEvery").min(u32::MAX as u64) as u32,
            }
        });
        let chunk_size = r.typed("chunkSize", |v| if let keys::Value::Size(s) = v { Some(s) } else { None });
        let compression =
            r.typed("chunkCompression", |v| if let keys::Value::Compression(c) = v { Some(c) } else { None });
        let chunk = Chunking {
            files: r.all("chunkFiles"),
            settings: chunk::Settings { chunk_size, compression, ..Default::default() },
            transport: r.typed("chunkTransport", |v| match v {
                keys::Value::Word(w) => ChunkTransport::parse(w),
                _ => None,
            }),
            remote_agent_path: Some(r.text("remoteAgentPath")).filter(|s| !s.is_empty()),
            dedup_across_jobs: r.word("agentDedupScope") == "pool",
        };
        let target =
            r.typed("offsiteTarget", |v| if let keys::Value::Text(t) = v { Some(t.to_string()) } else { None });
        let endpoint =
            r.typed("offsiteEndpoint", |v| if let keys::Value::Text(t) = v { Some(t.to_string()) } else { None });
        let offsite_files = (r.path("offsiteCredentialsFile"), r.path("offsiteKeyFile"));
        let region = r.text("offsiteRegion");
        let offsite_keeps = Keeps(Level::ALL.map(|l| {
            let floor = if l == Level::Scheduled { 1 } else { 0 };
            r.int(offsite_keep_key(l)).clamp(floor, 10000) as u32
        }));
        let cleanup_grace_hours = r.int("offsiteCleanupGrace").max(0) as u64;
        let after_run = r.flag("offsiteAfterRun");
        let offsite_schedule = r.times("offsiteSchedule");
        let (parallel, bw_limit_kib) =
            (r.int("offsiteParallel").clamp(1, 64) as u32, r.int("offsiteBwLimit").max(0) as u64);
        let offsite_timeout = Duration::from_secs(r.uint("offsiteTimeout").max(1));
        let offsite = keys::parse_s3_target(&target).map(|(bucket, prefix)| Offsite {
            bucket,
            prefix,
            target,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region,
            credentials_file: offsite_files.0,
            key_file: offsite_files.1,
            keeps: offsite_keeps,
            cleanup_grace_hours,
            after_run,
            schedule: offsite_schedule,
            parallel,
            bw_limit_kib,
            timeout: offsite_timeout,
        });
        let trigger = r.int("NRPEtrigger");
        Settings {
            local: host == "localhost",
            host,
            description: r.text("Description"),
            enabled: r.word("status") == "enabled",
            schedule: r.times("TimeSchedule"),
            include_patterns: includes.iter().filter(|s| !s.starts_with('/')).cloned().collect(),
            include_paths,
            sources,
            excludes: r.all("Exclude"),
            root_dir: r.path("RootDir"),
            keeps,
            mail: Mail {
                to: r.all("EmailAddress"),
                chatty_on_success: r.uint("chattyOnSuccess"),
                retry_notification: r.flag("RetryNotification"),
            },
            retry: Retry { attempts: r.uint("RetryAttempts") as u32, after: r.uint("RetryAfter") },
            nrpe_trigger: u64::try_from(trigger).ok(),
            disk_space_warn: r.typed("DiskSpaceWarn", |v| match v {
                keys::Value::Word(w) => DiskSpaceWarn::parse(w),
                _ => None,
            }),
            ssh,
            rsync,
            rsyncd,
            scripts,
            kill_at: r.time("killAt"),
            resume_killed_at: r.time("resumeKilledAt"),
            resume_after_boot: r.flag("resumeAfterBoot"),
            automount,
            shared_root_dir: r.flag("sharedRootDir"),
            samba_share: r.flag("SambaShare"),
            samba_users: samba_users(&r.all("SambaValidUser")),
            debug: r.flag("Debug"),
            sme,
            esxi,
            chunk,
            offsite,
        }
    }
}

impl Global {
    pub(super) fn read(r: &mut Reader<'_>) -> Global {
        let status = match r.word("globalStatus").as_str() {
            "enabled" => Some(true),
            "disabled" => Some(false),
            _ => None,
        };
        Global {
            status,
            send_status: r.word("sendStatus"),
            lock_dir: r.path("lockDir"),
            log_dir: r.path("logDir"),
            ssh_dir: r.path("sshDir"),
            script_dir: r.path("scriptDir"),
            agent_binary: r.path("agentBinary"),
            smtp: Smtp {
                host: r.text("smtpHost"),
                port: r.port("smtpPort"),
                tls: r.word("smtpTLS"),
                user: r.text("smtpUser"),
                password: r.text("smtpPassword"),
            },
            mail_from: r.text("mailFrom"),
            sendmail_bin: r.text("sendmailBinary"),
            mail_timeout: Duration::from_secs(r.uint("mailTimeout").max(1)),
            cron_file: r.path("cronFile"),
            scrub_days: r.uint("scrubDays"),
            scrub_time: r.time("scrubTime"),
            affa_binary: r.path("affaBinary"),
            metrics_file: r.path("metricsFile"),
            watchdog_dir: r.text("watchdogDir"),
            nrpe_config: r.opt_path("nrpeConfig"),
            nrpe_restart: r.text("nrpeRestart"),
            samba_conf_dir: r.path("sambaConfDir"),
            smb_conf: r.path("smbConf"),
        }
    }
}

fn samba_users(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Compression;
    use crate::config::{keys::KEYS, Config};
    use std::path::Path;

    fn parse(text: &str) -> crate::Result<Config> {
        Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), text.to_string())])
            .and_then(Config::strict)
    }

    const TP: &str = "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89";

    #[test]
    fn every_typed_field_from_a_sample_config() {
        let c = parse(&format!(
            "[GlobalAffaConfig]\nglobalStatus=disabled\nsendStatus=daily\nlockDir=/l\nlogDir=/g\nsshDir=/s\nscriptDir=/x\n\
             smtpHost=mx\nsmtpPort=587\nsmtpTLS=tls\nsmtpUser=u\nsmtpPassword=p\nmailFrom=f@x\nsendmailBinary=/sm\n\
             cronFile=/c\naffaBinary=/a\nmetricsFile=/m\nwatchdogDir=/w\nnrpeConfig=/n\nnrpeRestart=r\nsambaConfDir=/sc\nsmbConf=/smb\n\
             dailyKeep=3\n\
             [web]\nremoteHostName=web.lan\nremoteUser=bk\nsshPort=2222\nDescription=the web\nstatus=disabled\n\
             TimeSchedule=2230\nTimeSchedule=0105\nInclude=/etc\nInclude=*.conf\nExclude=/tmp\nRootDir=/srv\n\
             scheduledKeep=0\nweeklyKeep=-2\nmonthlyKeep=6\nyearlyKeep=1\nEmailAddress=a@x, b@x\nchattyOnSuccess=2\n\
             RetryAttempts=3\nRetryAfter=60\nRetryNotification=no\nNRPEtrigger=48\nDiskSpaceWarn=risky\nBandwidthLimit=100\n\
             rsyncTimeout=30\nrsyncCompress=no\nrsync--inplace=no\nrsync--modify-window=2\nrsyncOptions=--a --b\n\
             ConnectionCheckTimeout=7\nlocalNice=5\nremoteNice=-3\nlocalNiceBinary=/n1\nlocalRsyncBinary=/r1\nlocalSSHBinary=/s1\n\
             remoteNiceBinary=/n2\nremoteRsyncBinary=/r2\nRemoteAuthorizedKeysFile=k\npreJobCommand=a\npostJobCommand=b\n\
             preJobCommandRemote=c\npostJobCommandRemote=d\nscriptTimeout=9\nkillAt=0600\nresumeKilledAt=1900\nresumeAfterBoot=no\n\
             AutomountDevice=LABEL=usb\nAutomountPoint=/srv\nAutomountOptions=-t ext4\nAutoUnmount=no\nSambaShare=yes\n\
             SambaValidUser=u1,u2\nDebug=yes\nSMEServer=yes\nRPMCheck=yes\nWatchdog=no\n\
             chunkFiles=*.img\nchunkSize=4MiB\nchunkCompression=lz4\n\
             [vm]\nremoteHostName=esx\nESXi=yes\nESXiVMName=v1\nESXiUsername=api\nESXiPassword=pw\nESXiHost=vc\nESXiPort=8443\n\
             ESXiThumbprint={TP}\nESXiSnapshotQuiesce=yes\nESXiSnapshotMemory=yes\nESXiSnapshotMode=vim-cmd\nESXiVimCmd=/bin/vim-cmd\n\
             ESXiTaskTimeout=77\nESXiUserSnapshots=refuse\nESXiCBT=yes\nESXiCBTVerifyEvery=3\nrsyncdPort=874\n\
             [d]\nremoteHostName=win\nrsyncdMode=yes\nrsyncdModule=M\nrsyncdUser=\nrsyncdPassword=s\nrsyncdPort=874\n"
        ))
        .unwrap();
        let g = &c.settings;
        assert_eq!((g.status, g.send_status.as_str()), (Some(false), "daily"));
        assert_eq!((g.lock_dir.as_path(), g.log_dir.as_path()), (Path::new("/l"), Path::new("/g")));
        assert_eq!((g.ssh_dir.as_path(), g.script_dir.as_path()), (Path::new("/s"), Path::new("/x")));
        assert_eq!(
            g.smtp,
            Smtp { host: "mx".into(), port: 587, tls: "tls".into(), user: "u".into(), password: "p".into() }
        );
        assert_eq!((g.mail_from.as_str(), g.sendmail_bin.as_str()), ("f@x", "/sm"));
        assert_eq!((g.cron_file.as_path(), g.affa_binary.as_path()), (Path::new("/c"), Path::new("/a")));
        assert_eq!((g.metrics_file.as_path(), g.watchdog_dir.as_str()), (Path::new("/m"), "/w"));
        assert_eq!((g.nrpe_config.as_deref(), g.nrpe_restart.as_str()), (Some(Path::new("/n")), "r"));
        assert_eq!((g.samba_conf_dir.as_path(), g.smb_conf.as_path()), (Path::new("/sc"), Path::new("/smb")));

        let w = c.job("web").unwrap();
        assert_eq!((w.host.as_str(), w.local, w.description.as_str(), w.enabled), ("web.lan", false, "the web", false));
        assert_eq!(w.schedule, [(22, 30), (1, 5)]);
        assert_eq!((w.include_paths.clone(), w.sources.clone()), (vec!["/etc".to_string()], vec!["/etc".to_string()]));
        assert_eq!(
            (w.include_patterns.clone(), w.excludes.clone()),
            (vec!["*.conf".to_string()], vec!["/tmp".to_string()])
        );
        assert_eq!(w.root_dir, Path::new("/srv"));
        assert_eq!(w.keeps, Keeps([1, 3, 0, 6, 1]), "scheduledKeep=0 counts as 1, a negative keep as 0");
        assert_eq!(w.mail, Mail { to: vec!["a@x, b@x".into()], chatty_on_success: 2, retry_notification: false });
        assert_eq!(w.retry, Retry { attempts: 3, after: 60 });
        assert_eq!((w.nrpe_trigger, w.disk_space_warn.factor()), (Some(48), Some(0.1)));
        assert_eq!(
            w.ssh,
            Ssh {
                user: "bk".into(),
                port: 2222,
                ssh_bin: "/s1".into(),
                connect_timeout: 7,
                authorized_keys: "k".into()
            }
        );
        assert_eq!(
            w.rsync,
            Rsync {
                bwlimit: 100,
                timeout: 30,
                compress: false,
                inplace: false,
                modify_window: 2,
                options: "--a --b".into(),
                local_nice: 5,
                remote_nice: -3,
                local_nice_bin: "/n1".into(),
                local_rsync_bin: "/r1".into(),
                remote_nice_bin: "/n2".into(),
                remote_rsync_bin: "/r2".into(),
            }
        );
        assert_eq!(w.rsyncd, None);
        assert_eq!(
            w.scripts,
            Scripts {
                pre: vec!["a".into()],
                post: vec!["b".into()],
                pre_remote: vec!["c".into()],
                post_remote: vec!["d".into()],
                timeout: Duration::from_secs(9)
            }
        );
        assert_eq!((w.kill_at, w.resume_killed_at, w.resume_after_boot), (Some((6, 0)), Some((19, 0)), false));
        assert_eq!(
            w.automount,
            Some(Automount {
                device: "LABEL=usb".into(),
                point: "/srv".into(),
                options: vec!["-t".into(), "ext4".into()],
                unmount: false
            })
        );
        assert_eq!((w.samba_share, w.samba_users.clone()), (true, vec!["u1".to_string(), "u2".to_string()]));
        assert!(w.debug);
        assert_eq!(w.sme, Some(Sme { rpm_check: true, watchdog: false }));
        assert_eq!(w.esxi, None);
        assert_eq!(w.chunk.files, ["*.img"]);
        assert_eq!((w.chunk.settings.chunk_size, w.chunk.settings.compression), (4 << 20, Compression::Lz4));

        let v = c.job("vm").unwrap();
        assert_eq!(
            v.esxi,
            Some(Esxi {
                vm_name: "v1".into(),
                user: "api".into(),
                password: "pw".into(),
                password_file: None,
                host: "vc".into(),
                port: 8443,
                thumbprint: Some(TP.to_ascii_uppercase()),
                plain_http: false,
                quiesce: true,
                memory: true,
                vim_cmd: Some("/bin/vim-cmd".into()),
                task_timeout: Duration::from_secs(77),
                refuse_user_snapshots: true,
                cbt: Cbt::Yes,
                cbt_verify_every: 3,
            })
        );
        // The ESXi defaults that follow from ESXi=yes, and the job defaults from the global section.
        assert_eq!((v.rsync.remote_rsync_bin.as_str(), v.ssh.port), ("/bin/rsync", 22));
        assert_eq!(v.keeps, Keeps([1, 3, 4, 12, 2]));
        assert_eq!((v.rsyncd.clone(), v.sme, v.automount.clone()), (None, None, None));
        assert_eq!(v.chunk.settings, chunk::Settings::default(), "default chunkSize 1M, chunkCompression zstd:1");

        let d = c.job("d").unwrap();
        assert_eq!(d.rsyncd, Some(Rsyncd { module: "M".into(), user: String::new(), password: "s".into(), port: 874 }));
        let local = parse("[l]\nremoteHostName=localhost\n").unwrap();
        let l = local.job("l").unwrap();
        assert!(l.local);
        assert_eq!((l.sources.clone(), l.include_paths.clone()), (vec!["/".to_string()], vec![]));
        assert_eq!((local.settings.status, l.kill_at, l.nrpe_trigger), (None, None, Some(24)));
    }

    /// The offsite keys: none without offsiteTarget, the bucket and prefix split, the defaults.
    #[test]
    fn offsite_keys() {
        let c = parse("[a]\nremoteHostName=h\n[b]\nremoteHostName=h\noffsiteTarget=s3://my-bucket.1/box/one/\noffsiteEndpoint=http://127.0.0.1:8080\n").unwrap();
        assert_eq!(c.job("a").unwrap().offsite, None);
        let b = c.job("b").unwrap().offsite.clone().unwrap();
        assert_eq!(
            (b.bucket.as_str(), b.prefix.as_str(), b.endpoint.as_str()),
            ("my-bucket.1", "box/one", "http://127.0.0.1:8080")
        );
        assert_eq!((b.region.as_str(), b.key_file.as_path()), ("us-east-1", Path::new("/etc/affa/offsite.key")));
        assert_eq!(b.credentials_file, Path::new("/etc/affa/offsite.credentials"));
        assert_eq!((b.keeps, b.cleanup_grace_hours), (Keeps([1, 7, 4, 12, 2]), 24), "the offsite keeps' defaults");
        let k = parse("[k]\nremoteHostName=h\noffsiteTarget=s3://bkt\nscheduledKeep=5\noffsiteScheduledKeep=0\noffsiteDailyKeep=3\noffsiteWeeklyKeep=-1\noffsiteMonthlyKeep=0\noffsiteYearlyKeep=9\noffsiteCleanupGrace=0\n").unwrap();
        let k = k.job("k").unwrap();
        let o = k.offsite.clone().unwrap();
        assert_eq!(
            (o.keeps, o.cleanup_grace_hours),
            (Keeps([1, 3, 0, 0, 9]), 0),
            "own keeps, clamped as the local ones"
        );
        assert!(!b.after_run, "offsiteAfterRun=no by default");
        assert_eq!((b.parallel, b.bw_limit_kib), (1, 0));
        assert_eq!(k.keeps.of(Level::Scheduled), 5, "the local keeps are not the offsite ones");
        assert_eq!(keys::parse_s3_target("s3://bkt"), Some(("bkt".into(), String::new())));
        for bad in ["s3://b", "s3://-bucket", "http://bucket", "s3://bucket//x", "s3://bucket/./x", "s3://bucket/a b"] {
            assert_eq!(keys::parse_s3_target(bad), None, "{bad}");
        }
    }

    /// ESXiCBT and ESXiCBTVerifyEvery: defaults auto and 7, bad values named.
    #[test]
    fn cbt_keys() {
        let c = parse("[a]\nremoteHostName=h\nESXi=yes\nESXiVMName=v\nESXiUsername=u\nESXiPassword=p\n[b]\nremoteHostName=h\nESXi=yes\nESXiVMName=v\nESXiUsername=u\nESXiPassword=p\nESXiCBT=no\nESXiCBTVerifyEvery=0\n").unwrap();
        let a = c.job("a").unwrap().esxi.clone().unwrap();
        assert_eq!((a.cbt, a.cbt_verify_every), (Cbt::Auto, 7));
        let b = c.job("b").unwrap().esxi.clone().unwrap();
        assert_eq!((b.cbt, b.cbt_verify_every), (Cbt::No, 0));
        let e =
            parse("[a]\nremoteHostName=h\nESXi=yes\nESXiVMName=v\nESXiUsername=u\nESXiPassword=p\nESXiCBT=always\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("key 'ESXiCBT' has the value 'always', expected auto, yes or no"), "{e}");
        let e = parse(
            "[a]\nremoteHostName=h\nESXi=yes\nESXiVMName=v\nESXiUsername=u\nESXiPassword=p\nESXiCBTVerifyEvery=-1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ESXiCBTVerifyEvery"), "{e}");
    }

    /// chunkTransport, remoteAgentPath and agentBinary: typed once, with their defaults (the
    /// derived remote path: `transport::agent`'s tests).
    #[test]
    fn agent_keys_are_typed_with_their_defaults() {
        let c = parse(
            "[GlobalAffaConfig]\nagentBinary=/opt/affa-agent\n[a]\nremoteHostName=h\n\
             [b]\nremoteHostName=h\nchunkTransport=rsync\nremoteAgentPath=/srv/x/affa-agent\n\
             [c]\nremoteHostName=h\nchunkTransport=agent\n",
        )
        .unwrap();
        assert_eq!(c.settings.agent_binary, Path::new("/opt/affa-agent"));
        let a = c.job("a").unwrap();
        assert_eq!((a.chunk.transport, a.chunk.remote_agent_path.as_deref()), (ChunkTransport::Auto, None));
        let b = c.job("b").unwrap();
        assert_eq!(b.chunk.transport, ChunkTransport::Rsync);
        assert_eq!(b.chunk.remote_agent_path.as_deref(), Some("/srv/x/affa-agent"));
        assert_eq!(c.job("c").unwrap().chunk.transport, ChunkTransport::Agent);
        let d = parse("[a]\nremoteHostName=h\n").unwrap();
        assert_eq!(d.settings.agent_binary, Path::new("/usr/lib/affa/affa-agent"));
        let err = parse("[a]\nremoteHostName=h\nchunkTransport=ssh\n").unwrap_err().to_string();
        assert!(err.contains("key 'chunkTransport' has the value 'ssh', expected auto, agent or rsync"), "{err}");
    }

    /// One parser per setting: `chunkCompression` means the same when the configuration is
    /// checked and when the run compresses (the store's parser, also used for manifests), in
    /// any case; `zstd` is `zstd:3` as docs/FORMAT.md says.
    #[test]
    fn chunk_compression_and_size_have_one_meaning() {
        let job = |v: &str| {
            let c = parse(&format!("[j]\nremoteHostName=h\n{v}\n")).unwrap_or_else(|e| panic!("{v}: {e}"));
            c.job("j").unwrap().chunk.settings.clone()
        };
        for (v, want) in [
            ("ZSTD", Compression::Zstd(3)),
            ("zstd", Compression::Zstd(3)),
            ("Zstd:7", Compression::Zstd(7)),
            ("LZ4", Compression::Lz4),
            ("None", Compression::None),
        ] {
            let at_load = job(&format!("chunkCompression={v}")).compression;
            assert_eq!(at_load, want, "{v}");
            assert_eq!(chunk::parse_compression(v).unwrap(), at_load, "{v}: the run's parser");
        }
        for (v, want) in
            [("262144", 256 << 10), ("512K", 512 << 10), ("1m", 1 << 20), ("4MiB", 4 << 20), ("16M", 16 << 20)]
        {
            assert_eq!(job(&format!("chunkSize={v}")).chunk_size, want, "{v}");
            assert_eq!(chunk::parse_chunk_size(v).unwrap(), want, "{v}: the store's parser");
        }
    }

    /// A bad value of every kind of key: one line naming the file, line, key, value and what
    /// is expected; the job is broken, the others run.
    #[test]
    fn a_bad_value_of_each_kind_is_a_one_line_error() {
        for (line, expected) in [
            ("rsyncCompress=maybe", "yes or no"),
            ("sshPort=0", "a whole number from 1 to 65535"),
            ("localNice=20", "a whole number from -19 to 19"),
            ("dailyKeep=10001", "a whole number from 0 to 10000 (a negative one counts as 0, as in Affa 3)"),
            ("DiskSpaceWarn=lax", "strict, normal, risky or none"),
            ("TimeSchedule=2400", "a time HHMM (0000 to 2359)"),
            ("killAt=7", "a time HHMM (0000 to 2359) or nothing"),
            ("RootDir=srv", "an absolute path"),
            ("AutomountPoint=mnt", "an absolute path or nothing"),
            ("chunkFiles=[", "a glob pattern such as *-flat.vmdk"),
            ("chunkSize=3M", "a power of two from 256K to 16M, written like 262144, 512K, 1M or 4MiB"),
            ("chunkSize=4MB", "a power of two from 256K to 16M, written like 262144, 512K, 1M or 4MiB"),
            ("chunkCompression=zstd:20", "none, lz4, zstd (= zstd:3) or zstd:N with N from 1 to 19 (any case)"),
            ("chunkCompression=gzip", "none, lz4, zstd (= zstd:3) or zstd:N with N from 1 to 19 (any case)"),
            ("ESXiThumbprint=ab:cd", "a SHA-256 fingerprint: 32 hex bytes, colons optional"),
            ("offsiteTarget=s3://Bad_Bucket/x", keys::S3_TARGET_EXPECTED),
            ("offsiteTarget=s3://bucket/a/../b", keys::S3_TARGET_EXPECTED),
            (
                "offsiteEndpoint=ftp://h",
                "an http:// or https:// URL of a host, with an optional port and no path, or nothing",
            ),
        ] {
            let text = format!("[bad]\nremoteHostName=h\n{line}\n[good]\nremoteHostName=h\n");
            let c = Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), text)]).unwrap();
            let (key, value) = line.split_once('=').unwrap();
            assert_eq!(
                c.broken["bad"].errors,
                [format!("/etc/affa/t.conf:3: key '{key}' has the value '{value}', expected {expected}")],
                "{line}"
            );
            assert!(c.job("good").is_ok(), "{line}");
        }
    }

    /// A value the typed reading cannot use (the line check normally stops it first): an error
    /// of its job, and the key's default in its place, never a panic.
    #[test]
    fn a_value_that_does_not_parse_is_an_error_and_the_default() {
        let mut values: BTreeMap<&'static str, Vec<String>> =
            KEYS.iter().map(|d| (d.name, d.default.iter().map(|s| s.to_string()).collect())).collect();
        values.insert("sshPort", vec!["ssh".into()]);
        values.insert("chunkCompression", vec!["zstd:0".into()]);
        values.insert("TimeSchedule", vec!["2230".into(), "25:00".into()]);
        let origin = Origin { file: "/etc/affa/t.conf".into(), line: 4 };
        let mut r = Reader { values: &values, origin: &origin, job: "j", errors: Vec::new() };
        let s = Settings::read(&mut r, &[]);
        assert_eq!(
            (s.ssh.port, s.chunk.settings.compression, s.schedule.clone()),
            (22, Compression::Zstd(1), vec![(22, 30)])
        );
        assert_eq!(
            r.errors,
            [
                "/etc/affa/t.conf:4: key 'sshPort' of job [j] has the value 'ssh', expected a whole number from 1 to 65535",
                "/etc/affa/t.conf:4: key 'chunkCompression' of job [j] has the value 'zstd:0', expected none, lz4, zstd (= zstd:3) or zstd:N with N from 1 to 19 (any case)",
                "/etc/affa/t.conf:4: key 'TimeSchedule' of job [j] has the value '25:00', expected a time HHMM (0000 to 2359)",
            ]
        );
    }

    /// Every key's default parses by its kind (the fallback of a bad value), and reading a job
    /// with every optional group switched on reads each key of this file by a known name.
    #[test]
    fn every_default_parses_and_every_key_is_typed() {
        for d in KEYS {
            let defaults: Vec<&str> = if d.default.is_empty() { vec![""] } else { d.default.to_vec() };
            for v in defaults {
                if d.kind == keys::Kind::Glob || d.kind == keys::Kind::Hhmm {
                    assert!(d.multi, "{}: a multi-valued key (no value = none)", d.name);
                    continue;
                }
                assert!(keys::parse(d.kind, v).is_ok(), "default '{v}' of {}", d.name);
            }
        }
        let mut values: BTreeMap<&'static str, Vec<String>> =
            KEYS.iter().map(|d| (d.name, d.default.iter().map(|s| s.to_string()).collect())).collect();
        for k in ["ESXi", "rsyncdMode", "SMEServer", "SambaShare"] {
            values.insert(k, vec!["yes".into()]);
        }
        values.insert("AutomountDevice", vec!["/dev/sdb1".into()]);
        values.insert("AutomountPoint", vec!["/mnt".into()]);
        values.insert("ESXiSnapshotMode", vec!["vim-cmd".into()]);
        let origin = Origin { file: "/etc/affa/t.conf".into(), line: 1 };
        let mut r = Reader { values: &values, origin: &origin, job: "j", errors: Vec::new() };
        let s = Settings::read(&mut r, &[]);
        let g = Global::read(&mut r);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(s.esxi.is_some() && s.rsyncd.is_some() && s.sme.is_some() && s.automount.is_some());
        assert_eq!((g.status, g.smtp.port), (None, 25));
    }
}
