//! The chunk file bytes (docs/FORMAT.md, "Chunk file (version 1)") as the pool stores them, made
//! on the source so the wire and the pool carry the same bytes.
//!
//! Owns: the agent's encoder. It must produce exactly what affa-store's encoder produces for the
//! same input and setting (same header, same raw fallback rule); the agent's tests decode its
//! output with affa-store. Must never: panic on a chunk of up to 16 MiB.

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
