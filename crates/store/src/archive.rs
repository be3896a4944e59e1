//! The archive set of one job: `RootDir/JOB/{scheduled,daily,weekly,monthly,yearly}.N`,
//! `scheduled.running`, `.doneDates`, `.AFFA-TRASH`, and rotation (journaled in
//! `.rotation-journal`, so a crash between two renames is finished by the next run).
//!
//! Owns: which archives exist and are valid (and whether `scheduled.running` holds a complete
//! transfer: only by affa's marker outside it, [`RUNNING_COMPLETE`]), affa's reserved names at
//! an archive's root, which one is the `--link-dest` basis, and
//! rotation/promotion exactly as Affa 3's `shiftArchives` (with its monthly-fallback defect
//! fixed). Must never: copy or modify the contents of an archive (rotation only renames), name a
//! transfer that has no report `scheduled.0`, or delete anything but the archive that falls off
//! the end of its level.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDateTime};

use crate::error::{IoContext, Result};
use crate::report::Report;

pub const RUNNING: &str = "scheduled.running";
/// An interrupted transfer, kept as an extra `--link-dest` basis for the resumed run.
pub const RESUME: &str = ".scheduled.resume";
pub const TRASH: &str = ".AFFA-TRASH";
pub const DONE_DATES: &str = ".doneDates";
/// The "complete transfer" marker of `scheduled.running`, in the job directory (outside the
/// transferred tree: a source cannot write it): the BLAKE3 of the report affa wrote there. A
/// report in `scheduled.running` counts only when this marker matches it, so a report a source
/// planted (or one left by an interrupted transfer) is never believed.
pub const RUNNING_COMPLETE: &str = ".running-complete";

/// affa's own files at the root of an archive (docs/FORMAT.md). A transfer never brings a
/// source's files of these names ([`reserved_excludes`]): a source cannot plant a report, a
/// setup copy, a VM description, chunk links or a manifest index.
pub fn reserved_names(job: &str) -> Vec<String> {
    vec![
        crate::report::REPORT_FILE.to_string(),
        format!(".{job}-setup.ini"),
        crate::vmrecord::ESXI_INI.to_string(),
        crate::chunk::ARCHIVE_CHUNK_DIR.to_string(),
        crate::chunk::INDEX_FILE.to_string(),
    ]
}

/// rsync `--exclude` arguments for [`reserved_names`] and the temp names affa writes them under
/// (`.NAME.tmp-*`), anchored at the root of the transfer (without a trailing `/`, so a symlink
/// or file of such a name is excluded as well as a directory).
pub fn reserved_excludes(job: &str) -> Vec<String> {
    reserved_names(job).iter().flat_map(|n| [format!("--exclude=/{n}"), format!("--exclude=/.{n}.tmp-*")]).collect()
}

/// Record that `scheduled.running` holds a complete transfer: called right after affa wrote its
/// report there.
pub fn mark_running_complete(job_dir: &Path) -> Result<()> {
    let r = fs::read(job_dir.join(RUNNING).join(crate::report::REPORT_FILE))
        .ctx(|| format!("cannot read the report of {}", job_dir.join(RUNNING).display()))?;
    crate::fsutil::write_atomic(
        &job_dir.join(RUNNING_COMPLETE),
        blake3::hash(&r).to_hex().as_bytes(),
        crate::fsutil::Perm::Mode(0o600),
    )
}

/// Forget the marker (a new transfer starts, or `scheduled.running` was renamed).
pub fn clear_running_complete(job_dir: &Path) -> Result<()> {
    let p = job_dir.join(RUNNING_COMPLETE);
    match fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx(|| format!("cannot remove {}", p.display())),
        _ => Ok(()),
    }
}

/// The report of `scheduled.running` if it holds a complete transfer: the report exists, has a
/// valid date, and is the one affa recorded in [`RUNNING_COMPLETE`].
pub fn running_report(job_dir: &Path) -> Option<Report> {
    let want = fs::read_to_string(job_dir.join(RUNNING_COMPLETE)).ok()?;
    let f = crate::untrusted::open_regular(&job_dir.join(RUNNING).join(crate::report::REPORT_FILE)).ok()?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, crate::report::REPORT_MAX as u64 + 1), &mut data).ok()?;
    if data.len() > crate::report::REPORT_MAX || blake3::hash(&data).to_hex().as_str() != want.trim() {
        return None;
    }
    let r = Report::parse(&String::from_utf8_lossy(&data));
    r.date()?;
    Some(r)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Scheduled,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Level {
    pub const ALL: [Level; 5] = [Level::Scheduled, Level::Daily, Level::Weekly, Level::Monthly, Level::Yearly];

    pub fn name(self) -> &'static str {
        match self {
            Level::Scheduled => "scheduled",
            Level::Daily => "daily",
            Level::Weekly => "weekly",
            Level::Monthly => "monthly",
            Level::Yearly => "yearly",
        }
    }
    pub fn letter(self) -> char {
        self.name().chars().next().unwrap().to_ascii_uppercase()
    }
    pub fn keep_key(self) -> &'static str {
        match self {
            Level::Scheduled => "scheduledKeep",
            Level::Daily => "dailyKeep",
            Level::Weekly => "weeklyKeep",
            Level::Monthly => "monthlyKeep",
            Level::Yearly => "yearlyKeep",
        }
    }
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }
    /// The level below (the promotion source).
    pub fn below(self) -> Option<Level> {
        match self {
            Level::Scheduled => None,
            Level::Daily => Some(Level::Scheduled),
            Level::Weekly => Some(Level::Daily),
            Level::Monthly => Some(Level::Weekly),
            Level::Yearly => Some(Level::Monthly),
        }
    }
    /// The period key in `.doneDates` for a time: daily=%Y%j, weekly=%Y%W, monthly=%Y%m, yearly=%Y.
    pub fn period(self, t: NaiveDateTime) -> String {
        match self {
            Level::Scheduled => String::new(),
            Level::Daily => t.format("%Y%j").to_string(),
            Level::Weekly => t.format("%Y%W").to_string(),
            Level::Monthly => t.format("%Y%m").to_string(),
            Level::Yearly => format!("{}", t.year()),
        }
    }
}

/// Keep counts per level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeps(pub [u32; 5]);

impl Keeps {
    pub fn of(&self, l: Level) -> u32 {
        self.0[l as usize]
    }
}

/// One archive directory.
#[derive(Debug, Clone)]
pub struct Archive {
    pub level: Level,
    pub index: u32,
    pub path: PathBuf,
    pub report: Option<Report>,
}

impl Archive {
    pub fn name(&self) -> String {
        format!("{}.{}", self.level.name(), self.index)
    }
    pub fn valid(&self) -> bool {
        self.report.is_some()
    }
}

/// Parse `level.N` (N without leading zeros, as Affa writes them).
pub fn parse_archive_name(name: &str) -> Option<(Level, u32)> {
    let (l, n) = name.split_once('.')?;
    let level = Level::parse(l)?;
    if n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    Some((level, n.parse().ok()?))
}

/// Every archive of a job dir, sorted by level then index.
pub fn list(job_dir: &Path) -> Result<Vec<Archive>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(job_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).ctx(|| format!("cannot read {}", job_dir.display())),
    };
    for e in rd {
        let e = e.ctx(|| format!("cannot read {}", job_dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((level, index)) = parse_archive_name(&name) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let path = e.path();
                let report = Report::read(&path).or_else(|| crate::report::convert_affa2(&path));
                out.push(Archive { level, index, report, path });
            }
        }
    }
    out.sort_by_key(|a| (a.level, a.index));
    Ok(out)
}

/// Find an archive by name (`scheduled.0`, `daily.3`), with a helpful error.
pub fn find(job_dir: &Path, job: &str, name: &str) -> Result<Archive> {
    let all = list(job_dir)?;
    if let Some(a) = all.iter().find(|a| a.name() == name) {
        return Ok(a.clone());
    }
    let names: Vec<String> = all.iter().map(|a| a.name()).collect();
    bail!(
        "job {job} has no archive '{name}'; archives there: {}",
        if names.is_empty() { "none".to_string() } else { names.join(", ") }
    )
}

/// The valid archive with the newest report date (the `--link-dest` basis), if any.
pub fn newest_valid(job_dir: &Path) -> Result<Option<Archive>> {
    let mut v: Vec<Archive> = list(job_dir)?.into_iter().filter(|a| a.valid()).collect();
    // Newest date first; among equal dates the lower level and index (the fresher rename).
    v.sort_by(|a, b| {
        let (da, db) = (a.report.as_ref().unwrap().date().unwrap(), b.report.as_ref().unwrap().date().unwrap());
        db.cmp(da).then((a.level, a.index).cmp(&(b.level, b.index)))
    });
    Ok(v.into_iter().next())
}

/// `.doneDates`: the period each level was last promoted in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DoneDates {
    pub values: [String; 5],
}

impl DoneDates {
    pub fn read(job_dir: &Path) -> DoneDates {
        let mut d = DoneDates::default();
        if let Ok(text) = fs::read_to_string(job_dir.join(DONE_DATES)) {
            for (k, v) in affa_core::keyvalue::pairs(&text, None) {
                // A period is digits (`%Y%j` ...), or -1 for never; anything else (a hand edit)
                // reads as never: the promotion is due, and the rotation journal, which writes
                // these values word by word, can always be read back.
                let period = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
                if let (Some(l), true) = (Level::parse(k), period) {
                    d.values[l as usize] = v.to_string();
                }
            }
        }
        d
    }
    pub fn get(&self, l: Level) -> &str {
        &self.values[l as usize]
    }
    pub fn write(&self, job_dir: &Path) -> Result<()> {
        let mut s = String::from("[doneDates]\n");
        for l in [Level::Daily, Level::Weekly, Level::Monthly, Level::Yearly] {
            let v = self.get(l);
            s.push_str(&format!("{}={}\n", l.name(), if v.is_empty() { "-1" } else { v }));
        }
        crate::fsutil::write_atomic(&job_dir.join(DONE_DATES), s.as_bytes(), crate::fsutil::Perm::Mode(0o600))
    }
}

/// Rotate one level, exactly as Affa 3's `shiftArchives`:
/// - if `C.0` exists (and, for `scheduled`, `scheduled.running` is valid): move `C.(K-1)` to the
///   trash, then rename `C.(i-1)` to `C.i` for i = K-1 down to 1; but when some `C.g` with
///   0 < g < K is missing (a crash between two renames), only `C.0 .. C.(g-1)` move up and
///   nothing goes to the trash (Affa would trash `C.(K-1)` and lose an archive);
/// - `scheduled`: rename a valid `scheduled.running` to `scheduled.0`;
/// - other levels: promote the oldest archive of the level below to `C.0`; when the level below
///   keeps nothing, fall through to the next level down (Affa's monthly fallback tested the wrong
///   keep count; here every fallback tests the keep counts of all the levels it skips).
///
/// Returns what was done, one line each, for the log. Only renames; the trash is emptied by
/// [`empty_trash`].
pub fn shift(job_dir: &Path, level: Level, keeps: Keeps, stamp: &str) -> Result<Vec<String>> {
    shift_recording(job_dir, level, keeps, stamp, None)
}

/// The rotation journal: the renames of one [`shift`] (and the `.doneDates` it records),
/// written before the first rename and removed after the last, so that a crash between two
/// renames is finished by [`recover`] instead of leaving a gap that loses an archive.
pub const JOURNAL: &str = ".rotation-journal";

/// [`shift`], also recording `done` as `.doneDates` in the same journaled step (a promotion).
pub fn shift_recording(
    job_dir: &Path,
    level: Level,
    keeps: Keeps,
    stamp: &str,
    done: Option<&DoneDates>,
) -> Result<Vec<String>> {
    recover(job_dir)?;
    let plan = plan_shift(job_dir, level, keeps, stamp)?;
    if plan.is_empty() && done.is_none() {
        return Ok(Vec::new());
    }
    if plan.len() == 1 && done.is_none() {
        // One rename is atomic by itself: no journal needed.
        let (from, to) = &plan[0];
        let (f, t) = (job_dir.join(from), job_dir.join(to));
        if let Some(parent) = t.parent() {
            fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
        }
        fs::rename(&f, &t).ctx(|| format!("cannot rename {} to {}", f.display(), t.display()))?;
        crate::interrupt::crash_point("rename");
        return Ok(vec![format!("{} -> {}", name_of(&f), name_of(&t))]);
    }
    let mut j = String::from("affa-rotation-journal 2\n");
    for (from, to) in &plan {
        // The source's identity: a replay moves only that directory (docs/FORMAT.md).
        let p = job_dir.join(from);
        let ino = fs::symlink_metadata(&p).ctx(|| format!("cannot stat {}", p.display()))?.ino();
        j.push_str(&format!("mv {from} {to} {ino}\n"));
    }
    if let Some(d) = done {
        for l in [Level::Daily, Level::Weekly, Level::Monthly, Level::Yearly] {
            j.push_str(&format!("done {} {}\n", l.name(), if d.get(l).is_empty() { "-1" } else { d.get(l) }));
        }
    }
    crate::fsutil::write_atomic(&job_dir.join(JOURNAL), j.as_bytes(), crate::fsutil::Perm::Mode(0o600))?;
    apply_journal(job_dir)
}

/// Finish a rotation a crash cut short (see [`JOURNAL`]); returns the renames done.
pub fn recover(job_dir: &Path) -> Result<Vec<String>> {
    if !job_dir.join(JOURNAL).exists() {
        return Ok(Vec::new());
    }
    apply_journal(job_dir)
}

/// A journal entry: one archive-dir name, or `.AFFA-TRASH/NAME` (nothing that leaves the job dir).
fn journal_path(job_dir: &Path, name: &str) -> Option<PathBuf> {
    let ok = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0');
    match name.split_once('/') {
        None if ok(name) => Some(job_dir.join(name)),
        Some((TRASH, n)) if ok(n) => Some(job_dir.join(TRASH).join(n)),
        _ => None,
    }
}

fn apply_journal(job_dir: &Path) -> Result<Vec<String>> {
    let jp = job_dir.join(JOURNAL);
    let text = fs::read_to_string(&jp).ctx(|| format!("cannot read {}", jp.display()))?;
    let mut done = Vec::new();
    let mut dd: Option<DoneDates> = None;
    let bad = || {
        crate::error::Error::damaged(format!(
            "{} is damaged; move it away and check the archive names of {}",
            jp.display(),
            job_dir.display()
        ))
    };
    let mut lines = text.lines();
    let version = match lines.next() {
        Some("affa-rotation-journal 1") => 1,
        Some("affa-rotation-journal 2") => 2,
        _ => return Err(bad()),
    };
    let mut moves = Vec::new();
    for line in lines {
        let w: Vec<&str> = line.split(' ').collect();
        match w.as_slice() {
            ["mv", from, to] if version == 1 => moves.push((
                journal_path(job_dir, from).ok_or_else(bad)?,
                journal_path(job_dir, to).ok_or_else(bad)?,
                None,
            )),
            ["mv", from, to, ino] if version == 2 => moves.push((
                journal_path(job_dir, from).ok_or_else(bad)?,
                journal_path(job_dir, to).ok_or_else(bad)?,
                Some(ino.parse::<u64>().map_err(|_| bad())?),
            )),
            ["done", l, v] => {
                let l = Level::parse(l).filter(|l| *l != Level::Scheduled).ok_or_else(bad)?;
                let d = dd.get_or_insert_with(DoneDates::default);
                d.values[l as usize] = if *v == "-1" { String::new() } else { v.to_string() };
            }
            _ => return Err(bad()),
        }
    }
    // Replaying is idempotent: a step is done when its source is there, still the directory
    // the journal named (its inode), and its target free. Version 1 had no inode: there a
    // finished step's target staying occupied was the only sign it was done.
    for (from, to, ino) in moves {
        let same = match (fs::symlink_metadata(&from), ino) {
            (Ok(m), Some(i)) => m.ino() == i,
            (Ok(_), None) => true,
            (Err(_), _) => false,
        };
        if same && fs::symlink_metadata(&to).is_err() {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
            }
            fs::rename(&from, &to).ctx(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
            done.push(format!("{} -> {}", name_of(&from), name_of(&to)));
            crate::interrupt::crash_point("rename");
        }
    }
    if let Some(d) = dd {
        d.write(job_dir)?;
    }
    fs::remove_file(&jp).ctx(|| format!("cannot remove {}", jp.display()))?;
    Ok(done)
}

/// The renames of one shift, worked out on the names present now (see [`shift`]).
fn plan_shift(job_dir: &Path, level: Level, keeps: Keeps, stamp: &str) -> Result<Vec<(String, String)>> {
    use std::collections::HashSet;
    let mut dirs: HashSet<String> = HashSet::new();
    let mut all: HashSet<String> = HashSet::new();
    match fs::read_dir(job_dir) {
        Ok(rd) => {
            for e in rd {
                let e = e.ctx(|| format!("cannot read {}", job_dir.display()))?;
                let n = e.file_name().to_string_lossy().into_owned();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    dirs.insert(n.clone());
                }
                all.insert(n);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| format!("cannot read {}", job_dir.display())),
    }
    let mut plan: Vec<(String, String)> = Vec::new();
    let p = |l: Level, i: u32| format!("{}.{}", l.name(), i);
    let running_valid = running_report(job_dir).is_some();
    let k = keeps.of(level);
    // Every name the shift or its promotion could touch is a directory, or absent: a file or a
    // symbolic link there is not a gap, and the shift would stop at it after trashing the
    // oldest archive. Refused before anything moves.
    let mut touched = vec![level];
    while let Some(b) = touched.last().and_then(|l| l.below()) {
        touched.push(b);
    }
    for l in touched {
        for i in 0..keeps.of(l) {
            let n = p(l, i);
            if all.contains(&n) && !dirs.contains(&n) {
                return Err(crate::error::Error::new(format!(
                    "{} is not a directory (a file or a symbolic link where an archive belongs); affa does not rotate over it: move it away, then run again",
                    job_dir.join(&n).display()
                )));
            }
        }
    }
    let mut mv = |from: String, to: String, dirs: &mut HashSet<String>, all: &mut HashSet<String>| {
        dirs.remove(&from);
        all.remove(&from);
        if !to.contains('/') {
            dirs.insert(to.clone());
            all.insert(to.clone());
        }
        plan.push((from, to));
    };
    if k == 0 {
        return Ok(plan);
    }
    if dirs.contains(&p(level, 0)) && (level != Level::Scheduled || running_valid) {
        // A gap below the end (left by a crash between two renames, or an archive deleted by
        // hand) is closed up first: shifting stops at the first free index and nothing falls
        // off the end.
        let top = match (1..k).find(|&i| !all.contains(&p(level, i))) {
            Some(gap) => gap,
            None => {
                let last = p(level, k - 1);
                if dirs.contains(&last) {
                    let to = format!("{TRASH}/{}.{}-{}-{}", level.name(), k - 1, stamp, std::process::id());
                    mv(last, to, &mut dirs, &mut all);
                }
                k - 1
            }
        };
        for i in (1..=top).rev() {
            if dirs.contains(&p(level, i - 1)) {
                mv(p(level, i - 1), p(level, i), &mut dirs, &mut all);
            }
        }
    }
    if level == Level::Scheduled {
        if !all.contains(&p(level, 0)) && running_valid {
            mv(RUNNING.to_string(), p(level, 0), &mut dirs, &mut all);
        }
        return Ok(plan);
    }
    // Promotion source: the oldest archive of the level below; if that level keeps nothing,
    // the level below it, and so on.
    let mut src = None;
    let mut below = level.below();
    while let Some(b) = below {
        let kb = keeps.of(b);
        if kb > 0 {
            src = Some(p(b, kb - 1));
            break;
        }
        below = b.below();
    }
    if let Some(src) = src {
        if dirs.contains(&src) && !all.contains(&p(level, 0)) {
            mv(src, p(level, 0), &mut dirs, &mut all);
        }
    }
    Ok(plan)
}

/// Delete what rotation moved to the trash.
pub fn empty_trash(job_dir: &Path) -> Result<()> {
    let trash = job_dir.join(TRASH);
    if trash.exists() {
        remove_tree(&trash)?;
    }
    Ok(())
}

/// Remove the directories directly in `job_dir` whose name starts with `prefix` (the staging
/// directories of restores killed before they could remove their own: `.restore-staging.PID`,
/// `.offsite-restore.PID`). Only for a caller holding the job's lock: no live restore of the
/// job owns one then. Best effort: what cannot be removed stays for the next time.
pub fn remove_leftover_dirs(job_dir: &Path, prefix: &str) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(rd) = fs::read_dir(job_dir) {
        for e in rd.flatten() {
            let dir = e.file_type().is_ok_and(|t| t.is_dir());
            if dir && e.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                let _ = remove_tree(&e.path());
            }
        }
    }
}

/// `rm -rf`, tolerant of read-only directories inside archives.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Some directory inside may lack the write bit: make directories writable, retry.
            make_dirs_writable(path);
            fs::remove_dir_all(path).ctx(|| format!("cannot delete {}", path.display()))
        }
    }
}

fn make_dirs_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = fs::symlink_metadata(path) {
        if md.is_dir() {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(md.permissions().mode() | 0o700));
            if let Ok(rd) = fs::read_dir(path) {
                for e in rd.flatten() {
                    make_dirs_writable(&e.path());
                }
            }
        }
    }
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Archives beyond the keep counts (what `--cleanup` deletes).
pub fn beyond_keep(job_dir: &Path, keeps: Keeps) -> Result<Vec<Archive>> {
    Ok(list(job_dir)?.into_iter().filter(|a| a.index >= keeps.of(a.level)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(dir: &Path, name: &str, date: &str) {
        let p = dir.join(name);
        fs::create_dir_all(&p).unwrap();
        let mut r = Report::default();
        r.set("Date", date);
        r.write(&p).unwrap();
        if name == RUNNING {
            mark_running_complete(dir).unwrap();
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        list(dir).unwrap().iter().map(|a| a.name()).collect()
    }

    #[test]
    fn archive_names_are_strict() {
        assert_eq!(parse_archive_name("daily.3"), Some((Level::Daily, 3)));
        assert_eq!(parse_archive_name("daily.03"), None);
        assert_eq!(parse_archive_name("scheduled.running"), None);
        assert_eq!(parse_archive_name("hourly.1"), None);
        assert_eq!(parse_archive_name("daily."), None);
    }

    #[test]
    fn scheduled_shift_needs_a_valid_running() {
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([2, 7, 4, 12, 2]);
        mk(d.path(), "scheduled.0", "202601010000");
        fs::create_dir(d.path().join(RUNNING)).unwrap();
        assert!(shift(d.path(), Level::Scheduled, keeps, "x").unwrap().is_empty());
        assert_eq!(names(d.path()), ["scheduled.0"]);
        mk(d.path(), RUNNING, "202601020000");
        shift(d.path(), Level::Scheduled, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.1"]);
        mk(d.path(), RUNNING, "202601030000");
        shift(d.path(), Level::Scheduled, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.1"]);
        let a = list(d.path()).unwrap();
        assert_eq!(a[0].report.as_ref().unwrap().date(), Some("202601030000"));
        assert_eq!(a[1].report.as_ref().unwrap().date(), Some("202601020000"));
        assert!(d.path().join(TRASH).join(format!("scheduled.1-x-{}", std::process::id())).is_dir());
    }

    #[test]
    fn monthly_falls_back_past_every_empty_level() {
        // weeklyKeep=0 and dailyKeep=0: monthly is promoted from scheduled. Affa 3 tested
        // scheduledKeep instead of dailyKeep here and promoted nothing.
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([2, 0, 0, 3, 0]);
        mk(d.path(), "scheduled.0", "202601020000");
        mk(d.path(), "scheduled.1", "202601010000");
        shift(d.path(), Level::Monthly, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0", "monthly.0"]);
        // weeklyKeep=0 but dailyKeep>0: the daily level is the source, even if it is empty yet.
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([1, 2, 0, 3, 0]);
        mk(d.path(), "scheduled.0", "202601020000");
        shift(d.path(), Level::Monthly, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0"]);
        mk(d.path(), "daily.1", "202601010000");
        shift(d.path(), Level::Monthly, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0", "monthly.0"]);
    }

    #[test]
    fn link_dest_basis_is_the_newest_valid_archive() {
        let d = tempfile::tempdir().unwrap();
        mk(d.path(), "daily.0", "202601050000");
        mk(d.path(), "scheduled.0", "202601040000");
        fs::create_dir(d.path().join("scheduled.1")).unwrap(); // no report: invalid
        assert_eq!(newest_valid(d.path()).unwrap().unwrap().name(), "daily.0");
    }

    #[test]
    fn an_interrupted_rotation_is_finished_from_its_journal() {
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([3, 0, 0, 0, 0]);
        mk(d.path(), "scheduled.0", "202601030000");
        mk(d.path(), "scheduled.1", "202601020000");
        mk(d.path(), "scheduled.2", "202601010000");
        mk(d.path(), RUNNING, "202601040000");
        let plan = plan_shift(d.path(), Level::Scheduled, keeps, "x").unwrap();
        assert_eq!(plan.len(), 4, "{plan:?}");
        let mut j = String::from("affa-rotation-journal 1\n");
        for (f, t) in &plan {
            j.push_str(&format!("mv {f} {t}\n"));
        }
        fs::write(d.path().join(JOURNAL), j).unwrap();
        // The crash came after two of the four renames.
        for (f, t) in &plan[..2] {
            fs::create_dir_all(d.path().join(TRASH)).unwrap();
            fs::rename(d.path().join(f), d.path().join(t)).unwrap();
        }
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.2"]);
        recover(d.path()).unwrap();
        let dates: Vec<String> =
            list(d.path()).unwrap().iter().map(|a| a.report.as_ref().unwrap().date().unwrap().to_string()).collect();
        assert_eq!(dates, ["202601040000", "202601030000", "202601020000"]);
        assert!(!d.path().join(JOURNAL).exists());
        assert!(recover(d.path()).unwrap().is_empty());
    }

    /// A journal that was carried out whole but not removed (a crash just before), found after
    /// the trash was emptied by hand: its steps name directories that moved since (their
    /// inodes), so nothing moves again.
    #[test]
    fn a_finished_journal_replayed_after_the_trash_was_emptied_moves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([3, 0, 0, 0, 0]);
        for (n, date) in
            [("scheduled.0", "202601030000"), ("scheduled.1", "202601020000"), ("scheduled.2", "202601010000")]
        {
            mk(d.path(), n, date);
        }
        mk(d.path(), RUNNING, "202601040000");
        let plan = plan_shift(d.path(), Level::Scheduled, keeps, "x").unwrap();
        let mut j = String::from("affa-rotation-journal 2\n");
        for (f, t) in &plan {
            j.push_str(&format!("mv {f} {t} {}\n", fs::symlink_metadata(d.path().join(f)).unwrap().ino()));
        }
        for (f, t) in &plan {
            fs::create_dir_all(d.path().join(TRASH)).unwrap();
            fs::rename(d.path().join(f), d.path().join(t)).unwrap();
        }
        fs::write(d.path().join(JOURNAL), j).unwrap();
        fs::remove_dir_all(d.path().join(TRASH)).unwrap();
        let before: Vec<String> =
            list(d.path()).unwrap().iter().map(|a| a.report.as_ref().unwrap().date().unwrap().to_string()).collect();
        assert_eq!(before, ["202601040000", "202601030000", "202601020000"]);
        assert!(recover(d.path()).unwrap().is_empty(), "a finished journal moved archives again");
        let after: Vec<String> =
            list(d.path()).unwrap().iter().map(|a| a.report.as_ref().unwrap().date().unwrap().to_string()).collect();
        assert_eq!(after, before);
        assert!(!d.path().join(JOURNAL).exists());
    }

    /// A hand-edited `.doneDates` value that is not a period reads as never (a value with a
    /// space made the rotation journal that records it unreadable on every later run).
    #[test]
    fn done_dates_read_only_periods() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(DONE_DATES), "[doneDates]\ndaily=2026 12\nweekly=202647\nmonthly=-1\nyearly=x\n")
            .unwrap();
        let dd = DoneDates::read(d.path());
        assert_eq!(
            [Level::Daily, Level::Weekly, Level::Monthly, Level::Yearly].map(|l| dd.get(l).to_string()),
            ["", "202647", "", ""]
        );
    }

    /// A file or a symbolic link at an archive's name: the rotation is refused before anything
    /// moves (it trashed the oldest archive, then stopped at the file, on every run).
    #[test]
    fn a_file_at_an_archive_name_stops_the_rotation_before_anything_moves() {
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([3, 0, 0, 0, 0]);
        mk(d.path(), "scheduled.0", "202601030000");
        fs::write(d.path().join("scheduled.1"), "not an archive").unwrap();
        mk(d.path(), "scheduled.2", "202601010000");
        mk(d.path(), RUNNING, "202601040000");
        let e = shift(d.path(), Level::Scheduled, keeps, "x").unwrap_err().to_string();
        assert!(e.ends_with("scheduled.1 is not a directory (a file or a symbolic link where an archive belongs); affa does not rotate over it: move it away, then run again"), "{e}");
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.2"]);
        assert!(!d.path().join(TRASH).exists() && !d.path().join(JOURNAL).exists());
        // A symbolic link to an archive directory is no archive either, also below the level
        // a promotion takes from.
        fs::remove_file(d.path().join("scheduled.1")).unwrap();
        std::os::unix::fs::symlink(d.path().join("scheduled.2"), d.path().join("scheduled.1")).unwrap();
        assert!(shift(d.path(), Level::Daily, Keeps([3, 2, 0, 0, 0]), "x").is_err());
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.2"]);
    }

    #[test]
    fn a_journal_cannot_move_anything_outside_the_job_dir() {
        let d = tempfile::tempdir().unwrap();
        let job = d.path().join("job");
        mk(&job, "scheduled.0", "202601030000");
        for bad in [
            "mv ../x scheduled.1",
            "mv scheduled.0 ../stolen",
            "mv scheduled.0 .AFFA-TRASH/../../stolen",
            "mv /etc scheduled.5",
            "done scheduled 1",
            "rm -rf /",
        ] {
            fs::write(job.join(JOURNAL), format!("affa-rotation-journal 1\n{bad}\n")).unwrap();
            assert!(recover(&job).is_err(), "{bad}");
            assert_eq!(names(&job), ["scheduled.0"]);
            assert!(!d.path().join("stolen").exists());
        }
    }

    #[test]
    fn a_gap_is_closed_without_trashing() {
        let d = tempfile::tempdir().unwrap();
        let keeps = Keeps([3, 0, 0, 0, 0]);
        mk(d.path(), "scheduled.0", "202601030000");
        mk(d.path(), "scheduled.2", "202601010000");
        mk(d.path(), RUNNING, "202601040000");
        shift(d.path(), Level::Scheduled, keeps, "x").unwrap();
        assert_eq!(names(d.path()), ["scheduled.0", "scheduled.1", "scheduled.2"]);
        assert!(!d.path().join(TRASH).exists());
    }
}

/// Rotation planning and keep arithmetic: the exact renames of each case.
#[cfg(test)]
mod plan_tests {
    use super::*;

    fn mk(dir: &Path, name: &str) {
        let p = dir.join(name);
        fs::create_dir_all(&p).unwrap();
        let mut r = Report::default();
        r.set("Date", "202601010000");
        r.write(&p).unwrap();
        if name == RUNNING {
            mark_running_complete(dir).unwrap();
        }
    }

    fn dir_with(names: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for n in names {
            mk(d.path(), n);
        }
        d
    }

    fn plan(d: &tempfile::TempDir, level: Level, keeps: [u32; 5]) -> Vec<(String, String)> {
        plan_shift(d.path(), level, Keeps(keeps), "STAMP").unwrap()
    }

    fn mv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn a_full_scheduled_level_trashes_the_oldest_and_takes_the_new_transfer() {
        let d = dir_with(&["scheduled.0", "scheduled.1", "scheduled.2", RUNNING]);
        let trash = format!(".AFFA-TRASH/scheduled.2-STAMP-{}", std::process::id());
        assert_eq!(
            plan(&d, Level::Scheduled, [3, 7, 4, 12, 2]),
            mv(&[
                ("scheduled.2", &trash),
                ("scheduled.1", "scheduled.2"),
                ("scheduled.0", "scheduled.1"),
                (RUNNING, "scheduled.0")
            ])
        );
        // scheduledKeep=1: the one archive goes to the trash, the transfer takes its place.
        let d = dir_with(&["scheduled.0", RUNNING]);
        let trash = format!(".AFFA-TRASH/scheduled.0-STAMP-{}", std::process::id());
        assert_eq!(
            plan(&d, Level::Scheduled, [1, 0, 0, 0, 0]),
            mv(&[("scheduled.0", &trash), (RUNNING, "scheduled.0")])
        );
    }

    #[test]
    fn scheduled_moves_only_for_a_complete_transfer() {
        // No transfer, or one without affa's completion marker: nothing moves.
        let d = dir_with(&["scheduled.0"]);
        assert!(plan(&d, Level::Scheduled, [3, 0, 0, 0, 0]).is_empty());
        fs::create_dir(d.path().join(RUNNING)).unwrap();
        Report::parse("[Report]\nDate=202601020000\n").write(&d.path().join(RUNNING)).unwrap();
        assert!(plan(&d, Level::Scheduled, [3, 0, 0, 0, 0]).is_empty());
        // The first archive of a job.
        let d = dir_with(&[RUNNING]);
        assert_eq!(plan(&d, Level::Scheduled, [3, 0, 0, 0, 0]), mv(&[(RUNNING, "scheduled.0")]));
    }

    #[test]
    fn promotion_takes_the_oldest_archive_kept_below() {
        // daily keeps 3 and has two: they move up, the oldest scheduled (index keep-1) comes in.
        let d = dir_with(&["scheduled.0", "scheduled.1", "daily.0", "daily.1"]);
        assert_eq!(
            plan(&d, Level::Daily, [2, 3, 4, 12, 2]),
            mv(&[("daily.1", "daily.2"), ("daily.0", "daily.1"), ("scheduled.1", "daily.0")])
        );
        // scheduledKeep=3 but only two scheduled archives yet: scheduled.2 is missing, no promotion.
        let d = dir_with(&["scheduled.0", "scheduled.1"]);
        assert!(plan(&d, Level::Daily, [3, 3, 4, 12, 2]).is_empty());
        // An empty level only takes the archive from below.
        let d = dir_with(&["daily.0", "daily.6"]);
        assert_eq!(plan(&d, Level::Weekly, [1, 7, 4, 12, 2]), mv(&[("daily.6", "weekly.0")]));
        // A level that keeps nothing never moves anything.
        let d = dir_with(&["scheduled.0", "weekly.0"]);
        assert!(plan(&d, Level::Weekly, [1, 7, 0, 12, 2]).is_empty());
    }

    #[test]
    fn promotion_falls_through_levels_that_keep_nothing() {
        // yearly from weekly (monthlyKeep=0): the oldest kept weekly.
        let d = dir_with(&["weekly.0", "weekly.1"]);
        assert_eq!(plan(&d, Level::Yearly, [1, 7, 2, 0, 2]), mv(&[("weekly.1", "yearly.0")]));
        // yearly from scheduled when every level between keeps nothing.
        let d = dir_with(&["scheduled.0", "scheduled.1", "yearly.0"]);
        let trash = format!(".AFFA-TRASH/yearly.0-STAMP-{}", std::process::id());
        assert_eq!(plan(&d, Level::Yearly, [2, 0, 0, 0, 1]), mv(&[("yearly.0", &trash), ("scheduled.1", "yearly.0")]));
    }

    #[test]
    fn a_gap_stops_the_shift_and_nothing_falls_off() {
        let d = dir_with(&["daily.0", "daily.1", "daily.3", "daily.4", "scheduled.0"]);
        assert_eq!(
            plan(&d, Level::Daily, [1, 5, 4, 12, 2]),
            mv(&[("daily.1", "daily.2"), ("daily.0", "daily.1"), ("scheduled.0", "daily.0")])
        );
    }

    #[test]
    fn cleanup_deletes_exactly_the_archives_beyond_the_keep_counts() {
        let d = dir_with(&["scheduled.0", "scheduled.1", "scheduled.2", "daily.0", "daily.1", "weekly.0", "yearly.2"]);
        let names: Vec<String> =
            beyond_keep(d.path(), Keeps([2, 1, 4, 12, 2])).unwrap().iter().map(|a| a.name()).collect();
        assert_eq!(names, ["scheduled.2", "daily.1", "yearly.2"]);
        assert!(beyond_keep(d.path(), Keeps([3, 2, 1, 0, 3])).unwrap().is_empty());
    }

    #[test]
    fn the_period_keys_of_done_dates() {
        let t = NaiveDateTime::parse_from_str("2026-03-02 10:00", "%Y-%m-%d %H:%M").unwrap();
        let keys: Vec<String> = Level::ALL.iter().map(|l| l.period(t)).collect();
        assert_eq!(keys, ["", "2026061", "202609", "202603", "2026"]);
        assert_eq!(
            Level::ALL.map(Level::keep_key),
            ["scheduledKeep", "dailyKeep", "weeklyKeep", "monthlyKeep", "yearlyKeep"]
        );
        assert_eq!(
            Level::ALL.map(Level::below),
            [None, Some(Level::Scheduled), Some(Level::Daily), Some(Level::Weekly), Some(Level::Monthly)]
        );
    }
}
