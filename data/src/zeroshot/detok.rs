//! The detokenisers of SEDD's zero-shot evaluation (Lou et al. 2024, `data.py`), which MD4 §9.2
//! follows ("evaluation setup the same as SEDD"): they undo the tokenisation of the benchmark
//! files (spaces around punctuation, `@-@`, `N`, `<unk>`, …) before GPT-2 BPE is applied.
//! Each function reproduces the reference rule list in order, including its quirks.

use std::sync::OnceLock;

use regex::Regex;

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    // The patterns are constants checked by the tests, so compilation cannot fail at run time.
    cell.get_or_init(|| Regex::new(pat).unwrap_or_else(|e| panic!("bad constant regex {pat}: {e}")))
}

macro_rules! regex {
    ($pat:expr) => {{
        static CELL: OnceLock<Regex> = OnceLock::new();
        re(&CELL, $pat)
    }};
}

/// WikiText (2 and 103) detokeniser.
pub fn wikitext_detokenize(s: &str) -> String {
    let mut s = s.replace("s '", "s'");
    // The reference pattern is r"/' [0-9]/" with literal slashes (so it almost never matches) and
    // a literal replacement; reproduced as is.
    s = regex!(r"/' [0-9]/")
        .replace_all(&s, "/'[0-9]/")
        .into_owned();
    s = s.replace(" @-@ ", "-");
    s = s.replace(" @,@ ", ",");
    s = s.replace(" @.@ ", ".");
    for (a, b) in [
        (" : ", ": "),
        (" ; ", "; "),
        (" . ", ". "),
        (" ! ", "! "),
        (" ? ", "? "),
        (" , ", ", "),
    ] {
        s = s.replace(a, b);
    }
    s = regex!(r"\(\s*([^\)]*?)\s*\)")
        .replace_all(&s, "($1)")
        .into_owned();
    s = regex!(r"\[\s*([^\]]*?)\s*\]")
        .replace_all(&s, "[$1]")
        .into_owned();
    s = regex!(r"\{\s*([^}]*?)\s*\}")
        .replace_all(&s, "{$1}")
        .into_owned();
    s = regex!(r#""\s*([^"]*?)\s*""#)
        .replace_all(&s, "\"$1\"")
        .into_owned();
    s = regex!(r"'\s*([^']*?)\s*'")
        .replace_all(&s, "'$1'")
        .into_owned();
    s = s.replace("= = = =", "====");
    s = s.replace("= = =", "===");
    s = s.replace("= =", "==");
    s = s.replace(" \u{b0} ", "\u{b0}");
    s = s.replace(" \n", "\n");
    s = s.replace("\n ", "\n");
    s = s.replace(" N ", " 1 ");
    s.replace(" 's", "'s")
}

/// Penn Treebank detokeniser.
pub fn ptb_detokenize(s: &str) -> String {
    let mut s = s.replace(" 's", "'s");
    s = s.replace("s ' ", "s' ");
    s = s.replace(" n't", "n't");
    s = s.replace(" \n ", "\n");
    s = s.replace("\\/", "/");
    // Repeated because `replace` does not see overlapping " N N " matches.
    for _ in 0..10 {
        s = s.replace(" N ", " 1 ");
    }
    s = s.replace("$ 1", "$1");
    s = s.replace("# 1", "#1");
    s.replace("<unk>", "?")
}

/// One Billion Words detokeniser.
pub fn lm1b_detokenize(s: &str) -> String {
    let mut s = s.replace("http : / / ", "http://");
    s = s.replace("https : / / ", "https://");
    s = regex!(r" '(\w+)").replace_all(&s, "'$1").into_owned();
    s = regex!(r" (\w+) \. ").replace_all(&s, " $1. ").into_owned();
    s = regex!(r" (\w+) \.$").replace_all(&s, " $1.").into_owned();
    s = s.replace(" ? ", "? ");
    s = regex!(r" \?$").replace_all(&s, "?").into_owned();
    s = s.replace(" ! ", "! ");
    s = regex!(r" !$").replace_all(&s, "!").into_owned();
    for (a, b) in [(" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/")] {
        s = s.replace(a, b);
    }
    s = regex!(r#"" ([^"]+) ""#)
        .replace_all(&s, "\"$1\"")
        .into_owned();
    s = regex!(r"' ([^']+) '").replace_all(&s, "'$1'").into_owned();
    s = regex!(r"\( ([^\(\)]+) \)")
        .replace_all(&s, "($1)")
        .into_owned();
    s = regex!(r"\[ ([^\[\]]+) \]")
        .replace_all(&s, "[$1]")
        .into_owned();
    s = s.replace("$ ", "$");
    s.replace("\u{a3} ", "\u{a3}")
}

/// LAMBADA detokeniser: curly double quotes → straight, stripped, prefixed with a newline.
pub fn lambada_detokenize(s: &str) -> String {
    let s = s.replace(['\u{201c}', '\u{201d}'], "\"");
    format!("\n{}", s.trim())
}
