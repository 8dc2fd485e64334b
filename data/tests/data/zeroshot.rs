use maskdiff_data::tokenizer::{Gpt2Tokenizer, GPT2_EOS};
use maskdiff_data::zeroshot::*;
use maskdiff_data::DataError;

use crate::{have_data, shared_data};

#[test]
fn wikitext_detokenizer_by_hand() {
    assert_eq!(
        wikitext_detokenize(" = Robert Boulter = \n"),
        " = Robert Boulter =\n"
    );
    assert_eq!(
        wikitext_detokenize(" the 1 @,@ 000 @-@ year war , he said . "),
        " the 1,000-year war, he said. "
    );
    assert_eq!(
        wikitext_detokenize("3 @.@ 5 m ( born 1970 ) it 's"),
        "3.5 m (born 1970) it's"
    );
    assert_eq!(wikitext_detokenize(" = = Career = = \n"), " == Career ==\n");
    assert_eq!(
        wikitext_detokenize("the \" Teddy 's Story \" episode"),
        "the \"Teddy's Story\" episode"
    );
    assert_eq!(wikitext_detokenize("in N years"), "in 1 years");
}

#[test]
fn ptb_detokenizer_by_hand() {
    assert_eq!(
        ptb_detokenize("it was n't black monday"),
        "it wasn't black monday"
    );
    assert_eq!(
        ptb_detokenize("cost $ N million in N N"),
        "cost $1 million in 1 N"
    );
    assert_eq!(
        ptb_detokenize("the company 's <unk> ceo"),
        "the company's ? ceo"
    );
    assert_eq!(ptb_detokenize("a N N N b"), "a 1 1 1 b");
    assert_eq!(ptb_detokenize("1\\/2"), "1/2");
}

#[test]
fn lm1b_and_lambada_detokenizers_by_hand() {
    assert_eq!(
        lm1b_detokenize("He said , \" hello there \" ."),
        "He said, \"hello there\" ."
    );
    assert_eq!(lm1b_detokenize("I 'm here ."), "I'm here.");
    assert_eq!(
        lm1b_detokenize("Why ? Because ( he ) paid $ 5 ."),
        "Why? Because (he) paid $5."
    );
    assert_eq!(
        lm1b_detokenize("see http : / / x.org now !"),
        "see http://x.org now!"
    );
    assert_eq!(
        lambada_detokenize("  \u{201c}Hi,\u{201d} he said. "),
        "\n\"Hi,\" he said."
    );
}

#[test]
fn documents_are_split_like_the_reference_loaders() {
    let w = ZeroShotSet::WikiText2
        .parse_documents(" \n = A = \n \n text .\n")
        .unwrap();
    assert_eq!(w, vec!["", " = A = \n", "", " text .\n"]);
    let p = ZeroShotSet::Ptb.parse_documents(" a b \n c\n").unwrap();
    assert_eq!(p, vec!["a b", "c"]);
    let l = ZeroShotSet::Lambada
        .parse_documents("{\"text\": \"x y\"}\n\n{\"text\": \"z\"}\n")
        .unwrap();
    assert_eq!(l, vec!["x y", "z"]);
    assert!(matches!(
        ZeroShotSet::Lambada.parse_documents("{\"t\": 1}\n"),
        Err(DataError::Parse { line: 1, .. })
    ));
    assert!(matches!(
        ZeroShotSet::Lambada.parse_documents("not json\n"),
        Err(DataError::Parse { .. })
    ));
    assert_eq!("1bw".parse::<ZeroShotSet>().unwrap(), ZeroShotSet::Lm1b);
    assert_eq!(
        "WikiText-103".parse::<ZeroShotSet>().unwrap(),
        ZeroShotSet::WikiText103
    );
}

#[test]
fn blocks_pack_documents_with_eos_and_drop_tails() {
    let t = Gpt2Tokenizer::new().unwrap();
    let docs: Vec<String> = ["Hello world", "Hello world", "Hello world"]
        .map(String::from)
        .to_vec();
    // Each LAMBADA-detokenised doc is "\nHello world" = [198, 15496, 995] + EOS = 4 tokens.
    let whole = blocks_from_documents(ZeroShotSet::Lambada, &docs, &t, 5, Grouping::Whole).unwrap();
    assert_eq!(whole.total_tokens, 12);
    assert_eq!(whole.num_blocks, 2);
    assert_eq!(whole.block(0), &[198, 15496, 995, GPT2_EOS, 198]);
    assert_eq!(whole.block(1), &[15496, 995, GPT2_EOS, 198, 15496]);
    // Groups of 2 documents: 8 tokens → 1 block; then 4 tokens → 0 blocks.
    let g = blocks_from_documents(
        ZeroShotSet::Lambada,
        &docs,
        &t,
        5,
        Grouping::PerDocuments(2),
    )
    .unwrap();
    assert_eq!(g.num_blocks, 1);
    assert!(matches!(
        blocks_from_documents(ZeroShotSet::Lambada, &docs, &t, 13, Grouping::Whole),
        Err(DataError::TooShort {
            len: 12,
            window: 13
        })
    ));
}

#[test]
fn shared_sets_load_into_gpt2_blocks() {
    let dir = shared_data().join("zeroshot");
    if !have_data(
        &dir,
        "the zero-shot sets exist only in this project's ../shared/data",
    ) {
        return;
    }
    // Line counts of the shared files (wc -l).
    assert_eq!(
        ZeroShotSet::Lambada.read_documents(&dir).unwrap().len(),
        5153
    );
    assert_eq!(ZeroShotSet::Ptb.read_documents(&dir).unwrap().len(), 3761);
    assert_eq!(
        ZeroShotSet::WikiText2.read_documents(&dir).unwrap().len(),
        4358
    );
    for set in [
        ZeroShotSet::Lambada,
        ZeroShotSet::Ptb,
        ZeroShotSet::WikiText2,
        ZeroShotSet::Lm1b,
    ] {
        let b = load_zero_shot(&dir, set, 1024, Grouping::Whole).unwrap();
        assert_eq!(b.ids.len(), b.num_blocks * 1024);
        assert!(b.total_tokens - b.ids.len() < 1024);
        assert!(b.num_blocks > 50, "{set:?}: {} blocks", b.num_blocks);
        assert!(b.ids.iter().all(|&i| i <= GPT2_EOS));
        let g = load_zero_shot(&dir, set, 1024, Grouping::PerDocuments(1000)).unwrap();
        assert!(g.num_blocks <= b.num_blocks && g.total_tokens == b.total_tokens);
        eprintln!(
            "{set:?}: {} tokens, {} blocks (whole), {} blocks (per 1000 docs)",
            b.total_tokens, b.num_blocks, g.num_blocks
        );
    }
    // PTB: one EOS per sentence.
    let p = load_zero_shot(&dir, ZeroShotSet::Ptb, 1, Grouping::Whole).unwrap();
    assert_eq!(p.ids.iter().filter(|&&i| i == GPT2_EOS).count(), 3761);
}
