//! Chunk store (`chunkFiles`): deduplicated, compressed storage of big files (VM disks).
//!
//! Owns: the settings (chunk size, compression) and their parsing, the pool
//! `RootDir/.affa-pool/`, the per-archive chunk links `ARCHIVE/.affa-chunks/`, the manifests
//! `ARCHIVE/<file>.affa-manifest` and their index `ARCHIVE/.affa-manifests` (only a manifest the
//! index lists is one), and every operation on them: chunking a plain staging file
//! into an archive, rebuilding (unchunking / streaming) a file from an archive, verifying an
//! archive, archive usage numbers, and sweeping unreferenced pool entries. The byte layouts are
//! written down in docs/FORMAT.md ("Chunk store").
//!
//! Must never: print (progress goes through a callback), delete anything outside the pool's
//! fan-out directories and its own temp files, leave a manifest that names a chunk which is not
//! durably stored and linked, leave a rebuilt file that did not verify, or panic on any bytes read
//! from disk (manifests and chunk files are untrusted input).

mod blob;
mod build;
pub mod index;
mod manifest;
mod pipeline;
mod pool;
pub mod remote;
mod restore;
mod scrub;
mod source;
#[cfg(test)]
mod tests;
mod writers;

/// A chunk file's bytes made and read back (chunk file version 1), for copies of chunks outside
/// the pool (the offsite bucket).
pub use blob::{decode as decode_chunk_file, Encoder as ChunkEncoder};
pub use build::{chunk_file, manifest_path, ChunkStats};
pub use index::INDEX_FILE;
pub use manifest::{
    ChunkRef, Manifest, MANIFEST_SUFFIX, MANIFEST_VERSION, MANIFEST_VERSION_DERIVED, MANIFEST_VERSION_LENGTHS,
    MAX_CHUNKS, MAX_MANIFEST_LEN,
};
pub use pool::{linked_ids, sweep, sweep_some, Pool, SweepStats, ARCHIVE_CHUNK_DIR, POOL_DIR};
pub use restore::{
    archive_usage, chunked_files, evict_damaged, list_manifests, load_chunk_at, load_chunk_from, open_chunk_at,
    read_manifest, recorded_manifest, stream_file, stream_file_from, unchunk_file, unchunk_file_from,
    unchunk_file_without_set_id, verify_archive, whole_file_hash_from, ArchiveUsage, ChunkProblem, ChunkReader,
    ProblemKind, VerifyReport,
};
pub use scrub::{scrub, Damaged, ScrubReport, Slice};
pub use source::{ArchiveChunks, ChunkSource, MAX_CHUNK_FILE_LEN};

use crate::error::{Error, Result};
use std::fmt;

/// Smallest accepted chunk size (256 KiB).
pub const MIN_CHUNK_SIZE: u32 = 256 << 10;
/// Largest accepted chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size (1 MiB, chosen by the benchmark: see docs/FORMAT.md "Chunk size").
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Progress callback: called with the number of bytes of the file done so far (monotonic).
pub type Progress<'a> = Option<&'a dyn Fn(u64)>;

/// How chunks are compressed in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    /// zstd with level 1..=19.
    Zstd(i32),
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Parse `none`, `lz4`, `zstd` (= `zstd:3`) or `zstd:N` with N in 1..=19 (case-insensitive).
pub fn parse_compression(s: &str) -> Result<Compression> {
    let expected = "expected none, lz4, zstd or zstd:N with N from 1 to 19";
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "none" => return Ok(Compression::None),
        "lz4" => return Ok(Compression::Lz4),
        "zstd" => return Ok(Compression::Zstd(3)),
        _ => {}
    }
    if let Some(level) = t.strip_prefix("zstd:") {
        if let Ok(n) = level.parse::<i32>() {
            if (1..=19).contains(&n) {
                return Ok(Compression::Zstd(n));
            }
        }
    }
    Err(Error::config(format!("invalid compression '{s}': {expected}")))
}

/// Parse a chunk size: a byte count (`262144`) or a number with a binary suffix `K`, `KiB`,
/// `M`, `MiB` (case-insensitive; `4M` = `4MiB` = 4194304). It must be a power of two from
/// 256 KiB to 16 MiB.
pub fn parse_chunk_size(s: &str) -> Result<u32> {
    let expected = "expected a power of two from 256K to 16M, written like 262144, 1M, 4MiB or 512K";
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult): (&str, u64) = if let Some(n) = lower.strip_suffix("kib") {
        (n, 1 << 10)
    } else if let Some(n) = lower.strip_suffix("mib") {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix('k') {
        (n, 1 << 10)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n, 1 << 20)
    } else {
        (lower.as_str(), 1)
    };
    let num = num.trim();
    let value = if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
        num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
    } else {
        None
    };
    match value {
        Some(v) if v.is_power_of_two() && v >= MIN_CHUNK_SIZE as u64 && v <= MAX_CHUNK_SIZE as u64 => Ok(v as u32),
        _ => Err(Error::config(format!("invalid chunk size '{s}': {expected}"))),
    }
}

/// Chunking settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Fixed chunk size in bytes, power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE].
    pub chunk_size: u32,
    pub compression: Compression,
    /// Worker threads; 0 = `available_parallelism` (further capped so memory stays bounded).
    pub threads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk_size: DEFAULT_CHUNK_SIZE,
            // zstd -1 loses 3% of ratio against -3 but is 38% faster (limits.md).
            compression: Compression::Zstd(1),
            threads: 0,
        }
    }
}

impl Settings {
    /// Check the ranges (a Settings built by hand may be out of range).
    pub fn validate(&self) -> Result<()> {
        if !self.chunk_size.is_power_of_two() || self.chunk_size < MIN_CHUNK_SIZE || self.chunk_size > MAX_CHUNK_SIZE {
            crate::bail!(Config, "invalid chunk size {}: expected a power of two from 256K to 16M", self.chunk_size);
        }
        if let Compression::Zstd(l) = self.compression {
            if !(1..=19).contains(&l) {
                crate::bail!(Config, "invalid zstd level {l}: expected 1 to 19");
            }
        }
        Ok(())
    }
}

/// A chunk id: BLAKE3 of the chunk's uncompressed bytes.
pub type ChunkId = [u8; 32];

/// Lowercase hex of an id.
pub fn id_hex(id: &ChunkId) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in id {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parse exactly 64 lowercase hex digits. Anything else is refused, so an id read from a
/// manifest can never name a path outside the chunk directory.
pub fn parse_id(s: &str) -> Option<ChunkId> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for i in 0..32 {
        let hi = hexval(b[2 * i])?;
        let lo = hexval(b[2 * i + 1])?;
        id[i] = (hi << 4) | lo;
    }
    Some(id)
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// True when every byte is zero (16 bytes at a time, then the rest).
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.by_ref().all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0) && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn compression_parsing() {
        assert_eq!(parse_compression("none").unwrap(), Compression::None);
        assert_eq!(parse_compression("LZ4").unwrap(), Compression::Lz4);
        assert_eq!(parse_compression("zstd").unwrap(), Compression::Zstd(3));
        assert_eq!(parse_compression("zstd:19").unwrap(), Compression::Zstd(19));
        for bad in ["", "zstd:0", "zstd:20", "zstd:-1", "gzip", "zstd:", "zstd:x", "lz4:1"] {
            let e = parse_compression(bad).unwrap_err();
            assert!(e.message().contains("expected none, lz4, zstd"), "{bad}: {e}");
            assert_eq!(e.kind(), crate::error::ErrorKind::Config);
        }
        for c in [Compression::None, Compression::Lz4, Compression::Zstd(7)] {
            assert_eq!(parse_compression(&c.to_string()).unwrap(), c);
        }
    }

    #[test]
    fn chunk_size_parsing() {
        assert_eq!(parse_chunk_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_chunk_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_chunk_size("262144").unwrap(), 256 << 10);
        assert_eq!(parse_chunk_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_chunk_size("256KiB").unwrap(), 256 << 10);
        assert_eq!(parse_chunk_size("16m").unwrap(), 16 << 20);
        for bad in ["", "3M", "128K", "32M", "4MB", "-4M", "4.5M", "M", "99999999999999999999K"] {
            let e = parse_chunk_size(bad).unwrap_err();
            assert!(e.message().contains("power of two"), "{bad}: {e}");
        }
    }

    #[test]
    fn ids_are_strict_hex() {
        let id = *blake3::hash(b"x").as_bytes();
        assert_eq!(parse_id(&id_hex(&id)), Some(id));
        assert_eq!(parse_id(&id_hex(&id).to_uppercase()), None);
        assert_eq!(parse_id("../../etc/passwd"), None);
        assert_eq!(parse_id(&"g".repeat(64)), None);
        assert_eq!(parse_id(&"a".repeat(63)), None);
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v[3..997]));
        v[996] = 1;
        assert!(!is_zero(&v[3..997]));
        assert!(is_zero(&[]));
    }
}

/// An I/O error that says nothing of a file's bytes (out of descriptors or memory, a network
/// file system's hiccup, an interruption): a pool entry is not judged damaged by it.
pub(crate) fn transient_io(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let transient = [
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOMEM,
        Errno::STALE,
        Errno::NOTCONN,
        Errno::AGAIN,
        Errno::INTR,
        Errno::TIMEDOUT,
    ];
    e.raw_os_error().is_some_and(|n| transient.iter().any(|t| t.raw_os_error() == n))
}

#[cfg(test)]
mod transient_tests {
    #[test]
    fn only_errors_that_say_nothing_of_the_bytes_are_transient() {
        use rustix::io::Errno;
        let e = |n: Errno| std::io::Error::from_raw_os_error(n.raw_os_error());
        assert!(super::transient_io(&e(Errno::MFILE)) && super::transient_io(&e(Errno::STALE)));
        assert!(!super::transient_io(&e(Errno::IO)) && !super::transient_io(&e(Errno::UCLEAN)));
        assert!(!super::transient_io(&std::io::Error::new(std::io::ErrorKind::InvalidData, "x")));
    }
}
