//! The archive report `.AFFA3-REPORT` and rsync's `--stats` output.
//!
//! Owns: reading and writing the report (INI, section `[Report]`, Affa 3's keys) and turning
//! rsync's statistics into report keys. Must never: write a report that is not complete on disk
//! (an archive is valid only if it has its report, so it is written to a temp file, fsynced and
//! renamed).

use std::fs;
use std::path::Path;

use crate::error::Result;

pub const REPORT_FILE: &str = ".AFFA3-REPORT";
/// The most of a report any reader reads (archive contents are not trusted): a report affa
/// writes is never longer, or the archive it makes valid would not be recognised as complete.
pub const REPORT_MAX: usize = 1 << 20;
/// The report of an Affa 2 archive (`Key: value` lines), converted as Affa 3 does.
pub const AFFA2_REPORT_FILE: &str = ".AFFA-REPORT";

/// Ordered key/value pairs of `[Report]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub values: Vec<(String, String)>,
}

impl Report {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
    /// Set (replace) a key.
    pub fn set(&mut self, key: &str, value: impl ToString) {
        let value = value.to_string().replace(['\n', '\r'], " ");
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.values.push((key.to_string(), value)),
        }
    }
    /// `Date` as Affa writes it: `YYYYmmddHHMM`; None when missing or malformed.
    pub fn date(&self) -> Option<&str> {
        self.get("Date").filter(|d| d.len() == 12 && d.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn parse(text: &str) -> Report {
        let mut r = Report::default();
        for (k, v) in affa_core::keyvalue::pairs(text, Some("Report")) {
            r.values.push((k.to_string(), v.to_string()));
        }
        r
    }

    pub fn to_text(&self) -> String {
        let mut s = String::from("[Report]\n");
        for (k, v) in &self.values {
            s.push_str(&format!("{k}={v}\n"));
        }
        s
    }

    /// Read `DIR/.AFFA3-REPORT`; None if absent or without a valid Date.
    pub fn read(archive_dir: &Path) -> Option<Report> {
        // Archive contents are not trusted: no symlink followed, no fifo opened, at most 1 MiB.
        let f = crate::untrusted::open_regular(&archive_dir.join(REPORT_FILE)).ok()?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, REPORT_MAX as u64), &mut data).ok()?;
        let r = Report::parse(&String::from_utf8_lossy(&data));
        r.date()?;
        Some(r)
    }

    /// Write `DIR/.AFFA3-REPORT` atomically; a report longer than [`REPORT_MAX`] is refused
    /// (readers would not see all of it).
    pub fn write(&self, archive_dir: &Path) -> Result<()> {
        let text = self.to_text();
        if text.len() > REPORT_MAX {
            bail!(
                "the report of {} would be {} bytes, over the {REPORT_MAX} a reader reads",
                archive_dir.display(),
                text.len()
            );
        }
        crate::fsutil::write_atomic(&archive_dir.join(REPORT_FILE), text.as_bytes(), crate::fsutil::Perm::Mode(0o600))
    }

    /// Add rsync's `--stats` lines as CamelCase keys, as Affa does ("Total file size: 1,234
    /// bytes" -> `TotalFileSize=1234`).
    pub fn add_rsync_stats(&mut self, output: &str) {
        for (k, v) in parse_rsync_stats(output) {
            self.set(&k, v);
        }
    }
}

/// The report of an Affa 2 archive that has no `.AFFA3-REPORT`, converted as Affa 3's
/// `convertReportV2toV3` does: every `Key words: value` line whose value is numeric (or whose key
/// starts with `Date`) becomes `KeyWords=number` (thousands separators dropped), lines starting
/// with `#` and keys starting with `File` are skipped. The result is written as `.AFFA3-REPORT`
/// (so Affa 3 and affa read it alike) with the archive directory's time set to the old report's,
/// as Affa 3 does; when it cannot be written (a read-only disk) it is only returned. None when
/// there is no Affa 2 report (a regular file of at most 1 MiB) or it has no valid `Date`.
pub fn convert_affa2(archive_dir: &Path) -> Option<Report> {
    let old = archive_dir.join(AFFA2_REPORT_FILE);
    let md = fs::symlink_metadata(&old).ok()?;
    if !md.is_file() || md.len() > 1 << 20 || fs::symlink_metadata(archive_dir.join(REPORT_FILE)).is_ok() {
        return None;
    }
    let text = String::from_utf8_lossy(&fs::read(&old).ok()?).into_owned();
    let mut r = Report::default();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || !line.contains(": ") {
            continue;
        }
        let (k, v) = line.split_once(':')?;
        let (k, v) = (k.trim(), v.trim().replace(',', ""));
        if k.starts_with("File") || (!v.starts_with(|c: char| c == '-' || c.is_ascii_digit()) && !k.starts_with("Date"))
        {
            continue;
        }
        let Some(start) = v.find(|c: char| c == '-' || c == '.' || c.is_ascii_digit()) else { continue };
        let num: String = v[start..].chars().take_while(|c| *c == '-' || *c == '.' || c.is_ascii_digit()).collect();
        let key: String = k
            .split_whitespace()
            .map(|w| {
                let mut c = w.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .collect();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        r.set(&key, num);
    }
    r.date()?;
    let text = format!("; converted from {AFFA2_REPORT_FILE} (Affa V2)\n{}", r.to_text());
    if crate::fsutil::write_atomic(&archive_dir.join(REPORT_FILE), text.as_bytes(), crate::fsutil::Perm::Mode(0o600))
        .is_ok()
    {
        if let Ok(t) = md.modified() {
            let _ = fs::File::open(archive_dir).and_then(|d| d.set_modified(t));
        }
    }
    Some(r)
}

/// The keys rsync's `--stats` prints (3.x; `NumberOfFilesTransferred` of 2.6), as CamelCase.
/// Nothing else is taken from rsync's output: the host's rsync may print any line on the
/// client's stdout (its messages), and a `Date: 209912312359` taken as a report value would
/// make that archive the newest valid one for good (the default restore, the age NRPE checks).
pub const RSYNC_STATS_KEYS: [&str; 11] = [
    "NumberOfFiles",
    "NumberOfCreatedFiles",
    "NumberOfDeletedFiles",
    "NumberOfRegularFilesTransferred",
    "NumberOfFilesTransferred",
    "TotalFileSize",
    "TotalTransferredFileSize",
    "LiteralData",
    "MatchedData",
    "TotalBytesSent",
    "TotalBytesReceived",
];

/// rsync `--stats` output -> (CamelCaseKey, number) pairs, only for [`RSYNC_STATS_KEYS`].
/// Lines that are not statistics are ignored; never panics on any input.
pub fn parse_rsync_stats(output: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("rsync")
            || line.starts_with("sent ")
            || line.starts_with("total size is")
            || line.starts_with("File list")
        {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else { continue };
        if k.is_empty() || k.len() > 60 || !k.chars().all(|c| c.is_ascii_alphabetic() || c == ' ') {
            continue;
        }
        let key: String = k
            .split_whitespace()
            .map(|w| {
                let mut c = w.chars();
                match c.next() {
                    Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                    None => String::new(),
                }
            })
            .collect();
        let val: String = v.split_whitespace().next().unwrap_or("").replace(',', "");
        if !RSYNC_STATS_KEYS.contains(&key.as_str())
            || val.is_empty()
            || !val.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            continue;
        }
        out.push((key, val));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report longer than readers read is refused, not written (the archive it would make
    /// valid would not be recognised as complete); one just under the limit is read back whole.
    #[test]
    fn a_report_over_the_readers_limit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut r = Report::default();
        r.set("Date", "202603021100");
        r.set("ChunkVanishedFiles", "x".repeat(REPORT_MAX));
        let e = r.write(t.path()).unwrap_err().to_string();
        assert!(e.contains("over the 1048576 a reader reads"), "{e}");
        assert!(!t.path().join(REPORT_FILE).exists());
        r.set("ChunkVanishedFiles", "x".repeat(REPORT_MAX - 100));
        r.write(t.path()).unwrap();
        assert_eq!(Report::read(t.path()).unwrap(), r);
    }

    const STATS: &str = "\nNumber of files: 1,234 (reg: 1,000, dir: 234)\nNumber of created files: 10 (reg: 10)\nNumber of deleted files: 0\nNumber of regular files transferred: 12\nTotal file size: 5,678,901 bytes\nTotal transferred file size: 1,024 bytes\nLiteral data: 1,024 bytes\nMatched data: 0 bytes\nFile list size: 0\nFile list generation time: 0.001 seconds\nFile list transfer time: 0.000 seconds\nTotal bytes sent: 71\nTotal bytes received: 2,019\n\nsent 71 bytes  received 2,019 bytes  180.00 bytes/sec\ntotal size is 5,678,901  speedup is 0.13\n";

    #[test]
    fn rsync_stats_become_affa_keys() {
        let mut r = Report::default();
        r.add_rsync_stats(STATS);
        assert_eq!(r.get("NumberOfFiles"), Some("1234"));
        assert_eq!(r.get("TotalFileSize"), Some("5678901"));
        assert_eq!(r.get("TotalBytesReceived"), Some("2019"));
        assert_eq!(r.get("NumberOfRegularFilesTransferred"), Some("12"));
        assert_eq!(r.get("FileListSize"), None);
        assert_eq!(r.values.len(), 10);
        // What a host's rsync can print among the statistics (its messages reach stdout).
        let mut r = Report::default();
        r.add_rsync_stats(&format!("Date: 209912312359\nExecution Time: 1\nExit Status: 0\nAffa Version: 9\n{STATS}"));
        assert_eq!((r.get("Date"), r.get("ExecutionTime"), r.get("ExitStatus")), (None, None, None));
        assert_eq!(r.values.len(), 10);
    }

    #[test]
    fn report_round_trip_and_validity() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Report::default();
        r.set("Date", "202611261015");
        r.set("ExitStatus", 0);
        r.write(dir.path()).unwrap();
        assert_eq!(Report::read(dir.path()), Some(r));
        fs::write(dir.path().join(REPORT_FILE), "[Report]\nDate=garbage\n").unwrap();
        assert_eq!(Report::read(dir.path()), None);
        for junk in ["", "\u{0}\u{1}", "[Report]\n=\n==", "Number of files:\n:::"] {
            let _ = parse_rsync_stats(junk);
            let _ = Report::parse(junk);
        }
    }
}
