//! `--show-steps`: the unmasking process in the terminal, as in the paper's Figure 3. Snapshots
//! of the sequence at evenly spaced steps (masks as a dim `·`), then the final sample with every
//! token coloured by the step that revealed it (blue = early, i.e. near t = 1; red = late).

/// The reveal step of every position (0-based, in sampling order), `None` if it was fixed by a
/// prompt or filled at the end.
#[derive(Debug, Clone, Default)]
pub struct RevealTrace {
    pub step: Vec<Option<usize>>,
    pub total_steps: usize,
}

/// An xterm-256 colour on a blue → cyan → green → yellow → red ramp for `frac ∈ [0, 1]`.
fn ramp(frac: f64) -> u8 {
    const RAMP: [u8; 10] = [21, 27, 33, 39, 45, 49, 118, 226, 208, 196];
    let i = (frac.clamp(0.0, 1.0) * (RAMP.len() - 1) as f64).round() as usize;
    RAMP[i]
}

/// Colour each piece by its reveal step; fixed pieces are bold white.
pub fn coloured(pieces: &[String], trace: &RevealTrace) -> String {
    let mut s = String::new();
    let denom = trace.total_steps.saturating_sub(1).max(1) as f64;
    for (p, st) in pieces.iter().zip(&trace.step) {
        match st {
            Some(k) => s.push_str(&format!("\x1b[38;5;{}m{p}", ramp(*k as f64 / denom))),
            None => s.push_str(&format!("\x1b[1;37m{p}\x1b[22m")),
        }
    }
    s.push_str("\x1b[0m");
    s
}

/// The sequence as it was after `upto` steps: positions revealed later are shown as masks.
pub fn snapshot(pieces: &[String], trace: &RevealTrace, upto: usize, fixed: &[bool]) -> String {
    let mut s = String::new();
    for ((p, st), &fx) in pieces.iter().zip(&trace.step).zip(fixed) {
        let shown = fx || matches!(st, Some(k) if *k < upto);
        if shown {
            s.push_str(p);
        } else {
            s.push_str("\x1b[2m·\x1b[22m");
        }
    }
    s
}

/// A legend line for the colour ramp.
pub fn legend(total_steps: usize) -> String {
    let mut s = String::from("reveal step: ");
    for i in 0..10 {
        s.push_str(&format!("\x1b[38;5;{}m█", ramp(i as f64 / 9.0)));
    }
    s.push_str(&format!(
        "\x1b[0m  1 → {total_steps} (bold white: fixed by the prompt)"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_hides_later_reveals_and_colours_follow_the_step() {
        let pieces: Vec<String> = "abc".chars().map(String::from).collect();
        let trace = RevealTrace {
            step: vec![Some(0), Some(9), None],
            total_steps: 10,
        };
        let fixed = [false, false, true];
        let snap = snapshot(&pieces, &trace, 1, &fixed);
        assert!(
            snap.starts_with('a') && snap.contains('·') && snap.ends_with('c'),
            "{snap}"
        );
        assert!(!snap.contains('b'));
        let col = coloured(&pieces, &trace);
        assert!(
            col.contains("\x1b[38;5;21ma"),
            "first step is blue: {col:?}"
        );
        assert!(col.contains("\x1b[38;5;196mb"), "last step is red: {col:?}");
    }
}
