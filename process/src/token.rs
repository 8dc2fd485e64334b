//! Tokens, the mask state and the vocabulary that checks them (spec §0: real ids 0..V−1, mask id V).

use crate::ProcessError;
use serde::{Deserialize, Serialize};

/// A vocabulary of `V` real tokens; the mask is one extra state with input id `V`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vocab {
    size: u32,
}

/// A real (never-mask) token id, `< V` of the vocabulary that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Token(u32);

/// The state of one position of x_t: a real token or the absorbing mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    Real(Token),
    Mask,
}

impl Token {
    /// The id (always `< V`).
    pub fn id(self) -> u32 {
        self.0
    }
    /// The id as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl State {
    pub fn is_mask(self) -> bool {
        matches!(self, State::Mask)
    }
    pub fn token(self) -> Option<Token> {
        match self {
            State::Real(t) => Some(t),
            State::Mask => None,
        }
    }
}

impl From<Token> for State {
    fn from(t: Token) -> Self {
        State::Real(t)
    }
}

impl Vocab {
    /// A vocabulary of `size` real tokens (1 ≤ size < u32::MAX, so the mask id fits in u32).
    pub fn new(size: usize) -> Result<Self, ProcessError> {
        if size == 0 || size >= u32::MAX as usize {
            return Err(ProcessError::BadVocab(size));
        }
        Ok(Self { size: size as u32 })
    }
    /// V, the number of real tokens.
    pub fn size(self) -> usize {
        self.size as usize
    }
    /// The mask's input id, V.
    pub fn mask_id(self) -> u32 {
        self.size
    }
    /// Number of input ids the network embeds, V + 1.
    pub fn num_input_ids(self) -> usize {
        self.size as usize + 1
    }
    /// Check a real token id.
    pub fn token(self, id: u32) -> Result<Token, ProcessError> {
        if id < self.size {
            Ok(Token(id))
        } else {
            Err(ProcessError::TokenOutOfRange {
                id: id as u64,
                vocab: self.size(),
            })
        }
    }
    /// Check a whole sequence of real token ids.
    pub fn tokens(self, ids: &[u32]) -> Result<Vec<Token>, ProcessError> {
        ids.iter().map(|&i| self.token(i)).collect()
    }
    /// Decode a network input id (`V` is the mask).
    pub fn state(self, id: u32) -> Result<State, ProcessError> {
        if id == self.size {
            Ok(State::Mask)
        } else {
            self.token(id).map(State::Real)
        }
    }
    /// Decode a sequence of input ids.
    pub fn states(self, ids: &[u32]) -> Result<Vec<State>, ProcessError> {
        ids.iter().map(|&i| self.state(i)).collect()
    }
    /// The network input id of a state (mask ↦ V).
    pub fn input_id(self, s: State) -> u32 {
        match s {
            State::Real(t) => t.0,
            State::Mask => self.size,
        }
    }
    /// Network input ids of a sequence of states.
    pub fn input_ids(self, xs: &[State]) -> Vec<u32> {
        xs.iter().map(|&s| self.input_id(s)).collect()
    }
}
