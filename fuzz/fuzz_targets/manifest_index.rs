#![no_main]
//! The manifest index `.affa-manifests` read back from an archive: nothing it lists may leave
//! the archive.
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/common/host_input.rs"]
mod host_input;

fuzz_target!(|data: &[u8]| host_input::manifest_index(data));
