#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (k, v) in affa::report::parse_rsync_stats(&String::from_utf8_lossy(data)) {
        assert!(!k.is_empty() && k.bytes().all(|b| b.is_ascii_alphabetic()));
        assert!(!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    }
});
