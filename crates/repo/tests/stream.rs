//! Round trips through `CompressWriter` and `DecompressReader`, and what they do with bad input.

use std::io::{BufRead, Read, Write};

use pgkeep_repo::{CompressWriter, DecompressReader, Digest, FrameError, BLOCK_SIZE};
use proptest::prelude::*;
use sha2::Digest as _;

/// Deterministic test data of three kinds: random (incompressible), low-entropy runs
/// (compressible, like relation pages), and zeros.
fn make(kind: u8, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind % 3 {
        0 => (0..len).map(|_| next() as u8).collect(),
        1 => {
            let mut v = Vec::with_capacity(len);
            while v.len() < len {
                let r = next();
                let run = (r >> 8) as usize % 300 + 1;
                let byte = if r % 4 == 0 { r as u8 } else { b' ' };
                v.resize(v.len() + run.min(len - v.len()), byte);
            }
            v
        }
        _ => vec![0; len],
    }
}

fn expected_digest(raw: &[u8], sha: bool) -> Digest {
    Digest {
        size: raw.len() as u64,
        crc32c: crc32c::crc32c(raw),
        sha256: sha.then(|| sha2::Sha256::digest(raw).into()),
    }
}

/// Compresses `raw` written in pieces of the given sizes (cycled).
fn compress(raw: &[u8], pieces: &[usize], sha: bool) -> (Digest, u64, Vec<u8>) {
    let mut w = CompressWriter::new(Vec::new(), sha);
    let mut rest = raw;
    let mut i = 0;
    while !rest.is_empty() {
        let n = pieces[i % pieces.len()].clamp(1, rest.len());
        w.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
        i += 1;
    }
    w.finish().unwrap()
}

/// Decompresses with `read` calls of the given buffer sizes (cycled).
fn decompress(frame: &[u8], pieces: &[usize], sha: bool) -> std::io::Result<(Vec<u8>, Digest)> {
    let mut r = DecompressReader::new(frame, sha);
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let mut buf = vec![0; pieces[i % pieces.len()].max(1)];
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        i += 1;
    }
    assert!(r.is_done());
    Ok((out, r.digest()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(
        kind in 0u8..3,
        len in prop_oneof![Just(0usize), 1usize..5000, 0usize..(5 * BLOCK_SIZE + 7)],
        seed in any::<u64>(),
        write_pieces in prop::collection::vec(prop_oneof![1usize..100, 1usize..(3 * BLOCK_SIZE)], 1..5),
        read_pieces in prop::collection::vec(prop_oneof![1usize..100, 1usize..(2 * BLOCK_SIZE)], 1..5),
        sha in any::<bool>(),
    ) {
        let raw = make(kind, len, seed);
        let (digest, stored, frame) = compress(&raw, &write_pieces, sha);
        prop_assert_eq!(digest, expected_digest(&raw, sha));
        prop_assert_eq!(stored, frame.len() as u64);
        // Incompressible blocks are stored as is, so a frame never grows by more than headers.
        prop_assert!(stored <= raw.len() as u64 + 11 + 4 * (raw.len() / BLOCK_SIZE + 1) as u64);
        let (out, got) = decompress(&frame, &read_pieces, sha).unwrap();
        prop_assert!(out == raw, "content differs");
        prop_assert_eq!(got, digest);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut r = DecompressReader::new(&bytes[..], true);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    }

    #[test]
    fn mutations_never_panic(pos in any::<prop::sample::Index>(), byte in any::<u8>(), kind in 0u8..3) {
        let raw = make(kind, 70_000, 42);
        let (_, _, mut frame) = compress(&raw, &[70_000], false);
        let pos = pos.index(frame.len());
        frame[pos] = byte;
        let mut r = DecompressReader::new(&frame[..], false);
        if let Err(e) = std::io::copy(&mut r, &mut std::io::sink()) {
            prop_assert!(FrameError::from_io(&e).is_some(), "not a frame error: {}", e);
        }
    }
}

#[test]
fn block_boundaries() {
    for len in [
        0,
        1,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
        2 * BLOCK_SIZE,
        3 * BLOCK_SIZE - 1,
    ] {
        for kind in 0..3 {
            let raw = make(kind, len, 7);
            for pieces in [[BLOCK_SIZE], [4096], [BLOCK_SIZE + 3]] {
                let (digest, _, frame) = compress(&raw, &pieces, true);
                assert_eq!(digest, expected_digest(&raw, true));
                let (out, got) = decompress(&frame, &[BLOCK_SIZE], true).unwrap();
                assert!(out == raw, "len {len} kind {kind}");
                assert_eq!(got, digest);
            }
        }
    }
}

#[test]
fn empty_stream_is_a_valid_frame() {
    let (digest, stored, frame) = CompressWriter::new(Vec::new(), true).finish().unwrap();
    assert_eq!(digest, expected_digest(b"", true));
    assert_eq!(stored, 11, "header and end mark");
    let (out, got) = decompress(&frame, &[10], true).unwrap();
    assert!(out.is_empty());
    assert_eq!(got, digest);
}

#[test]
fn frames_are_standard_lz4() {
    // Our frames decode with lz4_flex's own frame decoder (so `lz4 -d` reads repository objects).
    for kind in 0..3 {
        let raw = make(kind, 2 * BLOCK_SIZE + 100, 3);
        let (_, _, frame) = compress(&raw, &[BLOCK_SIZE], false);
        let mut out = Vec::new();
        lz4_flex::frame::FrameDecoder::new(&frame[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == raw);
    }
    // And we read its frames written with the settings we accept.
    let raw = make(1, 300_000, 5);
    let info = lz4_flex::frame::FrameInfo::new()
        .block_size(lz4_flex::frame::BlockSize::Max64KB)
        .block_mode(lz4_flex::frame::BlockMode::Independent);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(&raw).unwrap();
    let frame = enc.finish().unwrap();
    let (out, _) = decompress(&frame, &[65536], false).unwrap();
    assert!(out == raw);
}

#[test]
fn frames_we_did_not_write_are_refused() {
    let raw = make(1, 1000, 5);
    // Linked blocks and content checksums are not what CompressWriter writes.
    let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(&raw).unwrap();
    let frame = enc.finish().unwrap();
    let err = std::io::copy(
        &mut DecompressReader::new(&frame[..], false),
        &mut std::io::sink(),
    )
    .unwrap_err();
    assert!(
        matches!(
            FrameError::from_io(&err),
            Some(FrameError::UnsupportedHeader(..))
        ),
        "{err}"
    );
}

#[test]
fn truncation_is_detected_at_every_cut() {
    let raw = make(1, BLOCK_SIZE + 5000, 9);
    let (_, _, frame) = compress(&raw, &[BLOCK_SIZE], false);
    for cut in (0..frame.len())
        .step_by(frame.len() / 300)
        .chain(frame.len() - 12..frame.len())
    {
        let mut r = DecompressReader::new(&frame[..cut], false);
        let err = std::io::copy(&mut r, &mut std::io::sink()).unwrap_err();
        assert_eq!(
            FrameError::from_io(&err),
            Some(&FrameError::Truncated),
            "cut at {cut}"
        );
        assert!(!r.is_done());
    }
}

#[test]
fn bufread_and_digest_track_what_was_consumed() {
    let raw = make(1, 3 * BLOCK_SIZE, 11);
    let (digest, _, frame) = compress(&raw, &[BLOCK_SIZE], true);
    let mut r = DecompressReader::new(&frame[..], true);
    let mut out = Vec::new();
    loop {
        let chunk = r.fill_buf().unwrap();
        if chunk.is_empty() {
            break;
        }
        // Consume in two halves to check partial consumption is summed exactly once.
        let half = chunk.len().div_ceil(2);
        out.extend_from_slice(&chunk[..half]);
        r.consume(half);
        assert_eq!(r.digest().size, out.len() as u64);
        assert_eq!(r.digest().crc32c, crc32c::crc32c(&out));
    }
    assert!(out == raw);
    assert_eq!(r.digest(), digest);
    assert_eq!(
        digest.sha256_hex(),
        Some(hex::encode(sha2::Sha256::digest(&raw)))
    );
}

#[test]
fn flush_ends_a_block_early_but_keeps_the_stream_valid() {
    let raw = make(1, 10_000, 13);
    let mut w = CompressWriter::new(Vec::new(), false);
    w.write_all(&raw[..3000]).unwrap();
    w.flush().unwrap();
    let after_flush = w.get_ref().len();
    assert!(after_flush > 7, "flush did not reach the inner writer");
    w.write_all(&raw[3000..]).unwrap();
    let (digest, _, frame) = w.finish().unwrap();
    assert_eq!(digest, expected_digest(&raw, false));
    let (out, _) = decompress(&frame, &[999], false).unwrap();
    assert!(out == raw);
}
