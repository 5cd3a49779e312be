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

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::*;
use crate::head_product::{head_product, transpose, Zeros};
use crate::linear_op::{Product, View};
use crate::nn::{layer_norm_bwd, normalize_rows, row_stats};
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

/// Query rows per block of the causal products.
const QUERY_BLOCK: usize = 32;

pub(crate) struct Saved {
    stats: Vec<(f32, f32)>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    /// Per (sequence, head): the (l, l) attention probabilities, zero above the diagonal (empty
    /// when the forward was not kept for a backward).
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
    pub(crate) fn attention_forward(dims: &AttentionDims, quant: &AttentionQuant, residual: bool, keep: bool, x: &[f32], p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let (rows, hd) = check(dims, x.len(), p.len())?;
        let AttentionDims { d, heads, seq_len: l, eps } = *dims;
        let (ln_w, rest) = p.split_at(d);
        let (ln_b, rest) = rest.split_at(d);
        let (w_qkv, w_out) = rest.split_at(3 * d * d);
        let stats = row_stats(x, d, eps);
        let normed = normalize_rows(x, ln_w, ln_b, &stats)?;
        let qkv = match &quant.qkv {
            Some(q) => q.matmul_t(&normed, rows),
            None => Product::ABt.run((&normed, rows, d), (w_qkv, 3 * d, d))?.0,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let w3 = 3 * d;
        // One sequence per task, its heads' outputs written straight into their columns of the
        // merged rows. Training keeps every head's probabilities (zero above the diagonal);
        // inference reuses one (l, l) scratch per sequence. Both buffers are zeroed a sequence or
        // a head at a time as the loop reaches them, in cache (zeroing the 4 MB of a tiny
        // preset's probabilities ahead of the loop cost ≈ 0.2 ms of a 4.5 ms block forward).
        let mut merged = slots(rows * d);
        let mut probs = slots(if keep { rows / l * heads * l * l } else { 0 });
        let failed = std::sync::atomic::AtomicBool::new(false);
        let sequence = |seq: usize, pr: &mut [MaybeUninit<f32>], per_head: usize, m: &mut [MaybeUninit<f32>]| {
            let mut ok = true;
            let m = zeroed(m);
            let mut kt = vec![0f32; hd * l];
            for h in 0..heads {
                let base = seq * l * w3 + h * hd;
                let pr = zeroed(&mut pr[h * per_head..h * per_head + l * l]);
                // Kᵀ with contiguous rows, which the products' tiles read in place.
                ok &= transpose(&qkv[base + d..], w3, l, hd, &mut kt).is_ok();
                // Causal blocks: queries i0..i1 see keys 0..i1 at most, so the products skip
                // the blocks above the diagonal (5/8 of the full products' work at l = 128).
                for i0 in (0..l).step_by(QUERY_BLOCK) {
                    let i1 = (i0 + QUERY_BLOCK).min(l);
                    let q = View { data: &qkv[base + i0 * w3..], rs: w3, cs: 1 };
                    let kt = View { data: &kt, rs: l, cs: 1 };
                    ok &= head_product(i1 - i0, i1, hd, &mut pr[i0 * l..], l, q, kt, Zeros::None).is_ok();
                    // Query i sees keys 0..=i: softmax(scale · scores) there, zero beyond.
                    for i in i0..i1 {
                        let row = &mut pr[i * l..i * l + i1];
                        // Lane-wise max and sum: a running f32 reduction cannot be reordered,
                        // and would keep the exp loop scalar.
                        let max = max_lanes(&row[..=i]);
                        // The passes run over the block's whole row, the hidden keys' scores
                        // (finite) zeroed after the exp: row lengths are then the block's, so
                        // the loops run in full vectors where a visible part's tail was scalar.
                        for s in row.iter_mut() {
                            *s = exp(scale * (*s - max));
                        }
                        row[i + 1..].fill(0.0);
                        let inv = 1.0 / sum_lanes(row);
                        for s in row.iter_mut() {
                            *s *= inv;
                        }
                    }
                    // Each tile of P·V sums over the keys its queries see, not the block's.
                    let p_block = View { data: &pr[i0 * l..], rs: l, cs: 1 };
                    let v = View { data: &qkv[base + 2 * d..], rs: w3, cs: 1 };
                    ok &= head_product(i1 - i0, hd, i1, &mut m[i0 * d + h * hd..], d, p_block, v, Zeros::After(i0)).is_ok();
                }
            }
            if !ok {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if keep {
            for_chunks2(&mut probs, heads * l * l, &mut merged, l * d, |seq, pr, m| sequence(seq, pr, l * l, m));
        } else {
            for_chunks(&mut merged, l * d, |seq, m| sequence(seq, &mut slots(l * l), 0, m));
        }
        // SAFETY: `sequence` zeroed each chunk of l·d merged values whole, and each head's l·l
        // probabilities, which tile a chunk of heads·l·l; `check` made rows a multiple of l, so
        // the chunks cover both buffers.
        let (merged, probs) = unsafe { (written(merged), written(probs)) };
        if failed.into_inner() {
            candle_core::bail!("attention: a head's product did not fit its views");
        }
        let out = match &quant.out {
            // The integer kernels add the residual as they store: no copy of x to add into.
            Some(q) if residual => q.matmul_t_plus(&merged, rows, x),
            Some(q) => q.matmul_t(&merged, rows),
            None => {
                let mut out = if residual { x.to_vec() } else { vec![0f32; x.len()] };
                Product::ABt.write_into((&merged, rows, d), (w_out, d, d), &mut out, residual)?;
                out
            }
        };
        Ok((out, Saved { stats, normed, qkv, probs, merged }))
    }
}

simd_dispatch! {
    pub(crate) fn attention_backward(dims: &AttentionDims, residual: bool, x: &[f32], p: &[f32], s: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (rows, hd) = check(dims, x.len(), p.len())?;
        let AttentionDims { d, heads, seq_len: l, .. } = *dims;
        let (ln_w, w_qkv, w_out) = (&p[..d], &p[2 * d..2 * d + 3 * d * d], &p[2 * d + 3 * d * d..]);
        let mut dp = vec![0f32; p.len()];
        let (o_qkv, o_out) = (2 * d, 2 * d + 3 * d * d);
        Product::AtB.write_into((g, rows, d), (&s.merged, rows, d), &mut dp[o_out..], false)?;
        let dmerged = Product::AB.run((g, rows, d), (w_out, d, d))?.0;
        let scale = 1.0 / (hd as f32).sqrt();
        let w3 = 3 * d;
        // One sequence per task, dq, dk and dv written straight into their columns of the
        // projection's (rows, 3·d) gradient. The products run in causal blocks like the
        // forward's: P and dS are zero above the diagonal, so no block there is computed, and
        // each tile of dS·K, Pᵀ·dO and dSᵀ·Q sums only the terms its rows see (`Zeros`).
        let mut dqkv = vec![0f32; rows * w3];
        let failed = std::sync::atomic::AtomicBool::new(false);
        for_chunks(&mut dqkv, l * w3, |seq, dst| {
            let mut ok = true;
            let mut ds = vec![0f32; l * l];
            let mut vt = vec![0f32; hd * l];
            for h in 0..heads {
                let base = seq * l * w3 + h * hd;
                ok &= transpose(&s.qkv[base + 2 * d..], w3, l, hd, &mut vt).is_ok();
                let pr = &s.probs[(seq * heads + h) * l * l..][..l * l];
                let d_o = |i0: usize| View { data: &dmerged[(seq * l + i0) * d + h * hd..], rs: d, cs: 1 };
                for i0 in (0..l).step_by(QUERY_BLOCK) {
                    let i1 = (i0 + QUERY_BLOCK).min(l);
                    // dP = dO · Vᵀ for queries i0..i1 over the keys they see.
                    let vt = View { data: &vt, rs: l, cs: 1 };
                    ok &= head_product(i1 - i0, i1, hd, &mut ds[i0 * l..], l, d_o(i0), vt, Zeros::None).is_ok();
                    // dS = scale · P ⊙ (dP − Σ_j dP ⊙ P): zero beyond the visible keys, where
                    // P is zero, so whole block rows (full vectors, as in the forward) need no fill.
                    for i in i0..i1 {
                        let (dr, prow) = (&mut ds[i * l..i * l + i1], &pr[i * l..i * l + i1]);
                        let dot = dot_lanes(dr, prow);
                        for (a, &b) in dr.iter_mut().zip(prow) {
                            *a = scale * b * (*a - dot);
                        }
                    }
                    // dQ = dS · K.
                    let k = View { data: &s.qkv[base + d..], rs: w3, cs: 1 };
                    let ds_rows = View { data: &ds[i0 * l..], rs: l, cs: 1 };
                    ok &= head_product(i1 - i0, hd, i1, &mut dst[i0 * w3 + h * hd..], w3, ds_rows, k, Zeros::After(i0)).is_ok();
                }
                // Keys j0..j1 are seen by queries j0..l: dV = Pᵀ · dO and dK = dSᵀ · Q there.
                for j0 in (0..l).step_by(QUERY_BLOCK) {
                    let j1 = (j0 + QUERY_BLOCK).min(l);
                    let pt = View { data: &pr[j0 * l + j0..], rs: 1, cs: l };
                    let dv = &mut dst[j0 * w3 + 2 * d + h * hd..];
                    ok &= head_product(j1 - j0, hd, l - j0, dv, w3, pt, d_o(j0), Zeros::Before).is_ok();
                    let dst_t = View { data: &ds[j0 * l + j0..], rs: 1, cs: l };
                    let q = View { data: &s.qkv[base + j0 * w3..], rs: w3, cs: 1 };
                    ok &= head_product(j1 - j0, hd, l - j0, &mut dst[j0 * w3 + d + h * hd..], w3, dst_t, q, Zeros::Before).is_ok();
                }
            }
            if !ok {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if failed.into_inner() {
            candle_core::bail!("attention: a head's product did not fit its views");
        }
        Product::AtB.write_into((&dqkv, rows, w3), (&s.normed, rows, d), &mut dp[o_qkv..o_out], false)?;
        let dnormed = Product::AB.run((&dqkv, rows, w3), (w_qkv, w3, d))?.0;
        let (dx, dw, db) = layer_norm_bwd(x, ln_w, &s.stats, &dnormed, residual.then_some(g))?;
        dp[..d].copy_from_slice(&dw);
        dp[d..2 * d].copy_from_slice(&db);
        Ok((dx, dp))
    }
}

impl KeptBlock for AttentionOp {
    type Saved = Saved;
    const NAME: &'static str = "attention-block";
    fn forward(&self, x: &[f32], p: &[f32], keep: bool) -> Result<(Vec<f32>, Saved)> {
        attention_forward(&self.dims, &self.quant, self.residual, keep, x, p)
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
