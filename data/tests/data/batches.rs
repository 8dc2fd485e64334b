use maskdiff_data::pack::{blocks, pack_documents};
use maskdiff_data::*;
use maskdiff_process::Vocab;
use proptest::prelude::*;

#[test]
fn text8_offsets_and_counts() {
    // Spec §9.1: train [0, 90M), valid [90M, 95M), test [95M, 100M); 89,999,745 training windows
    // of 256; 19,531 evaluation chunks of 256 per 5M split.
    let r = SplitRatio::default().ranges(100_000_000);
    assert_eq!(
        r,
        [
            0..90_000_000,
            90_000_000..95_000_000,
            95_000_000..100_000_000
        ]
    );
    let s = WindowSampler::new(r[0].clone(), 256, 0).unwrap();
    assert_eq!(s.num_windows(), 89_999_745);
    assert_eq!(EvalChunks::new(r[2].clone(), 256).unwrap().count(), 19_531);
}

proptest! {
    #[test]
    fn splits_are_disjoint_ordered_and_cover(len in 0usize..10_000_000, a in 0u32..100, b in 0u32..100, c in 1u32..100) {
        let r = SplitRatio::new(a, b, c).unwrap().ranges(len);
        prop_assert_eq!(r[0].start, 0);
        prop_assert_eq!(r[0].end, r[1].start);
        prop_assert_eq!(r[1].end, r[2].start);
        prop_assert_eq!(r[2].end, len);
        prop_assert!(r.iter().all(|x| x.start <= x.end));
        // Each split is within one token of its exact share.
        let sum = (a + b + c) as f64;
        for (x, p) in r.iter().zip([a, b, c]) {
            prop_assert!((x.len() as f64 - len as f64 * p as f64 / sum).abs() <= 1.0);
        }
    }

    #[test]
    fn windows_are_in_range(start in 0usize..1000, n in 1usize..500, w in 1usize..64, seed in any::<u64>()) {
        prop_assume!(n >= w);
        let mut s = WindowSampler::new(start..start + n, w, seed).unwrap();
        for _ in 0..100 {
            let x = s.next_start();
            prop_assert!(x >= start && x + w <= start + n);
        }
    }
}

#[test]
fn each_epoch_visits_every_window_once_in_a_seeded_order() {
    let n_win = 37u64;
    let mut s = WindowSampler::new(10..10 + 36 + 8, 8, 7).unwrap();
    assert_eq!(s.num_windows(), n_win);
    let e0: Vec<usize> = (0..n_win).map(|_| s.next_start()).collect();
    assert_eq!(s.state().epoch, 1);
    assert_eq!(s.state().index, 0);
    let e1: Vec<usize> = (0..n_win).map(|_| s.next_start()).collect();
    for e in [&e0, &e1] {
        let mut v = e.clone();
        v.sort();
        assert_eq!(v, (10..10 + n_win as usize).collect::<Vec<_>>());
    }
    assert_ne!(e0, e1, "epochs should be reshuffled");
    assert_ne!(e0, (10..47).collect::<Vec<_>>(), "order should be shuffled");
    let mut other = WindowSampler::new(10..54, 8, 8).unwrap();
    let o: Vec<usize> = (0..n_win).map(|_| other.next_start()).collect();
    assert_ne!(e0, o, "different seeds should give different orders");
}

#[test]
fn resuming_from_a_saved_state_reproduces_the_stream() {
    let ids: Vec<u32> = (0..5000u32).map(|i| i % 27).collect();
    let file = TokenFile::from_tokens(&ids, Vocab::new(27).unwrap(), TokenizerId::Text8).unwrap();
    let mut a = WindowSampler::new(100..4000, 64, 42).unwrap();
    let reference: Vec<TokenBatch> = (0..300).map(|_| a.next_batch(&file, 16).unwrap()).collect();

    let mut b = WindowSampler::new(100..4000, 64, 42).unwrap();
    for r in &reference[..123] {
        assert_eq!(&b.next_batch(&file, 16).unwrap(), r);
    }
    let saved = serde_json::to_string(b.state()).unwrap();
    let mut c = WindowSampler::from_state(serde_json::from_str(&saved).unwrap()).unwrap();
    for r in &reference[123..] {
        assert_eq!(&c.next_batch(&file, 16).unwrap(), r);
    }
    // Batch content is the file at the reported offsets.
    let r = &reference[5];
    assert_eq!((r.batch, r.len), (16, 64));
    for (k, &o) in r.offsets.iter().enumerate() {
        assert_eq!(r.row(k).unwrap(), &ids[o..o + 64]);
    }
}

#[test]
fn too_short_and_bad_states_are_errors() {
    assert!(matches!(
        WindowSampler::new(0..10, 11, 0),
        Err(DataError::TooShort {
            len: 10,
            window: 11
        })
    ));
    assert!(matches!(
        EvalChunks::new(5..9, 5),
        Err(DataError::TooShort { len: 4, window: 5 })
    ));
    assert!(WindowSampler::new(0..10, 0, 0).is_err());
    let mut st = WindowSampler::new(0..10, 5, 0).unwrap().state().clone();
    st.index = 6; // only 6 windows: 0..=5
    assert!(WindowSampler::from_state(st).is_err());
    let file =
        TokenFile::from_tokens(&[0; 20], Vocab::new(27).unwrap(), TokenizerId::Text8).unwrap();
    let mut s = WindowSampler::new(0..30, 5, 0).unwrap();
    assert!(s.next_batch(&file, 2).is_err());
}

#[test]
fn eval_chunks_are_consecutive_non_overlapping_tail_dropped() {
    let ids: Vec<u32> = (0..1000u32).map(|i| i % 256).collect();
    let file = TokenFile::from_tokens(&ids, Vocab::new(256).unwrap(), TokenizerId::Bytes).unwrap();
    let ch = EvalChunks::new(10..1000, 100).unwrap();
    assert_eq!(ch.count(), 9); // 990 / 100, tail of 90 dropped
    let batches: Vec<TokenBatch> = ch.batches(&file, 4).collect::<Result<_>>().unwrap();
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        vec![4, 4, 1]
    );
    let offsets: Vec<usize> = batches.iter().flat_map(|b| b.offsets.clone()).collect();
    assert_eq!(offsets, (0..9).map(|i| 10 + 100 * i).collect::<Vec<_>>());
    assert_eq!(batches[2].row(0).unwrap(), &ids[810..910]);
    // Indices past the end are errors, not panics or wrapped offsets.
    assert_eq!(ch.chunk(8).unwrap(), 810..910);
    for i in [9, usize::MAX / 100 + 1, usize::MAX] {
        assert!(
            matches!(ch.chunk(i), Err(DataError::InvalidArgument(_))),
            "chunk {i}"
        );
    }
    assert!(ch
        .batch(&file, usize::MAX, usize::MAX)
        .unwrap()
        .ids
        .is_empty());
    for b in [1, 2, usize::MAX] {
        assert!(matches!(
            batches[2].row(b),
            Err(DataError::InvalidArgument(_))
        ));
    }
    // A batch whose ids are shorter than batch × len (fields set by hand) is an error too.
    let short = TokenBatch {
        ids: vec![0; 5],
        batch: 2,
        len: 3,
        offsets: vec![0, 3],
        labels: None,
    };
    assert_eq!(short.row(0).unwrap(), &[0, 0, 0]);
    assert!(short.row(1).is_err());
}

#[test]
fn documents_are_packed_with_eos_and_cut_into_blocks() {
    let stream = pack_documents([vec![1, 2, 3], vec![], vec![4]], 9);
    assert_eq!(stream, vec![1, 2, 3, 9, 9, 4, 9]);
    let b = blocks(&stream, 3).unwrap();
    assert_eq!(b, vec![&[1, 2, 3][..], &[9, 9, 4][..]]);
    assert!(blocks(&stream, 0).is_err());
}
