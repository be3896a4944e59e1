#![no_main]
use affa::chunk::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        assert_eq!(m.chunks.len() as u64, Manifest::chunk_count(m.size, m.chunk_size));
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }
});
