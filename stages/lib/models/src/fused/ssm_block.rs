//! The whole SSM block — LayerNorm, in_proj, causal conv + SiLU, step size Δ, selective scan,
//! C·h + D·x, SiLU gate, out_proj and the residual — as one autograd node over f32 rows.
//!
//! Op by op the block is ~20 graph nodes, and candle's backward adds every input gradient of
//! every node into a freshly zeroed buffer: on the block's (rows, d_inner) activations that
//! bookkeeping cost about as much as all the block's non-GEMM arithmetic. Here the forward keeps
//! its intermediates in the node, and the backward is written out by hand from the same kernels
//! the single fused ops use (conv, scan, GEMMs on the `gemm` crate), summing each activation's
//! gradient contributions in place. Tested against the op-by-op block and its autograd gradients.
//!
//! candle ops take at most three inputs, so the block's twelve parameters travel as one packed
//! vector ([`pack`]): the concatenation's backward hands each variable its slice of the packed
//! gradient, so the optimizer still sees the ordinary per-parameter variables.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::ssm::{conv_backward, conv_silu};
use super::ssm_gate::{gate, gate_backward, gate_to_int8};
use super::*;
use crate::linear_op::Product;
use crate::nn::{layer_norm_bwd, normalize_quantize_rows, normalize_rows, row_stats};
use crate::quant::QWeight;
use crate::scan::{scan_fwd, scan_rev};

/// Shapes of one block: model width d, inner width di, state size n, conv taps k, and the
/// sequence length its rows come in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsmBlockDims {
    pub d: usize,
    pub di: usize,
    pub n: usize,
    pub k: usize,
    pub seq_len: usize,
    pub eps: f64,
}

// The packed vector's parts, in order.
const LN_W: usize = 0;
const LN_B: usize = 1;
const W_IN: usize = 2;
const CONV_W: usize = 3;
const CONV_B: usize = 4;
// delta_proj's weight and B are adjacent: one (di + n, di) matrix, so Δ's projection and B·x
// are one GEMM (and so are their backward products).
const W_DELTA: usize = 5;
const B: usize = 6;
const B_DELTA: usize = 7;
const A_LOG: usize = 8;
const C: usize = 9;
const D_SKIP: usize = 10;
const W_OUT: usize = 11;
const PARTS: usize = 12;

impl SsmBlockDims {
    /// Element counts of the parts: LayerNorm weight and bias (d), in_proj (2·di, d), conv taps
    /// (di, k) and bias (di), delta_proj (di, di), B (n, di), delta_proj's bias (di), A_log (n),
    /// C (di, n), D (di), out_proj (d, di).
    fn sizes(&self) -> [usize; PARTS] {
        let (d, di, n, k) = (self.d, self.di, self.n, self.k);
        [d, d, 2 * di * d, di * k, di, di * di, n * di, di, n, di * n, di, d * di]
    }

    fn offsets(&self) -> [usize; PARTS + 1] {
        let mut o = [0; PARTS + 1];
        for (i, s) in self.sizes().iter().enumerate() {
            o[i + 1] = o[i] + s;
        }
        o
    }
}

/// The block's parameters as one vector, in the order of [`SsmBlockDims::sizes`]; each must have
/// its part's element count.
pub fn pack(dims: &SsmBlockDims, parts: [&Tensor; PARTS]) -> Result<Tensor> {
    let sized: Vec<(&Tensor, usize)> = parts.into_iter().zip(dims.sizes()).collect();
    pack_parts("ssm-block", &sized)
}

/// Integer copies of the block's projections for quantized inference (None: the f32 weight in
/// the packed vector). B, C and the biases stay f32.
#[derive(Clone, Debug, Default)]
pub struct SsmBlockQuant {
    pub in_proj: Option<Arc<QWeight>>,
    pub delta_proj: Option<Arc<QWeight>>,
    pub out_proj: Option<Arc<QWeight>>,
}

impl SsmBlockQuant {
    fn any(&self) -> bool {
        self.in_proj.is_some() || self.delta_proj.is_some() || self.out_proj.is_some()
    }
}

/// What the backward needs from the forward.
pub(crate) struct Saved {
    stats: Vec<(f32, f32)>,
    normed: Vec<f32>,
    xs: Vec<f32>,
    z: Vec<f32>,
    xc: Vec<f32>,
    /// Rows of di + n: σ(delta_proj(xc) + bias), softplus′ there, then B·xc. (Without `keep`,
    /// the first di hold delta_proj(xc) before its bias.)
    qb: Vec<f32>,
    /// B·xc again, as (rows, n) on its own: the backward's per-row state loop reads it, and
    /// from qb's row tails that was one cache line per row, mostly from memory.
    bx: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    h: Vec<f32>,
    gated: Vec<f32>,
}

struct SsmBlockOp {
    dims: SsmBlockDims,
    quant: SsmBlockQuant,
    /// Adds the block input to the output (off when dropout sits between them).
    residual: bool,
}

/// A product into a fresh buffer (never zero-filled first).
fn gemm(product: Product, a: crate::linear_op::Matrix, b: crate::linear_op::Matrix) -> Result<Vec<f32>> {
    Ok(product.run(a, b)?.0)
}

fn part<'a>(p: &'a [f32], o: &[usize; PARTS + 1], i: usize) -> &'a [f32] {
    &p[o[i]..o[i + 1]]
}

/// Rows of x, after checking x holds whole sequences and p the whole packed parameter vector.
fn check(dims: &SsmBlockDims, x_len: usize, p_len: usize) -> Result<usize> {
    let SsmBlockDims { d, seq_len, .. } = *dims;
    let rows = x_len / d.max(1);
    if d == 0 || rows * d != x_len || seq_len == 0 || !rows.is_multiple_of(seq_len) {
        candle_core::bail!("ssm-block: {x_len} values are not whole sequences of {seq_len} rows of {d}");
    }
    let want = dims.offsets()[PARTS];
    if p_len != want {
        candle_core::bail!("ssm-block: {p_len} packed parameters, expected {want}");
    }
    Ok(rows)
}

simd_dispatch! {
    /// The block's output and what its backward needs.
    pub(crate) fn block_forward(dims: &SsmBlockDims, quant: &SsmBlockQuant, residual: bool, keep: bool, x: &[f32], p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let rows = check(dims, x.len(), p.len())?;
        let SsmBlockDims { d, di, n, k, seq_len: l, eps } = *dims;
        let o = dims.offsets();
        let (ln_w, ln_b) = (part(p, &o, LN_W), part(p, &o, LN_B));

        let stats = row_stats(x, d, eps);
        // An integer in_proj at inference takes the LayerNorm's output quantized as it is made;
        // the f32 output is made only when a float product or the backward reads it.
        let ln_to_int8 = quant.in_proj.is_some() && !keep;
        let normed = if ln_to_int8 { Vec::new() } else { normalize_rows(x, ln_w, ln_b, &stats)? };
        let w_in = part(p, &o, W_IN);
        let (xs, z) = match &quant.in_proj {
            Some(q) if ln_to_int8 => {
                let rows = normalize_quantize_rows(x, ln_w, ln_b, &stats, crate::simd::active())?;
                q.matmul_t_split_rows(&rows, di)
            }
            Some(q) => q.matmul_t_split(&normed, rows, di),
            None => (
                gemm(Product::ABt, (&normed, rows, d), (&w_in[..di * d], di, d))?,
                gemm(Product::ABt, (&normed, rows, d), (&w_in[di * d..], di, d))?,
            ),
        };

        let mut xc = slots(rows * di);
        conv_silu(&xs, part(p, &o, CONV_W), part(p, &o, CONV_B), (l, di, k), &mut xc)?;
        // SAFETY: conv_silu returned Ok, so xc and xs are one length of whole sequences and it
        // wrote every row of c values of every sequence of xc.
        let xc = unsafe { written(xc) };

        // Each row of qb: delta_proj(xc) before its bias (di values), then B·xc (n).
        let wq = di + n;
        let mut qb = match &quant.delta_proj {
            Some(q) => {
                // The integer product straight into each row's first di slots; B·x (n values a
                // row) copied into the rest.
                let mut qb = slots(rows * wq);
                q.matmul_t_into(&xc, rows, &mut qb, wq);
                let bx = gemm(Product::ABt, (&xc, rows, di), (part(p, &o, B), n, di))?;
                for (qr, br) in qb.chunks_exact_mut(wq).zip(bx.chunks_exact(n.max(1))) {
                    qr[di..].write_copy_of_slice(&br[..n]);
                }
                // SAFETY: matmul_t_into wrote the first di slots of every row of wq (it panics
                // otherwise) and the loop the last n of each: with n = 0 it runs no row and
                // there are no such slots.
                unsafe { written(qb) }
            }
            None => gemm(Product::ABt, (&xc, rows, di), (&p[o[W_DELTA]..o[B + 1]], wq, di))?,
        };
        // Δ per row: mean over channels of softplus(delta_proj(xc) + bias); when training, the
        // same exponential gives softplus′ = σ, kept in place of the product.
        let b_delta = part(p, &o, B_DELTA);
        let mut delta = vec![0f32; rows];
        let per = rows_per_task(wq);
        for_chunks2(&mut qb, per * wq, &mut delta, per, |_, qrows, out| {
            let mut tmp = vec![0f32; di];
            for (o, row) in out.iter_mut().zip(qrows.chunks_exact_mut(wq)) {
                if keep {
                    for ((t, q), b) in tmp.iter_mut().zip(&mut row[..di]).zip(b_delta) {
                        (*t, *q) = softplus_sigmoid(*q + b);
                    }
                } else {
                    for ((t, &q), b) in tmp.iter_mut().zip(&row[..di]).zip(b_delta) {
                        *t = softplus(q + b);
                    }
                }
                *o = sum_lanes(&tmp) / di as f32;
            }
        });

        // a = exp(Δ·A), u = Δ·(B x), h = scan(a, u).
        let a_neg: Vec<f32> = part(p, &o, A_LOG).iter().map(|v| -v.exp()).collect();
        let (mut a, mut u, mut bx) = (vec![0f32; rows * n], vec![0f32; rows * n], vec![0f32; rows * n]);
        let rows_n = a.chunks_exact_mut(n.max(1)).zip(u.chunks_exact_mut(n.max(1))).zip(bx.chunks_exact_mut(n.max(1)));
        for ((((ar, ur), br), &dt), qr) in rows_n.zip(&delta).zip(qb.chunks_exact(wq)) {
            br.copy_from_slice(&qr[di..]);
            for (((av, uv), &an), &b) in ar.iter_mut().zip(ur.iter_mut()).zip(&a_neg).zip(br.iter()) {
                *av = exp(dt * an);
                *uv = dt * b;
            }
        }
        let h = scan_fwd(&a, &u, (rows / l, l, n));

        // gated = (C h + D ⊙ xc) ⊙ silu(z), y = C h made row by row in registers and not kept
        // (the backward makes it again where it needs it).
        let (d_skip, c) = (part(p, &o, D_SKIP), part(p, &o, C));
        if let (Some(q), false) = (&quant.out_proj, keep) {
            // Inference on an integer out_proj: the gate's rows quantized as they are made.
            let gated = gate_to_int8((&h, c), &xc, &z, d_skip, crate::simd::active());
            let out = if residual { q.matmul_t_plus_rows(&gated, x) } else { q.matmul_t_rows(&gated) };
            return Ok((out, Saved { stats, normed, xs, z, xc, qb, bx, delta, a, h, gated: Vec::new() }));
        }
        let gated = gate((&h, c), &xc, &z, d_skip);

        let out = match &quant.out_proj {
            // The integer kernels add the residual as they store: no copy of x to add into.
            Some(q) if residual => q.matmul_t_plus(&gated, rows, x),
            Some(q) => q.matmul_t(&gated, rows),
            None => {
                let mut out = if residual { x.to_vec() } else { vec![0f32; x.len()] };
                Product::ABt.write_into((&gated, rows, di), (part(p, &o, W_OUT), d, di), &mut out, residual)?;
                out
            }
        };
        Ok((out, Saved { stats, normed, xs, z, xc, qb, bx, delta, a, h, gated }))
    }
}

simd_dispatch! {
    /// Gradients of the input and of the packed parameters, given the output's gradient `g`.
    pub(crate) fn block_backward(dims: &SsmBlockDims, residual: bool, x: &[f32], p: &[f32], s: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = check(dims, x.len(), p.len())?;
        let SsmBlockDims { d, di, n, k, seq_len: l, .. } = *dims;
        let o = dims.offsets();
        let mut dp = vec![0f32; o[PARTS]];
        let at = |i: usize| o[i]..o[i + 1];

        // out_proj
        Product::AtB.write_into((g, rows, d), (&s.gated, rows, di), &mut dp[at(W_OUT)], false)?;
        let mut dy = gemm(Product::AB, (g, rows, d), (part(p, &o, W_OUT), d, di))?;

        // The gate, in one pass: ∂gated becomes ∂y in place; ∂z, xc's share through D, and D's
        // gradient. Then ∂h = ∂y · C and C's gradient ∂yᵀ · h.
        let gg = gate_backward(&mut dy, (&s.h, part(p, &o, C)), &s.xc, &s.z, part(p, &o, D_SKIP));
        dp[at(D_SKIP)].copy_from_slice(&gg.dd);
        let (dz, mut dxc) = (gg.dz, gg.dxc);
        let dh = gemm(Product::AB, (&dy, rows, di), (part(p, &o, C), di, n))?;
        Product::AtB.write_into((&dy, rows, di), (&s.h, rows, n), &mut dp[at(C)], false)?;

        // The scan's adjoint, then back through a = exp(Δ·A) and u = Δ·(B x).
        let lam = scan_rev(&s.a, &dh, (rows / l, l, n));
        let a_neg: Vec<f32> = part(p, &o, A_LOG).iter().map(|v| -v.exp()).collect();
        let mut ddelta = vec![0f32; rows];
        // The gradient of qb: of delta_proj's product (filled below), then of B·xc.
        let wq = di + n;
        if s.qb.len() != rows * wq {
            candle_core::bail!("ssm-block backward: {} kept (Δ | B·x) values for {rows} rows of {wq}", s.qb.len());
        }
        let mut dqb = slots(rows * wq);
        // ∂(B·xc) per row, (rows, n), copied into dqb's row tails below with the rest of each row.
        let mut dbx = vec![0f32; rows * n];
        let mut da_neg = vec![0f64; n];
        // Per row, the n state terms side by side (they vectorize), then summed in order. Rows
        // come from chunk iterators, not index ranges: sliced per row, this loop cost ≈ 0.8 % of
        // a step in bounds checks and address arithmetic for n = 8 values.
        let (zeros, mut terms) = (vec![0f32; n], vec![0f32; n]);
        let nn = n.max(1);
        let prev = std::iter::once(&zeros[..]).chain(s.h.chunks_exact(nn));
        let row_in = prev.zip(lam.chunks_exact(nn)).zip(s.a.chunks_exact(nn)).zip(&s.delta);
        let row_b = s.bx.chunks_exact(nn).zip(dbx.chunks_exact_mut(nn));
        for (r, ((dd, (((h_prev, lr), ar), &dt)), (br, dbr))) in ddelta.iter_mut().zip(row_in).zip(row_b).enumerate() {
            let h_prev = if r % l == 0 { &zeros[..] } else { h_prev };
            let bx = br.iter().zip(&a_neg);
            for ((((((t, db), dn), &lm), &hp), &av), (&b, &an)) in
                terms.iter_mut().zip(dbr.iter_mut()).zip(da_neg.iter_mut()).zip(lr).zip(h_prev).zip(ar).zip(bx)
            {
                let da = lm * hp * av; // ∂/∂(Δ·A)
                *t = fma(lm, b, da * an);
                *db = lm * dt;
                *dn += (da * dt) as f64;
            }
            *dd = terms.iter().fold(0f32, |acc, &t| acc + t);
        }
        // A = −exp(A_log) ⇒ ∂A/∂A_log = A.
        for ((t, &g), &an) in dp[at(A_LOG)].iter_mut().zip(&da_neg).zip(&a_neg) {
            *t = g as f32 * an;
        }
        // Δ = mean softplus(q + bias): ∂q = ∂Δ / di · σ(q + bias), which the forward kept in qb.
        let per = rows_per_task(wq);
        let mut bias_partial = vec![0f32; rows.div_ceil(per) * di];
        for_chunks2(&mut dqb, per * wq, &mut bias_partial, di, |i, out, acc| {
            let rows_in = s.qb[i * per * wq..].chunks_exact(wq).zip(&ddelta[i * per..]);
            for (k, (or, (qr, &gd))) in out.chunks_exact_mut(wq).zip(rows_in).enumerate() {
                let r = i * per + k;
                or[di..].write_copy_of_slice(&dbx[r * n..(r + 1) * n]);
                let scale = gd / di as f32;
                for ((o, &sg), a) in or[..di].iter_mut().zip(&qr[..di]).zip(acc.iter_mut()) {
                    *a += *o.write(scale * sg);
                }
            }
        });
        // SAFETY: qb holds rows × wq values (the forward kept it so), so every row of wq slots
        // of dqb was zipped with one of qb's rows and written whole: its first di values, then
        // its n-value tail.
        let dqb = unsafe { written(dqb) };
        dp[at(B_DELTA)].copy_from_slice(&column_sums(&bias_partial, di));
        // [delta_proj; B] together: their weight gradients and their share of ∂xc.
        let wb = &p[o[W_DELTA]..o[B + 1]];
        Product::AtB.write_into((&dqb, rows, wq), (&s.xc, rows, di), &mut dp[o[W_DELTA]..o[B + 1]], false)?;
        Product::AB.write_into((&dqb, rows, wq), (wb, wq, di), &mut dxc, true)?;

        // xc = silu(conv(xs) + bias): ∂xs and the conv's parameters, (di, k + 1): taps, then the bias.
        let (dxs, taps) = conv_backward(&dxc, &s.xs, part(p, &o, CONV_W), part(p, &o, CONV_B), l, di, k)?;
        for (ch, row) in taps.chunks_exact(k + 1).enumerate() {
            dp[o[CONV_W] + ch * k..o[CONV_W] + (ch + 1) * k].copy_from_slice(&row[..k]);
            dp[o[CONV_B] + ch] = row[k];
        }

        // in_proj (x and z halves), then the LayerNorm.
        let w_in = part(p, &o, W_IN);
        let (dw_x, dw_z) = dp[at(W_IN)].split_at_mut(di * d);
        Product::AtB.write_into((&dxs, rows, di), (&s.normed, rows, d), dw_x, false)?;
        Product::AtB.write_into((&dz, rows, di), (&s.normed, rows, d), dw_z, false)?;
        let mut dnormed = gemm(Product::AB, (&dxs, rows, di), (&w_in[..di * d], di, d))?;
        Product::AB.write_into((&dz, rows, di), (&w_in[di * d..], di, d), &mut dnormed, true)?;
        let (dx, dw, db) = layer_norm_bwd(x, part(p, &o, LN_W), &s.stats, &dnormed, residual.then_some(g))?;
        dp[at(LN_W)].copy_from_slice(&dw);
        dp[at(LN_B)].copy_from_slice(&db);
        Ok((dx, dp))
    }
}

impl KeptBlock for SsmBlockOp {
    type Saved = Saved;
    const NAME: &'static str = "ssm-block";
    fn forward(&self, x: &[f32], p: &[f32], keep: bool) -> Result<(Vec<f32>, Saved)> {
        block_forward(&self.dims, &self.quant, self.residual, keep, x, p)
    }
    fn backward(&self, x: &[f32], p: &[f32], saved: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        block_backward(&self.dims, self.residual, x, p, saved, g)
    }
}

/// The SSM block on f32 rows x (batch · seq_len, d) with packed parameters (see [`pack`]):
/// `x + out_proj(…)` with `residual`, `out_proj(…)` alone without. `train` keeps what the
/// backward pass needs; `quant` (inference only) runs those projections on their integer kernels.
pub fn ssm_block(
    x: &Tensor,
    packed: &Tensor,
    dims: SsmBlockDims,
    quant: SsmBlockQuant,
    residual: bool,
    train: bool,
) -> Result<Tensor> {
    if train && quant.any() {
        candle_core::bail!("ssm-block: quantized weights are for inference; train the f32 model");
    }
    Kept::apply(SsmBlockOp { dims, quant, residual }, x, packed, train)
}
