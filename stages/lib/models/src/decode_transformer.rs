//! Batch-1 decoding of the Transformer baseline on plain slices, with a KV cache.
//!
//! The same computation as [`crate::transformer::Transformer::step`] (tested equal to 1e-5) on
//! weights copied once: per token, matrix-vector products for the projections and the MLP,
//! attention of the new query over the cached keys and values of every head. Through candle the
//! step is ~60 tensor ops on vectors of 128–512 values plus a concatenation of the whole cache per
//! layer, and that dispatch and copying cost many times the arithmetic. Quantized layers keep
//! their integer kernels.

use std::sync::Arc;

use candle_core::Result;

use crate::decode::{embed_token, matvec, values, Dense, Norm};
use crate::quant::QWeight;
use crate::transformer::Transformer;

struct Block {
    ln1: Norm,
    qkv: Dense,
    proj: Dense,
    ln2: Norm,
    up: Dense,
    down: Dense,
}

/// The Transformer prepared for batch-1 decoding; see the module docs.
pub struct TransformerDecoder {
    embed: Vec<f32>,
    pos: Vec<f32>,
    norm_f: Norm,
    head: Option<Arc<QWeight>>,
    blocks: Vec<Block>,
    heads: usize,
    d_model: usize,
    d_ff: usize,
    vocab: usize,
    max_seq_len: usize,
}

/// A sequence being decoded by a [`TransformerDecoder`]: per layer, the keys and values of every
/// position so far as rows of d_model (head h in columns h·hd..(h+1)·hd).
pub struct TransformerDecodeState {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    out: Vec<f32>,
    hidden: Vec<f32>,
    scores: Vec<f32>,
    /// Position of the next token.
    pub pos: usize,
}

impl TransformerDecoder {
    pub fn new(m: &Transformer) -> Result<Self> {
        let blocks = m
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    ln1: Norm::new(&b.ln1)?,
                    qkv: Dense::new(&b.qkv)?,
                    proj: Dense::new(&b.proj)?,
                    ln2: Norm::new(&b.ln2)?,
                    up: Dense::new(&b.up)?,
                    down: Dense::new(&b.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let c = &m.cfg;
        if c.n_heads == 0 || !c.d_model.is_multiple_of(c.n_heads) {
            candle_core::bail!("d_model {} is not a multiple of {} heads", c.d_model, c.n_heads);
        }
        Ok(TransformerDecoder {
            embed: values(m.emb.embed.embeddings())?,
            pos: values(m.emb.pos.embeddings())?,
            norm_f: Norm::new(&m.emb.norm_f)?,
            head: m.emb.head_quantized().map(|q| Arc::new(q.clone())),
            blocks,
            heads: c.n_heads,
            d_model: c.d_model,
            d_ff: c.d_ff,
            vocab: c.vocab_size,
            max_seq_len: c.max_seq_len,
        })
    }

    pub fn start(&self) -> TransformerDecodeState {
        let (d, n) = (self.d_model, self.blocks.len());
        let cache = || (0..n).map(|_| Vec::with_capacity(self.max_seq_len * d)).collect();
        TransformerDecodeState {
            keys: cache(),
            values: cache(),
            x: vec![0.0; d],
            normed: vec![0.0; d],
            qkv: vec![0.0; 3 * d],
            attended: vec![0.0; d],
            out: vec![0.0; d],
            hidden: vec![0.0; self.d_ff],
            scores: Vec::with_capacity(self.max_seq_len),
            pos: 0,
        }
    }

    /// Feed `token` at the state's position; returns the next-token logits (vocab).
    pub fn step(&self, token: u32, st: &mut TransformerDecodeState) -> Result<Vec<f32>> {
        let d = self.d_model;
        embed_token(&self.embed, &self.pos, (self.vocab, self.max_seq_len), token, st.pos, &mut st.x)?;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let seen = st.pos + 1;
        for ((b, keys), vals) in self.blocks.iter().zip(st.keys.iter_mut()).zip(st.values.iter_mut()) {
            b.ln1.apply(&st.x, &mut st.normed);
            b.qkv.apply(&st.normed, &mut st.qkv);
            keys.extend_from_slice(&st.qkv[d..2 * d]);
            vals.extend_from_slice(&st.qkv[2 * d..3 * d]);
            for h in 0..self.heads {
                let y = &mut st.attended[h * hd..(h + 1) * hd];
                attend(&st.qkv[h * hd..(h + 1) * hd], keys, vals, d, h * hd, seen, scale, &mut st.scores, y);
            }
            b.proj.apply(&st.attended, &mut st.out);
            for (x, o) in st.x.iter_mut().zip(&st.out) {
                *x += o;
            }
            b.ln2.apply(&st.x, &mut st.normed);
            b.up.apply(&st.normed, &mut st.hidden);
            crate::fused::gelu_in_place(&mut st.hidden);
            b.down.apply(&st.hidden, &mut st.out);
            for (x, o) in st.x.iter_mut().zip(&st.out) {
                *x += o;
            }
        }
        st.pos += 1;
        self.norm_f.apply(&st.x, &mut st.normed);
        Ok(match &self.head {
            Some(q) => q.matmul_t(&st.normed, 1),
            None => {
                let mut logits = vec![0.0; self.vocab];
                matvec(&self.embed, d, &st.normed, &mut logits);
                logits
            }
        })
    }
}

crate::fused::simd_dispatch! {
    /// One head's attention output `y` for query `q` over the first `seen` cached rows (each of
    /// width `d`, this head's slice at column `col`); `scores` is scratch.
    #[allow(clippy::too_many_arguments)]
    fn attend(q: &[f32], keys: &[f32], vals: &[f32], d: usize, col: usize, seen: usize, scale: f32, scores: &mut Vec<f32>, y: &mut [f32]) -> () {
        let hd = q.len();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..seen {
            let k = &keys[j * d + col..j * d + col + hd];
            // 8 partial sums: a fixed order, and it vectorizes.
            let mut acc = [0f32; 8];
            let mut i = 0;
            while i + 8 <= hd {
                for l in 0..8 {
                    acc[l] += q[i + l] * k[i + l];
                }
                i += 8;
            }
            let mut dot = acc.iter().sum::<f32>();
            while i < hd {
                dot += q[i] * k[i];
                i += 1;
            }
            let s = dot * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let inv = 1.0 / total;
        y.fill(0.0);
        for (j, &w) in scores.iter().enumerate() {
            let (v, w) = (&vals[j * d + col..j * d + col + hd], w * inv);
            for (o, &vv) in y.iter_mut().zip(v) {
                *o += w * vv;
            }
        }
    }
}
