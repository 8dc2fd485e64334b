//! Token caches of plain-text sources: built once, reused while the source is unchanged
//! (identical tokens, the file left untouched), replaced when it changes.

use maskdiff_data::textcache::*;
use maskdiff_data::{TokenizerId, WindowSampler};

use crate::temp_dir;

fn caches(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tok"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_open_reads_the_cache_and_a_changed_source_invalidates_it() {
    let dir = temp_dir("textcache");
    let src = dir.join("corpus.txt");
    let text = "The cat sat on the mat, and the dog ran to a big red house! ".repeat(50);
    std::fs::write(&src, &text).unwrap();

    let (a, sa) = open_or_build_text_cache(&src, TokenizerId::Text8).unwrap();
    let CacheStatus::Built(path) = sa else {
        panic!("first open must build, got {sa:?}")
    };
    assert_eq!(caches(&dir).len(), 1);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // The tokens are those of tokenising the text directly.
    let direct = tokenize_text(text.as_bytes(), TokenizerId::Text8).unwrap();
    assert_eq!(a.ids(0..a.len()).unwrap(), direct);

    let (b, sb) = open_or_build_text_cache(&src, TokenizerId::Text8).unwrap();
    assert_eq!(sb, CacheStatus::Reused(path.clone()));
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert_eq!(a.header(), b.header());
    // Identical batches from the cached and the freshly built tokens.
    let (mut s1, mut s2) = (
        WindowSampler::new(0..a.len(), 16, 7).unwrap(),
        WindowSampler::new(0..b.len(), 16, 7).unwrap(),
    );
    for _ in 0..20 {
        assert_eq!(s1.next_batch(&a, 4).unwrap(), s2.next_batch(&b, 4).unwrap());
    }

    // Another tokenizer has its own cache beside it.
    let (c, sc) = open_or_build_text_cache(&src, TokenizerId::Bytes).unwrap();
    assert!(matches!(sc, CacheStatus::Built(_)));
    assert_eq!(c.len(), text.len());
    assert_eq!(caches(&dir).len(), 2);

    // Same length, one byte changed: a new key, the old text8 cache removed.
    let changed = text.replacen("cat", "cot", 1);
    assert_eq!(changed.len(), text.len());
    std::fs::write(&src, &changed).unwrap();
    let (d, sd) = open_or_build_text_cache(&src, TokenizerId::Text8).unwrap();
    let CacheStatus::Built(new_path) = sd else {
        panic!("a changed source must rebuild, got {sd:?}")
    };
    assert_ne!(new_path, path);
    assert!(!path.exists());
    assert_eq!(
        d.ids(0..d.len()).unwrap(),
        tokenize_text(changed.as_bytes(), TokenizerId::Text8).unwrap()
    );
    assert_eq!(caches(&dir).len(), 2);
}

#[test]
fn the_fingerprint_is_the_fnv_of_the_whole_file() {
    let dir = temp_dir("textcache-fp");
    let p = dir.join("x.txt");
    // Larger than the 1 MiB read buffer, so the streamed hash spans several reads.
    let bytes: Vec<u8> = (0..(3 << 19)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, &bytes).unwrap();
    let fp = source_fingerprint(&p).unwrap();
    assert_eq!(fp.bytes, bytes.len() as u64);
    assert_eq!(fp.fnv1a64, maskdiff_data::fnv1a64(&bytes));
}

#[cfg(unix)]
#[test]
fn an_unwritable_directory_only_loses_the_cache() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("textcache-ro");
    let src = dir.join("t.txt");
    std::fs::write(&src, "hello world ".repeat(10)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    let writable = std::fs::write(&probe, b"x").is_ok(); // root ignores permissions
    let r = open_or_build_text_cache(&src, TokenizerId::Text8);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (f, s) = r.unwrap();
    assert_eq!(f.len(), 120);
    if !writable {
        assert!(matches!(s, CacheStatus::Uncached(_)), "{s:?}");
    }
}
