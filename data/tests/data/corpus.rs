use maskdiff_data::corpus::*;
use maskdiff_data::tokenizer::{
    normalize_text8, Gpt2Tokenizer, Text8Tokenizer, Tokenizer, GPT2_EOS,
};
use maskdiff_data::{DataError, TokenizerId};

use crate::temp_dir;

fn fake_cache(name: &str) -> std::path::PathBuf {
    let d = temp_dir(name);
    let sh = d.join("english/shakespeare");
    let so = d.join("english/sotu");
    std::fs::create_dir_all(&sh).unwrap();
    std::fs::create_dir_all(&so).unwrap();
    std::fs::write(sh.join("b_gut.txt"), "Second play.").unwrap();
    std::fs::write(sh.join("a_gut.txt"), "First PLAY, act 1!").unwrap();
    std::fs::write(sh.join("notes.txt"), "ignored").unwrap();
    std::fs::write(so.join("1790_x.txt"), "Fellow-Citizens").unwrap();
    d
}

#[test]
fn files_are_read_in_a_fixed_order() {
    let d = fake_cache("corpus-order");
    let names: Vec<String> = english_corpus_files(&d)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["a_gut.txt", "b_gut.txt", "1790_x.txt"]);
}

#[test]
fn text8_bytes_and_gpt2_corpora() {
    let d = fake_cache("corpus-build");
    let f = build_english_corpus(&d, TokenizerId::Text8).unwrap();
    assert_eq!(f.tokenizer(), TokenizerId::Text8);
    let text = Text8Tokenizer.decode(&f.ids(0..f.len()).unwrap()).unwrap();
    assert_eq!(text, "first play act one second play fellow citizens");
    assert_eq!(
        text,
        normalize_text8("First PLAY, act 1! Second play. Fellow-Citizens")
    );
    assert!(english_corpus_path(&d, TokenizerId::Text8).is_file());

    let b = build_english_corpus(&d, TokenizerId::Bytes).unwrap();
    assert_eq!(
        b.len(),
        "First PLAY, act 1!\n\nSecond play.\n\nFellow-Citizens".len()
    );

    let g = build_english_corpus(&d, TokenizerId::Gpt2).unwrap();
    let ids = g.ids(0..g.len()).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == GPT2_EOS).count(), 3);
    assert_eq!(*ids.last().unwrap(), GPT2_EOS);
    assert_eq!(
        Gpt2Tokenizer::new().unwrap().decode(&ids).unwrap(),
        "First PLAY, act 1!<|endoftext|>Second play.<|endoftext|>Fellow-Citizens<|endoftext|>"
    );

    // Deterministic: rebuilding gives the same checksum; reopening does not rebuild.
    let again = build_english_corpus(&d, TokenizerId::Gpt2).unwrap();
    assert_eq!(again.header().checksum, g.header().checksum);
    assert_eq!(
        open_or_build_english_corpus(&d, TokenizerId::Gpt2)
            .unwrap()
            .header(),
        g.header()
    );
    assert!(build_english_corpus(&d, TokenizerId::Pixels).is_err());
}

#[test]
fn missing_sources_are_reported() {
    let d = temp_dir("corpus-missing");
    assert!(matches!(
        build_english_corpus(&d, TokenizerId::Text8),
        Err(DataError::MissingFile(_))
    ));
}
