//! Changing a job's configuration file in place (`--rename-job`, `--move-archive`,
//! `--send-key` pinning `ESXiThumbprint`).
//!
//! Owns: line-level edits that keep the user's comments and layout, each under a lock of the
//! file's directory, the section found by its header as the file is now. Must never: leave a half
//! written file (temp + rename), or touch another job's section.

use std::fs;
use std::path::Path;

use crate::config::Job;
use crate::error::{IoContext, Result};

/// The UTF-8 byte order mark an editor may put before the first line.
const BOM: &[u8] = "\u{feff}".as_bytes();

/// A line as text for matching only (the file is edited as bytes: a Latin-1 comment and a byte
/// order mark are written back as they were).
fn text(line: &[u8]) -> String {
    String::from_utf8_lossy(line.strip_prefix(BOM).unwrap_or(line)).into_owned()
}

fn section_name(line: &[u8]) -> Option<String> {
    let l = text(line);
    let l = l.trim();
    l.strip_prefix('[')?.strip_suffix(']').map(|n| n.trim().to_string())
}

fn key_of(line: &[u8]) -> Option<String> {
    let l = text(line);
    let l = l.trim();
    if l.starts_with('#') || l.starts_with(';') {
        return None;
    }
    l.split_once('=').map(|(k, _)| k.trim().to_string())
}

fn blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn write(path: &Path, lines: &[Vec<u8>]) -> Result<()> {
    let mut text = lines.join(&b'\n');
    text.push(b'\n');
    // The file may hold ESXiPassword: keep its mode (0600 for a new one) from the first byte.
    crate::fsutil::write_atomic(path, &text, crate::fsutil::Perm::KeepOr(0o600))
}

/// An exclusive lock on the directory of a configuration file for one read-modify-write: two
/// affa processes editing the same file (a `--send-key` and a run's `chattyOnSuccess`) cannot
/// lose each other's edit. Released when dropped.
struct DirLock {
    _held: std::fs::File,
}

fn lock_dir(path: &Path) -> Result<DirLock> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let f = fs::File::open(dir).ctx(|| format!("cannot open {}", dir.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot lock {}", dir.display()))?;
    Ok(DirLock { _held: f })
}

/// The job's file, locked, its lines, and the index of the job's header `[NAME]` as the file
/// is now (the line number recorded when it was loaded may be stale: another edit, by affa or
/// by hand, may have added or removed lines above it).
fn open_section(job: &Job) -> Result<(DirLock, Vec<Vec<u8>>, usize)> {
    let path = &job.origin.file;
    let lock = lock_dir(path)?;
    let bytes = fs::read(path).ctx(|| format!("cannot read {}", path.display()))?;
    let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    // As `str::lines`: no empty last line after the final newline, and no '\r' at line ends.
    if bytes.ends_with(b"\n") || bytes.is_empty() {
        lines.pop();
    }
    for l in &mut lines {
        if l.ends_with(b"\r") {
            l.pop();
        }
    }
    let at: Vec<usize> =
        (0..lines.len()).filter(|&i| section_name(&lines[i]).as_deref() == Some(job.name.as_str())).collect();
    match at.as_slice() {
        [i] => Ok((lock, lines, *i)),
        [] => bail!(
            Config,
            "{} changed since it was read: it has no section [{}] any more; nothing was written",
            path.display(),
            job.name
        ),
        _ => bail!(Config, "{} has the section [{}] {} times; nothing was written", path.display(), job.name, at.len()),
    }
}

fn is_comment(l: &[u8]) -> bool {
    let l = text(l);
    let l = l.trim();
    l.starts_with('#') || l.starts_with(';')
}

/// Where the comment lines that describe the header at `header` begin: the comment lines right
/// above it, when a blank line (or the start of the file) is above them; comment lines right
/// below a section's keys (a key commented out) stay with that section.
fn header_comments(lines: &[Vec<u8>], header: usize) -> usize {
    let mut c = header;
    while c > 0 && is_comment(&lines[c - 1]) {
        c -= 1;
    }
    if c < header && (c == 0 || blank(&lines[c - 1])) {
        c
    } else {
        header
    }
}

/// The end (exclusive) of the section whose header is at `start`: the next header, less the
/// comment lines that describe that next one.
fn section_end(lines: &[Vec<u8>], start: usize) -> usize {
    match (start + 1..lines.len()).find(|&i| section_name(&lines[i]).is_some()) {
        Some(next) => header_comments(lines, next).max(start + 1),
        None => lines.len(),
    }
}

/// Refuse before anything is moved when the job's file cannot be edited: a symbolic link
/// (affa replaces a file by rename, and never writes through a link), not a regular file, or
/// a directory affa cannot write in. (`--rename-job` and `--move-archive` move the archives
/// first: a failed edit after that would leave them where the configuration does not say.)
pub fn check_editable(job: &Job) -> Result<()> {
    let path = &job.origin.file;
    let m = fs::symlink_metadata(path).ctx(|| format!("cannot read {}", path.display()))?;
    if m.file_type().is_symlink() {
        bail!(Config, "{} is a symbolic link: affa edits a configuration file by replacing it and never writes through a link; make it a regular file, or edit it by hand; nothing was changed", path.display());
    }
    if !m.is_file() {
        bail!(Config, "{} is not a regular file; nothing was changed", path.display());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_err() {
        bail!(
            Config,
            "cannot write in {} (where affa replaces {}): nothing was changed",
            dir.display(),
            path.display()
        );
    }
    // The section is there as the file is now (read, found once).
    open_section(job).map(drop)
}

/// Set `key=value` in the job's own section (replacing an existing line, else appending one
/// after the section's last line).
pub fn set_key(job: &Job, key: &str, value: &str) -> Result<()> {
    let (_lock, mut lines, start) = open_section(job)?;
    let end = (start + 1..lines.len()).find(|&i| section_name(&lines[i]).is_some()).unwrap_or(lines.len());
    let new = format!("{key}={value}");
    if let Some(i) = (start + 1..end).find(|&i| key_of(&lines[i]).is_some_and(|k| k.eq_ignore_ascii_case(key))) {
        lines[i] = new.into_bytes();
    } else {
        let mut at = section_end(&lines, start);
        while at > start + 1 && blank(&lines[at - 1]) {
            at -= 1;
        }
        lines.insert(at, new.into_bytes());
    }
    write(&job.origin.file, &lines)
}

/// Rename the job's section header.
pub fn rename_section(job: &Job, new: &str) -> Result<()> {
    let (_lock, mut lines, i) = open_section(job)?;
    let bom = if lines[i].starts_with(BOM) { BOM } else { b"" };
    lines[i] = [bom, format!("[{new}]").as_bytes()].concat();
    write(&job.origin.file, &lines)
}

/// Remove the job's section (the comment lines right above its header, the header and keys,
/// up to the next section; the comments right above the next section's header stay with it).
pub fn remove_section(job: &Job) -> Result<()> {
    let (_lock, lines, header) = open_section(job)?;
    let end = section_end(&lines, header);
    let start = header_comments(&lines, header);
    let kept: Vec<Vec<u8>> = lines[..start].iter().chain(&lines[end..]).cloned().collect();
    write(&job.origin.file, &kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const TEXT: &str = "[GlobalAffaConfig]\nRootDir=/srv/b\n\n[vm-a]\nremoteHostName=a\n\n# vm-b: the database host\n[vm-b]\nremoteHostName=b\n\n# the last one\n[vm-c]\nremoteHostName=c\n";

    fn setup() -> (tempfile::TempDir, Config) {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("jobs.conf"), TEXT).unwrap();
        let cfg = Config::load(t.path()).unwrap();
        (t, cfg)
    }

    /// The section is found by its header as the file is now: an edit of an earlier section
    /// (one line more) does not make the next edit land in the previous job.
    #[test]
    fn edits_find_the_section_as_the_file_is_now() {
        let (t, cfg) = setup();
        let f = t.path().join("jobs.conf");
        set_key(cfg.job("vm-a").unwrap(), "dailyKeep", "5").unwrap();
        set_key(cfg.job("vm-b").unwrap(), "dailyKeep", "6").unwrap();
        let text = fs::read_to_string(&f).unwrap();
        assert_eq!(
            text,
            "[GlobalAffaConfig]\nRootDir=/srv/b\n\n[vm-a]\nremoteHostName=a\ndailyKeep=5\n\n# vm-b: the database host\n[vm-b]\nremoteHostName=b\ndailyKeep=6\n\n# the last one\n[vm-c]\nremoteHostName=c\n"
        );
        let again = Config::load(t.path()).unwrap();
        assert!(again.problems.is_empty(), "{:?}", again.problems);
        assert_eq!(again.job("vm-b").unwrap().get("dailyKeep"), "6");
        // Removed: the comment above the next section stays with it.
        remove_section(cfg.job("vm-b").unwrap()).unwrap();
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            "[GlobalAffaConfig]\nRootDir=/srv/b\n\n[vm-a]\nremoteHostName=a\ndailyKeep=5\n\n# vm-b: the database host\n# the last one\n[vm-c]\nremoteHostName=c\n"
                .replace("# vm-b: the database host\n", "")
        );
        // A section that is gone: an error, nothing written.
        let before = fs::read_to_string(&f).unwrap();
        let e = set_key(cfg.job("vm-b").unwrap(), "RootDir", "/x").unwrap_err().to_string();
        assert!(e.contains("has no section [vm-b] any more; nothing was written"), "{e}");
        assert_eq!(fs::read_to_string(&f).unwrap(), before);
        rename_section(cfg.job("vm-c").unwrap(), "vm-d").unwrap();
        assert!(fs::read_to_string(&f).unwrap().ends_with("# the last one\n[vm-d]\nremoteHostName=c\n"));
    }

    /// Edited as bytes: a byte order mark, a Latin-1 comment and a key commented out below a
    /// section stay as they were, in that section (the parser reads such a file; its edits
    /// must work too).
    #[test]
    fn a_file_with_a_bom_and_latin1_is_edited_byte_for_byte() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("jobs.conf");
        let text: &[u8] = b"\xef\xbb\xbf[vm-a]\nremoteHostName=a\n# caf\xe9\n#dailyKeep=9\n[vm-b]\nremoteHostName=b\n";
        fs::write(&f, text).unwrap();
        let cfg = Config::load(t.path()).unwrap();
        assert!(cfg.problems.is_empty(), "{:?}", cfg.problems);
        check_editable(cfg.job("vm-a").unwrap()).unwrap();
        set_key(cfg.job("vm-a").unwrap(), "dailyKeep", "5").unwrap();
        assert_eq!(
            fs::read(&f).unwrap(),
            b"\xef\xbb\xbf[vm-a]\nremoteHostName=a\n# caf\xe9\n#dailyKeep=9\ndailyKeep=5\n[vm-b]\nremoteHostName=b\n"
        );
        rename_section(cfg.job("vm-a").unwrap(), "vm-c").unwrap();
        assert!(fs::read(&f).unwrap().starts_with(b"\xef\xbb\xbf[vm-c]\n"));
        // vm-b's removal keeps vm-c's commented-out lines (no blank line above them).
        remove_section(cfg.job("vm-b").unwrap()).unwrap();
        assert_eq!(
            fs::read(&f).unwrap(),
            b"\xef\xbb\xbf[vm-c]\nremoteHostName=a\n# caf\xe9\n#dailyKeep=9\ndailyKeep=5\n"
        );
    }

    #[test]
    fn a_symlinked_file_is_refused_before_anything_moves() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real.conf.txt");
        fs::write(&real, "[web]\nremoteHostName=h\n").unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("web.conf")).unwrap();
        let cfg = Config::load(t.path()).unwrap();
        let e = check_editable(cfg.job("web").unwrap()).unwrap_err().to_string();
        assert!(e.contains("web.conf is a symbolic link") && e.ends_with("nothing was changed"), "{e}");
        fs::remove_file(t.path().join("web.conf")).unwrap();
        fs::copy(&real, t.path().join("web.conf")).unwrap();
        let cfg = Config::load(t.path()).unwrap();
        check_editable(cfg.job("web").unwrap()).unwrap();
    }
}
