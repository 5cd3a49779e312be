//! The Transformer's attention sub-block — LayerNorm, the q/k/v projection, causal multi-head
//! attention, the output projection and the residual — as one autograd node over f32 rows.
//!
//! Op by op it is ~15 graph nodes, among them head split/merge reshapes and transposes whose
//! backward builds zeroed full-size gradients, and candle sums each node's input gradients into
//! fresh buffers; together that cost more than the attention arithmetic. Here the forward keeps
//! the attention probabilities and the backward is written out per (sequence, head) with GEMMs
//! on strided views of the (rows, 3·d) projection. Parameters travel packed ([`pack`]): LayerNorm
//! weight and bias, the q/k/v weight (3·d, d), the output weight (d, d). Tested against the
//! op-by-op block and its autograd gradients.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::*;
use crate::linear_op::{strided_product, Product, View};
use crate::nn::{layer_norm_bwd, row_stats};
use crate::quant::QWeight;

/// Model width d, heads, sequence length of the rows, LayerNorm epsilon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDims {
    pub d: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub eps: f64,
}

impl AttentionDims {
    fn packed_len(&self) -> usize {
        2 * self.d + 4 * self.d * self.d
    }
}

/// LayerNorm weight and bias, the q/k/v weight (3·d, d) and the output weight (d, d), as one vector.
pub fn pack(dims: &AttentionDims, ln_w: &Tensor, ln_b: &Tensor, w_qkv: &Tensor, w_out: &Tensor) -> Result<Tensor> {
    let d = dims.d;
    pack_parts("attention", &[(ln_w, d), (ln_b, d), (w_qkv, 3 * d * d), (w_out, d * d)])
}

/// Integer copies of the q/k/v and output projections for quantized inference (None: f32).
#[derive(Clone, Debug, Default)]
pub struct AttentionQuant {
    pub qkv: Option<Arc<QWeight>>,
    pub out: Option<Arc<QWeight>>,
}

struct Saved {
    stats: Vec<(f32, f32)>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    /// Per (sequence, head): the (l, l) attention probabilities, zero above the diagonal.
    probs: Vec<f32>,
    /// The heads' outputs merged back into rows of d.
    merged: Vec<f32>,
}

struct AttentionOp {
    dims: AttentionDims,
    quant: AttentionQuant,
    residual: bool,
}

fn check(dims: &AttentionDims, x_len: usize, p_len: usize) -> Result<(usize, usize)> {
    let AttentionDims { d, heads, seq_len: l, .. } = *dims;
    let rows = x_len / d.max(1);
    if d == 0 || heads == 0 || d % heads != 0 || rows * d != x_len || l == 0 || !rows.is_multiple_of(l) {
        candle_core::bail!("attention: {x_len} values are not whole sequences of {l} rows of {d} in {heads} heads");
    }
    if p_len != dims.packed_len() {
        candle_core::bail!("attention: {p_len} packed parameters, expected {}", dims.packed_len());
    }
    Ok((rows, d / heads))
}

simd_dispatch! {
    fn attention_forward(dims: &AttentionDims, quant: &AttentionQuant, residual: bool, x: &[f32], p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let (rows, hd) = check(dims, x.len(), p.len())?;
        let AttentionDims { d, heads, seq_len: l, eps } = *dims;
        let (ln_w, rest) = p.split_at(d);
        let (ln_b, rest) = rest.split_at(d);
        let (w_qkv, w_out) = rest.split_at(3 * d * d);
        let stats = row_stats(x, d, eps);
        let mut normed = vec![0f32; x.len()];
        for ((out, row), &(mean, rstd)) in normed.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(&stats) {
            for (((o, &v), &lw), &lb) in out.iter_mut().zip(row).zip(ln_w).zip(ln_b) {
                *o = (v - mean) * rstd * lw + lb;
            }
        }
        let qkv = match &quant.qkv {
            Some(q) => q.matmul_t(&normed, rows),
            None => Product::ABt.run((&normed, rows, d), (w_qkv, 3 * d, d))?.0,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let w3 = 3 * d;
        let mut probs = vec![0f32; rows / l * heads * l * l];
        let mut heads_out = vec![0f32; rows * d];
        let failed = std::sync::atomic::AtomicBool::new(false);
        for_chunks2(&mut probs, l * l, &mut heads_out, l * hd, |idx, pr, out| {
            let (seq, h) = (idx / heads, idx % heads);
            let base = seq * l * w3 + h * hd;
            let q = View { data: &qkv[base..], rs: w3, cs: 1 };
            let kt = View { data: &qkv[base + d..], rs: 1, cs: w3 };
            let v = View { data: &qkv[base + 2 * d..], rs: w3, cs: 1 };
            let ok = strided_product(l, l, hd, pr, l, q, kt, false).is_ok();
            // Query i sees keys 0..=i: softmax(scale · scores) there, zero beyond.
            for i in 0..l {
                let row = &mut pr[i * l..(i + 1) * l];
                // Lane-wise max and sum: a running f32 reduction cannot be reordered, and would
                // keep the exp loop scalar.
                let mut lanes = [f32::NEG_INFINITY; 8];
                for ch in row[..=i].chunks(8) {
                    for (m, &s) in lanes.iter_mut().zip(ch) {
                        *m = m.max(s);
                    }
                }
                let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for s in row[..=i].iter_mut() {
                    *s = exp(scale * (*s - max));
                }
                let inv = 1.0 / sum_lanes(&row[..=i]);
                for s in row[..=i].iter_mut() {
                    *s *= inv;
                }
                row[i + 1..].fill(0.0);
            }
            let ok = ok && strided_product(l, hd, l, out, hd, View { data: pr, rs: l, cs: 1 }, v, false).is_ok();
            if !ok {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if failed.into_inner() {
            candle_core::bail!("attention: a head's product did not fit its views");
        }
        // (sequence, head, l, hd) → rows of d.
        let mut merged = vec![0f32; rows * d];
        for (idx, block) in heads_out.chunks_exact(l * hd).enumerate() {
            let (seq, h) = (idx / heads, idx % heads);
            for (i, src) in block.chunks_exact(hd).enumerate() {
                let at = (seq * l + i) * d + h * hd;
                merged[at..at + hd].copy_from_slice(src);
            }
        }
        let mut out = if residual { x.to_vec() } else { vec![0f32; x.len()] };
        match &quant.out {
            Some(q) => q.matmul_t_add(&merged, rows, &mut out),
            None => Product::ABt.write_into((&merged, rows, d), (w_out, d, d), &mut out, residual)?,
        }
        Ok((out, Saved { stats, normed, qkv, probs, merged }))
    }
}

simd_dispatch! {
    fn attention_backward(dims: &AttentionDims, residual: bool, x: &[f32], p: &[f32], s: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (rows, hd) = check(dims, x.len(), p.len())?;
        let AttentionDims { d, heads, seq_len: l, .. } = *dims;
        let (ln_w, w_qkv, w_out) = (&p[..d], &p[2 * d..2 * d + 3 * d * d], &p[2 * d + 3 * d * d..]);
        let mut dp = vec![0f32; p.len()];
        let (o_qkv, o_out) = (2 * d, 2 * d + 3 * d * d);
        Product::AtB.write_into((g, rows, d), (&s.merged, rows, d), &mut dp[o_out..], false)?;
        let dmerged = Product::AB.run((g, rows, d), (w_out, d, d))?.0;
        let scale = 1.0 / (hd as f32).sqrt();
        let w3 = 3 * d;
        // Per (sequence, head): dq, dk, dv, each (l, hd).
        let mut dheads = vec![0f32; rows / l * heads * 3 * l * hd];
        let failed = std::sync::atomic::AtomicBool::new(false);
        for_chunks(&mut dheads, 3 * l * hd, |idx, buf| {
            let (seq, h) = (idx / heads, idx % heads);
            let base = seq * l * w3 + h * hd;
            let pr = &s.probs[idx * l * l..(idx + 1) * l * l];
            let d_o = View { data: &dmerged[seq * l * d + h * hd..], rs: d, cs: 1 };
            let (dq, rest) = buf.split_at_mut(l * hd);
            let (dk, dv) = rest.split_at_mut(l * hd);
            let mut ok = strided_product(l, hd, l, dv, hd, View { data: pr, rs: 1, cs: l }, d_o, false).is_ok();
            let mut ds = vec![0f32; l * l];
            ok &= strided_product(l, l, hd, &mut ds, l, d_o, View { data: &s.qkv[base + 2 * d..], rs: 1, cs: w3 }, false).is_ok();
            // dS = scale · P ⊙ (dP − Σ_j dP ⊙ P) on the visible part; P is zero beyond it.
            for i in 0..l {
                let (dr, prow) = (&mut ds[i * l..(i + 1) * l], &pr[i * l..(i + 1) * l]);
                let mut lanes = [0f32; 8];
                for (ca, cb) in dr[..=i].chunks(8).zip(prow[..=i].chunks(8)) {
                    for ((acc, a), b) in lanes.iter_mut().zip(ca).zip(cb) {
                        *acc += a * b;
                    }
                }
                let dot: f32 = lanes.iter().sum();
                for (a, &b) in dr[..=i].iter_mut().zip(&prow[..=i]) {
                    *a = scale * b * (*a - dot);
                }
                dr[i + 1..].fill(0.0);
            }
            ok &= strided_product(l, hd, l, dq, hd, View { data: &ds, rs: l, cs: 1 }, View { data: &s.qkv[base + d..], rs: w3, cs: 1 }, false).is_ok();
            ok &= strided_product(l, hd, l, dk, hd, View { data: &ds, rs: 1, cs: l }, View { data: &s.qkv[base..], rs: w3, cs: 1 }, false).is_ok();
            if !ok {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if failed.into_inner() {
            candle_core::bail!("attention: a head's product did not fit its views");
        }
        // (sequence, head, {q,k,v}, l, hd) → rows of 3·d laid out as the projection's output.
        let mut dqkv = vec![0f32; rows * w3];
        for (idx, block) in dheads.chunks_exact(3 * l * hd).enumerate() {
            let (seq, h) = (idx / heads, idx % heads);
            for (part, m) in block.chunks_exact(l * hd).enumerate() {
                for (i, src) in m.chunks_exact(hd).enumerate() {
                    let at = (seq * l + i) * w3 + part * d + h * hd;
                    dqkv[at..at + hd].copy_from_slice(src);
                }
            }
        }
        Product::AtB.write_into((&dqkv, rows, w3), (&s.normed, rows, d), &mut dp[o_qkv..o_out], false)?;
        let dnormed = Product::AB.run((&dqkv, rows, w3), (w_qkv, w3, d))?.0;
        let mut dx = if residual { g.to_vec() } else { vec![0f32; x.len()] };
        let (dw, db) = layer_norm_bwd(x, ln_w, &s.stats, &dnormed, &mut dx);
        dp[..d].copy_from_slice(&dw);
        dp[d..2 * d].copy_from_slice(&db);
        Ok((dx, dp))
    }
}

impl KeptBlock for AttentionOp {
    type Saved = Saved;
    const NAME: &'static str = "attention-block";
    fn forward(&self, x: &[f32], p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        attention_forward(&self.dims, &self.quant, self.residual, x, p)
    }
    fn backward(&self, x: &[f32], p: &[f32], saved: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        attention_backward(&self.dims, self.residual, x, p, saved, g)
    }
}

/// The attention sub-block on f32 rows x (batch · seq_len, d) with packed parameters (see
/// [`pack`]): `x + proj(attention(LN(x)))` with `residual`, the projection alone without. Full
/// sequences only (no KV cache). `train` keeps what the backward pass needs; `quant` (inference
/// only) runs the projections on their integer kernels.
pub fn attention_block(
    x: &Tensor,
    packed: &Tensor,
    dims: AttentionDims,
    quant: AttentionQuant,
    residual: bool,
    train: bool,
) -> Result<Tensor> {
    if train && (quant.qkv.is_some() || quant.out.is_some()) {
        candle_core::bail!("attention: quantized weights are for inference; train the f32 model");
    }
    Kept::apply(AttentionOp { dims, quant, residual }, x, packed, train)
}
