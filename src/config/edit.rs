//! Changing a job's configuration file in place (`--rename-job`, `--move-archive`,
//! `--send-key` pinning `ESXiThumbprint`).
//!
//! Owns: line-level edits that keep the user's comments and layout. Must never: leave a half
//! written file (temp + rename), or touch another job's section.

use std::fs;
use std::path::Path;

use crate::config::Job;
use crate::error::{IoContext, Result};

fn section_name(line: &str) -> Option<&str> {
    let l = line.trim();
    l.strip_prefix('[')?.strip_suffix(']').map(str::trim)
}

fn key_of(line: &str) -> Option<&str> {
    let l = line.trim();
    if l.starts_with('#') || l.starts_with(';') {
        return None;
    }
    l.split_once('=').map(|(k, _)| k.trim())
}

fn write(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    // The file may hold ESXiPassword: keep its mode (0600 for a new one) from the first byte.
    crate::fsutil::write_atomic(path, text.as_bytes(), crate::fsutil::Perm::KeepOr(0o600))
}

/// Set `key=value` in the job's own section (replacing an existing line, else appending one
/// after the section's last line).
pub fn set_key(job: &Job, key: &str, value: &str) -> Result<()> {
    let path = &job.origin.file;
    let text = fs::read_to_string(path).ctx(|| format!("cannot read {}", path.display()))?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let start = job.origin.line - 1;
    let mut end = lines.len();
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        if section_name(l).is_some() {
            end = i;
            break;
        }
    }
    let new = format!("{key}={value}");
    if let Some(i) = (start + 1..end).find(|&i| key_of(&lines[i]).is_some_and(|k| k.eq_ignore_ascii_case(key))) {
        lines[i] = new;
    } else {
        let mut at = end;
        while at > start + 1 && lines[at - 1].trim().is_empty() {
            at -= 1;
        }
        lines.insert(at, new);
    }
    write(path, &lines)
}

/// Rename the job's section header.
pub fn rename_section(job: &Job, new: &str) -> Result<()> {
    let path = &job.origin.file;
    let text = fs::read_to_string(path).ctx(|| format!("cannot read {}", path.display()))?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let i = job.origin.line - 1;
    if lines.get(i).and_then(|l| section_name(l)) != Some(job.name.as_str()) {
        bail!(Config, "{} changed since it was read: line {} is not [{}]", path.display(), job.origin.line, job.name);
    }
    lines[i] = format!("[{new}]");
    write(path, &lines)
}

/// Remove the job's section (header and keys, up to the next section).
pub fn remove_section(job: &Job) -> Result<()> {
    let path = &job.origin.file;
    let text = fs::read_to_string(path).ctx(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let start = job.origin.line - 1;
    let end = (start + 1..lines.len()).find(|&i| section_name(&lines[i]).is_some()).unwrap_or(lines.len());
    let kept: Vec<String> = lines[..start].iter().chain(&lines[end..]).cloned().collect();
    write(path, &kept)
}
