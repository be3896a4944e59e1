//! The agent protocol's decoder (crates/agent-proto) on arbitrary bytes, as either peer would
//! receive them (backup and restore messages alike): never a panic, never a buffer above MAX_FRAME.
#![no_main]
use affa_agent_proto::{FrameReader, Msg, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = FrameReader::new(data);
    while let Ok(Some(m)) = r.read_msg() {
        // What decodes must encode again and decode equal (text fields excepted: invalid UTF-8
        // is replaced on decoding, which may lengthen it past the sender's limit).
        let text = matches!(m, Msg::Hello { .. } | Msg::Error { .. } | Msg::Fault { .. } | Msg::RAbort { .. });
        if let (false, Ok(b)) = (text, m.encode()) {
            assert_eq!(FrameReader::new(&b[..]).read_msg().unwrap().unwrap(), m);
        }
    }
    if let Some((&t, body)) = data.split_first() {
        let _ = Msg::decode(t, body);
    }
    assert!(r.get_mut().len() <= data.len() && MAX_FRAME > 0);
});
