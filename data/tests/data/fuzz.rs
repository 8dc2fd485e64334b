//! Arbitrary bytes into the token-file reader: an error or a valid file, never a panic.

use maskdiff_data::tokenfile::encode_token_file;
use maskdiff_data::{TokenFile, TokenizerId};
use maskdiff_process::Vocab;
use proptest::prelude::*;

proptest! {
    #[test]
    fn token_reader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = TokenFile::from_bytes(bytes);
    }

    #[test]
    fn token_reader_never_panics_on_mutated_valid_files(
        ids in proptest::collection::vec(0u32..70000, 0..50),
        v in prop_oneof![Just(27usize), Just(256), Just(50257), Just(70000)],
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
    ) {
        let ids: Vec<u32> = ids.into_iter().map(|i| i % v as u32).collect();
        let mut b = encode_token_file(&ids, Vocab::new(v).unwrap(), TokenizerId::Custom).unwrap();
        let intact = b.clone();
        for (pos, x) in flips { let n = b.len(); b[pos % n] ^= x; }
        if cut % 3 == 0 { b.truncate(cut % (b.len() + 1)); }
        let changed = b != intact;
        match TokenFile::from_bytes(b) {
            // Any accepted file has a consistent header and in-range tokens.
            Ok(f) => {
                prop_assert!(f.vocab().size() <= 1usize << (8 * f.header().dtype.width()));
                let all = f.ids(0..f.len()).unwrap();
                prop_assert!(all.iter().all(|&t| (t as usize) < f.vocab().size()));
                if !changed { prop_assert_eq!(all, ids); }
            }
            Err(_) => prop_assert!(changed),
        }
    }
}
