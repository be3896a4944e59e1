//! The VM record of an ESXi archive: `.affa-esxi.ini` (docs/FORMAT.md, VM record format 2).
//!
//! Owns: the file's name and reading it back. Backup writes it (affa's `backup::vm`), restore
//! reads it. Must never: trust what it reads (an archive's files came from a host: every name and
//! path read here is checked by its user with `untrusted::SafeRelPath` before use).

use std::collections::BTreeMap;

/// The VM record's file name, at the root of an ESXi job's archive.
pub const ESXI_INI: &str = ".affa-esxi.ini";

/// `.affa-esxi.ini`, as sections of key/values (read back from an archive: untrusted input).
pub struct Ini {
    pub sections: Vec<(String, BTreeMap<String, String>)>,
}

impl Ini {
    pub fn parse(text: &str) -> Ini {
        let mut sections: Vec<(String, BTreeMap<String, String>)> = Vec::new();
        for l in text.lines() {
            let l = l.trim();
            if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
                continue;
            }
            if let Some(n) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                sections.push((n.to_string(), BTreeMap::new()));
            } else if let (Some((k, v)), Some(s)) = (l.split_once('='), sections.last_mut()) {
                s.1.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        Ini { sections }
    }
    pub fn get(&self, sec: &str, key: &str) -> Option<&str> {
        self.sections.iter().find(|(n, _)| n == sec).and_then(|(_, m)| m.get(key)).map(|s| s.as_str())
    }
    pub fn all(&self, prefix: &str) -> Vec<&BTreeMap<String, String>> {
        self.sections.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, m)| m).collect()
    }
}
