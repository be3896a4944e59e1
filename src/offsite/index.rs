//! The archive index of the offsite bucket, version 1 (docs/FORMAT.md "The archive index"):
//! what an archive holds (directories, plain files with their chunks, symbolic links, the chunks
//! of its chunked files), written as text and sealed as the last object of an upload.
//!
//! Owns: the index's text form, writing and parsing it. Must never: accept an index whose `end`
//! checksum does not match, a path that is absolute or climbs with `..`, or a file whose chunk
//! lines do not match its size (an index is read back from a bucket: untrusted until checked).

use crate::chunk::{id_hex, parse_id, ChunkId, ChunkRef};
use crate::error::Result;

const MAGIC: &str = "affa-offsite-index 1";

/// One entry of an archive, its path relative to the archive root (raw bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32, uid: u32, gid: u32, mtime: i64, path: Vec<u8> },
    File { mode: u32, uid: u32, gid: u32, mtime: i64, size: u64, path: Vec<u8>, chunks: Vec<ChunkRef> },
    Link { uid: u32, gid: u32, mtime: i64, path: Vec<u8>, target: Vec<u8> },
}

/// An archive as uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub job: String,
    /// Its name when it was uploaded (`scheduled.0`).
    pub archive: String,
    /// The report's Date.
    pub date: String,
    /// BLAKE3 of its report, hex: the archive id.
    pub id: String,
    pub uploaded: String,
    pub chunk_size: u32,
    pub entries: Vec<Entry>,
    /// The chunks of its chunked files, each once.
    pub chunked: Vec<ChunkId>,
}

/// Bytes outside `!`..`~`, and `%`, as `%XX`.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if (b'!'..=b'~').contains(&c) && c != b'%' {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A relative path without empty, `.` or `..` components.
fn safe_path(p: &[u8]) -> bool {
    !p.is_empty() && p.split(|&c| c == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl Index {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = format!(
            "{MAGIC}\njob {}\narchive {}\ndate {}\nid {}\nuploaded {}\nchunk-size {}\n",
            self.job, self.archive, self.date, self.id, self.uploaded, self.chunk_size
        );
        for e in &self.entries {
            match e {
                Entry::Dir { mode, uid, gid, mtime, path } => {
                    s.push_str(&format!("D {mode:o} {uid} {gid} {mtime} {}\n", escape(path)))
                }
                Entry::File { mode, uid, gid, mtime, size, path, chunks } => {
                    s.push_str(&format!("F {mode:o} {uid} {gid} {mtime} {size} {}\n", escape(path)));
                    for c in chunks {
                        match c {
                            ChunkRef::Zero => s.push_str("zero\n"),
                            ChunkRef::Stored(id) => {
                                s.push_str(&id_hex(id));
                                s.push('\n')
                            }
                        }
                    }
                }
                Entry::Link { uid, gid, mtime, path, target } => {
                    s.push_str(&format!("L {uid} {gid} {mtime} {} {}\n", escape(path), escape(target)))
                }
            }
        }
        for id in &self.chunked {
            s.push_str(&format!("C {}\n", id_hex(id)));
        }
        let end = blake3::hash(s.as_bytes());
        s.push_str(&format!("end {}\n", end.to_hex()));
        s.into_bytes()
    }

    /// Parse an index read back from the bucket (`name` names it in errors).
    pub fn parse(data: &[u8], name: &str) -> Result<Index> {
        let bad = |why: String| crate::Error::damaged(format!("offsite index {name} is damaged: {why}"));
        let text = std::str::from_utf8(data).map_err(|_| bad("not UTF-8".into()))?;
        let body_len = text.rfind("\nend ").ok_or_else(|| bad("no end line".into()))? + 1;
        let (body, end) = text.split_at(body_len);
        let sum = end.strip_prefix("end ").and_then(|e| e.strip_suffix('\n'));
        if sum != Some(blake3::hash(body.as_bytes()).to_hex().as_str()) || !body.ends_with('\n') {
            return Err(bad("its end checksum does not match".into()));
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(bad(format!("it does not start with '{MAGIC}'")));
        }
        let mut head = |key: &str| -> Result<String> {
            match lines.next().and_then(|l| l.strip_prefix(key)).and_then(|v| v.strip_prefix(' ')) {
                Some(v) => Ok(v.to_string()),
                None => Err(bad(format!("no '{key}' line where expected"))),
            }
        };
        let (job, archive, date, id, uploaded) =
            (head("job")?, head("archive")?, head("date")?, head("id")?, head("uploaded")?);
        let chunk_size: u32 = head("chunk-size")?
            .parse()
            .ok()
            .filter(|n| (crate::chunk::MIN_CHUNK_SIZE..=crate::chunk::MAX_CHUNK_SIZE).contains(n))
            .ok_or_else(|| bad("a bad chunk-size".into()))?;
        let mut idx = Index { job, archive, date, id, uploaded, chunk_size, entries: Vec::new(), chunked: Vec::new() };
        let mut pending: u64 = 0;
        for (n, l) in lines.enumerate() {
            let at = |why: &str| bad(format!("line {}: {why}", n + 8));
            if pending > 0 {
                let c = if l == "zero" {
                    ChunkRef::Zero
                } else {
                    ChunkRef::Stored(parse_id(l).ok_or_else(|| at("expected a chunk id or zero"))?)
                };
                if let Some(Entry::File { chunks, .. }) = idx.entries.last_mut() {
                    chunks.push(c);
                }
                pending -= 1;
                continue;
            }
            let f: Vec<&str> = l.split(' ').collect();
            let num = |s: &str| s.parse::<i64>().map_err(|_| at("a bad number"));
            let id32 = |s: &str| s.parse::<u32>().map_err(|_| at("a bad number"));
            let mode =
                |s: &str| u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| at("a bad mode"));
            let path = |s: &str| {
                unescape(s).filter(|p| safe_path(p)).ok_or_else(|| at("a path that is not relative and safe"))
            };
            match f.as_slice() {
                ["D", m, u, g, t, p] => idx.entries.push(Entry::Dir {
                    mode: mode(m)?,
                    uid: id32(u)?,
                    gid: id32(g)?,
                    mtime: num(t)?,
                    path: path(p)?,
                }),
                ["F", m, u, g, t, size, p] => {
                    let size: u64 = size.parse().map_err(|_| at("a bad size"))?;
                    pending = size.div_ceil(chunk_size as u64);
                    idx.entries.push(Entry::File {
                        mode: mode(m)?,
                        uid: id32(u)?,
                        gid: id32(g)?,
                        mtime: num(t)?,
                        size,
                        path: path(p)?,
                        chunks: Vec::with_capacity(pending.min(1 << 16) as usize),
                    })
                }
                ["L", u, g, t, p, target] => idx.entries.push(Entry::Link {
                    uid: id32(u)?,
                    gid: id32(g)?,
                    mtime: num(t)?,
                    path: path(p)?,
                    target: unescape(target).ok_or_else(|| at("a bad link target"))?,
                }),
                ["C", id] => idx.chunked.push(parse_id(id).ok_or_else(|| at("expected a chunk id"))?),
                _ => return Err(at("an unknown line")),
            }
        }
        if pending > 0 {
            return Err(bad("the last file lacks chunk lines".into()));
        }
        Ok(idx)
    }

    /// Every chunk the archive needs, with a label of one file that uses it (plain files' chunks
    /// first, then those of the chunked files).
    pub fn chunk_uses(&self) -> Vec<(ChunkId, String)> {
        let mut v = Vec::new();
        for e in &self.entries {
            if let Entry::File { path, chunks, .. } = e {
                for c in chunks {
                    if let ChunkRef::Stored(id) = c {
                        v.push((*id, escape(path)));
                    }
                }
            }
        }
        v.extend(self.chunked.iter().map(|id| (*id, "a chunked file".to_string())));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        Index {
            job: "web".into(),
            archive: "scheduled.0".into(),
            date: "202612010500".into(),
            id: "ab".repeat(32),
            uploaded: "2026-12-01T05:10:00".into(),
            chunk_size: 1 << 20,
            entries: vec![
                Entry::Dir { mode: 0o755, uid: 0, gid: 0, mtime: 1, path: b"etc".to_vec() },
                Entry::File {
                    mode: 0o644,
                    uid: 1,
                    gid: 2,
                    mtime: 3,
                    size: (1 << 20) + 1,
                    path: b"etc/a b\n%".to_vec(),
                    chunks: vec![ChunkRef::Zero, ChunkRef::Stored([9; 32])],
                },
                Entry::Link { uid: 0, gid: 0, mtime: 4, path: b"l".to_vec(), target: b"../x y".to_vec() },
            ],
            chunked: vec![[5; 32]],
        }
    }

    #[test]
    fn an_index_reads_back_and_refuses_damage() {
        let i = sample();
        let b = i.to_bytes();
        assert_eq!(Index::parse(&b, "i/x").unwrap(), i);
        assert_eq!(i.chunk_uses().len(), 2);
        let mut bent = b.clone();
        bent[30] ^= 1;
        assert!(Index::parse(&bent, "i/x").unwrap_err().to_string().contains("end checksum"));
        // A climbing path is refused even with a good checksum.
        let mut evil = sample();
        evil.entries[0] = Entry::Dir { mode: 0o755, uid: 0, gid: 0, mtime: 1, path: b"../etc".to_vec() };
        let e = Index::parse(&evil.to_bytes(), "i/x").unwrap_err().to_string();
        assert!(e.contains("relative and safe"), "{e}");
    }
}
