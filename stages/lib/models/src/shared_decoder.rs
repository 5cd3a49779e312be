//! One decoder shared by many sequences, for a server: the weights are prepared once and every
//! request keeps only its own small state (Itera-Lite: the recurrent state; the Transformer: its
//! KV cache). Itera-Lite decodes the sequences of a step together ([`IteraDecoder::step_many`]);
//! the Transformer steps them one after another (its KV caches differ in length).

use candle_core::Result;

use crate::decode::{IteraDecodeState, IteraDecoder};
use crate::decode_transformer::{TransformerDecodeState, TransformerDecoder};
use crate::model::{Model, Net};

pub enum SharedDecoder {
    Itera(IteraDecoder),
    Transformer(TransformerDecoder),
}

/// One sequence's decoding state.
pub enum SeqState {
    Itera(Box<IteraDecodeState>),
    Transformer(Box<TransformerDecodeState>),
}

impl SeqState {
    /// Tokens fed so far.
    pub fn pos(&self) -> usize {
        match self {
            SeqState::Itera(s) => s.pos,
            SeqState::Transformer(s) => s.pos,
        }
    }
}

impl SharedDecoder {
    pub fn new(model: &Model) -> Result<SharedDecoder> {
        Ok(match &model.net {
            Net::IteraLite(m) => SharedDecoder::Itera(IteraDecoder::new(m)?),
            Net::Transformer(m) => SharedDecoder::Transformer(TransformerDecoder::new(m)?),
        })
    }

    /// Whether steps of several sequences run as one batch (Itera-Lite) or one by one.
    pub fn batches(&self) -> bool {
        matches!(self, SharedDecoder::Itera(_))
    }

    pub fn start(&self) -> SeqState {
        match self {
            SharedDecoder::Itera(d) => SeqState::Itera(Box::new(d.start())),
            SharedDecoder::Transformer(d) => SeqState::Transformer(Box::new(d.start())),
        }
    }

    /// Feed `tokens` (at least one) to one sequence; the logits after the last.
    pub fn feed(&self, st: &mut SeqState, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut last = None;
        for &t in tokens {
            last = Some(match (self, &mut *st) {
                (SharedDecoder::Itera(d), SeqState::Itera(s)) => d.step(t, s)?,
                (SharedDecoder::Transformer(d), SeqState::Transformer(s)) => d.step(t, s)?,
                _ => candle_core::bail!("a decoding state of the other model"),
            });
        }
        last.ok_or_else(|| candle_core::Error::Msg("feeding needs at least one token".into()))
    }

    /// One token to each sequence (`tokens[i]` to `states[i]`); each one's next logits.
    pub fn step_many(&self, tokens: &[u32], states: &mut [&mut SeqState]) -> Result<Vec<Vec<f32>>> {
        if let SharedDecoder::Itera(d) = self {
            let mut itera: Vec<&mut IteraDecodeState> = Vec::with_capacity(states.len());
            for st in states.iter_mut() {
                match &mut **st {
                    SeqState::Itera(s) => itera.push(s),
                    SeqState::Transformer(_) => candle_core::bail!("a decoding state of the other model"),
                }
            }
            return d.step_many(tokens, &mut itera);
        }
        states.iter_mut().zip(tokens).map(|(st, &t)| self.feed(st, &[t])).collect()
    }
}
