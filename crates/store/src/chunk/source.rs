//! Where a restore reads the chunks of a chunked file: the archive's own `.affa-chunks/` (the
//! default, [`ArchiveChunks`]) or another store a caller provides (the offsite bucket,
//! `src/offsite/fetch.rs`), through one trait the rebuild, stream and agent-restore paths read.
//!
//! Owns: the [`ChunkSource`] seam and the error that names a bad chunk with the place it came
//! from. Must never: hand a chunk on unchecked: a source only delivers a chunk file's bytes;
//! the reader (`restore.rs`, `remote.rs`) decodes them and checks length and BLAKE3 against the
//! id before a byte of it is used.

use super::pool::archive_entry;
use super::restore::ProblemKind;
use super::{id_hex, ChunkId};
use crate::error::Error;
use std::path::Path;

/// The largest chunk file a reader accepts (header, the largest chunk, room for an
/// incompressible payload's overhead).
pub const MAX_CHUNK_FILE_LEN: u64 = super::blob::HEADER_LEN as u64 + super::MAX_CHUNK_SIZE as u64 + (1 << 20);

/// A store of chunk files, by chunk id. Shared by the reading threads of one file.
pub trait ChunkSource: Sync {
    /// Put the chunk file (chunk file version 1: header and compressed payload) of `id` in
    /// `raw` (replacing its contents): `Missing` when the store has none, `Damaged` when it
    /// cannot be read (or, for a sealed store, does not open).
    fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind>;

    /// Where the chunk `id` is kept, for error messages (None: the archive's own link).
    fn place(&self, _id: &ChunkId) -> Option<String> {
        None
    }

    /// How many reads of this source the reader of one file runs at once, ahead of its
    /// consumer in manifest order (None: the reader's default, the cores up to 8). A remote
    /// store, whose reads wait on the network rather than on a core, says how many requests it
    /// may have in flight. The reader's window (its memory) grows with it: see `restore.rs`.
    fn parallel(&self) -> Option<usize> {
        None
    }
}

/// The chunk links of an archive (`ARCHIVE/.affa-chunks/`).
pub struct ArchiveChunks<'a>(pub &'a Path);

impl ChunkSource for ArchiveChunks<'_> {
    fn read(&self, id: &ChunkId, raw: &mut Vec<u8>) -> std::result::Result<(), ProblemKind> {
        match super::pool::read_blob(&archive_entry(self.0, id), raw) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ProblemKind::Missing),
            Err(e) => Err(ProblemKind::Damaged(format!("cannot read: {e}"))),
        }
    }
}

/// The error of a missing or damaged chunk `id` of the file `what`, naming where it was read.
pub(super) fn source_error(src: &dyn ChunkSource, id: &ChunkId, what: &Path, k: ProblemKind) -> Error {
    let Some(place) = src.place(id) else { return super::restore::chunk_error(id, what, k) };
    match k {
        ProblemKind::Missing => {
            Error::damaged(format!("chunk {} of {} is missing ({place} does not exist)", id_hex(id), what.display()))
        }
        ProblemKind::Damaged(why) => {
            Error::damaged(format!("chunk {} of {} is damaged: {place} {why}", id_hex(id), what.display()))
        }
    }
}

/// Read chunk `id` from `src`, decode it into `out` and check its length and BLAKE3.
pub(super) fn load(
    src: &dyn ChunkSource,
    id: &ChunkId,
    len: usize,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), ProblemKind> {
    src.read(id, raw)?;
    super::restore::check_blob(id, len, raw, out)
}
