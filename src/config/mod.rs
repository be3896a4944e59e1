//! Job configuration: every `*.conf` under the configuration directory (subdirectories too, as
//! Affa 3), Affa 3's INI format.
//!
//! Owns: reading, merging (built-in default < `[GlobalAffaConfig]` < the job's section) and
//! validating keys into typed [`Job`]s. Must never: guess at a value it does not understand (a
//! bad value is a one-line error naming file, line, key and what is expected), or let a job
//! name escape RootDir.

pub mod edit;
pub mod keys;
pub mod typed;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, IoContext, Result};
use keys::{Scope, KEYS};

pub const GLOBAL_SECTION: &str = "GlobalAffaConfig";
pub const CONFIG_DIR_ENV: &str = "AFFA_CONFIG_DIR";
pub const DEFAULT_CONFIG_DIR: &str = "/etc/affa";

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One section as written: canonical key -> values with their origins.
#[derive(Debug, Clone, Default)]
struct Section {
    origin: Option<Origin>,
    values: BTreeMap<&'static str, Vec<(String, Origin)>>,
}

/// The merged, validated settings of one job: typed ([`typed::Settings`], reached through
/// `Deref`: `job.ssh.port`, `job.chunk.settings`...), and the raw key -> values map that only
/// the configuration's own views read by key (`--show-property`, `.JOB-setup.ini`, edits).
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    /// The file and line of the job's section header.
    pub origin: Origin,
    /// Every setting, parsed once when the configuration is read.
    pub settings: typed::Settings,
    values: BTreeMap<&'static str, Vec<String>>,
    /// The file that holds ESXiPassword, if any (it must not be readable by others).
    pub password_file_origin: Option<PathBuf>,
}

/// Every job, plus the global settings.
///
/// A configuration error belongs to the job whose section holds it: that job is kept out of
/// `jobs` (in `broken`, with its errors) and every other job runs. Only an error in
/// `[GlobalAffaConfig]` makes the whole configuration unusable ([`Config::parse`] fails).
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub jobs: BTreeMap<String, Job>,
    /// Settings of `[GlobalAffaConfig]` merged over the defaults, as a job (its job keys are
    /// the defaults of every job).
    pub global: Job,
    /// `[GlobalAffaConfig]`'s own keys, typed.
    pub settings: typed::Global,
    /// Jobs whose sections have errors: they do not run, each one fails alone.
    pub broken: BTreeMap<String, BrokenJob>,
    /// Every configuration error, one line each, in file and line order (`--configcheck`),
    /// including those that belong to no job (a bad section name, a key before any section).
    pub problems: Vec<String>,
}

/// A job whose section has errors.
#[derive(Debug, Clone)]
pub struct BrokenJob {
    pub name: String,
    pub origin: Origin,
    /// Its errors, one line each.
    pub errors: Vec<String>,
    /// What could be read of it (the values that were valid, over the global ones and the
    /// defaults): where to log, where to mail, when cron starts it. Never run.
    pub partial: Job,
}

impl BrokenJob {
    /// The error a command on this job fails with: the first error, and how many more.
    pub fn error(&self) -> Error {
        let more = match self.errors.len() {
            0 | 1 => String::new(),
            n => format!(" ({} more: affa --configcheck)", n - 1),
        };
        Error::config(format!("{}{more}", self.errors.first().map(String::as_str).unwrap_or("configuration error")))
    }
}

/// What [`Config::select`] found.
#[derive(Debug, Default)]
pub struct Selected<'a> {
    /// The jobs that can run, in name order (or as named).
    pub jobs: Vec<&'a Job>,
    /// Each job that cannot: its name, what could be read of it (a broken job), its error.
    pub errors: Vec<(String, Option<&'a Job>, Error)>,
}

/// Where the lines being read belong.
enum Target {
    /// Before any section header of the file.
    Nothing,
    /// A section that is not a job (its header is in error): its lines are skipped.
    Invalid,
    Section(String),
}

/// The configuration directory: `--config-dir`, else `AFFA_CONFIG_DIR`, else `/etc/affa`.
pub fn config_dir(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_DIR_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

/// A job name Affa accepts, and that is safe as a directory name; never the global section's
/// name, in any case (a job renamed so would become a second `[GlobalAffaConfig]`, or one that
/// looks like it: every job would stop).
pub fn valid_job_name(name: &str) -> bool {
    !name.eq_ignore_ascii_case(GLOBAL_SECTION)
        && !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// What a byte sequence that is not UTF-8 becomes in a configuration text.
const NOT_UTF8: char = char::REPLACEMENT_CHARACTER;

/// A configuration file's text: bytes that are not UTF-8 are read as [`NOT_UTF8`] (an error
/// only where the line is not a comment).
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every `*.conf` file under `dir`, subdirectories included (as Affa 3's `find /etc/affa/
/// -type f -name "*.conf"`), sorted by path. Symbolic links to directories are not followed.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let root = rustix::process::geteuid().is_root();
    // As root: the directory resolved once, every directory above it checked (nobody else can
    // swap a component, a symlink of theirs included, between the checks and the reads).
    let start = if root {
        let real = fs::canonicalize(dir)
            .map_err(|e| Error::io(format!("cannot read configuration directory {}: {e}", dir.display()), e))?;
        trusted_ancestors(&real)?;
        real
    } else {
        dir.to_path_buf()
    };
    let mut stack = vec![start];
    while let Some(d) = stack.pop() {
        if root {
            trusted_by_root(&d, "configuration directory")?;
        }
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => return Err(Error::io(format!("cannot read configuration directory {}: {e}", d.display()), e)),
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "conf") && p.is_file() {
                if root {
                    trusted_by_root(&p, "configuration file")?;
                    if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                        // What the link names, and every directory above it.
                        let real = fs::canonicalize(&p).map_err(|e| {
                            Error::io(format!("cannot read configuration file {}: {e}", p.display()), e)
                        })?;
                        trusted_ancestors(&real)?;
                    }
                }
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every directory above `real` (a resolved path) is root's, and writable by nobody else unless
/// sticky (as /tmp: there only an entry's owner can move it).
fn trusted_ancestors(real: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for a in real.ancestors().skip(1) {
        let m = fs::metadata(a).map_err(|e| Error::io(format!("cannot read directory {}: {e}", a.display()), e))?;
        if m.uid() != 0 || (m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0) {
            return Err(Error::config(format!(
                "{} (above the configuration {}) is {}: affa runs as root and reads only a configuration no other user could have written or moved; expected every directory above it owned by root and not writable by group or others",
                a.display(),
                real.display(),
                owner_and_mode(&m)
            )));
        }
    }
    Ok(())
}

/// affa as root reads a configuration only another root could have written: the directory
/// (each one below it too) and every `*.conf` (a symbolic link: what it points to) owned by
/// root and not writable by group or others. A configuration directory of another user (a
/// `sudo affa --nrpe --config-dir DIR` allowed to nagios by a wildcard in sudoers) would make
/// root open, read and write where that user chose (lockDir=/dev opens devices).
fn trusted_by_root(p: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).map_err(|e| Error::io(format!("cannot read {what} {}: {e}", p.display()), e))?;
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(Error::config(format!(
            "{what} {} is {}: affa runs as root and reads only a configuration no other user could have written; expected it owned by root and not writable by group or others (chown root {}; chmod go-w {})",
            p.display(),
            owner_and_mode(&m),
            p.display(),
            p.display()
        )));
    }
    Ok(())
}

/// "root's with mode 0755", "owned by uid 65534 with mode 0700", for the two checks above.
fn owner_and_mode(m: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let who = if m.uid() == 0 { "root's".to_string() } else { format!("owned by uid {}", m.uid()) };
    format!("{who} with mode {:04o}", m.mode() & 0o7777)
}

impl Config {
    /// Read every `*.conf` under `dir` (sorted by path) and validate all jobs. A file that
    /// cannot be read fails the whole configuration: it may hold `[GlobalAffaConfig]`, and
    /// jobs run on the built-in defaults instead (another RootDir, other keep counts) would
    /// be worse than no run. Bytes that are not UTF-8 (a Latin-1 comment) do not make a file
    /// unreadable: each line is read on its own, and only a key, value or header line holding
    /// such bytes is an error (of its section).
    pub fn load(dir: &Path) -> Result<Config> {
        let mut texts = Vec::new();
        for f in config_files(dir)? {
            match fs::read(&f) {
                Ok(bytes) => texts.push((f, text_of(&bytes))),
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "cannot read configuration file {}: {e}; it may hold [{GLOBAL_SECTION}], so no job runs until it can be read",
                            f.display()
                        ),
                        e,
                    ))
                }
            }
        }
        Self::parse(dir, &texts)
    }

    /// The configuration only if it has no error at all (the first one otherwise).
    pub fn strict(self) -> Result<Config> {
        match self.problems.first() {
            Some(p) => Err(Error::config(p.clone())),
            None => Ok(self),
        }
    }

    /// Parse configuration texts (file name, content) as one INI document. Errors in a job's
    /// section make that job broken; errors in `[GlobalAffaConfig]` fail the whole parse.
    pub fn parse(dir: &Path, texts: &[(PathBuf, String)]) -> Result<Config> {
        let mut sections: BTreeMap<String, Section> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (file, text) in texts {
            let mut current = Target::Nothing;
            for (i, raw) in text.lines().enumerate() {
                let origin = Origin { file: file.clone(), line: i + 1 };
                // A byte order mark (an editor's UTF-8 signature) is not part of the first line.
                let raw = if i == 0 { raw.strip_prefix('\u{feff}').unwrap_or(raw) } else { raw };
                let line = raw.trim();
                if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                    continue;
                }
                let mut error = |target: &Target, msg: String| {
                    if let Target::Section(name) = target {
                        if name == GLOBAL_SECTION {
                            return Err(Error::config(msg));
                        }
                        errors.entry(name.clone()).or_default().push(msg.clone());
                    }
                    problems.push(msg);
                    Ok(())
                };
                if line.contains(NOT_UTF8) {
                    // Which section a broken header was is unknown: it may have been the global one.
                    if line.starts_with('[') {
                        return Err(Error::config(format!("{origin}: section header '{line}' holds bytes that are not UTF-8 (shown as {NOT_UTF8}); expected [JOBNAME] in UTF-8")));
                    }
                    // Only the key is shown: the value may be a password.
                    let msg = match line.split_once('=') {
                        Some((k, _)) => format!("{origin}: the value of key '{}' holds bytes that are not UTF-8; expected UTF-8 text", k.trim()),
                        None => format!("{origin}: line '{line}' holds bytes that are not UTF-8 (shown as {NOT_UTF8}); expected UTF-8 text"),
                    };
                    error(&current, msg)?;
                    continue;
                }
                if let Some(rest) = line.strip_prefix('[') {
                    // A header that looks like the global section but is not exactly it would
                    // leave every job on the built-in defaults: never only a job's problem.
                    let bare = rest.trim_end_matches(']').trim();
                    if bare.eq_ignore_ascii_case(GLOBAL_SECTION)
                        && rest.strip_suffix(']').map(str::trim) != Some(GLOBAL_SECTION)
                    {
                        return Err(Error::config(format!(
                            "{origin}: section header '{line}' looks like [{GLOBAL_SECTION}] but is not it (the name is case-sensitive, in one pair of brackets); expected [{GLOBAL_SECTION}]"
                        )));
                    }
                    let Some(name) = rest.strip_suffix(']') else {
                        current = Target::Invalid;
                        error(
                            &current,
                            format!("{origin}: section header '{line}' has no closing ']'; expected [JOBNAME]"),
                        )?;
                        continue;
                    };
                    let name = name.trim();
                    if name != GLOBAL_SECTION && !valid_job_name(name) {
                        current = Target::Invalid;
                        error(&current, format!("{origin}: job name '{name}' is not valid; expected letters, digits, '_', '.' and '-' only (not starting with '.' or '-', at most 64)"))?;
                        continue;
                    }
                    current = Target::Section(name.to_string());
                    if let Some(prev) = sections.get(name) {
                        let p = prev.origin.as_ref().unwrap();
                        let expected = if name == GLOBAL_SECTION {
                            format!("expected it once: move these settings into the [{GLOBAL_SECTION}] at {p}")
                        } else {
                            "expected each job once".to_string()
                        };
                        error(
                            &current,
                            format!("{origin}: section [{name}] is defined twice (first at {p}); {expected}"),
                        )?;
                        continue;
                    }
                    sections.insert(name.to_string(), Section { origin: Some(origin), values: BTreeMap::new() });
                    order.push(name.to_string());
                    continue;
                }
                let Some((key, value)) = line.split_once('=') else {
                    error(
                        &current,
                        format!(
                            "{origin}: line '{line}' is not understood; expected key=value, [JOBNAME] or a # comment"
                        ),
                    )?;
                    continue;
                };
                let (key, value) = (key.trim(), value.trim());
                let sec = match &current {
                    Target::Section(s) => s.clone(),
                    Target::Invalid => continue,
                    Target::Nothing => {
                        error(&current, format!("{origin}: key '{key}' comes before any [section]; expected [JOBNAME] or [{GLOBAL_SECTION}] first"))?;
                        continue;
                    }
                };
                let Some(def) = keys::lookup(key) else {
                    let hint = match keys::closest(key) {
                        Some(c) => format!(" (did you mean '{c}'?)"),
                        None => String::new(),
                    };
                    error(&current, format!("{origin}: unknown key '{key}' in [{sec}]{hint}; see affa --show-default-config for the valid keys"))?;
                    continue;
                };
                if def.scope == Scope::Global && sec != GLOBAL_SECTION {
                    error(
                        &current,
                        format!("{origin}: key '{}' belongs in [{GLOBAL_SECTION}], not in job [{sec}]", def.name),
                    )?;
                    continue;
                }
                if let Err(exp) = keys::check(def.kind, value) {
                    error(&current, format!("{origin}: key '{}' has the value '{value}', expected {exp}", def.name))?;
                    continue;
                }
                let s = sections.get_mut(&sec).unwrap();
                let slot = s.values.entry(def.name).or_default();
                if !def.multi && !slot.is_empty() {
                    let first = &slot[0].1;
                    let msg = format!(
                        "{origin}: key '{}' is given a second time in [{sec}] (first at {first}); it takes one value",
                        def.name
                    );
                    error(&current, msg)?;
                    continue;
                }
                slot.push((value.to_string(), origin));
            }
        }

        let global_sec = sections.remove(GLOBAL_SECTION).unwrap_or_default();
        let global_origin = global_sec.origin.clone().unwrap_or(Origin { file: dir.join("(defaults)"), line: 0 });
        let (global, errs) = merge(GLOBAL_SECTION, global_origin, &Section::default(), &global_sec, true);
        if let Some(e) = errs.into_iter().next() {
            return Err(Error::of(ErrorKind::Config, e));
        }
        let mut reader =
            typed::Reader { values: &global.values, origin: &global.origin, job: GLOBAL_SECTION, errors: Vec::new() };
        let settings = typed::Global::read(&mut reader);
        if let Some(e) = reader.errors.into_iter().next() {
            return Err(Error::of(ErrorKind::Config, e));
        }
        let mut jobs = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for name in order.iter().filter(|n| *n != GLOBAL_SECTION) {
            let sec = &sections[name];
            let origin = sec.origin.clone().unwrap();
            let (job, typed_errs) = merge(name, origin.clone(), &global_sec, sec, false);
            let mut errs = errors.remove(name).unwrap_or_default();
            problems.extend(typed_errs.iter().cloned());
            errs.extend(typed_errs);
            if let Err(e) = job.validate() {
                problems.push(e.to_string());
                errs.push(e.to_string());
            }
            if errs.is_empty() {
                jobs.insert(name.clone(), job);
            } else {
                broken.insert(name.clone(), BrokenJob { name: name.clone(), origin, errors: errs, partial: job });
            }
        }
        Ok(Config { dir: dir.to_path_buf(), jobs, global, settings, broken, problems })
    }

    /// The jobs named on the command line, or all of them, for a command that goes through
    /// jobs one by one: the ones that can run, and for each named or (without names) existing
    /// job that cannot, its error (with what could be read of a broken job, if it exists), so
    /// that the command does the others and reports it: one job's broken configuration never
    /// stops another's.
    pub fn select(&self, names: &[String]) -> Selected<'_> {
        let mut sel = Selected::default();
        if names.is_empty() {
            sel.jobs = self.jobs.values().collect();
            sel.errors = self.broken.values().map(|b| (b.name.clone(), Some(&b.partial), b.error())).collect();
            return sel;
        }
        for n in names {
            match self.job(n) {
                Ok(j) => sel.jobs.push(j),
                Err(e) => sel.errors.push((n.clone(), self.broken.get(n).map(|b| &b.partial), e)),
            }
        }
        sel
    }

    pub fn job(&self, name: &str) -> Result<&Job> {
        if let Some(b) = self.broken.get(name) {
            return Err(b.error());
        }
        self.jobs.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.jobs.keys().chain(self.broken.keys()).map(|s| s.as_str()).collect();
            let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            let problems = match self.problems.len() {
                0 => String::new(),
                n => format!(" ({n} configuration error(s): affa --configcheck)"),
            };
            Error::config(format!("no job named '{name}' in {}; jobs there: {list}{problems}", self.dir.display()))
        })
    }

    /// `--debug`: Debug=yes for every job (Affa 3's option).
    pub fn force_debug(&mut self) {
        for j in self.jobs.values_mut().chain(self.broken.values_mut().map(|b| &mut b.partial)) {
            j.values.insert("Debug", vec!["yes".into()]);
            j.settings.debug = true;
        }
    }

    /// The configuration errors that belong to no job: a section header that could not be
    /// read (`[web server]`, `[web`), a key before any section. The job such a header was
    /// meant to be is neither working nor broken: monitoring reports these on their own.
    pub fn problems_of_no_job(&self) -> Vec<&String> {
        self.problems.iter().filter(|p| !self.broken.values().any(|b| b.errors.contains(p))).collect()
    }

    /// Is there a section of that name, working or broken?
    pub fn has_job(&self, name: &str) -> bool {
        self.jobs.contains_key(name) || self.broken.contains_key(name)
    }

    /// Every job as configured: the working ones and what could be read of the broken ones,
    /// sorted by name (for lists that must show every job, and for the secrets to hide).
    pub fn all_jobs(&self) -> Vec<&Job> {
        let mut v: Vec<&Job> = self.jobs.values().chain(self.broken.values().map(|b| &b.partial)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every secret the configuration holds (to be kept out of mails).
    ///
    /// It reads the keys by name, in every job as written (working or broken, typed or not): a
    /// secret must be hidden wherever it was written.
    pub fn secrets(&self) -> Vec<String> {
        let mut s = Vec::new();
        let mut push = |v: &str| {
            if !v.is_empty() && !s.iter().any(|x: &String| x == v) {
                s.push(v.to_string());
            }
        };
        push(self.global.get("smtpPassword"));
        for j in std::iter::once(&self.global).chain(self.all_jobs()) {
            push(j.get("ESXiPassword"));
            push(j.get("rsyncdPassword"));
            let f = j.get("ESXiPasswordFile");
            if !f.is_empty() {
                if let Ok(t) = std::fs::read_to_string(f) {
                    push(t.lines().next().unwrap_or("").trim_end());
                }
            }
        }
        // Longest first, so a secret containing another is hidden whole.
        s.sort_by_key(|x| std::cmp::Reverse(x.len()));
        s
    }

    pub fn lock_dir(&self) -> PathBuf {
        self.settings.lock_dir.clone()
    }
    pub fn log_dir(&self) -> PathBuf {
        self.settings.log_dir.clone()
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.settings.ssh_dir.clone()
    }
    pub fn script_dir(&self) -> PathBuf {
        self.settings.script_dir.clone()
    }
}

/// Defaults < global section < job section, and the typed settings read from that (with the
/// errors of values that do not parse; the whole-job checks are [`Job::validate`]).
fn merge(name: &str, origin: Origin, global: &Section, own: &Section, is_global: bool) -> (Job, Vec<String>) {
    let mut values = BTreeMap::new();
    let mut explicit = Vec::new();
    let mut password_file_origin = None;
    for def in KEYS {
        if def.scope == Scope::Global && !is_global {
            continue;
        }
        let given = own.values.get(def.name).or_else(|| global.values.get(def.name));
        let v: Vec<String> = match given {
            Some(list) => {
                explicit.push(def.name);
                if def.name == "ESXiPassword" {
                    password_file_origin = Some(list[0].1.file.clone());
                }
                list.iter().map(|(v, _)| v.clone()).collect()
            }
            None => def.default.iter().map(|s| s.to_string()).collect(),
        };
        values.insert(def.name, v);
    }
    let mut reader = typed::Reader { values: &values, origin: &origin, job: name, errors: Vec::new() };
    let settings = typed::Settings::read(&mut reader, &explicit);
    let errors = reader.errors;
    (Job { name: name.to_string(), origin, settings, values, password_file_origin }, errors)
}

/// The typed settings are the job's fields: `job.ssh`, `job.keeps`, `job.esxi`...
impl std::ops::Deref for Job {
    type Target = typed::Settings;
    fn deref(&self) -> &typed::Settings {
        &self.settings
    }
}

impl Job {
    /// Whole-job rules: required keys, and keys that only make sense together.
    fn validate(&self) -> Result<()> {
        let o = &self.origin;
        if self.get("remoteHostName").is_empty() {
            bail!(
                Config,
                "{o}: job [{}] has no remoteHostName; expected the host name or IP of the machine to back up",
                self.name
            );
        }
        if self.esxi() {
            for key in ["ESXiVMName", "ESXiUsername"] {
                if self.get(key).is_empty() {
                    bail!(Config, "{o}: ESXi job [{}] has no {key}; expected it with ESXi=yes", self.name);
                }
            }
            if self.get("ESXiPassword").is_empty() && self.get("ESXiPasswordFile").is_empty() {
                bail!(Config, "{o}: ESXi job [{}] has neither ESXiPassword nor ESXiPasswordFile; expected one of them with ESXi=yes", self.name);
            }
            if self.get("ESXiProtocol") == "http" {
                if !self.get("ESXiThumbprint").is_empty() {
                    bail!(Config, "{o}: ESXi job [{}] has ESXiProtocol=http and ESXiThumbprint={}: plain http has no certificate to check against the pin; expected ESXiProtocol=https (or no ESXiThumbprint)", self.name, self.get("ESXiThumbprint"));
                }
                if !self.flag("ESXiInsecureHttp") {
                    bail!(Config, "{o}: ESXi job [{}] has ESXiProtocol=http, which sends the API password unencrypted; expected ESXiProtocol=https, or ESXiInsecureHttp=yes to allow it on a test host", self.name);
                }
            }
        }
        if self.flag("SMEServer") && (self.esxi() || self.flag("rsyncdMode")) {
            bail!(Config,
                "{o}: job [{}] has SMEServer=yes with {}: the SME Server events run over ssh on a Linux host; expected SMEServer=no",
                self.name,
                if self.esxi() { "ESXi=yes" } else { "rsyncdMode=yes" }
            );
        }
        if self.samba_share && self.samba_users.is_empty() {
            bail!(Config, "{o}: job [{}] has SambaShare=yes but SambaValidUser is empty; expected the Samba users allowed to read its archives (e.g. SambaValidUser=affa): the share reads every archive as root, so it is never opened to all users", self.name);
        }
        if self.flag("rsyncdMode") {
            let why = if self.esxi() {
                Some("ESXi=yes")
            } else if self.get("remoteHostName") == "localhost" {
                Some("remoteHostName=localhost")
            } else if !self.get_all("preJobCommandRemote").is_empty()
                || !self.get_all("postJobCommandRemote").is_empty()
            {
                Some("pre/postJobCommandRemote")
            } else {
                None
            };
            if let Some(w) = why {
                bail!(Config, "{o}: job [{}] has rsyncdMode=yes with {w}, which needs ssh to the host; expected rsyncdMode=no or without {w}", self.name);
            }
        }
        if self.get("AutomountDevice").is_empty() != self.get("AutomountPoint").is_empty() {
            bail!(
                Config,
                "{o}: job [{}] has {} without {}; expected both (the device and where to mount it, normally RootDir)",
                self.name,
                if self.get("AutomountPoint").is_empty() { "AutomountDevice" } else { "AutomountPoint" },
                if self.get("AutomountPoint").is_empty() { "AutomountPoint" } else { "AutomountDevice" }
            );
        }
        Ok(())
    }

    /// The values of a key, for the configuration's own views (`--show-property`, the setup
    /// copy, the secrets to hide): the run reads the typed fields instead.
    pub fn get_all(&self, key: &str) -> &[String] {
        self.values.get(key).map(|v| v.as_slice()).unwrap_or(&[])
    }
    /// The single value of a key ("" when empty), for the configuration's own views and
    /// checks (and `--list`'s job box, which shows AutoUnmount as written); the run reads the
    /// typed fields instead.
    pub(crate) fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("internal: unknown config key {key}"))
            .first()
            .map(|s| s.as_str())
            .unwrap_or("")
    }
    fn flag(&self, key: &str) -> bool {
        keys::parse_bool(self.get(key)).unwrap_or(false)
    }

    pub fn esxi(&self) -> bool {
        self.settings.esxi.is_some()
    }
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }
    pub fn root_dir(&self) -> PathBuf {
        self.settings.root_dir.clone()
    }
    /// RootDir/JOB.
    pub fn job_dir(&self) -> PathBuf {
        self.settings.root_dir.join(&self.name)
    }
    pub fn keep(&self, level: crate::archive::Level) -> u32 {
        self.settings.keeps.of(level)
    }
    /// The ESXi settings of an ESXi job; an error for any other job.
    pub fn esxi_settings(&self) -> Result<&typed::Esxi> {
        self.settings
            .esxi
            .as_ref()
            .ok_or_else(|| Error::of(ErrorKind::Config, format!("job {} is not an ESXi job (ESXi=no)", self.name)))
    }

    /// The ESXi API password, from ESXiPassword or ESXiPasswordFile. A file holding it that
    /// group or others can read is refused, with the chmod that fixes it.
    pub fn esxi_password(&self) -> Result<String> {
        let check = |p: &Path| -> Result<()> {
            use std::os::unix::fs::PermissionsExt;
            let md = fs::metadata(p).ctx(|| format!("cannot read {}", p.display()))?;
            if md.permissions().mode() & 0o077 != 0 {
                bail!(Config,
                    "{} holds the ESXi password of job {} but group or others may read it (mode {:o}); run: chmod 600 {}",
                    p.display(), self.name, md.permissions().mode() & 0o777, p.display()
                );
            }
            Ok(())
        };
        let esxi = self.esxi_settings()?;
        if !esxi.password.is_empty() {
            if let Some(f) = &self.password_file_origin {
                check(f)?;
            }
            return Ok(esxi.password.clone());
        }
        let Some(f) = &esxi.password_file else {
            bail!(Config, "ESXi job {} has neither ESXiPassword nor ESXiPasswordFile", self.name);
        };
        check(f)?;
        let s = fs::read_to_string(f).ctx(|| format!("cannot read ESXiPasswordFile {}", f.display()))?;
        let pw = s.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            bail!(
                Config,
                "ESXiPasswordFile {} of job {} is empty; expected the password on its first line",
                f.display(),
                self.name
            );
        }
        Ok(pw)
    }

    /// The effective configuration as INI (for `.JOB-setup.ini`), secrets replaced by `<hidden>`.
    pub fn to_ini(&self) -> String {
        let mut s = format!("[{}]\n", self.name);
        for def in KEYS.iter().filter(|d| d.scope == Scope::Job) {
            for v in self.get_all(def.name) {
                let shown = if is_secret(def.name) && !v.is_empty() { "<hidden>" } else { v.as_str() };
                s.push_str(&format!("{}={}\n", def.name, shown));
            }
        }
        s
    }
}

/// Keys whose values must never be shown.
pub fn is_secret(key: &str) -> bool {
    matches!(key, "ESXiPassword" | "rsyncdPassword" | "smtpPassword")
}

/// The default configuration, commented, for `--show-default-config`.
pub fn default_config_text() -> String {
    let mut s = String::from("# affa: every key with its default; put jobs in /etc/affa/*.conf\n");
    for scope in [Scope::Global, Scope::Job] {
        s.push_str(if scope == Scope::Global { "\n[GlobalAffaConfig]\n" } else { "\n[JOBNAME]\n" });
        for d in KEYS.iter().filter(|d| d.scope == scope) {
            s.push_str(&format!("# {} ({})\n", d.help, keys::expected(d.kind)));
            if d.default.is_empty() {
                s.push_str(&format!("#{}=\n", d.name));
            }
            for v in d.default {
                s.push_str(&format!("{}={}\n", d.name, v));
            }
        }
    }
    s
}

/// The key `--show-property NAME` means: the key of that name (any case), else the one key
/// whose name starts with it (Affa 3's prefix match).
pub fn property(name: &str) -> Result<&'static keys::KeyDef> {
    if let Some(d) = keys::lookup(name) {
        return Ok(d);
    }
    let lower = name.to_ascii_lowercase();
    let found: Vec<&keys::KeyDef> =
        KEYS.iter().filter(|d| !name.is_empty() && d.name.to_ascii_lowercase().starts_with(&lower)).collect();
    match found.as_slice() {
        [d] => Ok(d),
        [] => {
            let hint = keys::closest(name).map(|c| format!(" (did you mean '{c}'?)")).unwrap_or_default();
            bail!(Config, "unknown key '{name}'{hint}");
        }
        many => bail!(Config, "'{name}' is ambiguous: {}", many.iter().map(|d| d.name).collect::<Vec<_>>().join(" ")),
    }
}

/// Affa 3's `--show-property` listing: "Values of property KEY", then `JOB: value` per job
/// (the name column 17 wide; TimeSchedule and SambaValidUser on one line, the other
/// multi-valued keys one line per value).
pub fn property_values(cfg: &Config, name: &str) -> Result<String> {
    let d = property(name)?;
    let mut out = format!("Values of property {}\n", d.name);
    for job in cfg.all_jobs() {
        let jn = if job.name.len() > 17 { format!("{}..", &job.name[..15]) } else { job.name.clone() };
        let mut values: Vec<String> = match d.scope {
            Scope::Global => vec![cfg.global.get(d.name).to_string()],
            Scope::Job => job.get_all(d.name).to_vec(),
        };
        if !d.multi {
            out.push_str(&format!("{jn:<17}: {}\n", values.first().map(String::as_str).unwrap_or("")));
        } else if matches!(d.name, "TimeSchedule" | "SambaValidUser") {
            values.sort();
            if !values.is_empty() {
                out.push_str(&format!("{jn:<17}: {}\n", values.join(" ")));
            }
        } else {
            for v in values {
                out.push_str(&format!("{jn:<17}: {v}\n"));
            }
        }
    }
    Ok(out)
}

/// One key's description, for `--show-property KEY`.
pub fn describe_key(name: &str) -> Result<String> {
    let d = property(name)?;
    Ok(format!(
        "{}: {}\n  values: {}\n  default: {}\n  {}{}",
        d.name,
        d.help,
        keys::expected(d.kind),
        if d.default.is_empty() { "(none)".to_string() } else { d.default.join(", ") },
        if d.multi { "multi-valued (repeat the line)" } else { "single value" },
        if d.scope == Scope::Global { "; only in [GlobalAffaConfig]" } else { "" },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), text.to_string())])
            .and_then(Config::strict)
    }

    /// What could make affa drop [GlobalAffaConfig] and run every job on the built-in
    /// defaults (another RootDir, other keep counts) fails the whole configuration instead; a
    /// byte order mark and bytes that are not UTF-8 in a comment are fine.
    #[test]
    fn the_global_section_is_never_dropped_silently() {
        let raw = |t: &[u8]| Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), text_of(t))]);
        let job = "\n[web]\nremoteHostName=h\n";
        for head in ["[GlobalAffaConfig", "[globalaffaconfig]", "[GlobalAffaConfig]]", "[ GLOBALAFFACONFIG ]"] {
            let e = raw(format!("{head}\nRootDir=/srv/b{job}").as_bytes()).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{head} was accepted"));
            assert!(
                e.starts_with(&format!(
                    "/etc/affa/t.conf:1: section header '{}' looks like [GlobalAffaConfig]",
                    head.trim()
                )),
                "{e}"
            );
        }
        // A byte order mark before the header.
        let c = raw(format!("\u{feff}[GlobalAffaConfig]\nRootDir=/srv/b{job}").as_bytes()).unwrap().strict().unwrap();
        assert_eq!(c.job("web").unwrap().job_dir(), PathBuf::from("/srv/b/web"));
        // Latin-1 in a comment: read; in a value: that section's error (the global's: all).
        let c =
            raw(b"# caf\xe9\n[GlobalAffaConfig]\nRootDir=/srv/b\n[web]\nremoteHostName=h\n").unwrap().strict().unwrap();
        assert_eq!(c.job("web").unwrap().job_dir(), PathBuf::from("/srv/b/web"));
        let e = raw(b"[GlobalAffaConfig]\nRootDir=/srv/caf\xe9\n").err().unwrap().to_string();
        assert!(e.starts_with("/etc/affa/t.conf:2: the value of key 'RootDir' holds bytes that are not UTF-8"), "{e}");
        // A password is never shown, not even a part of it.
        let c = raw(b"[web]\nremoteHostName=h\nESXiPassword=s3cr\xe9t\n").unwrap();
        assert!(!c.problems.is_empty() && c.problems.iter().all(|p| !p.contains("s3cr")), "{:?}", c.problems);
        let c = raw(
            b"[GlobalAffaConfig]\nRootDir=/srv/b\n[web]\nremoteHostName=h\nInclude=/caf\xe9\n[db]\nremoteHostName=d\n",
        )
        .unwrap();
        assert!(c.broken.contains_key("web") && c.jobs.contains_key("db"), "{:?}", c.problems);
        let e = raw(b"[Global\xe9]\nRootDir=/srv/b\n").err().unwrap().to_string();
        assert!(e.contains(":1: section header '[Global\u{fffd}]' holds bytes that are not UTF-8"), "{e}");
    }

    /// A configuration file that cannot be read fails the whole configuration, naming it.
    #[test]
    fn an_unreadable_file_stops_every_job() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a.conf"), "[web]\nremoteHostName=h\n").unwrap();
        std::os::unix::fs::symlink(t.path().join("gone"), t.path().join("b.conf")).unwrap();
        fs::create_dir(t.path().join("c.conf")).unwrap();
        // b.conf: a dangling symlink (not a file: not listed); a file that is a directory: not listed.
        assert!(Config::load(t.path()).unwrap().jobs.contains_key("web"));
        // A file whose read fails even for root (EIO: /proc/self/mem at offset 0).
        let f = t.path().join("d.conf");
        std::os::unix::fs::symlink("/proc/self/mem", &f).unwrap();
        assert!(fs::read(&f).is_err());
        let e = Config::load(t.path()).err().unwrap().to_string();
        assert!(
            e.contains(&format!("cannot read configuration file {}", f.display()))
                && e.contains("no job runs until it can be read"),
            "{e}"
        );
    }

    #[test]
    fn defaults_global_and_job_merge() {
        let c = parse("[GlobalAffaConfig]\ndailyKeep=3\nRootDir=/srv/b\n[web]\nremoteHostName=h\nInclude=/etc\nInclude=/home\ndailyKeep=5\n[db]\nremoteHostName=d\n").unwrap();
        let web = c.job("web").unwrap();
        assert_eq!(web.get("dailyKeep"), "5");
        assert_eq!(web.get("weeklyKeep"), "4");
        assert_eq!(web.get_all("Include"), ["/etc", "/home"]);
        let db = c.job("db").unwrap();
        assert_eq!(db.get("dailyKeep"), "3");
        assert_eq!(db.job_dir(), PathBuf::from("/srv/b/db"));
        assert_eq!(db.sources, vec!["/".to_string()]);
    }

    /// As root, a configuration another user could have written is refused before it is read:
    /// its directory or a file of another owner, or writable by group or others.
    #[test]
    fn root_reads_only_a_configuration_no_other_user_could_write() {
        use std::os::unix::fs::PermissionsExt;
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("etc");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("a.conf"), "[a]\nremoteHostName=h\n").unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.join("a.conf"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(&d).is_ok());
        let nobody = Some(rustix::process::Uid::from_raw(65534));
        rustix::fs::chown(&d, nobody, None).unwrap();
        let e = Config::load(&d).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("configuration directory {} is owned by uid 65534 with mode 0755", d.display())),
            "{e}"
        );
        rustix::fs::chown(&d, Some(rustix::process::Uid::ROOT), None).unwrap();
        fs::set_permissions(d.join("a.conf"), fs::Permissions::from_mode(0o666)).unwrap();
        let e = Config::load(&d).unwrap_err().to_string();
        assert!(e.contains("a.conf is root's with mode 0666") && e.contains("chmod go-w"), "{e}");
        fs::set_permissions(d.join("a.conf"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        fs::set_permissions(d.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Config::load(&d).unwrap_err().to_string().contains("sub is root's with mode 0777"));
        fs::remove_dir(d.join("sub")).unwrap();
        // A directory above it of another user (who could swap the configuration under it),
        // reached through a symlink of theirs too.
        let other = t.path().join("theirs");
        fs::create_dir(&other).unwrap();
        fs::rename(&d, other.join("etc")).unwrap();
        rustix::fs::chown(&other, nobody, None).unwrap();
        let e = Config::load(&other.join("etc")).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{} (above the configuration", other.display())), "{e}");
        std::os::unix::fs::symlink(other.join("etc"), t.path().join("link")).unwrap();
        assert!(Config::load(&t.path().join("link")).unwrap_err().to_string().contains("owned by uid 65534"));
        rustix::fs::chown(&other, Some(rustix::process::Uid::ROOT), None).unwrap();
        assert!(Config::load(&t.path().join("link")).is_ok());
    }

    #[test]
    fn errors_name_file_line_key_and_expectation() {
        let e = parse("[web]\nremoteHostName=h\nstatus=enbabled\n").unwrap_err().to_string();
        assert_eq!(e, "/etc/affa/t.conf:3: key 'status' has the value 'enbabled', expected enabled or disabled");
        let e = parse("[web]\nremoteHostName=h\nTimeSchedule=2561\n").unwrap_err().to_string();
        assert!(e.contains(":3: key 'TimeSchedule' has the value '2561', expected a time HHMM"), "{e}");
        let e = parse("[web]\nremoteHostName=h\ndailyKeep=seven\n").unwrap_err().to_string();
        assert!(e.contains("key 'dailyKeep' has the value 'seven', expected a whole number from 0 to 10000"), "{e}");
        let e = parse("[web]\nremotHostName=h\n").unwrap_err().to_string();
        assert!(e.contains(":2: unknown key 'remotHostName' in [web] (did you mean 'remoteHostName'?)"), "{e}");
        let e = parse("[web]\nInclude=/etc\n").unwrap_err().to_string();
        assert!(e.contains("/etc/affa/t.conf:1: job [web] has no remoteHostName"), "{e}");
        let e = parse("[we/b]\nremoteHostName=h\n").unwrap_err().to_string();
        assert!(e.contains(":1: job name 'we/b' is not valid"), "{e}");
        let e = parse("[web]\nremoteHostName=h\n[web]\nremoteHostName=h\n").unwrap_err().to_string();
        assert!(e.contains(":3: section [web] is defined twice (first at /etc/affa/t.conf:1)"), "{e}");
        let e = parse("[GlobalAffaConfig]\nRootDir=/a\n[GlobalAffaConfig]\nRootDir=/b\n").unwrap_err().to_string();
        assert!(e.contains(":3: section [GlobalAffaConfig] is defined twice (first at /etc/affa/t.conf:1); expected it once: move these settings into the [GlobalAffaConfig] at /etc/affa/t.conf:1"), "{e}");
        let e = parse("[web]\nremoteHostName=h\nchunkFiles=*-flat.vmdk   # base disks\n").unwrap_err().to_string();
        assert_eq!(e, "/etc/affa/t.conf:3: key 'chunkFiles' has the value '*-flat.vmdk   # base disks', expected a glob pattern such as *-flat.vmdk without a comment after it (a # comment is a line of its own in an affa file)");
        let e = parse("[web]\nremoteHostName=h\nESXiPasswordFile=/etc/affa/p\t# 0600\n").unwrap_err().to_string();
        assert!(e.contains("key 'ESXiPasswordFile' has the value '/etc/affa/p\t# 0600', expected an absolute path or nothing without a comment after it"), "{e}");
        assert!(parse("[web]\nremoteHostName=h\nDescription=web # the shop\nchunkFiles=*#1.img\n").is_ok());
        let e = parse("[web]\nremoteHostName=h\nsshPort=22\nsshPort=23\n").unwrap_err().to_string();
        assert!(e.contains(":4: key 'sshPort' is given a second time"), "{e}");
        let e = parse("[web]\nremoteHostName=h\nlockDir=/tmp\n").unwrap_err().to_string();
        assert!(e.contains("belongs in [GlobalAffaConfig]"), "{e}");
        let e = parse("[web]\nremoteHostName=h\nESXi=yes\nESXiVMName=v\n").unwrap_err().to_string();
        assert!(e.contains("has no ESXiUsername"), "{e}");
        assert!(parse("[..]\nremoteHostName=h\n").is_err());
        // Affa 3's values: scheduledKeep=0 counts as 1, negative keeps as 0, negative nice and
        // NRPEtrigger are valid.
        let c = parse(
            "[web]\nremoteHostName=h\nscheduledKeep=0\ndailyKeep=-3\nlocalNice=-5\nremoteNice=-19\nNRPEtrigger=-1\n",
        )
        .unwrap();
        let w = c.job("web").unwrap();
        assert_eq!((w.keep(crate::archive::Level::Scheduled), w.keep(crate::archive::Level::Daily)), (1, 0));
        assert_eq!((w.rsync.local_nice, w.get("NRPEtrigger")), (-5, "-1"));
        assert_eq!((w.rsync.remote_nice, w.nrpe_trigger), (-19, None));
        assert!(parse("[web]\nremoteHostName=h\nlocalNice=-20\n").is_err());
        assert!(parse("[web]\nremoteHostName=h\nscheduledKeep=1-\n").is_err());
        assert!(parse("[web]\nremoteHostName=h\nchunkSize=1G\n").is_err());
        assert!(parse("[web]\nremoteHostName=h\nchunkSize=3M\n").is_err());
        assert!(parse("[web]\nremoteHostName=h\nrsyncdMode=yes\n").is_ok());
        let e = parse("[web]\nremoteHostName=h\nrsyncdMode=yes\npreJobCommandRemote=x\n").unwrap_err().to_string();
        assert!(e.contains("rsyncdMode=yes with pre/postJobCommandRemote, which needs ssh"), "{e}");
        assert!(parse("[web]\nremoteHostName=h\nAutomountDevice=/dev/sdb1\n").is_err());
        for users in ["", " , ", "\nSambaValidUser="] {
            let e = parse(&format!("[web]\nremoteHostName=h\nSambaShare=yes\nSambaValidUser={users}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/etc/affa/t.conf:1: job [web] has SambaShare=yes but SambaValidUser is empty; expected the Samba users allowed"), "{e}");
        }
        assert!(parse("[web]\nremoteHostName=h\nSambaShare=no\nSambaValidUser=\n").is_ok());
        assert!(parse("[web]\nremoteHostName=h\nSambaShare=yes\n").is_ok(), "the default user affa");
    }

    #[test]
    fn an_error_breaks_its_own_job_only() {
        let text = "[GlobalAffaConfig]\nEmailAddress=g@x\n[a]\nremoteHostName=h\n[b]\nremoteHostName=h\nEmailAddress=b@x\nstatus=enbabled\nTimeSchedule=0115\ndailyKeep=x\n[c d]\nremoteHostName=h\n[e]\nremoteHostName=h\n";
        let c = Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/t.conf"), text.into())]).unwrap();
        assert_eq!(c.jobs.keys().collect::<Vec<_>>(), ["a", "e"]);
        let b = &c.broken["b"];
        assert_eq!(b.errors.len(), 2, "{:?}", b.errors);
        assert_eq!(b.partial.get_all("EmailAddress"), ["b@x"]);
        assert_eq!(b.partial.get_all("TimeSchedule"), ["0115"]);
        let e = c.job("b").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/affa/t.conf:8: key 'status'") && e.ends_with("(1 more: affa --configcheck)"),
            "{e}"
        );
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
        assert!(c.problems[2].contains("job name 'c d' is not valid"));
        assert_eq!(c.all_jobs().iter().map(|j| j.name.as_str()).collect::<Vec<_>>(), ["a", "b", "e"]);
        // An error in [GlobalAffaConfig] stops everything.
        let g = "[GlobalAffaConfig]\nsendStatus=hourly\n[a]\nremoteHostName=h\n";
        assert!(Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/g.conf"), g.into())]).is_err());
    }

    #[test]
    fn esxi_defaults_follow_the_host_and_secrets_are_hidden() {
        let c = parse("[vm]\nremoteHostName=esx\nESXi=yes\nESXiVMName=v\nESXiUsername=affa\nESXiPassword=s3cret\n")
            .unwrap();
        let j = c.job("vm").unwrap();
        assert_eq!(j.rsync.remote_rsync_bin, "/bin/rsync");
        assert_eq!(j.ssh.authorized_keys, "/etc/ssh/keys-root/authorized_keys");
        assert!(!j.to_ini().contains("s3cret"));
        assert!(j.to_ini().contains("ESXiPassword=<hidden>"));
        let c = parse("[h]\nremoteHostName=x\n").unwrap();
        assert_eq!(c.job("h").unwrap().rsync.remote_rsync_bin, "/usr/bin/rsync");
    }

    #[test]
    fn esxi_user_snapshots_is_keep_or_refuse() {
        let job = "[vm]\nremoteHostName=esx\nESXi=yes\nESXiVMName=v\nESXiUsername=affa\nESXiPassword=s3cret\n";
        assert_eq!(parse(job).unwrap().job("vm").unwrap().get("ESXiUserSnapshots"), "keep");
        let c = parse(&format!("{job}ESXiUserSnapshots=refuse\n")).unwrap();
        assert_eq!(c.job("vm").unwrap().get("ESXiUserSnapshots"), "refuse");
        let e = parse(&format!("{job}ESXiUserSnapshots=consolidate\n")).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/affa/t.conf:7: key 'ESXiUserSnapshots' has the value 'consolidate', expected keep or refuse"
        );
    }
}

/// Keep arithmetic: the five keep counts a job rotates with.
#[cfg(test)]
mod keep_tests {
    use super::*;
    use crate::archive::Level;

    fn config(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/affa"), &[(PathBuf::from("/etc/affa/k.conf"), text.to_string())])
            .and_then(Config::strict)
    }

    fn keeps(text: &str) -> [u32; 5] {
        let c = config(text).unwrap();
        let j = c.jobs.values().next().unwrap();
        Level::ALL.map(|l| j.keep(l))
    }

    #[test]
    fn keep_counts_default_merge_and_clamp_as_in_affa3() {
        assert_eq!(keeps("[w]\nremoteHostName=h\n"), [1, 7, 4, 12, 2]);
        // The global section over the defaults, the job's own over both.
        assert_eq!(
            keeps(
                "[GlobalAffaConfig]\ndailyKeep=3\nyearlyKeep=10000\n[w]\nremoteHostName=h\nweeklyKeep=9\ndailyKeep=5\n"
            ),
            [1, 5, 9, 12, 10000]
        );
        // Affa 3: scheduledKeep below 1 counts as 1, a negative keep as 0.
        assert_eq!(
            keeps("[w]\nremoteHostName=h\nscheduledKeep=0\ndailyKeep=-1\nweeklyKeep=-7\nmonthlyKeep=0\nyearlyKeep=-99999\n"),
            [1, 0, 0, 0, 0]
        );
        assert_eq!(keeps("[w]\nremoteHostName=h\nscheduledKeep=-2\nmonthlyKeep=1\n"), [1, 7, 4, 1, 2]);
        // Above 10000: a configuration error naming the key and the range.
        let e = config("[w]\nremoteHostName=h\nweeklyKeep=10001\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/affa/k.conf:3: key 'weeklyKeep' has the value '10001', expected a whole number from 0 to 10000 \
             (a negative one counts as 0, as in Affa 3)"
        );
        let e = config("[w]\nremoteHostName=h\nscheduledKeep=10001\n").unwrap_err().to_string();
        assert!(
            e.ends_with("expected a whole number from 1 to 10000 (a smaller one counts as 1, as in Affa 3)"),
            "{e}"
        );
    }
}
