use std::io::Write;

use maskdiff_data::images::*;
use maskdiff_data::{DataError, Split};
use proptest::prelude::*;

use crate::{data_cache, have_data, temp_dir};

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_images_and_labels_plain_and_gzip() {
    let dir = temp_dir("idx");
    let pixels: Vec<u8> = (0..3 * 2 * 2).map(|i| (i * 20) as u8).collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte.gz"),
        gzip(&idx_bytes(&[3, 2, 2], &pixels)),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx_bytes(&[3], &[7, 0, 9]),
    )
    .unwrap();
    let set = load_fashion_mnist(&dir, Split::Train).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!(
        set.shape,
        ImageShape {
            height: 2,
            width: 2,
            channels: 1,
            levels: 256
        }
    );
    assert_eq!(set.image(1).unwrap(), &[80, 100, 120, 140]);
    assert_eq!((set.label(0), set.label(2)), (Some(7), Some(9)));
    let b = set.batch(&[2, 0]).unwrap();
    assert_eq!(b.ids, vec![160, 180, 200, 220, 0, 20, 40, 60]);
    assert_eq!(b.labels, Some(vec![9, 7]));
    assert!(matches!(
        load_fashion_mnist(&dir, Split::Test),
        Err(DataError::MissingFile(_))
    ));
}

#[test]
fn idx_header_errors() {
    assert!(matches!(
        parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0], "x"),
        Err(DataError::BadMagic { .. })
    ));
    assert!(matches!(
        parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0], "x"),
        Err(DataError::BadHeader { .. })
    ));
    assert!(matches!(
        parse_idx(&idx_bytes(&[2, 2], &[1, 2, 3]), "x"),
        Err(DataError::WrongSize {
            expected: 16,
            found: 15,
            ..
        })
    ));
    assert!(matches!(
        parse_idx(&[0, 0, 8, 3, 0], "x"),
        Err(DataError::WrongSize { .. })
    ));
    let a = parse_idx(&idx_bytes(&[2, 2], &[1, 2, 3, 4]), "x").unwrap();
    assert_eq!(a.dims, vec![2, 2]);

    let dir = temp_dir("idx-bad");
    std::fs::write(dir.join("i"), idx_bytes(&[2, 1, 1], &[1, 2])).unwrap();
    std::fs::write(dir.join("l"), idx_bytes(&[3], &[1, 2, 3])).unwrap();
    std::fs::write(dir.join("l10"), idx_bytes(&[2], &[1, 10])).unwrap();
    std::fs::write(dir.join("flat"), idx_bytes(&[2], &[1, 2])).unwrap();
    assert!(matches!(
        load_idx_dataset(&dir.join("i"), Some(&dir.join("l"))),
        Err(DataError::BadHeader { .. })
    ));
    assert!(matches!(
        load_idx_dataset(&dir.join("i"), Some(&dir.join("l10"))),
        Err(DataError::Parse { .. })
    ));
    assert!(matches!(
        load_idx_dataset(&dir.join("flat"), None),
        Err(DataError::BadHeader { .. })
    ));
}

#[test]
fn cifar_records_become_hwc_tokens() {
    // Two records; record k has label k+3 and plane values R = p % 251, G = 1, B = 2 + k.
    let mut bytes = Vec::new();
    for k in 0..2u8 {
        bytes.push(k + 3);
        bytes.extend((0..1024).map(|p| (p % 251) as u8));
        bytes.extend(std::iter::repeat_n(1u8, 1024));
        bytes.extend(std::iter::repeat_n(2 + k, 1024));
    }
    let set = parse_cifar10_batch(&bytes, "t").unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.shape.tokens_per_image(), 3072);
    assert_eq!(set.labels, Some(vec![3, 4]));
    let img = set.image(1).unwrap();
    // Pixel (h, w) = (3, 5) is plane index 3·32 + 5 = 101 → tokens 3·101 .. 3·101+3.
    assert_eq!(&img[303..306], &[101, 1, 3]);
    // Pixel (31, 31) = plane index 1023 → R = 1023 % 251 = 19.
    assert_eq!(&img[3069..3072], &[19, 1, 3]);

    assert!(matches!(
        parse_cifar10_batch(&bytes[..3000], "t"),
        Err(DataError::WrongSize { .. })
    ));
    let mut bad = bytes.clone();
    bad[CIFAR10_RECORD_LEN] = 10;
    assert!(matches!(
        parse_cifar10_batch(&bad, "t"),
        Err(DataError::Parse { line: 1, .. })
    ));

    let dir = temp_dir("cifar");
    std::fs::write(dir.join("test_batch.bin"), &bytes).unwrap();
    assert_eq!(load_cifar10(&dir, Split::Test).unwrap(), set);
    assert!(matches!(
        load_cifar10(&dir, Split::Train),
        Err(DataError::MissingFile(_))
    ));
}

#[test]
fn fetched_digits_decode_to_1797_labelled_images() {
    let path = data_cache().join("digits/digits.csv.gz");
    if !have_data(
        &path,
        "fetch it with `bash scripts/fetch-data.sh data-cache digits`",
    ) {
        return;
    }
    let set = load_digits(&path).unwrap();
    assert_eq!(set.len(), 1797);
    assert_eq!(
        set.shape,
        ImageShape {
            height: 8,
            width: 8,
            channels: 1,
            levels: 17
        }
    );
    assert_eq!(set.tokens.len(), 1797 * 64);
    assert!(set.tokens.iter().all(|&v| v <= 16));
    // Class counts of sklearn's digits (np.bincount(load_digits().target)).
    let mut counts = [0usize; 10];
    for i in 0..set.len() {
        counts[set.label(i).unwrap() as usize] += 1;
    }
    assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
    // First row of the CSV (read with zcat): a zero.
    assert_eq!(
        &set.image(0).unwrap()[..16],
        &[0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    );
    assert_eq!(set.label(0), Some(0));
}

#[test]
fn digits_csv_errors() {
    let row = |label: &str| format!("{}{}\n", "1,".repeat(64), label);
    assert_eq!(
        parse_digits_csv(&(row("3") + &row("4")), "t")
            .unwrap()
            .labels,
        Some(vec![3, 4])
    );
    assert!(matches!(
        parse_digits_csv(&row("10"), "t"),
        Err(DataError::Parse { line: 1, .. })
    ));
    assert!(matches!(
        parse_digits_csv("1,2,3\n", "t"),
        Err(DataError::Parse { .. })
    ));
    let bad = format!("17,{}0\n", "1,".repeat(63));
    assert!(matches!(
        parse_digits_csv(&bad, "t"),
        Err(DataError::Parse { .. })
    ));
}

#[test]
fn tokens_decode_to_pixels() {
    let s17 = ImageShape {
        height: 1,
        width: 3,
        channels: 1,
        levels: 17,
    };
    // v·255/16 rounded: 0 → 0, 8 → 127.5 → 128, 16 → 255.
    assert_eq!(s17.decode(&[0, 8, 16]).unwrap().pixels, vec![0, 128, 255]);
    assert!(matches!(
        s17.decode(&[0, 17, 1]),
        Err(DataError::TokenOutOfVocab { id: 17, pos: 1, .. })
    ));
    assert!(s17.decode(&[0, 1]).is_err());
    let m = s17.decode_with_mask(&[16, 17, 0], [255, 0, 0]).unwrap();
    assert_eq!(m.channels, 3);
    assert_eq!(m.pixels, vec![255, 255, 255, 255, 0, 0, 0, 0, 0]);
    let rgb = ImageShape {
        height: 1,
        width: 1,
        channels: 3,
        levels: 256,
    };
    assert_eq!(rgb.decode(&[1, 2, 250]).unwrap().pixels, vec![1, 2, 250]);
}

proptest! {
    /// Any shape, any ids: decoding returns a value or an error, never panics; a shape without
    /// pixels (a zero dimension, channels other than 1 or 3) or whose size overflows is an error.
    #[test]
    fn decoding_any_shape_is_an_error_or_an_image(
        height in prop_oneof![0usize..4, Just(usize::MAX)],
        width in prop_oneof![0usize..4, Just(usize::MAX / 2)],
        channels in 0usize..5,
        levels in 0u32..300,
        ids in proptest::collection::vec(0u32..300, 0..40),
    ) {
        let shape = ImageShape { height, width, channels, levels };
        let plain = shape.decode(&ids);
        let masked = shape.decode_with_mask(&ids, [255, 0, 255]);
        let valid = height > 0 && width > 0 && (channels == 1 || channels == 3)
            && shape.checked_tokens_per_image() == Some(ids.len())
            && (2..=256).contains(&levels);
        if !valid {
            prop_assert!(plain.is_err() && masked.is_err());
        }
        if let Ok(m) = masked {
            prop_assert_eq!(m.pixels.len(), height * width * 3);
        }
        let set = ImageSet { shape, tokens: vec![0; 8], labels: None, num_classes: 0 };
        let _ = set.len();
        prop_assert!(set.image(usize::MAX).is_none());
    }
}

#[test]
fn gzip_idx_is_capped_by_the_declared_size() {
    // 4 declared bytes, a 1 MB stream behind them: refused after reading declared + 1 bytes.
    let long = gzip(&idx_bytes(&[2, 2], &vec![7u8; 1 << 20]));
    match parse_idx(&long, "x") {
        Err(DataError::WrongSize {
            expected, found, ..
        }) => assert_eq!((expected, found), (4, 5)),
        other => panic!("expected WrongSize, got {other:?}"),
    }
    // A header declaring 2^48 bytes (u32 dims whose product overflows no u64 but exceeds the
    // global bound) is refused from the header alone.
    let huge = gzip(&idx_bytes(&[65536, 65536, 65536], &[1, 2, 3]));
    assert!(matches!(
        parse_idx(&huge, "x"),
        Err(DataError::BadHeader { .. })
    ));
    // Overflowing u64: five dims of 2^32 − 1.
    let over = gzip(&idx_bytes(&[u32::MAX; 5], &[]));
    assert!(matches!(
        parse_idx(&over, "x"),
        Err(DataError::BadHeader { .. })
    ));
    // Exactly the declared size still parses; truncated is still WrongSize.
    let ok = parse_idx(&gzip(&idx_bytes(&[2, 2], &[1, 2, 3, 4])), "x").unwrap();
    assert_eq!((ok.dims, ok.data), (vec![2, 2], vec![1, 2, 3, 4]));
    assert!(matches!(
        parse_idx(&gzip(&idx_bytes(&[2, 2], &[1, 2, 3])), "x"),
        Err(DataError::WrongSize { .. })
    ));
    assert!(parse_idx(&gzip(&[0, 0, 8]), "x").is_err());
}

#[test]
fn zero_channel_images_are_refused() {
    let s = ImageShape {
        height: 2,
        width: 2,
        channels: 0,
        levels: 17,
    };
    assert!(matches!(
        s.decode_with_mask(&[], [0, 0, 0]),
        Err(DataError::InvalidArgument(_))
    ));
    assert!(matches!(s.decode(&[]), Err(DataError::InvalidArgument(_))));
}

#[test]
fn image_sampler_visits_each_image_once_per_epoch() {
    let set = parse_digits_csv(
        &(0..10)
            .map(|k| format!("{}{}\n", "0,".repeat(64), k))
            .collect::<String>(),
        "t",
    )
    .unwrap();
    let mut s = set.sampler(3).unwrap();
    let b = set.next_batch(&mut s, 10).unwrap();
    let mut labels = b.labels.unwrap();
    labels.sort();
    assert_eq!(labels, (0..10).collect::<Vec<u32>>());
}

proptest! {
    #[test]
    fn image_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4000)) {
        let _ = parse_idx(&bytes, "fuzz");
        let _ = parse_cifar10_batch(&bytes, "fuzz");
        let _ = parse_digits_csv(&String::from_utf8_lossy(&bytes), "fuzz");
    }

    #[test]
    fn idx_parser_never_panics_on_plausible_headers(nd in 0u8..5, dims in proptest::collection::vec(any::<u32>(), 0..5), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut b = vec![0, 0, 8, nd];
        for d in dims { b.extend_from_slice(&(d % 9).to_be_bytes()); }
        b.extend(tail);
        let _ = parse_idx(&b, "fuzz");
        let _ = parse_idx(&gzip(&b), "fuzz");
    }
}
