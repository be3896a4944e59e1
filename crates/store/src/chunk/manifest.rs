//! The manifest of one chunked file (`<file>.affa-manifest`, text format versions 1 to 3:
//! version 2 is a CBT-derived manifest without the whole-file hash, version 3 records each stored
//! chunk's file length, with or without the whole-file hash).
//!
//! Owns: the manifest's text layout (see docs/FORMAT.md), serializing and parsing it.
//! Must never: panic or allocate without bound on a truncated, garbage or malicious manifest;
//! accept a chunk id that is not exactly 64 lowercase hex digits; accept a manifest whose chunk
//! list does not match its size and chunk size, or whose trailing checksum does not match; accept
//! a recorded chunk file length outside what a chunk file can be.

use super::{id_hex, parse_compression, parse_id, ChunkId, Compression};
use super::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::error::{Error, Result};

/// File name suffix of a manifest: `vm-flat.vmdk` -> `vm-flat.vmdk.affa-manifest`.
pub const MANIFEST_SUFFIX: &str = ".affa-manifest";
/// Manifest format version of a manifest with its whole-file hash (every full pass).
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest format version of a manifest without the whole-file hash (a CBT-derived backup
/// that read only the changed chunks), written by earlier releases.
pub const MANIFEST_VERSION_DERIVED: u32 = 2;
/// Manifest format version with each stored chunk's file length (with or without the
/// whole-file hash): what this program writes whenever the lengths are known; also the highest
/// version it reads.
pub const MANIFEST_VERSION_LENGTHS: u32 = 3;
/// Shortest chunk file a version 3 manifest may record (a header and one byte).
const MIN_BLOB_LEN: u64 = super::blob::HEADER_LEN as u64 + 1;
const MAGIC: &str = "affa-chunk-manifest";
/// Longest accepted line (ids are 64 chars; header lines are short).
const MAX_LINE: usize = 256;
/// Largest accepted file size (2^50 bytes = 1 PiB).
const MAX_SIZE: u64 = 1 << 50;
/// Longest chunk file a version 3 manifest may record (what a reader accepts at all).
const MAX_BLOB_LEN: u64 = super::MAX_CHUNK_FILE_LEN;
/// Largest manifest file a reader accepts (restore, the mount, the next run's previous
/// manifest).
pub const MAX_MANIFEST_LEN: u64 = 2 << 30;
/// Most chunks one manifest may list (2^26: 64 TiB at 1 MiB chunks, beyond VMFS's 62 TB; 16
/// TiB at 256 KiB). A file of more is refused before any work, and so is what an agent claims:
/// each chunk's entry is held in memory while the manifest is made (33 bytes: 2.2 GB at this
/// bound). The manifest's own length is checked when it is written: readers accept at most
/// [`MAX_MANIFEST_LEN`] (stored chunk lines are up to 74 bytes, zero ones 5: a disk of more
/// than ~29 million stored chunks needs a larger chunkSize).
pub const MAX_CHUNKS: u64 = 1 << 26;

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
    /// The file length (header + payload) of each stored chunk's pool entry as the writer
    /// checked or wrote it, index-aligned with `chunks` (0 at a zero chunk): what the next
    /// backup's cheap check of a carried chunk compares with one `lstat`. `None`: not recorded
    /// (a version 1 or 2 manifest). A hint for damage checks only: readers that rebuild data
    /// decode and hash every chunk whatever it says.
    pub stored_lens: Option<Vec<u32>>,
}

impl Manifest {
    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let cs = self.chunk_size as u64;
        let start = i as u64 * cs;
        (self.size - start).min(cs) as usize
    }

    /// The recorded file length of chunk `i`'s pool entry, if the manifest has one.
    pub fn stored_len(&self, i: usize) -> Option<u32> {
        self.stored_lens.as_ref().and_then(|l| l.get(i).copied()).filter(|&n| n as u64 >= MIN_BLOB_LEN)
    }

    /// The lengths to write: `stored_lens` when it has one valid length per stored chunk.
    fn lens_to_write(&self) -> Option<&[u32]> {
        let l = self.stored_lens.as_deref()?;
        let ok = l.len() == self.chunks.len()
            && self.chunks.iter().zip(l).all(|(c, &n)| match c {
                ChunkRef::Zero => true,
                ChunkRef::Stored(_) => (MIN_BLOB_LEN..=MAX_BLOB_LEN).contains(&(n as u64)),
            });
        ok.then_some(l)
    }

    /// Number of chunks a file of `size` bytes has.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(chunk_size as u64)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = String::with_capacity(400 + self.chunks.len() * 65);
        // Version 3 whenever every stored chunk's length is known (every manifest this
        // program's backups write); the older versions otherwise (a manifest built by hand).
        let lens = self.lens_to_write();
        let version = match (lens, &self.file_hash) {
            (Some(_), _) => MANIFEST_VERSION_LENGTHS,
            (None, Some(_)) => MANIFEST_VERSION,
            (None, None) => MANIFEST_VERSION_DERIVED,
        };
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
        for (i, c) in self.chunks.iter().enumerate() {
            match c {
                ChunkRef::Zero => s.push_str("zero\n"),
                ChunkRef::Stored(id) => {
                    s.push_str(&id_hex(id));
                    if let Some(l) = lens {
                        let _ = write!(s, " {}", l[i]);
                    }
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
                "3" => 3,
                _ => {
                    return Err(bad(format!(
                        "format version {v:?}, this program reads versions 1 to {MANIFEST_VERSION_LENGTHS}"
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
        let mut lens: Option<Vec<u32>> = (version >= 3).then(|| Vec::with_capacity(chunks.capacity()));
        for _ in 0..count {
            let (line, _) =
                next_line()?.ok_or_else(|| bad(format!("truncated chunk list ({} of {count})", chunks.len())))?;
            if line == "zero" {
                chunks.push(ChunkRef::Zero);
                if let Some(l) = lens.as_mut() {
                    l.push(0);
                }
                continue;
            }
            let n = chunks.len();
            let (id_part, len_part) = match &lens {
                None => (line, None),
                Some(_) => {
                    let (id, len) = line
                        .split_once(' ')
                        .ok_or_else(|| bad(format!("chunk {n}: {line:?} has no stored length (version 3)")))?;
                    (id, Some(len))
                }
            };
            let id = parse_id(id_part).ok_or_else(|| bad(format!("bad chunk id {:?}", line)))?;
            if let (Some(l), Some(len)) = (lens.as_mut(), len_part) {
                let digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) && !len.starts_with('0');
                let v = Some(len)
                    .filter(|_| digits)
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|v| (MIN_BLOB_LEN..=MAX_BLOB_LEN).contains(v))
                    .ok_or_else(|| {
                        bad(format!(
                            "chunk {n}: stored length {len:?}, expected {MIN_BLOB_LEN} to {MAX_BLOB_LEN} bytes"
                        ))
                    })?;
                l.push(v as u32);
            }
            chunks.push(ChunkRef::Stored(id));
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
            stored_lens: lens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest header this writer makes is under 4 KiB and the longest chunk line under 80
    /// bytes (what FORMAT.md's arithmetic of MAX_MANIFEST_LEN assumes).
    #[test]
    fn max_chunks_of_the_longest_lines_fit_what_readers_accept() {
        let m = Manifest {
            size: 1 << 50,
            mode: 0o7777,
            uid: u32::MAX,
            gid: u32::MAX,
            mtime: (i64::MIN, 999_999_999),
            atime: Some((i64::MIN, 999_999_999)),
            chunk_size: MAX_CHUNK_SIZE,
            compression: Compression::Zstd(19),
            file_hash: Some([0xff; 32]),
            added_bytes: u64::MAX,
            chunks: vec![ChunkRef::Stored([0xff; 32])],
            stored_lens: Some(vec![MAX_BLOB_LEN as u32]),
        };
        let text = String::from_utf8(m.to_bytes()).unwrap();
        let line = text.lines().find(|l| l.starts_with("ffff")).unwrap();
        assert!(line.len() < 80, "{line}");
        assert!(text.len() - (line.len() + 1) <= 4096, "{text}");
    }
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
            stored_lens: None,
        }
    }

    /// Rewrite the body of a manifest (before `end`) and give it a matching checksum.
    fn resum(body: &str) -> Vec<u8> {
        format!("{body}end {}\n", id_hex(blake3::hash(body.as_bytes()).as_bytes())).into_bytes()
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
        assert!(Manifest::parse(b"affa-chunk-manifest 4\n").unwrap_err().message().contains("version"));
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

    #[test]
    fn version_3_records_stored_lengths_and_reads_back() {
        for hash in [true, false] {
            let mut m = sample();
            if !hash {
                m.file_hash = None;
            }
            m.stored_lens = Some(vec![17, 0, MAX_BLOB_LEN as u32]);
            let b = String::from_utf8(m.to_bytes()).unwrap();
            assert!(b.starts_with("affa-chunk-manifest 3\n"), "{b}");
            assert_eq!(b.contains("\nderived cbt\n"), !hash, "{b}");
            let ChunkRef::Stored(a) = m.chunks[0] else { unreachable!() };
            assert!(b.contains(&format!("\n{} 17\nzero\n", id_hex(&a))), "{b}");
            let back = Manifest::parse(b.as_bytes()).unwrap();
            assert_eq!(back, m);
            assert_eq!(
                (back.stored_len(0), back.stored_len(1), back.stored_len(2)),
                (Some(17), None, Some(MAX_BLOB_LEN as u32))
            );
        }
        // Versions 1 and 2 still read, without lengths.
        for hash in [true, false] {
            let mut m = sample();
            if !hash {
                m.file_hash = None;
            }
            let b = m.to_bytes();
            let want = if hash { "affa-chunk-manifest 1\n" } else { "affa-chunk-manifest 2\n" };
            assert!(b.starts_with(want.as_bytes()));
            let back = Manifest::parse(&b).unwrap();
            assert_eq!((back.stored_lens.clone(), back.stored_len(0)), (None, None));
            assert_eq!(back, m);
        }
        // Lengths that cannot all be written (wrong count, a stored chunk without a valid one):
        // the older version, never a version 3 manifest with a wrong length.
        for lens in [vec![100, 0], vec![100, 0, 0], vec![16, 0, 100], vec![100, 0, MAX_BLOB_LEN as u32 + 1]] {
            let m = Manifest { stored_lens: Some(lens.clone()), ..sample() };
            let b = m.to_bytes();
            assert!(b.starts_with(b"affa-chunk-manifest 1\n"), "{lens:?}");
            assert_eq!(Manifest::parse(&b).unwrap().stored_lens, None);
        }
    }

    #[test]
    fn bad_stored_lengths_are_refused() {
        let m = Manifest { stored_lens: Some(vec![1000, 0, 2000]), ..sample() };
        let good = String::from_utf8(m.to_bytes()).unwrap();
        let body = &good[..good.find("end ").unwrap()];
        let ChunkRef::Stored(a) = m.chunks[0] else { unreachable!() };
        let line = format!("{} 1000\n", id_hex(&a));
        assert!(body.contains(&line));
        let cases = [
            (format!("{}\n", id_hex(&a)), "has no stored length"),
            (format!("{} \n", id_hex(&a)), "stored length \"\""),
            (format!("{} 16\n", id_hex(&a)), "stored length \"16\", expected 17 to"),
            (format!("{} 01000\n", id_hex(&a)), "stored length \"01000\""),
            (format!("{} +1000\n", id_hex(&a)), "stored length \"+1000\""),
            (format!("{} -1\n", id_hex(&a)), "stored length \"-1\""),
            (format!("{} 1000 7\n", id_hex(&a)), "stored length \"1000 7\""),
            (format!("{} {}\n", id_hex(&a), MAX_BLOB_LEN + 1), "expected 17 to"),
            (format!("{} 99999999999999999999999\n", id_hex(&a)), "expected 17 to"),
            (format!("{}  1000\n", id_hex(&a)), "stored length \" 1000\""),
            ("zero 5\n".to_string(), "bad chunk id \"zero 5\""),
            (format!("../../../etc/passwd{} 1000\n", &id_hex(&a)[19..]), "bad chunk id"),
        ];
        for (bad_line, want) in cases {
            let e = Manifest::parse(&resum(&body.replace(&line, &bad_line))).unwrap_err();
            assert!(e.message().contains(want), "{bad_line:?}: {e} (wanted {want})");
            assert_eq!(e.kind(), crate::error::ErrorKind::Damaged);
        }
        // A version 1 or 2 manifest has no lengths: an id line with one is refused.
        let v1 = resum(&body.replace("manifest 3\n", "manifest 1\n"));
        assert!(Manifest::parse(&v1).unwrap_err().message().contains("bad chunk id"));
        // The checksum still covers the lengths.
        let other = good.replacen(" 1000\n", " 1001\n", 1);
        assert!(Manifest::parse(other.as_bytes()).unwrap_err().message().contains("checksum mismatch"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Manifest::parse(&data);
        }

        #[test]
        fn mutations_never_panic(pos in 0usize..1000, byte in any::<u8>(), cut in 0usize..1000) {
            let mut b = Manifest { stored_lens: Some(vec![5000, 0, 17]), ..sample() }.to_bytes();
            if pos % 2 == 0 {
                b = sample().to_bytes();
            }
            let p = pos % b.len();
            b[p] = byte;
            b.truncate(b.len() - cut % b.len());
            let _ = Manifest::parse(&b);
        }
    }
}
