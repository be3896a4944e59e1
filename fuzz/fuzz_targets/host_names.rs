#![no_main]
//! The one path-safety rule and the escaping of host text, on any bytes a host could send.
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/common/host_input.rs"]
mod host_input;

fuzz_target!(|data: &[u8]| host_input::host_names(data));
