//! `MODEL.kiln` format: round trip and every way a file can be bad.

mod common;

use kiln_runtime::artifact::{Artifact, ArtifactError, FORMAT_VERSION};
use proptest::prelude::*;

/// A small artifact with stand-in kernel bytes (the format does not look inside them).
fn sample() -> Artifact {
    common::add_relu_artifact(b"\x7fELF not really a library".to_vec())
}

#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("MODEL.kiln");
    let a = sample();
    a.save(&path).unwrap();
    let b = Artifact::load(&path).unwrap();
    assert_eq!(a, b);
    // Saving again replaces the file atomically and leaves no temporary behind.
    b.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn sections_are_64_byte_aligned() {
    let a = sample();
    let bytes = a.to_bytes().unwrap();
    // The weights section holds the blob verbatim at a 64-aligned file offset.
    let pos = bytes
        .windows(a.weights.len())
        .position(|w| w == a.weights.as_slice())
        .unwrap();
    assert_eq!(pos % 64, 0);
}

#[test]
fn one_flipped_byte_is_a_checksum_error() {
    let bytes = sample().to_bytes().unwrap();
    for i in (16..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        let err = Artifact::from_bytes(&b, "MODEL.kiln").unwrap_err();
        // Flipping a byte of `file_len` reads as truncation or trailing data instead.
        if (16..24).contains(&i) {
            assert!(
                matches!(
                    err,
                    ArtifactError::Truncated { .. } | ArtifactError::Malformed { .. }
                ),
                "byte {i}: {err}"
            );
        } else {
            assert!(
                matches!(err, ArtifactError::Checksum { .. }),
                "byte {i}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("MODEL.kiln") && msg.contains("checksum"),
                "{msg}"
            );
        }
    }
}

#[test]
fn truncated_files_are_refused() {
    let bytes = sample().to_bytes().unwrap();
    for n in [0, 5, 8, 11, 15, 23, 24, 100, bytes.len() - 1] {
        let err = Artifact::from_bytes(&bytes[..n], "MODEL.kiln").unwrap_err();
        assert!(matches!(err, ArtifactError::Truncated { .. }), "{n}: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("MODEL.kiln");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = Artifact::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains("MODEL.kiln") && msg.contains("file_len"),
        "{msg}"
    );
}

#[test]
fn other_format_versions_are_refused() {
    let bytes = sample().to_bytes().unwrap();
    // Version 2 artifacts hold kernels with the two-argument ABI (no scratch memory).
    assert_eq!(FORMAT_VERSION, 6);
    for (v, word) in [(FORMAT_VERSION + 1, "newer"), (0, "older"), (5, "older")] {
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let err = Artifact::from_bytes(&b, "MODEL.kiln").unwrap_err();
        assert!(matches!(err, ArtifactError::Version { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("format_version") && msg.contains(word) && msg.contains("MODEL.kiln"),
            "{msg}"
        );
    }
}

#[test]
fn wrong_magic_is_refused() {
    let mut b = sample().to_bytes().unwrap();
    b[0] = b'X';
    let msg = Artifact::from_bytes(&b, "MODEL.kiln")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("magic") && msg.contains("not a Kiln artifact"),
        "{msg}"
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.kiln");
    let msg = Artifact::load(&missing).unwrap_err().to_string();
    assert!(msg.contains("nope.kiln"), "{msg}");
}

#[test]
fn trailing_bytes_are_refused() {
    let mut b = sample().to_bytes().unwrap();
    b.push(0);
    let msg = Artifact::from_bytes(&b, "m").unwrap_err().to_string();
    assert!(msg.contains("trailing"), "{msg}");
}

#[test]
fn inconsistent_plans_are_not_saved() {
    let mut a = sample();
    a.plan.weights[1].offset = 8;
    let msg = a.to_bytes().unwrap_err().to_string();
    assert!(
        msg.contains("weight 1 'bias'") && msg.contains("multiple of 64"),
        "{msg}"
    );
    let mut a = sample();
    a.plan.steps[1].args[1] = kiln_runtime::BufRef::Input { index: 0 };
    let msg = a.to_bytes().unwrap_err().to_string();
    assert!(msg.contains("writes input 'x'"), "{msg}");
}

/// Re-stamps the checksum so a mutation reaches the parser behind it.
fn restamp(b: &mut [u8]) {
    if b.len() >= 24 {
        let len = b.len() as u64;
        b[16..24].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast_hash(&b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    }
}

/// CRC-32 (IEEE), bitwise, to stay independent of the implementation under test.
fn crc32fast_hash(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn restamp_matches_the_writer() {
    let bytes = sample().to_bytes().unwrap();
    let mut b = bytes.clone();
    restamp(&mut b);
    assert_eq!(b, bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Artifact::from_bytes(&bytes, "fuzz");
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut b = b"KILNART\0".to_vec();
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&tail);
        restamp(&mut b);
        let _ = Artifact::from_bytes(&b, "fuzz");
    }

    #[test]
    fn mutated_artifacts_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<Option<usize>>(),
        stamp in any::<bool>(),
    ) {
        let mut b = sample().to_bytes().unwrap();
        for (at, v) in edits {
            let i = at % b.len();
            b[i] = v;
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        if stamp {
            restamp(&mut b);
        }
        // Past the checksum, the parser must still reject or accept without panicking, and
        // whatever it accepts must re-serialize.
        if let Ok(a) = Artifact::from_bytes(&b, "fuzz") {
            prop_assert!(a.to_bytes().is_ok());
        }
    }
}
