#![no_main]
//! `.affa-esxi.ini` read back from an archive by restore.
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/common/host_input.rs"]
mod host_input;

fuzz_target!(|data: &[u8]| host_input::esxi_ini(data));
