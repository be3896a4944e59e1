//! The manifest of one chunked file (`<file>.affa-manifest`, text format versions 1 and 2:
//! version 2 is a CBT-derived manifest without the whole-file hash).
//!
//! Owns: the manifest's text layout (see docs/FORMAT.md), serializing and parsing it.
//! Must never: panic or allocate without bound on a truncated, garbage or malicious manifest;
//! accept a chunk id that is not exactly 64 lowercase hex digits; accept a manifest whose chunk
//! list does not match its size and chunk size, or whose trailing checksum does not match.

use super::{id_hex, parse_compression, parse_id, ChunkId, Compression};
use super::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::error::{Error, Result};

/// File name suffix of a manifest: `vm-flat.vmdk` -> `vm-flat.vmdk.affa-manifest`.
pub const MANIFEST_SUFFIX: &str = ".affa-manifest";
/// Manifest format version of a manifest with its whole-file hash (every full pass).
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest format version of a manifest without the whole-file hash (a CBT-derived backup
/// that read only the changed chunks); also the highest version this program reads.
pub const MANIFEST_VERSION_DERIVED: u32 = 2;
const MAGIC: &str = "affa-chunk-manifest";
/// Longest accepted line (ids are 64 chars; header lines are short).
const MAX_LINE: usize = 256;
/// Largest accepted file size (2^50 bytes = 1 PiB).
const MAX_SIZE: u64 = 1 << 50;

/// One entry of the chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkRef {
    /// An all-zero chunk: not stored, a hole when rebuilt.
    Zero,
    Stored(ChunkId),
}

/// Everything needed to rebuild one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds) since the epoch.
    pub mtime: (i64, u32),
    pub atime: Option<(i64, u32)>,
    pub chunk_size: u32,
    /// Compression used when the chunks were first stored (informational: each chunk file says
    /// its own encoding).
    pub compression: Compression,
    /// BLAKE3 of the whole file's bytes; `None` for a CBT-derived manifest (version 2), whose
    /// backup read only the changed chunks.
    pub file_hash: Option<[u8; 32]>,
    /// Compressed bytes this file added to the pool when it was chunked (informational).
    pub added_bytes: u64,
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let cs = self.chunk_size as u64;
        let start = i as u64 * cs;
        (self.size - start).min(cs) as usize
    }

    /// Number of chunks a file of `size` bytes has.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(chunk_size as u64)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = String::with_capacity(400 + self.chunks.len() * 65);
        let version = if self.file_hash.is_some() { MANIFEST_VERSION } else { MANIFEST_VERSION_DERIVED };
        let _ = writeln!(s, "{MAGIC} {version}");
        let _ = writeln!(s, "size {}", self.size);
        let _ = writeln!(s, "mode {:04o}", self.mode);
        let _ = writeln!(s, "uid {}", self.uid);
        let _ = writeln!(s, "gid {}", self.gid);
        let _ = writeln!(s, "mtime {} {}", self.mtime.0, self.mtime.1);
        if let Some((a, n)) = self.atime {
            let _ = writeln!(s, "atime {a} {n}");
        }
        let _ = writeln!(s, "chunk-size {}", self.chunk_size);
        let _ = writeln!(s, "compression {}", self.compression);
        match &self.file_hash {
            Some(h) => {
                let _ = writeln!(s, "blake3 {}", id_hex(h));
            }
            None => s.push_str("derived cbt\n"),
        }
        let _ = writeln!(s, "added-bytes {}", self.added_bytes);
        let _ = writeln!(s, "chunks {}", self.chunks.len());
        for c in &self.chunks {
            match c {
                ChunkRef::Zero => s.push_str("zero\n"),
                ChunkRef::Stored(id) => {
                    s.push_str(&id_hex(id));
                    s.push('\n');
                }
            }
        }
        let sum = blake3::hash(s.as_bytes());
        let _ = writeln!(s, "end {}", id_hex(sum.as_bytes()));
        s.into_bytes()
    }

    /// Parse a manifest. Every failure is an error saying what is wrong (never a panic).
    /// Memory use is proportional to the input's length.
    pub fn parse(data: &[u8]) -> Result<Manifest> {
        let bad = |what: String| Error::damaged(format!("invalid chunk manifest: {what}"));
        let mut pos = 0usize;
        let mut lineno = 0usize;
        // Returns (line, offset of the line start).
        let mut next_line = || -> Result<Option<(&str, usize)>> {
            if pos >= data.len() {
                return Ok(None);
            }
            let start = pos;
            let rest = &data[pos..];
            let window = &rest[..rest.len().min(MAX_LINE + 1)];
            let Some(nl) = window.iter().position(|&b| b == b'\n') else {
                return Err(if rest.len() > MAX_LINE {
                    bad(format!("line {} longer than {MAX_LINE} bytes", lineno + 1))
                } else {
                    bad(format!("truncated (line {} has no end)", lineno + 1))
                });
            };
            lineno += 1;
            pos += nl + 1;
            let line = std::str::from_utf8(&rest[..nl]).map_err(|_| bad(format!("line {lineno} is not UTF-8")))?;
            Ok(Some((line, start)))
        };

        let (first, _) = next_line()?.ok_or_else(|| bad("empty file".into()))?;
        let version = match first.split_once(' ') {
            Some((MAGIC, v)) => match v {
                "1" => 1,
                "2" => 2,
                _ => {
                    return Err(bad(format!(
                        "format version {v:?}, this program reads versions 1 to {MANIFEST_VERSION_DERIVED}"
                    )))
                }
            },
            _ => return Err(bad("missing 'affa-chunk-manifest 1' header".into())),
        };

        let (mut size, mut mode, mut uid, mut gid, mut mtime, mut atime) = (None, None, None, None, None, None);
        let (mut chunk_size, mut compression, mut file_hash, mut added) = (None, None, None, 0u64);
        let count = loop {
            let (line, _) = next_line()?.ok_or_else(|| bad("truncated header".into()))?;
            let (key, val) = line.split_once(' ').unwrap_or((line, ""));
            let num = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("bad {key} value {v:?}")));
            let time = |v: &str| -> Result<(i64, u32)> {
                let (s, n) = v.split_once(' ').ok_or_else(|| bad(format!("bad {key} value {v:?}")))?;
                let s = s.parse::<i64>().map_err(|_| bad(format!("bad {key} value {v:?}")))?;
                let n = n.parse::<u32>().ok().filter(|&n| n < 1_000_000_000);
                Ok((s, n.ok_or_else(|| bad(format!("bad {key} value {v:?}")))?))
            };
            match key {
                "size" => size = Some(num(val)?).filter(|&s| s <= MAX_SIZE),
                "mode" => {
                    mode = Some(
                        u32::from_str_radix(val, 8)
                            .ok()
                            .filter(|&m| m <= 0o7777)
                            .ok_or_else(|| bad(format!("bad mode {val:?}")))?,
                    )
                }
                "uid" => uid = Some(u32::try_from(num(val)?).map_err(|_| bad("uid too big".into()))?),
                "gid" => gid = Some(u32::try_from(num(val)?).map_err(|_| bad("gid too big".into()))?),
                "mtime" => mtime = Some(time(val)?),
                "atime" => atime = Some(time(val)?),
                "chunk-size" => {
                    let v = num(val)?;
                    if !v.is_power_of_two() || v < MIN_CHUNK_SIZE as u64 || v > MAX_CHUNK_SIZE as u64 {
                        return Err(bad(format!("chunk size {v} out of range")));
                    }
                    chunk_size = Some(v as u32);
                }
                "compression" => compression = Some(parse_compression(val).map_err(|e| bad(e.to_string()))?),
                "blake3" => file_hash = Some(parse_id(val).ok_or_else(|| bad(format!("bad file hash {val:?}")))?),
                "added-bytes" => added = num(val)?,
                "chunks" => break num(val)?,
                // Unknown header keys are ignored (room for optional additions in version 1).
                _ => {}
            }
        };
        let size = size.ok_or_else(|| bad("missing or too large size".into()))?;
        let chunk_size = chunk_size.ok_or_else(|| bad("missing chunk-size".into()))?;
        let expected = Manifest::chunk_count(size, chunk_size);
        if count != expected {
            return Err(bad(format!("{count} chunks listed, size {size} needs {expected}")));
        }
        // Preallocate only what the input can actually hold (65 bytes a line).
        let mut chunks = Vec::with_capacity((count as usize).min(data.len() / 65 + 1));
        for _ in 0..count {
            let (line, _) =
                next_line()?.ok_or_else(|| bad(format!("truncated chunk list ({} of {count})", chunks.len())))?;
            if line == "zero" {
                chunks.push(ChunkRef::Zero);
            } else {
                let id = parse_id(line).ok_or_else(|| bad(format!("bad chunk id {:?}", line)))?;
                chunks.push(ChunkRef::Stored(id));
            }
        }
        let (line, start) = next_line()?.ok_or_else(|| bad("truncated (no end line)".into()))?;
        let sum = line
            .strip_prefix("end ")
            .and_then(parse_id)
            .ok_or_else(|| bad(format!("expected 'end <checksum>', found {line:?}")))?;
        if blake3::hash(&data[..start]).as_bytes() != &sum {
            return Err(bad("checksum mismatch (the manifest was altered or damaged)".into()));
        }
        if next_line()?.is_some() || pos != data.len() {
            return Err(bad("data after the end line".into()));
        }
        Ok(Manifest {
            size,
            mode: mode.ok_or_else(|| bad("missing mode".into()))?,
            uid: uid.ok_or_else(|| bad("missing uid".into()))?,
            gid: gid.ok_or_else(|| bad("missing gid".into()))?,
            mtime: mtime.ok_or_else(|| bad("missing mtime".into()))?,
            atime,
            chunk_size,
            compression: compression.ok_or_else(|| bad("missing compression".into()))?,
            file_hash: match (file_hash, version) {
                (None, 1) => return Err(bad("missing blake3".into())),
                (h, _) => h,
            },
            added_bytes: added,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            size: (4 << 20) * 2 + 5,
            mode: 0o4755,
            uid: 1000,
            gid: 100,
            mtime: (-5, 999_999_999),
            atime: Some((1_700_000_000, 0)),
            chunk_size: 4 << 20,
            compression: Compression::Zstd(1),
            file_hash: Some(*blake3::hash(b"f").as_bytes()),
            added_bytes: 42,
            chunks: vec![
                ChunkRef::Stored(*blake3::hash(b"a").as_bytes()),
                ChunkRef::Zero,
                ChunkRef::Stored(*blake3::hash(b"b").as_bytes()),
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
        let mut m2 = m.clone();
        m2.atime = None;
        m2.size = 0;
        m2.chunks.clear();
        assert_eq!(Manifest::parse(&m2.to_bytes()).unwrap(), m2);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample().to_bytes();
        for cut in 0..b.len() {
            assert!(Manifest::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn altered_manifests_are_refused() {
        let b = sample().to_bytes();
        let s = String::from_utf8(b.clone()).unwrap();
        // Path traversal in an id, even with a matching checksum.
        let evil = s.replace("zero\n", "../../../../etc/passwd\n");
        let body = &evil[..evil.find("end ").unwrap()];
        let evil = format!("{body}end {}\n", id_hex(blake3::hash(body.as_bytes()).as_bytes()));
        let e = Manifest::parse(evil.as_bytes()).unwrap_err();
        assert!(e.message().contains("bad chunk id"), "{e}");
        assert_eq!(e.kind(), crate::error::ErrorKind::Damaged);
        // Any changed byte breaks the checksum (or the syntax).
        for pos in [30, 100, b.len() - 70] {
            let mut x = b.clone();
            x[pos] ^= 1;
            assert!(Manifest::parse(&x).is_err());
        }
        // Huge claimed count without the lines.
        let body = "affa-chunk-manifest 1\nsize 1125899906842624\nmode 0644\nuid 0\ngid 0\nmtime 0 0\nchunk-size 262144\ncompression none\nblake3 0000000000000000000000000000000000000000000000000000000000000000\nchunks 4294967296\n";
        assert!(Manifest::parse(body.as_bytes()).is_err());
        assert!(Manifest::parse(&[b'a'; 100_000]).is_err());
        assert!(Manifest::parse(b"affa-chunk-manifest 3\n").unwrap_err().message().contains("version"));
        // Version 1 needs the whole-file hash; only version 2 may lack it.
        let mut d = sample();
        d.file_hash = None;
        let v2 = String::from_utf8(d.to_bytes()).unwrap();
        assert!(v2.starts_with("affa-chunk-manifest 2\n") && v2.contains("\nderived cbt\n"), "{v2}");
        assert_eq!(Manifest::parse(v2.as_bytes()).unwrap(), d);
        let body = v2[..v2.find("end ").unwrap()].replace("manifest 2\n", "manifest 1\n");
        let v1 = format!("{body}end {}\n", id_hex(blake3::hash(body.as_bytes()).as_bytes()));
        assert!(Manifest::parse(v1.as_bytes()).unwrap_err().message().contains("missing blake3"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Manifest::parse(&data);
        }

        #[test]
        fn mutations_never_panic(pos in 0usize..1000, byte in any::<u8>(), cut in 0usize..1000) {
            let mut b = sample().to_bytes();
            let p = pos % b.len();
            b[p] = byte;
            b.truncate(b.len() - cut % b.len());
            let _ = Manifest::parse(&b);
        }
    }
}
