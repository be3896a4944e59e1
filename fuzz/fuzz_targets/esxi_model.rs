#![no_main]
//! What an ESXi host answers about a VM: every VM-layout parser, and the one path-safety rule
//! on every datastore path it names.
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/common/host_input.rs"]
mod host_input;

fuzz_target!(|data: &[u8]| host_input::vm_layout(data));
