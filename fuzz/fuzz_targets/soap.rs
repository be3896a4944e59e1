#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = affa::esxi::soap::parse(data);
    let _ = affa::esxi::soap::parse_reply(data);
});
