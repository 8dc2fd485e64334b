use maskdiff_data::tokenfile::*;
use maskdiff_data::{fnv1a64, DataError, TokenizerId};
use maskdiff_process::Vocab;

use crate::temp_dir;

fn vocab(n: usize) -> Vocab {
    Vocab::new(n).unwrap()
}

#[test]
fn round_trip_each_dtype_with_exact_sizes() {
    let dir = temp_dir("tf-roundtrip");
    for (v, width, dtype) in [
        (27usize, 1u64, Dtype::U8),
        (256, 1, Dtype::U8),
        (257, 2, Dtype::U16),
        (50257, 2, Dtype::U16),
        (65536, 2, Dtype::U16),
        (70000, 4, Dtype::U32),
    ] {
        let ids: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % v as u32).collect();
        let path = dir.join(format!("v{v}.tok"));
        let f = TokenFile::write(&path, &ids, vocab(v), TokenizerId::Custom).unwrap();
        assert_eq!(f.header().dtype, dtype);
        // 64-byte header + 1000 tokens of `width` bytes.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 + 1000 * width);
        let g = TokenFile::open(&path).unwrap();
        assert_eq!(g.len(), 1000);
        assert_eq!(g.vocab().size(), v);
        assert_eq!(g.ids(0..1000).unwrap(), ids);
        assert_eq!(g.get(999), Some(ids[999]));
        assert_eq!(g.get(1000), None);
        assert_eq!(
            g.tokens(3..5)
                .unwrap()
                .iter()
                .map(|t| t.id())
                .collect::<Vec<_>>(),
            ids[3..5]
        );
        assert!(g.ids(999..1001).is_err());
    }
    // Atomic write leaves no temp files behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".tok")), "{names:?}");
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = encode_token_file(&[1, 2, 3], vocab(27), TokenizerId::Text8).unwrap();
    assert_eq!(&bytes[0..8], b"MDTOKENS");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1); // version
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 1); // dtype width
    assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 27); // vocab
    assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().unwrap()), 1); // text8
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 3); // length
    assert_eq!(
        u64::from_le_bytes(bytes[32..40].try_into().unwrap()),
        fnv1a64(&[1, 2, 3])
    );
    assert_eq!(&bytes[64..], &[1, 2, 3]);
}

fn good() -> Vec<u8> {
    encode_token_file(&[1, 2, 3, 4], vocab(27), TokenizerId::Text8).unwrap()
}

#[test]
fn corruption_is_detected_with_the_right_error() {
    let mut b = good();
    b[66] ^= 1;
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::BadChecksum { .. })
    ));

    let mut b = good();
    b[0] = b'X';
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::BadMagic { .. })
    ));

    let mut b = good();
    b[8] = 2;
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::BadVersion {
            found: 2,
            expected: 1,
            ..
        })
    ));

    let mut b = good();
    b.pop();
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::WrongSize {
            expected: 68,
            found: 67,
            ..
        })
    ));

    let mut b = good();
    b[12] = 3; // dtype width 3
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::BadHeader { .. })
    ));

    let mut b = good();
    b[16..20].copy_from_slice(&300u32.to_le_bytes()); // vocab 300 does not fit u8
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::BadHeader { .. })
    ));

    // A token out of the vocabulary with a consistent checksum.
    let mut b = good();
    b[65] = 30;
    let c = fnv1a64(&b[64..]);
    b[32..40].copy_from_slice(&c.to_le_bytes());
    assert!(matches!(
        TokenFile::from_bytes(b),
        Err(DataError::TokenOutOfVocab {
            id: 30,
            pos: 1,
            vocab: 27
        })
    ));

    assert!(matches!(
        encode_token_file(&[0, 27], vocab(27), TokenizerId::Text8),
        Err(DataError::TokenOutOfVocab { id: 27, pos: 1, .. })
    ));
    assert!(matches!(
        TokenFile::open(std::path::Path::new("/nonexistent/x.tok")),
        Err(DataError::MissingFile(_))
    ));
}

#[test]
fn a_corrupt_file_on_disk_fails_to_open() {
    let dir = temp_dir("tf-corrupt");
    let p = dir.join("c.tok");
    TokenFile::write(&p, &[5; 100], vocab(27), TokenizerId::Text8).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    b[100] = 6;
    std::fs::write(&p, b).unwrap();
    assert!(matches!(
        TokenFile::open(&p),
        Err(DataError::BadChecksum { .. })
    ));
}

#[test]
fn a_text_tokenizer_tag_must_match_the_vocabulary() {
    // text8 with V = 100 (ids < 100 all valid for the header): refused on writing and on opening.
    assert!(matches!(
        encode_token_file(&[1, 2, 99], vocab(100), TokenizerId::Text8),
        Err(DataError::InvalidArgument(_))
    ));
    let mut b = encode_token_file(&[1, 2, 99], vocab(100), TokenizerId::Custom).unwrap();
    b[20..24].copy_from_slice(&TokenizerId::Text8.code().to_le_bytes()); // header only: checksum holds
    match TokenFile::from_bytes(b) {
        Err(DataError::BadHeader { detail, .. }) => {
            assert!(detail.contains("text8") && detail.contains("27") && detail.contains("100"))
        }
        other => panic!("expected BadHeader, got {:?}", other.map(|f| *f.header())),
    }
    for (t, v) in [
        (TokenizerId::Text8, 27),
        (TokenizerId::Bytes, 256),
        (TokenizerId::Gpt2, 50257),
    ] {
        assert_eq!(t.vocab_size(), Some(v));
        assert!(encode_token_file(&[0], vocab(v), t).is_ok());
        assert!(encode_token_file(&[0], vocab(v + 1), t).is_err());
    }
    // Custom ids and pixels take any vocabulary.
    assert!(encode_token_file(&[0], vocab(100), TokenizerId::Custom).is_ok());
    assert!(encode_token_file(&[0], vocab(17), TokenizerId::Pixels).is_ok());
}
