//! The chunk file bytes (docs/FORMAT.md, "Chunk file (version 1)") as the pool stores them, made
//! on the source so the wire and the pool carry the same bytes.
//!
//! Owns: the agent's encoder and decoder. The encoder must produce exactly what affa-store's
//! encoder produces for the same input and setting (same header, same raw fallback rule); the
//! agent's tests decode its output with affa-store. The decoder (restore) takes chunk files from
//! affa. Must never: panic on a chunk of up to 16 MiB, or on any bytes given to `decode`, nor
//! decode into more than the chunk's length.

pub const HEADER_LEN: usize = 16;
const ENC_RAW: u8 = 0;
pub const ENC_ZSTD: u8 = 1;
pub const ENC_LZ4: u8 = 2;

/// Per-thread compression state: `comp` 0 none, 1 zstd (`level`), 2 lz4.
pub struct Encoder {
    comp: u8,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    pub fn new(comp: u8, level: u8) -> std::io::Result<Encoder> {
        let zstd = if comp == ENC_ZSTD { Some(zstd::bulk::Compressor::new(level as i32)?) } else { None };
        Ok(Encoder { comp, zstd })
    }

    /// Encode `data` into `out`: compressed when that saves at least 1/32, else raw.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        let bound = match self.comp {
            ENC_LZ4 => lz4_flex::block::get_maximum_output_size(data.len()),
            ENC_ZSTD => zstd::zstd_safe::compress_bound(data.len()),
            _ => 0,
        };
        out.resize(HEADER_LEN + bound.max(data.len()), 0);
        let compressed = match (self.comp, self.zstd.as_mut()) {
            (ENC_LZ4, _) => lz4_flex::block::compress_into(data, &mut out[HEADER_LEN..]).ok().map(|n| (ENC_LZ4, n)),
            (ENC_ZSTD, Some(c)) => Some((ENC_ZSTD, c.compress_to_buffer(data, &mut out[HEADER_LEN..])?)),
            _ => None,
        };
        let (enc, n) = match compressed {
            Some((enc, n)) if n < data.len() - data.len() / 32 => (enc, n),
            _ => {
                out[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
                (ENC_RAW, data.len())
            }
        };
        out.truncate(HEADER_LEN + n);
        out[0..4].copy_from_slice(b"AFCK");
        out[4] = 1;
        out[5] = enc;
        out[6] = 0;
        out[7] = 0;
        out[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        Ok(())
    }
}

/// Decode a chunk file into `out`, which becomes exactly `len` bytes (the chunk's length); a
/// header that disagrees with `len` or the file's length, or a payload that does not decode to
/// exactly `len` bytes, is an error saying so.
pub fn decode(blob: &[u8], len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if blob.len() < HEADER_LEN {
        return Err(format!("{} bytes, a chunk file header needs {HEADER_LEN}", blob.len()));
    }
    if &blob[0..4] != b"AFCK" || blob[4] != 1 || blob[5] > ENC_LZ4 || blob[6] != 0 || blob[7] != 0 {
        return Err("not a chunk file of version 1 (bad header)".into());
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let (raw, payload) = (le32(&blob[8..12]), le32(&blob[12..16]));
    if raw != len {
        return Err(format!("holds {raw} bytes, the chunk has {len}"));
    }
    let src = &blob[HEADER_LEN..];
    if src.len() != payload {
        return Err(format!("payload of {} bytes, its header says {payload}", src.len()));
    }
    out.clear();
    out.resize(len, 0);
    let n = match blob[5] {
        ENC_RAW if payload == len => {
            out.copy_from_slice(src);
            len
        }
        ENC_RAW => return Err("raw chunk whose payload length is not its length".into()),
        ENC_ZSTD => {
            zstd::bulk::decompress_to_buffer(src, &mut out[..]).map_err(|e| format!("zstd data corrupt: {e}"))?
        }
        _ => lz4_flex::block::decompress_into(src, &mut out[..]).map_err(|e| format!("lz4 data corrupt: {e}"))?,
    };
    if n != len {
        return Err(format!("decoded to {n} bytes, the chunk has {len}"));
    }
    Ok(())
}
