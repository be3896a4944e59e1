//! The table of every configuration key: name, default, kind of value, and a one-line meaning.
//!
//! Owns: what a key is allowed to hold. Must never: accept a value the run would misread
//! (`status=enbabled` is an error, not "disabled").

/// What values a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any text.
    Text,
    /// `yes` / `no` (also `1`/`0`, `true`/`false`).
    Bool,
    /// A whole number in `[min, max]`.
    Int(u64, u64),
    /// A whole number, possibly negative, in `[min, max]`.
    SInt(i64, i64),
    /// An archive count up to 10000; as in Affa 3, a smaller one than the floor (1 for
    /// scheduledKeep, 0 for the others) is accepted and counts as the floor.
    Keep(i64),
    /// One of the listed words.
    Enum(&'static [&'static str]),
    /// `HHMM`, 24-hour clock.
    Hhmm,
    /// `HHMM` or empty.
    OptHhmm,
    /// An absolute path.
    AbsPath,
    /// An absolute path or empty.
    OptAbsPath,
    /// A glob pattern (globset syntax).
    Glob,
    /// A chunk size: `262144`, `512K`, `1M`, `4MiB` (the store's one parser,
    /// [`crate::chunk::parse_chunk_size`]).
    Size,
    /// `none`, `lz4`, `zstd` (= `zstd:3`) or `zstd:N` (1..=19), any case (the store's one
    /// parser, [`crate::chunk::parse_compression`]).
    Compression,
    /// SHA-256 fingerprint: 32 bytes in hex, colons optional.
    Thumbprint,
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`, or empty ([`parse_s3_target`]).
    S3Target,
    /// An `http://` or `https://` URL of a host (no path), or empty.
    HttpUrl,
}

/// Where a key may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// In a job section or in `[GlobalAffaConfig]` (as a default for every job).
    Job,
    /// Only in `[GlobalAffaConfig]`.
    Global,
}

#[derive(Debug, Clone, Copy)]
pub struct KeyDef {
    pub name: &'static str,
    /// Default values (empty for none; several for multi-valued keys).
    pub default: &'static [&'static str],
    pub kind: Kind,
    pub multi: bool,
    pub scope: Scope,
    pub help: &'static str,
}

const fn k(name: &'static str, default: &'static [&'static str], kind: Kind, help: &'static str) -> KeyDef {
    KeyDef { name, default, kind, multi: false, scope: Scope::Job, help }
}
const fn m(name: &'static str, default: &'static [&'static str], kind: Kind, help: &'static str) -> KeyDef {
    KeyDef { name, default, kind, multi: true, scope: Scope::Job, help }
}
const fn g(name: &'static str, default: &'static [&'static str], kind: Kind, help: &'static str) -> KeyDef {
    KeyDef { name, default, kind, multi: false, scope: Scope::Global, help }
}

const U32: Kind = Kind::Int(0, u32::MAX as u64);
const YES: &[&str] = &["yes"];
const NO: &[&str] = &["no"];
const NONE: &[&str] = &[];

/// Every key, in the order `--show-default-config` prints them.
pub static KEYS: &[KeyDef] = &[
    k("remoteHostName", NONE, Kind::Text, "host name or IP of the source (required); localhost = local copy"),
    k("remoteUser", &["root"], Kind::Text, "ssh user on the source"),
    k("sshPort", &["22"], Kind::Int(1, 65535), "ssh port of the source"),
    k("Description", NONE, Kind::Text, "free text shown in lists"),
    k("status", &["enabled"], Kind::Enum(&["enabled", "disabled"]), "only enabled jobs run from cron"),
    m("TimeSchedule", &["2230"], Kind::Hhmm, "HHMM start time, one cron line each"),
    m("Include", NONE, Kind::Text, "source path (starts with /) or rsync include pattern; none = /"),
    m("Exclude", NONE, Kind::Text, "rsync exclude pattern (a leading / anchors it)"),
    k("RootDir", &["/var/affa"], Kind::AbsPath, "archive root; the job lives in RootDir/JOB"),
    k("scheduledKeep", &["1"], Kind::Keep(1), "scheduled archives kept"),
    k("dailyKeep", &["7"], Kind::Keep(0), "daily archives kept"),
    k("weeklyKeep", &["4"], Kind::Keep(0), "weekly archives kept"),
    k("monthlyKeep", &["12"], Kind::Keep(0), "monthly archives kept"),
    k("yearlyKeep", &["2"], Kind::Keep(0), "yearly archives kept"),
    m("EmailAddress", &["root"], Kind::Text, "mail recipients"),
    k("chattyOnSuccess", &["0"], U32, "number of success mails still to send"),
    k("RetryAttempts", &["4"], Kind::Int(0, 100), "re-runs of a failed scheduled run"),
    k("RetryAfter", &["600"], U32, "seconds between retries"),
    k("RetryNotification", YES, Kind::Bool, "mail on each failed attempt"),
    k(
        "NRPEtrigger",
        &["24"],
        Kind::SInt(-1_000_000, u32::MAX as i64),
        "hours without success before --nrpe says CRITICAL (0: no age check; negative: not monitored)",
    ),
    k(
        "DiskSpaceWarn",
        &["strict"],
        Kind::Enum(&["strict", "normal", "risky", "none"]),
        "warn when free space < last size x 1/0.5/0.1",
    ),
    k("BandwidthLimit", &["0"], U32, "KiB/s: rsync --bwlimit and the agent's session (0 = none)"),
    k("rsyncTimeout", &["900"], U32, "rsync --timeout seconds"),
    k("rsyncCompress", YES, Kind::Bool, "rsync --compress"),
    k("rsync--inplace", YES, Kind::Bool, "rsync --inplace"),
    k("rsync--modify-window", &["0"], U32, "rsync --modify-window if > 0"),
    k("rsyncOptions", NONE, Kind::Text, "extra rsync options, split on whitespace"),
    k(
        "ConnectionCheckTimeout",
        &["120"],
        Kind::Int(1, 3600),
        "ssh ConnectTimeout; the pre-check and other short remote commands end within twice this",
    ),
    k("localNice", &["0"], Kind::SInt(-19, 19), "nice level of the local rsync"),
    k("remoteNice", &["0"], Kind::SInt(-19, 19), "nice level of the remote rsync"),
    k("localNiceBinary", &["nice"], Kind::Text, "local nice binary"),
    k("localRsyncBinary", &["rsync"], Kind::Text, "local rsync binary"),
    k("localSSHBinary", &["ssh"], Kind::Text, "local ssh binary"),
    k("remoteNiceBinary", &["/bin/nice"], Kind::Text, "remote nice binary"),
    k("remoteRsyncBinary", &["/usr/bin/rsync"], Kind::Text, "remote rsync (ESXi jobs: /bin/rsync)"),
    k(
        "RemoteAuthorizedKeysFile",
        &[".ssh/authorized_keys2"],
        Kind::Text,
        "remote authorized keys file, relative to the user's home (ESXi jobs: /etc/ssh/keys-USER/authorized_keys)",
    ),
    m("preJobCommand", NONE, Kind::Text, "local script run before the transfer"),
    m("postJobCommand", NONE, Kind::Text, "local script run after the transfer"),
    m("preJobCommandRemote", NONE, Kind::Text, "script copied to the source and run there before"),
    m("postJobCommandRemote", NONE, Kind::Text, "script copied to the source and run there after"),
    k("scriptTimeout", &["7200"], Kind::Int(1, 604800), "seconds a pre/post-job script may run before it is stopped"),
    k("killAt", NONE, Kind::OptHhmm, "HHMM: cron kills a running job"),
    k("resumeKilledAt", NONE, Kind::OptHhmm, "HHMM: cron resumes a killed job"),
    k("resumeAfterBoot", YES, Kind::Bool, "--resume-interrupted restarts it after boot"),
    k(
        "AutomountDevice",
        NONE,
        Kind::Text,
        "device mounted at AutomountPoint for the run (a USB disk holding RootDir; also LABEL=... or UUID=...)",
    ),
    k("AutomountPoint", NONE, Kind::OptAbsPath, "where AutomountDevice is mounted (normally RootDir)"),
    k("AutomountOptions", NONE, Kind::Text, "mount options, e.g. -o noatime or -t ext4"),
    k("AutoUnmount", YES, Kind::Bool, "unmount after the run (when affa mounted it)"),
    k(
        "sharedRootDir",
        NO,
        Kind::Bool,
        "RootDir is shared by several affa servers (CephFS): a job runs on one server at a time (lock RootDir/.affa-locks/JOB)",
    ),
    k("SambaShare", NO, Kind::Bool, "read-only Samba share of RootDir/JOB"),
    m("SambaValidUser", &["affa"], Kind::Text, "users allowed on the share"),
    k("dedup", NO, Kind::Bool, "Affa 3: external whole-file dedup tool (ignored: chunkFiles deduplicates)"),
    k("dedupKill", NO, Kind::Bool, "kill the dedup tool when the next run starts"),
    k("rsyncdMode", NO, Kind::Bool, "pull from an rsync daemon on remoteHostName instead of ssh (e.g. a Windows host)"),
    k("rsyncdModule", &["AFFA"], Kind::Text, "rsync daemon module; Include paths are inside it"),
    k("rsyncdUser", &["affa"], Kind::Text, "rsync daemon user (empty: anonymous)"),
    k("rsyncdPassword", NONE, Kind::Text, "rsync daemon password (the file holding it should be mode 0600)"),
    k("rsyncdPort", &["873"], Kind::Int(1, 65535), "rsync daemon port"),
    k("Debug", NO, Kind::Bool, "verbose log"),
    k(
        "SMEServer",
        NO,
        Kind::Bool,
        "the host is an SME Server: its pre-backup/post-backup events around the transfer, its standard backup set added to the sources",
    ),
    k(
        "RPMCheck",
        NO,
        Kind::Bool,
        "with SMEServer=yes: the host's package list into the archive, compared with this server's (rpms-missing.txt, mailed once)",
    ),
    k(
        "Watchdog",
        NO,
        Kind::Bool,
        "with SMEServer=yes: a script on the host mails when no backup ran by the next scheduled time + 10 min",
    ),
    // ESXi hot backup
    k("ESXi", NO, Kind::Bool, "the source is a VMware ESXi VM (snapshot through the vSphere API)"),
    k("ESXiVMName", NONE, Kind::Text, "name of the VM in the host's inventory"),
    k("ESXiUsername", NONE, Kind::Text, "vSphere API user (a role allowed to create and delete snapshots)"),
    k("ESXiPassword", NONE, Kind::Text, "vSphere API password (the file holding it must be mode 0600)"),
    k("ESXiPasswordFile", NONE, Kind::OptAbsPath, "file holding the vSphere API password (mode 0600)"),
    k("ESXiHost", NONE, Kind::Text, "vSphere API host (default remoteHostName)"),
    k("ESXiPort", &["443"], Kind::Int(1, 65535), "vSphere API port"),
    k("ESXiThumbprint", NONE, Kind::Thumbprint, "SHA-256 fingerprint of the host's certificate (set by --send-key)"),
    k(
        "ESXiProtocol",
        &["https"],
        Kind::Enum(&["https", "http"]),
        "https pins ESXiThumbprint; http (test hosts) sends the password in clear: needs ESXiInsecureHttp=yes",
    ),
    k(
        "ESXiInsecureHttp",
        NO,
        Kind::Bool,
        "yes: allow ESXiProtocol=http, which sends the API password unencrypted (test hosts only)",
    ),
    k("ESXiSnapshotQuiesce", NO, Kind::Bool, "quiesce the guest file system for the snapshot"),
    k("ESXiSnapshotMemory", NO, Kind::Bool, "include the VM's memory in the snapshot"),
    k("ESXiSnapshotMode", &["api"], Kind::Enum(&["api", "vim-cmd"]), "api, or vim-cmd over ssh for free-licence hosts"),
    k("ESXiVimCmd", &["vim-cmd"], Kind::Text, "vim-cmd on the host (ESXiSnapshotMode=vim-cmd)"),
    k(
        "ESXiTaskTimeout",
        &["3600"],
        Kind::Int(1, 86400),
        "seconds to wait for a snapshot task (a vim-cmd call: this plus ConnectionCheckTimeout); a create past it is cancelled and waited for as long again, so that a snapshot it made is removed",
    ),
    k(
        "ESXiUserSnapshots",
        &["keep"],
        Kind::Enum(&["keep", "refuse"]),
        "a VM with snapshots of its own: keep = archive its whole snapshot chain (and warn), refuse = fail the run",
    ),
    k(
        "ESXiCBT",
        &["auto"],
        Kind::Enum(&["auto", "yes", "no"]),
        "Changed Block Tracking: read only the chunks changed since the last run (agent, API mode); auto = where the host allows it, yes = fail a run that cannot use it, no = never touch the VM's setting",
    ),
    k(
        "ESXiCBTVerifyEvery",
        &["7"],
        Kind::Int(0, 100000),
        "every N-th run of a CBT disk reads it all and compares it with what CBT gave (a difference fails the run); 0 = never",
    ),
    // chunk store
    m(
        "chunkFiles",
        NONE,
        Kind::Glob,
        "glob of files stored as compressed, deduplicated chunks (ESXi: *-flat.vmdk, *-delta.vmdk, *-sesparse.vmdk)",
    ),
    k("chunkSize", &["1M"], Kind::Size, "chunk size, a power of two from 256K to 16M (1M: see docs/FORMAT.md)"),
    k("chunkCompression", &["zstd:1"], Kind::Compression, "zstd:N (zstd = zstd:3), lz4 or none"),
    k(
        "chunkTransport",
        &["auto"],
        Kind::Enum(&["auto", "agent", "rsync"]),
        "how chunked files are read: agent = affa-agent on the source (no staging copy), rsync = into RootDir/JOB/.staging, auto = the agent, rsync where it cannot run",
    ),
    k(
        "agentDedupScope",
        &["job"],
        Kind::Enum(&["job", "pool"]),
        "which chunks affa-agent need not send: job = those of this job's own archives (its host learns nothing of other jobs' data), pool = any in RootDir's pool (less traffic for VMs cloned across jobs; each such host can then test whether the pool holds a given chunk)",
    ),
    k(
        "remoteAgentPath",
        NONE,
        Kind::Text,
        "where affa installs affa-agent on the source (empty: ESXi jobs the VM's datastore/.affa/affa-agent, others .affa/affa-agent in the remote user's home)",
    ),
    // offsite copies to S3 (issue 19; docs/FORMAT.md "Offsite bucket layout")
    k(
        "offsiteTarget",
        NONE,
        Kind::S3Target,
        "s3://BUCKET/PREFIX that affa --offsite copies archives to (empty: no offsite copies)",
    ),
    k(
        "offsiteEndpoint",
        NONE,
        Kind::HttpUrl,
        "the S3 service, e.g. https://rgw.example.org:8080 (empty: AWS, https://s3.REGION.amazonaws.com)",
    ),
    k("offsiteRegion", &["us-east-1"], Kind::Text, "the S3 region requests are signed for"),
    k(
        "offsiteCredentialsFile",
        &["/etc/affa/offsite.credentials"],
        Kind::AbsPath,
        "file (mode 0600) with the lines accessKey=... and secretKey=... of the S3 user",
    ),
    k(
        "offsiteKeyFile",
        &["/etc/affa/offsite.key"],
        Kind::AbsPath,
        "the offsite encryption key (mode 0600; made and printed once by the first --offsite: keep a copy elsewhere)",
    ),
    k(
        "offsiteScheduledKeep",
        &["1"],
        Kind::Keep(1),
        "offsite archives kept after each --offsite: the newest N (an index removed stops being listed; its chunks go with --offsite-cleanup)",
    ),
    k("offsiteDailyKeep", &["7"], Kind::Keep(0), "offsite archives kept: the newest of each of the newest N days that have one"),
    k("offsiteWeeklyKeep", &["4"], Kind::Keep(0), "offsite archives kept: the newest of each of the newest N weeks that have one"),
    k("offsiteMonthlyKeep", &["12"], Kind::Keep(0), "offsite archives kept: the newest of each of the newest N months that have one"),
    k("offsiteYearlyKeep", &["2"], Kind::Keep(0), "offsite archives kept: the newest of each of the newest N years that have one"),
    k(
        "offsiteParallel",
        &["1"],
        Kind::Int(1, 64),
        "objects an --offsite upload sends at the same time (more hide the bucket's latency)",
    ),
    k(
        "offsiteBwLimit",
        &["0"],
        U32,
        "KiB/s an --offsite upload sends at most, averaged over the upload (0 = no limit)",
    ),
    m(
        "offsiteSchedule",
        NONE,
        Kind::Hhmm,
        "HHMM: a cron line each that runs affa --offsite JOB (the newest archive, then the offsite keeps)",
    ),
    k(
        "offsiteAfterRun",
        NO,
        Kind::Bool,
        "yes: a successful --run copies its archive offsite (made by a first --offsite by hand); a failed copy is a warning, the archive stays",
    ),
    k(
        "offsiteTimeout",
        &["60"],
        Kind::Int(1, 86400),
        "seconds each request to the bucket may take, plus 1 s per 256 KiB it sends or receives; a request past it is cut and retried as a failed one",
    ),
    k(
        "offsiteCleanupGrace",
        &["24"],
        Kind::Int(0, 100_000),
        "hours: --offsite-cleanup removes an object no offsite archive references only when it is older (the bucket's clock)",
    ),
    // global only
    g(
        "globalStatus",
        &["jobs"],
        Kind::Enum(&["enabled", "disabled", "jobs"]),
        "enabled/disabled for all jobs, or jobs = per-job status",
    ),
    g("sendStatus", &["weekly"], Kind::Enum(&["daily", "weekly", "monthly", "never"]), "status mail interval"),
    g("lockDir", &["/var/lock/affa"], Kind::AbsPath, "where run locks live"),
    g("logDir", &["/var/log/affa"], Kind::AbsPath, "where logs live"),
    g("sshDir", &["/root/.ssh"], Kind::AbsPath, "where affa's ssh key and per-job known-hosts files live"),
    g("scriptDir", &["/etc/affa/scripts"], Kind::AbsPath, "where pre/post job scripts live"),
    g(
        "agentBinary",
        &["/usr/lib/affa/affa-agent"],
        Kind::AbsPath,
        "the static affa-agent affa installs on sources (when the default is missing: affa-agent next to the affa executable)",
    ),
    // mail, scheduling, monitoring (global)
    g("smtpHost", NONE, Kind::Text, "SMTP server for mail; empty = the local sendmail"),
    g("smtpPort", &["25"], Kind::Int(1, 65535), "SMTP port"),
    g(
        "smtpTLS",
        &["starttls"],
        Kind::Enum(&["none", "starttls", "tls"]),
        "SMTP encryption: starttls (when offered), tls, or none",
    ),
    g("smtpUser", NONE, Kind::Text, "SMTP login user (empty = no login)"),
    g("smtpPassword", NONE, Kind::Text, "SMTP login password (the file holding it must be mode 0600)"),
    g("mailFrom", NONE, Kind::Text, "sender address (default affa@HOSTNAME)"),
    g("sendmailBinary", &["/usr/sbin/sendmail"], Kind::Text, "local sendmail, used when smtpHost is empty"),
    g(
        "mailTimeout",
        &["60"],
        Kind::Int(1, 86400),
        "seconds a mail may take to be handed over (the SMTP session, or sendmailBinary), plus 1 s per 256 KiB of the mail; past it the session is closed (sendmail killed) and the mail not sent",
    ),
    g("cronFile", &["/etc/cron.d/affa"], Kind::AbsPath, "cron file written by --make-cronjobs"),
    g(
        "scrubDays",
        &["16"],
        Kind::Int(0, 3650),
        "the daily affa --scrub reads back 1/N of every chunk pool, so each stored chunk is checked once in N days (0: no scrub in the cron file)",
    ),
    g("scrubTime", &["1200"], Kind::OptHhmm, "HHMM: when cron runs the daily affa --scrub (empty: no scrub in the cron file)"),
    g("affaBinary", &["/usr/sbin/affa"], Kind::AbsPath, "the affa path used in cron lines"),
    g(
        "metricsFile",
        &["/var/lib/prometheus/node-exporter/affa.prom"],
        Kind::AbsPath,
        "Prometheus textfile written by --metrics",
    ),
    g(
        "watchdogDir",
        &["/etc/cron.hourly"],
        Kind::AbsPath,
        "directory on the hosts where Watchdog=yes installs the watchdog (run hourly by cron)",
    ),
    g(
        "nrpeConfig",
        NONE,
        Kind::OptAbsPath,
        "nrpe.cfg that --init-nrpe extends (empty: /etc/nagios/nrpe.cfg, else /etc/icinga/nrpe.cfg)",
    ),
    g(
        "nrpeRestart",
        &["systemctl try-restart nagios-nrpe-server.service"],
        Kind::Text,
        "command that restarts NRPE after --init-nrpe changed its files (empty: none)",
    ),
    g("sambaConfDir", &["/etc/samba/affa"], Kind::AbsPath, "where the Samba share include files are written"),
    g("smbConf", &["/etc/samba/smb.conf"], Kind::AbsPath, "the smb.conf that includes them"),
];

pub fn lookup(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|d| d.name == name).or_else(|| KEYS.iter().find(|d| d.name.eq_ignore_ascii_case(name)))
}

/// The valid key closest to a misspelt one (case-insensitive edit distance), if any is close.
pub fn closest(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    KEYS.iter()
        .map(|d| (edit_distance(&lower, &d.name.to_ascii_lowercase()), d.name))
        .filter(|(d, n)| *d <= 3.max(n.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value parsed by its kind's one parser ([`parse`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// Text, Glob (checked), AbsPath and OptAbsPath.
    Text(&'a str),
    Bool(bool),
    /// Int, SInt and Keep.
    Int(i64),
    /// One of an Enum's words.
    Word(&'a str),
    /// Hhmm (always Some) and OptHhmm (None when empty).
    Time(Option<(u32, u32)>),
    /// A chunk size in bytes.
    Size(u32),
    Compression(crate::chunk::Compression),
    /// Normalized; None when empty (not pinned yet).
    Thumbprint(Option<String>),
}

/// Parse one value by its kind: the one parser of every key, used by the line check when the
/// configuration is read and by the typed settings ([`super::typed`]). `Err` holds "what is
/// expected".
pub fn parse(kind: Kind, v: &str) -> Result<Value<'_>, String> {
    // `chunkFiles=*-flat.vmdk   # base disks` is a valid glob that matches nothing (the disks
    // silently not chunked), a path with it a file that does not exist: an ini comment is a line
    // of its own, so a value that looks commented is refused where it cannot be meant.
    let commented = v.contains(" #") || v.contains("\t#");
    if commented && matches!(kind, Kind::Glob | Kind::AbsPath | Kind::OptAbsPath) {
        return Err(format!(
            "{} without a comment after it (a # comment is a line of its own in an affa file)",
            expected(kind)
        ));
    }
    let value = match kind {
        Kind::Text => Some(Value::Text(v)),
        Kind::Bool => parse_bool(v).map(Value::Bool),
        Kind::Int(lo, hi) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n >= lo && *n <= hi && v.bytes().all(|b| b.is_ascii_digit()))
            .map(|n| Value::Int(n as i64)),
        Kind::SInt(lo, hi) => parse_int(v).filter(|n| *n >= lo && *n <= hi).map(Value::Int),
        Kind::Keep(_) => parse_int(v).filter(|n| *n <= 10000).map(Value::Int),
        Kind::Enum(words) => words.iter().find(|w| **w == v).map(|w| Value::Word(w)),
        Kind::Hhmm => parse_hhmm(v).map(|t| Value::Time(Some(t))),
        Kind::OptHhmm if v.is_empty() => Some(Value::Time(None)),
        Kind::OptHhmm => parse_hhmm(v).map(|t| Value::Time(Some(t))),
        Kind::AbsPath => v.starts_with('/').then_some(Value::Text(v)),
        Kind::OptAbsPath => (v.is_empty() || v.starts_with('/')).then_some(Value::Text(v)),
        Kind::Glob => (globset::Glob::new(v).is_ok() && !v.is_empty()).then_some(Value::Text(v)),
        Kind::Size => crate::chunk::parse_chunk_size(v).ok().map(Value::Size),
        Kind::Compression => crate::chunk::parse_compression(v).ok().map(Value::Compression),
        Kind::Thumbprint if v.is_empty() => Some(Value::Thumbprint(None)),
        Kind::Thumbprint => normalize_thumbprint(v).map(|t| Value::Thumbprint(Some(t))),
        Kind::S3Target => (v.is_empty() || parse_s3_target(v).is_some()).then_some(Value::Text(v)),
        Kind::HttpUrl => (v.is_empty() || valid_http_url(v)).then_some(Value::Text(v)),
    };
    value.ok_or_else(|| expected(kind))
}

/// Check one value against its kind; `Err` holds "what is expected".
pub fn check(kind: Kind, v: &str) -> Result<(), String> {
    parse(kind, v).map(|_| ())
}

pub fn expected(kind: Kind) -> String {
    match kind {
        Kind::Text => "text".into(),
        Kind::Bool => "yes or no".into(),
        Kind::Int(lo, hi) if hi == u32::MAX as u64 => format!("a whole number >= {lo}"),
        Kind::Int(lo, hi) => format!("a whole number from {lo} to {hi}"),
        Kind::SInt(_, hi) if hi == u32::MAX as i64 => "a whole number (negative allowed)".into(),
        Kind::SInt(lo, hi) => format!("a whole number from {lo} to {hi}"),
        Kind::Keep(0) => "a whole number from 0 to 10000 (a negative one counts as 0, as in Affa 3)".into(),
        Kind::Keep(f) => format!("a whole number from {f} to 10000 (a smaller one counts as {f}, as in Affa 3)"),
        Kind::Enum(words) => {
            let (last, rest) = words.split_last().unwrap();
            format!("{} or {last}", rest.join(", "))
        }
        Kind::Hhmm => "a time HHMM (0000 to 2359)".into(),
        Kind::OptHhmm => "a time HHMM (0000 to 2359) or nothing".into(),
        Kind::AbsPath => "an absolute path".into(),
        Kind::OptAbsPath => "an absolute path or nothing".into(),
        Kind::Glob => "a glob pattern such as *-flat.vmdk".into(),
        Kind::Size => "a power of two from 256K to 16M, written like 262144, 512K, 1M or 4MiB".into(),
        Kind::Compression => "none, lz4, zstd (= zstd:3) or zstd:N with N from 1 to 19 (any case)".into(),
        Kind::Thumbprint => "a SHA-256 fingerprint: 32 hex bytes, colons optional".into(),
        Kind::S3Target => S3_TARGET_EXPECTED.into(),
        Kind::HttpUrl => "an http:// or https:// URL of a host, with an optional port and no path, or nothing".into(),
    }
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "1" | "true" | "on" => Some(true),
        "no" | "0" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// A whole number with an optional sign (`-5`, `+5`, `12`); nothing else.
pub fn parse_int(v: &str) -> Option<i64> {
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// `HHMM` -> (hour, minute).
pub fn parse_hhmm(v: &str) -> Option<(u32, u32)> {
    if v.len() != 4 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: u32 = v[..2].parse().ok()?;
    let m: u32 = v[2..].parse().ok()?;
    (h < 24 && m < 60).then_some((h, m))
}

/// Upper-case, colon-separated SHA-256 fingerprint, or None if not 32 hex bytes.
pub fn normalize_thumbprint(v: &str) -> Option<String> {
    let hex: String = v.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let up = hex.to_ascii_uppercase();
    Some(up.as_bytes().chunks(2).map(|p| std::str::from_utf8(p).unwrap()).collect::<Vec<_>>().join(":"))
}

/// What offsiteTarget takes.
pub const S3_TARGET_EXPECTED: &str = "s3://BUCKET or s3://BUCKET/PREFIX (bucket: 3 to 63 of a-z 0-9 . -; prefix: A-Z a-z 0-9 . _ - / without empty, . or .. parts) or nothing";

/// `s3://BUCKET[/PREFIX]` -> (bucket, prefix without leading or trailing `/`). The bucket follows
/// S3's naming rules; the prefix is made of safe characters only (it becomes part of every object
/// name), without empty, `.` or `..` parts.
pub fn parse_s3_target(v: &str) -> Option<(String, String)> {
    let rest = v.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let b = bucket.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !(3..=63).contains(&b.len())
        || !alnum(b[0])
        || !alnum(b[b.len() - 1])
        || !b.iter().all(|&c| alnum(c) || c == b'.' || c == b'-')
    {
        return None;
    }
    let prefix = prefix.trim_end_matches('/');
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    };
    if !prefix.is_empty() && (prefix.len() > 512 || !prefix.split('/').all(part_ok)) {
        return None;
    }
    Some((bucket.to_string(), prefix.to_string()))
}

/// `http://HOST[:PORT]` or `https://...`, with at most a trailing `/` after the host.
pub fn valid_http_url(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://")) else { return false };
    let host = rest.strip_suffix('/').unwrap_or(rest);
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'))
}
