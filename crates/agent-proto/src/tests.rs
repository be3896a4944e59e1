use super::*;
use proptest::prelude::*;

fn samples() -> Vec<Msg> {
    let id = [7u8; 32];
    vec![
        Msg::Hello { version: VERSION, software: "affa-agent 0.1.0".into(), exe_hash: id },
        Msg::Error { message: "boom".into() },
        Msg::Bye,
        Msg::Backup(Backup {
            path: b"/vmfs/volumes/ds1/vm/vm-flat.vmdk".to_vec(),
            chunk_size: 1 << 20,
            compression: 1,
            level: 3,
            prev_count: 3,
            ranged: true,
        }),
        Msg::Prev { start: 5, entries: vec![None, Some(id), None] },
        Msg::Ranges(vec![(0, 2), (7, 9)]),
        Msg::Start,
        Msg::Opened(Opened {
            size: 1 << 40,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: (-5, 999_999_999),
            atime: (1, 0),
            window: 32,
        }),
        Msg::Chunk { index: 1, kind: ChunkKind::Zero },
        Msg::Chunk { index: 2, kind: ChunkKind::Same },
        Msg::Chunk { index: 3, kind: ChunkKind::Hash(id) },
        Msg::Answer { index: 3, need: true },
        Msg::Data { index: 3, blob: b"AFCK....".to_vec() },
        Msg::End(End { size: 9, mtime: (1, 2), file_hash: Some(id), bytes_read: 9, chunks_sent: 1 }),
        Msg::End(End { size: 9, mtime: (1, 2), file_hash: None, bytes_read: 0, chunks_sent: 0 }),
        Msg::Fault { kind: FaultKind::Shrank, offset: 4096, message: "x".into() },
        Msg::Restore(Restore {
            path: b"/vmfs/volumes/ds1/vm/vm-flat.vmdk".to_vec(),
            size: (3 << 20) + 5,
            chunk_size: 1 << 20,
            mode: 0o600,
            uid: u32::MAX,
            gid: 0,
            mtime: (1_700_000_000, 5),
            atime: (-1, 999_999_999),
            file_hash: id,
            count: 4,
            compare: true,
            keep_newer: false,
        }),
        Msg::RManifest { start: 0, entries: vec![Some(id), None, None, Some([9; 32])] },
        Msg::ROpened { window: 32, compared: false },
        Msg::RNeed { index: 3 },
        Msg::RData { index: 3, blob: b"AFCK....".to_vec() },
        Msg::RDone(RDone {
            chunks_received: 1,
            bytes_received: 24,
            chunks_local: 1,
            bytes_local_read: 1 << 20,
            skipped: false,
        }),
        Msg::RDone(RDone { skipped: true, ..RDone::default() }),
        Msg::RAbort { message: "chunk damaged".into() },
        Msg::Fault { kind: FaultKind::Aborted, offset: 0, message: "chunk damaged".into() },
    ]
}

fn stream(ms: &[Msg]) -> Vec<u8> {
    ms.iter().flat_map(|m| m.encode().unwrap()).collect()
}

#[test]
fn every_message_round_trips() {
    let ms = samples();
    let bytes = stream(&ms);
    let mut r = FrameReader::new(&bytes[..]);
    for m in &ms {
        assert_eq!(&r.expect().unwrap(), m);
    }
    assert!(r.read_msg().unwrap().is_none());
    assert_eq!(r.bytes_in, bytes.len() as u64);
}

#[test]
fn every_truncation_and_extension_is_an_error() {
    for m in samples() {
        let b = m.encode().unwrap();
        let body = &b[5..];
        for cut in 0..body.len() {
            // Data takes the rest of the frame as its blob: only its index can be cut.
            if matches!(m, Msg::Data { .. } | Msg::RData { .. }) && cut >= 8 {
                continue;
            }
            assert!(Msg::decode(b[4], &body[..cut]).is_err(), "{} cut at {cut}", m.name());
        }
        if !matches!(m, Msg::Data { .. } | Msg::RData { .. }) {
            let mut longer = body.to_vec();
            longer.push(0);
            assert!(Msg::decode(b[4], &longer).is_err(), "{} extended", m.name());
        }
    }
}

#[test]
fn hostile_lengths_are_refused_before_allocation() {
    // A frame length above the limit, zero, and a banner instead of a frame.
    for bytes in [
        ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec(),
        u32::MAX.to_le_bytes().to_vec(),
        0u32.to_le_bytes().to_vec(),
        b"bash: affa-agent: command not found\n".to_vec(),
    ] {
        let mut r = FrameReader::new(&bytes[..]);
        let e = r.read_msg().unwrap_err().to_string();
        assert!(e.contains("bad frame length"), "{e}");
        assert!(r.buf.capacity() <= MAX_FRAME);
    }
    // A frame cut short.
    let mut b = Msg::Bye.encode().unwrap();
    b[0] = 9;
    assert!(matches!(FrameReader::new(&b[..]).read_msg(), Err(Error::Eof)));
    // A PREV claiming 4 billion entries in a few bytes, a text longer than its limit.
    let mut body = 0u64.to_le_bytes().to_vec();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.push(0);
    assert!(Msg::decode(ty::PREV, &body).is_err());
    let mut body = (MAX_TEXT as u32 + 1).to_le_bytes().to_vec();
    body.extend(vec![b'a'; MAX_TEXT + 1]);
    assert!(Msg::decode(ty::ERROR, &body).is_err());
    assert!(Msg::decode(0x7f, &[]).unwrap_err().to_string().contains("unknown message type"));
    // A path with NUL or empty.
    for p in [&b""[..], b"/a\0b"] {
        let mut body = (p.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(p);
        body.extend_from_slice(&[0; 4 + 1 + 1 + 8 + 1]);
        assert!(Msg::decode(ty::BACKUP, &body).is_err());
        let mut body = (p.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(p);
        body.extend_from_slice(&[0; 8 + 4 * 4 + 12 * 2 + 32 + 8 + 1]);
        assert!(Msg::decode(ty::RESTORE, &body).is_err());
    }
    // An RMANIFEST claiming more entries than its frame holds; a fault kind not defined.
    let mut body = 0u64.to_le_bytes().to_vec();
    body.extend_from_slice(&1000u32.to_le_bytes());
    body.extend_from_slice(&[1; 999]);
    assert!(Msg::decode(ty::RMANIFEST, &body).unwrap_err().to_string().contains("RMANIFEST: 1000 entries"));
    let mut body = vec![14];
    body.extend_from_slice(&[0; 8 + 4]);
    assert!(Msg::decode(ty::FAULT, &body).is_err());
}

#[test]
fn handshake_agrees_and_a_version_mismatch_is_one_line_on_both_ends() {
    // Our side against a peer whose HELLO is already in the stream.
    let peer = stream(&[Msg::Hello { version: VERSION, software: "peer".into(), exe_hash: [1; 32] }]);
    let mut out = Vec::new();
    let (sw, h) =
        handshake(&mut FrameReader::new(&peer[..]), &mut FrameWriter::new(&mut out), "me", [0; 32], true).unwrap();
    assert_eq!((sw.as_str(), h), ("peer", [1; 32]));
    assert_eq!(FrameReader::new(&out[..]).expect().unwrap().name(), "HELLO");

    // A future version: its HELLO layout after the version is not parsed.
    let mut future = Msg::Hello { version: 2, software: String::new(), exe_hash: [0; 32] }.encode().unwrap();
    future.extend_from_slice(b"whatever a version 2 says");
    let n = (future.len() - 4) as u32;
    future[0..4].copy_from_slice(&n.to_le_bytes());
    let mut out = Vec::new();
    let e = handshake(&mut FrameReader::new(&future[..]), &mut FrameWriter::new(&mut out), "me", [0; 32], true)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "protocol version 2 not supported: this side speaks version 1");
    let mut r = FrameReader::new(&out[..]);
    r.expect().unwrap();
    assert_eq!(r.expect().unwrap(), Msg::Error { message: e.clone() });
    assert!(!e.contains('\n'));

    // The peer's refusal is shown as its text.
    let refused = stream(&[Msg::Error { message: "protocol version 1 not supported\n\x1b[31m".into() }]);
    let e = handshake(&mut FrameReader::new(&refused[..]), &mut FrameWriter::new(Vec::new()), "me", [0; 32], false)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("the peer refused: protocol version 1 not supported") && !e.contains('\n'), "{e}");
    // Invisible layout characters too (a right-to-left override, a line separator).
    assert_eq!(shown("a\u{202e}b\u{2028}c\u{2066}"), "a\\u{202e}b\\u{2028}c\\u{2066}");
    // Not an agent at all.
    let e = handshake(
        &mut FrameReader::new(&b"Welcome to ESXi\n"[..]),
        &mut FrameWriter::new(Vec::new()),
        "me",
        [0; 32],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not an affa agent") && e.contains("Welcome to ESXi"), "{e}");
}

#[test]
fn oversized_messages_are_refused_by_the_sender() {
    let m = Msg::Data { index: 0, blob: vec![0; MAX_FRAME] };
    assert!(m.encode().is_err());
    let m = Msg::Backup(Backup {
        path: vec![b'a'; MAX_PATH + 1],
        chunk_size: 1 << 20,
        compression: 0,
        level: 0,
        prev_count: 0,
        ranged: false,
    });
    assert!(m.encode().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut r = FrameReader::new(&data[..]);
        while let Ok(Some(_)) = r.read_msg() {}
        prop_assert!(r.buf.capacity() <= MAX_FRAME);
        if let Some((&t, body)) = data.split_first() {
            let _ = Msg::decode(t, body);
        }
    }

    #[test]
    fn mutated_frames_never_panic(which in 0usize..32, pos in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
        let ms = samples();
        let mut b = ms[which % ms.len()].encode().unwrap();
        let p = 4 + pos % (b.len() - 4);
        b[p] = byte;
        b.truncate(b.len() - cut % (b.len() - 4));
        let mut r = FrameReader::new(&b[..]);
        let _ = r.read_msg();
        prop_assert!(r.buf.capacity() <= MAX_FRAME);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, cases: 500, ..ProptestConfig::default() })]
    #[test]
    fn restore_messages_round_trip(
        path in proptest::collection::vec(1u8..=255, 1..300),
        nums in any::<(u64, u32, u32, u32, u32, u64)>(),
        times in any::<(i64, i64)>(),
        ns in (0u32..1_000_000_000, 0u32..1_000_000_000),
        hash in any::<[u8; 32]>(),
        compare in any::<bool>(),
        keep_newer in any::<bool>(),
        entries in proptest::collection::vec(proptest::option::of(any::<[u8; 32]>()), 1..50),
        blob in proptest::collection::vec(any::<u8>(), 0..100),
        done in any::<(u64, u64, u64, u64)>(),
        text in ".{0,80}",
    ) {
        let (size, chunk_size, mode, uid, gid, count) = nums;
        let ms = vec![
            Msg::Restore(Restore {
                path,
                size,
                chunk_size,
                mode,
                uid,
                gid,
                mtime: (times.0, ns.0),
                atime: (times.1, ns.1),
                file_hash: hash,
                count,
                compare,
                keep_newer,
            }),
            Msg::RManifest { start: size, entries },
            Msg::ROpened { window: mode, compared: compare },
            Msg::RNeed { index: count },
            Msg::RData { index: size, blob },
            Msg::RDone(RDone {
                chunks_received: done.0,
                bytes_received: done.1,
                chunks_local: done.2,
                bytes_local_read: done.3,
                skipped: keep_newer,
            }),
            Msg::RAbort { message: text },
        ];
        let bytes = stream(&ms);
        let mut r = FrameReader::new(&bytes[..]);
        for m in &ms {
            prop_assert_eq!(&r.expect().unwrap(), m);
        }
        prop_assert!(r.read_msg().unwrap().is_none());
    }
}
