#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = affa::report::Report::parse(&String::from_utf8_lossy(data));
    let _ = r.date();
    let _ = affa::report::Report::parse(&r.to_text());
});
