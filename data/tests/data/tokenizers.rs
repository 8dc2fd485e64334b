use maskdiff_data::tokenizer::*;
use maskdiff_data::DataError;
use proptest::prelude::*;

#[test]
fn text8_spec_11_24() {
    // Spec §11.24: "ab z" → [0, 1, 26, 25]; decode is the inverse.
    let t = Text8Tokenizer;
    assert_eq!(t.encode("ab z").unwrap(), vec![0, 1, 26, 25]);
    assert_eq!(t.decode(&[0, 1, 26, 25]).unwrap(), "ab z");
    assert_eq!(t.vocab_size(), 27);
    assert_eq!(t.vocab().unwrap().mask_id(), 27);
}

#[test]
fn text8_rejects_outside_alphabet_and_the_mask() {
    let t = Text8Tokenizer;
    match t.encode("ab,c") {
        Err(DataError::NotInAlphabet {
            ch: ',', pos: 2, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        t.encode("A"),
        Err(DataError::NotInAlphabet { .. })
    ));
    match t.decode(&[0, 27]) {
        Err(DataError::TokenOutOfVocab {
            id: 27,
            pos: 1,
            vocab: 27,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn text8_normaliser_follows_wikifil() {
    // By hand: lowercase, digits spelled, punctuation runs → one space.
    assert_eq!(normalize_text8("Hello, World!"), "hello world ");
    assert_eq!(normalize_text8("I have 2 cats."), "i have two cats ");
    assert_eq!(normalize_text8("a42b"), "a four two b");
    assert_eq!(normalize_text8("  --Caf\u{e9} au lait"), " caf au lait");
    assert_eq!(normalize_text8(""), "");
}

#[test]
fn gpt2_known_ids() {
    // Public GPT-2 (r50k_base) ids: the first 94 byte tokens are '!'..'~' (so '!' = 0, 'A' = 32),
    // ' ' = 220, '\n' = 198, "\n\n" = 628, "Hello" = 15496, " world" = 995, " the" = 262,
    // "," = 11, "." = 13, "hello" = 31373, " The" = 383, "The" = 464.
    let t = Gpt2Tokenizer::new().unwrap();
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.encode(" the").unwrap(), vec![262]);
    assert_eq!(t.encode("Hello, world!").unwrap(), vec![15496, 11, 995, 0]);
    assert_eq!(t.encode("hello world").unwrap(), vec![31373, 995]);
    assert_eq!(t.encode("The").unwrap(), vec![464]);
    assert_eq!(t.encode(" The").unwrap(), vec![383]);
    assert_eq!(t.encode("A").unwrap(), vec![32]);
    assert_eq!(t.encode(" ").unwrap(), vec![220]);
    assert_eq!(t.encode("\n").unwrap(), vec![198]);
    assert_eq!(t.encode("\n\n").unwrap(), vec![628]);
    assert_eq!(t.encode(".").unwrap(), vec![13]);
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.vocab().unwrap().mask_id(), 50257);
}

#[test]
fn gpt2_eos_is_special_and_literal_text_is_not() {
    let t = Gpt2Tokenizer::new().unwrap();
    assert_eq!(t.decode(&[GPT2_EOS]).unwrap(), "<|endoftext|>");
    let lit = t.encode("<|endoftext|>").unwrap();
    assert!(lit.len() > 1 && !lit.contains(&GPT2_EOS), "{lit:?}");
    assert_eq!(t.encode_document("Hello world"), vec![15496, 995, GPT2_EOS]);
    assert!(matches!(
        t.decode(&[50257]),
        Err(DataError::TokenOutOfVocab { id: 50257, .. })
    ));
}

#[test]
fn bytes_tokenizer_basics() {
    let t = ByteTokenizer;
    assert_eq!(t.encode("Az\u{e9}").unwrap(), vec![65, 122, 0xc3, 0xa9]);
    assert!(matches!(
        t.decode(&[256]),
        Err(DataError::TokenOutOfVocab { .. })
    ));
    assert_eq!(t.vocab().unwrap().mask_id(), 256);
}

#[test]
fn tokenizer_ids_round_trip() {
    for id in [
        TokenizerId::Custom,
        TokenizerId::Text8,
        TokenizerId::Bytes,
        TokenizerId::Gpt2,
        TokenizerId::Pixels,
    ] {
        assert_eq!(TokenizerId::from_code(id.code()), Some(id));
        assert_eq!(id.name().parse::<TokenizerId>().unwrap(), id);
    }
    assert_eq!(TokenizerId::from_code(99), None);
    assert!("nope".parse::<TokenizerId>().is_err());
    assert!(AnyTokenizer::new(TokenizerId::Pixels).is_err());
    let any = AnyTokenizer::new(TokenizerId::Text8).unwrap();
    assert_eq!(any.encode("ab z").unwrap(), vec![0, 1, 26, 25]);
}

proptest! {
    #[test]
    fn text8_round_trip(s in "[a-z ]{0,200}") {
        let t = Text8Tokenizer;
        let ids = t.encode(&s).unwrap();
        prop_assert_eq!(ids.len(), s.len());
        prop_assert!(ids.iter().all(|&i| i < 27));
        prop_assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn text8_normaliser_output_is_encodable_and_idempotent(s in any::<String>()) {
        let n = normalize_text8(&s);
        prop_assert!(Text8Tokenizer.encode(&n).is_ok());
        prop_assert!(!n.contains("  "));
        prop_assert_eq!(normalize_text8(&n), n.clone());
    }

    #[test]
    fn bytes_round_trip(s in any::<String>(), raw in proptest::collection::vec(any::<u8>(), 0..100)) {
        let t = ByteTokenizer;
        prop_assert_eq!(t.decode(&t.encode(&s).unwrap()).unwrap(), s);
        let ids: Vec<u32> = raw.iter().map(|&b| b as u32).collect();
        prop_assert_eq!(t.decode_bytes(&ids).unwrap(), raw);
    }

    #[test]
    fn gpt2_round_trip(s in any::<String>()) {
        let t = Gpt2Tokenizer::new().unwrap();
        let ids = t.encode(&s).unwrap();
        prop_assert!(ids.iter().all(|&i| i < GPT2_EOS));
        prop_assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn gpt2_decode_never_panics(ids in proptest::collection::vec(0u32..50300, 0..50)) {
        let t = Gpt2Tokenizer::new().unwrap();
        let r = t.decode(&ids);
        prop_assert_eq!(r.is_ok(), ids.iter().all(|&i| i < 50257));
    }
}
