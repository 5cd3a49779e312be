//! A pre-LN feed-forward layer — LayerNorm, then E experts Linear(d→e)–GELU–Linear(e→d) weighted
//! by per-row gates and summed, then the residual — as one autograd node over f32 rows. With one
//! expert and no gates it is Itera-Lite's dense FFN; with the router's gates (zero off each row's
//! top-k) it is the MoE layer, each expert run only on the rows routed to it: half the expert
//! FLOPs of computing all four densely at top-2. A zero gate means "not routed": that expert's
//! output and its gate gradient count as zero (the router's softmax over the top-k passes no
//! gradient to unselected experts anyway).
//!
//! Why one node: as for the SSM block (see `ssm_block`), candle's backward sums every node's input
//! gradients into freshly zeroed buffers, and the layer's (rows, E·e) activations made that
//! bookkeeping a large share of a training step. Parameters travel packed
//! ([`ExpertsLayout::pack`]): LayerNorm weight and bias, the experts' up weights stacked (E·e, d),
//! their down weights stacked (E·d, e).
//! Tested against the op-by-op layers and their autograd gradients.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::*;
use crate::linear_op::{Matrix, Product};
use crate::nn::{layer_norm_bwd, normalize_quantize_rows, normalize_rows, row_stats};
use crate::quant::{QWeight, QuantRows};

/// Model width d, experts, each expert's hidden width, LayerNorm epsilon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertsDims {
    pub d: usize,
    pub experts: usize,
    pub hidden: usize,
    pub eps: f64,
}

impl ExpertsDims {
    fn width(&self) -> usize {
        self.experts * self.hidden
    }
    /// LayerNorm weight, bias; up (E·e, d); down (E·d, e).
    fn sizes(&self) -> [usize; 4] {
        [self.d, self.d, self.width() * self.d, self.d * self.width()]
    }
    fn packed_len(&self) -> usize {
        self.sizes().iter().sum()
    }
}

/// A layer's parameters in the node's packing order — LayerNorm weight and bias, every expert's
/// up weight, every expert's down weight — and its dims. The one place that order is written:
/// the candle node ([`ExpertsLayout::pack`]) and the hand-written Itera-Lite step both take it.
pub struct ExpertsLayout<'a> {
    pub params: Vec<&'a Tensor>,
    pub dims: ExpertsDims,
}

/// The layout of a layer with LayerNorm `ln` (weight, bias, epsilon) and (up, down) weight
/// pairs, one per expert, on rows of width d.
pub fn layout<'a>(
    ln: (&'a Tensor, &'a Tensor, f64),
    pairs: &[(&'a Tensor, &'a Tensor)],
    d: usize,
) -> Result<ExpertsLayout<'a>> {
    let hidden = pairs.first().map(|p| p.0.dim(0)).transpose()?.unwrap_or(0);
    let mut params = vec![ln.0, ln.1];
    params.extend(pairs.iter().map(|p| p.0));
    params.extend(pairs.iter().map(|p| p.1));
    Ok(ExpertsLayout { params, dims: ExpertsDims { d, experts: pairs.len(), hidden, eps: ln.2 } })
}

impl ExpertsLayout<'_> {
    /// The parameters as the one vector the node takes: each expert's weights contiguous.
    pub fn pack(&self) -> Result<Tensor> {
        let e = self.dims.experts;
        if self.params.len() != 2 + 2 * e {
            candle_core::bail!("experts: {} parameters for {e} experts", self.params.len());
        }
        let up = Tensor::cat(&self.params[2..2 + e], 0)?;
        let down = Tensor::cat(&self.params[2 + e..], 0)?;
        let [w_n, b_n, up_n, down_n] = self.dims.sizes();
        pack_parts("experts", &[(self.params[0], w_n), (self.params[1], b_n), (&up, up_n), (&down, down_n)])
    }
}

/// One expert's share of a forward pass: its rows (None: all of them, in order), its input rows
/// gathered, and its activations.
struct Routed {
    rows: Option<Vec<usize>>,
    x: Vec<f32>,
    /// GELU′ at the up projection's output; empty when the forward was not kept for a
    /// backward (GELU ran in place).
    dgelu: Vec<f32>,
    hidden: Vec<f32>,
    /// `hidden` times each row's gate; empty without gates (then `hidden` is it).
    gated: Vec<f32>,
}

/// Integer copies of each expert's up and down weights for quantized inference (None: f32).
#[derive(Clone, Debug, Default)]
pub struct ExpertsQuant {
    pub up: Vec<Option<Arc<QWeight>>>,
    pub down: Vec<Option<Arc<QWeight>>>,
}

impl ExpertsQuant {
    fn any(&self) -> bool {
        self.up.iter().chain(&self.down).any(Option::is_some)
    }
}

pub(crate) struct Saved {
    pub(crate) ln: Normed,
    experts: Vec<Routed>,
}

/// The layer's LayerNorm over its input rows: per row (mean, 1/std), and the output.
pub(crate) struct Normed {
    pub(crate) stats: Vec<(f32, f32)>,
    pub(crate) out: Vec<f32>,
}

/// The LayerNorm the layer starts with, on rows x, its weight and bias taken from the packed
/// parameters p. The MoE router reads the same output: a caller running the router first hands
/// it on to [`experts_forward`] rather than having it computed twice.
pub(crate) fn experts_norm(dims: &ExpertsDims, x: &[f32], p: &[f32]) -> Result<Normed> {
    if p.len() < 2 * dims.d {
        candle_core::bail!("experts: {} packed parameters, expected {}", p.len(), dims.packed_len());
    }
    let stats = row_stats(x, dims.d, dims.eps);
    let out = normalize_rows(x, &p[..dims.d], &p[dims.d..2 * dims.d], &stats)?;
    Ok(Normed { stats, out })
}

/// The experts' input: the LayerNorm (`ln` when the caller made it) in f32 where a float
/// product or the backward reads it, and, for integer up projections at inference, all rows
/// quantized once, which each expert gathers its routed rows from. With every up projection
/// integer, the rows are quantized as the LayerNorm makes them and its f32 output is left empty.
fn experts_input(
    dims: &ExpertsDims,
    quant: &ExpertsQuant,
    keep: bool,
    x: &[f32],
    ln: Option<Normed>,
    p: &[f32],
) -> Result<(Normed, Option<QuantRows>)> {
    let (d, rows) = (dims.d, x.len() / dims.d.max(1));
    let int8 = (0..dims.experts).map(|j| quant.up.get(j).is_some_and(Option::is_some));
    let (any_int8, any_f32) = int8.fold((false, keep), |(i, f), q| (i || q, f || !q));
    let kernel = crate::simd::active();
    let quantized = |ln: Normed| {
        let xq = (any_int8 && !keep).then(|| QuantRows::new(kernel, d, &ln.out));
        (ln, xq)
    };
    Ok(match ln {
        Some(ln) if ln.out.len() == x.len() && ln.stats.len() == rows => quantized(ln),
        Some(_) => candle_core::bail!("experts: a LayerNorm output that is not {rows} rows of {d}"),
        None if any_f32 || p.len() < 2 * d => quantized(experts_norm(dims, x, p)?),
        None => {
            let stats = row_stats(x, d, dims.eps);
            let xq = normalize_quantize_rows(x, &p[..d], &p[d..2 * d], &stats, kernel)?;
            (Normed { stats, out: Vec::new() }, Some(xq))
        }
    })
}

/// How a forward runs: with the residual added, and keeping what a backward needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pass {
    pub(crate) residual: bool,
    pub(crate) keep: bool,
}

struct ExpertsOp {
    dims: ExpertsDims,
    quant: ExpertsQuant,
    residual: bool,
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

fn gemm(product: Product, a: Matrix, b: Matrix) -> Result<Vec<f32>> {
    Ok(product.run(a, b)?.0)
}

fn check(dims: &ExpertsDims, x_len: usize, gates: Option<&[f32]>, p_len: usize) -> Result<usize> {
    let rows = x_len / dims.d.max(1);
    if dims.d == 0 || rows * dims.d != x_len {
        candle_core::bail!("experts: {x_len} values are not rows of {}", dims.d);
    }
    match gates {
        Some(g) if g.len() != rows * dims.experts => {
            candle_core::bail!("experts: {} gates for {rows} rows of {} experts", g.len(), dims.experts)
        }
        None if dims.experts != 1 => candle_core::bail!("experts: {} experts need gates", dims.experts),
        _ => {}
    }
    if p_len != dims.packed_len() {
        candle_core::bail!("experts: {p_len} packed parameters, expected {}", dims.packed_len());
    }
    Ok(rows)
}

/// `rows` of a (_, width) matrix, copied out in order.
fn gather(m: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&m[r * width..(r + 1) * width]);
    }
    out
}

/// The gate of expert j for each of its rows (1 without gates).
fn row_gates(gates: Option<&[f32]>, experts: usize, j: usize, rows: &Option<Vec<usize>>, n: usize) -> Vec<f32> {
    match (gates, rows) {
        (Some(g), Some(rs)) => rs.iter().map(|&r| g[r * experts + j]).collect(),
        _ => vec![1.0; n],
    }
}

simd_dispatch! {
    pub(crate) fn experts_forward(dims: &ExpertsDims, quant: &ExpertsQuant, pass: Pass, x: &[f32], ln: Option<Normed>, gates: Option<&[f32]>, p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let rows = check(dims, x.len(), gates, p.len())?;
        let (d, e, ne) = (dims.d, dims.hidden, dims.experts);
        let (up, down) = p[2 * d..].split_at(ne * e * d);
        let Pass { residual, keep } = pass;
        let (ln, int8_in) = experts_input(dims, quant, keep, x, ln, p)?;
        let normed = &ln.out;
        // Without gates there is one expert (checked above); an integer down projection then
        // writes the output itself, adding the residual as it stores, with no copy of x first.
        let down_writes_out = gates.is_none() && quant.down.first().is_some_and(Option::is_some);
        let mut out = match (down_writes_out, residual) {
            (true, _) => Vec::new(),
            (false, true) => x.to_vec(),
            (false, false) => vec![0f32; x.len()],
        };
        let mut experts = Vec::with_capacity(ne);
        for j in 0..ne {
            let routed_rows = gates.map(|g| (0..rows).filter(|&r| g[r * ne + j] != 0.0).collect::<Vec<_>>());
            let n = routed_rows.as_ref().map_or(rows, Vec::len);
            let (xg, mut pre) = match (quant.up.get(j).and_then(Option::as_ref), &int8_in) {
                (Some(q), Some(xq)) => match &routed_rows {
                    Some(rs) => (Vec::new(), q.matmul_t_rows(&xq.gather(rs))),
                    None => (Vec::new(), q.matmul_t_rows(xq)),
                },
                (q, _) => {
                    let xg = routed_rows.as_ref().map(|rs| gather(normed, d, rs)).unwrap_or_default();
                    let xj: &[f32] = if routed_rows.is_some() { &xg } else { normed };
                    let pre = match q {
                        Some(q) => q.matmul_t(xj, n),
                        None => gemm(Product::ABt, (xj, n, d), (&up[j * e * d..(j + 1) * e * d], e, d))?,
                    };
                    (xg, pre)
                }
            };
            // Plain loops, not iterator adapters with closures, throughout these bodies: a closure
            // compiled for AVX2 cannot be inlined into std's baseline `map`/`for_each` drivers and
            // would cost a call per element.
            let hidden = if keep {
                // GELU into a fresh buffer, written once, not zeroed first; `pre` becomes GELU′
                // there (Φ(v) + v·φ(v)), all the backward needs of it, from the same erf.
                let mut hidden = Vec::with_capacity(pre.len());
                for (h, v) in hidden.spare_capacity_mut().iter_mut().zip(pre.iter_mut()) {
                    let x = *v;
                    let (t, e) = gelu_terms(x);
                    h.write(0.5 * x * t);
                    *v = gelu_grad(x, t, e);
                }
                // SAFETY: the loop wrote all pre.len() values of the capacity.
                unsafe { hidden.set_len(pre.len()) };
                hidden
            } else {
                for v in pre.iter_mut() {
                    *v = gelu(*v);
                }
                std::mem::take(&mut pre)
            };
            // Without gates every row's gate is 1: `gated` stays empty and `hidden` stands in.
            let mut gated = Vec::new();
            if gates.is_some() {
                let scale = row_gates(gates, ne, j, &routed_rows, n);
                let mut g = slots(hidden.len());
                for ((gr, hr), &s) in g.chunks_exact_mut(e.max(1)).zip(hidden.chunks_exact(e.max(1))).zip(&scale) {
                    for (o, &v) in gr.iter_mut().zip(hr) {
                        o.write(v * s);
                    }
                }
                // SAFETY: hidden holds n rows of e, one gate per row (row_gates gives n).
                gated = unsafe { written(g) };
            }
            let gated_or_hidden: &[f32] = if gates.is_some() { &gated } else { &hidden };
            let down_j = (&down[j * d * e..(j + 1) * d * e], d, e);
            let down_q = quant.down.get(j).and_then(Option::as_ref);
            match (&routed_rows, down_q) {
                (None, None) => Product::ABt.write_into((gated_or_hidden, n, e), down_j, &mut out, true)?,
                (None, Some(q)) if residual => out = q.matmul_t_plus(gated_or_hidden, n, x),
                (None, Some(q)) => out = q.matmul_t(gated_or_hidden, n),
                (Some(rs), _) => {
                    let y = match down_q {
                        Some(q) => q.matmul_t(gated_or_hidden, n),
                        None => gemm(Product::ABt, (gated_or_hidden, n, e), down_j)?,
                    };
                    for (yr, &r) in y.chunks_exact(d).zip(rs) {
                        for (o, v) in out[r * d..(r + 1) * d].iter_mut().zip(yr) {
                            *o += v;
                        }
                    }
                }
            }
            experts.push(Routed { rows: routed_rows, x: xg, dgelu: pre, hidden, gated });
        }
        Ok((out, Saved { ln, experts }))
    }
}

/// What [`experts_backward`] returns first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum InputGrad {
    /// x's gradient, with (`true`) or without the residual's.
    X { residual: bool },
    /// The LayerNorm output's gradient, before the LayerNorm's backward: for a caller that adds
    /// the gradient of another reader of the same LayerNorm (the MoE router) and runs the
    /// LayerNorm's backward itself. The LayerNorm's parameter gradients are then left zero.
    Normed,
}

simd_dispatch! {
    /// Gradients of x (or of the LayerNorm's output, see [`InputGrad`]), of the gates (when given)
    /// and of the packed parameters.
    pub(crate) fn experts_backward(dims: &ExpertsDims, want: InputGrad, x: &[f32], gates: Option<&[f32]>, p: &[f32], s: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let rows = check(dims, x.len(), gates, p.len())?;
        let (d, e, ne) = (dims.d, dims.hidden, dims.experts);
        let ln_w = &p[..d];
        let (up, down) = p[2 * d..].split_at(ne * e * d);
        let mut dp = vec![0f32; p.len()];
        let mut dgates = vec![0f32; if gates.is_some() { rows * ne } else { 0 }];
        let mut dnormed = vec![0f32; rows * d];
        for (j, r) in s.experts.iter().enumerate() {
            let n = r.rows.as_ref().map_or(rows, Vec::len);
            if n == 0 {
                continue;
            }
            let gg = r.rows.as_ref().map(|rs| gather(g, d, rs)).unwrap_or_default();
            let gj: &[f32] = if r.rows.is_some() { &gg } else { g };
            let xj: &[f32] = if r.rows.is_some() { &r.x } else { &s.ln.out };
            let (d_up, d_down) = dp[2 * d..].split_at_mut(ne * e * d);
            let gated: &[f32] = if r.gated.is_empty() { &r.hidden } else { &r.gated };
            Product::AtB.write_into((gj, n, d), (gated, n, e), &mut d_down[j * d * e..(j + 1) * d * e], false)?;
            let mut dpre = gemm(Product::AB, (gj, n, d), (&down[j * d * e..(j + 1) * d * e], d, e))?;
            if let Some(rs) = &r.rows {
                for ((dr, hr), &row) in dpre.chunks_exact(e).zip(r.hidden.chunks_exact(e)).zip(rs) {
                    dgates[row * ne + j] = dot_lanes(dr, hr);
                }
            }
            let scale = row_gates(gates, ne, j, &r.rows, n);
            for ((dr, gr), &sc) in dpre.chunks_exact_mut(e).zip(r.dgelu.chunks_exact(e)).zip(&scale) {
                for (dv, &dg) in dr.iter_mut().zip(gr) {
                    *dv *= sc * dg;
                }
            }
            Product::AtB.write_into((&dpre, n, e), (xj, n, d), &mut d_up[j * e * d..(j + 1) * e * d], false)?;
            let up_j = (&up[j * e * d..(j + 1) * e * d], e, d);
            match &r.rows {
                None => Product::AB.write_into((&dpre, n, e), up_j, &mut dnormed, true)?,
                Some(rs) => {
                    let dx = gemm(Product::AB, (&dpre, n, e), up_j)?;
                    for (dr, &row) in dx.chunks_exact(d).zip(rs) {
                        for (o, v) in dnormed[row * d..(row + 1) * d].iter_mut().zip(dr) {
                            *o += v;
                        }
                    }
                }
            }
        }
        let InputGrad::X { residual } = want else { return Ok((dnormed, dgates, dp)) };
        let (dx, dw, db) = layer_norm_bwd(x, ln_w, &s.ln.stats, &dnormed, residual.then_some(g))?;
        dp[..d].copy_from_slice(&dw);
        dp[d..2 * d].copy_from_slice(&db);
        Ok((dx, dgates, dp))
    }
}

impl ExpertsOp {
    fn fwd(&self, x: &[f32], gates: Option<&[f32]>, p: &[f32]) -> Result<Vec<f32>> {
        let (out, saved) = experts_forward(
            &self.dims,
            &self.quant,
            Pass { residual: self.residual, keep: self.keep },
            x,
            None,
            gates,
            p,
        )?;
        if self.keep {
            *self.saved.lock().map_err(|_| candle_core::Error::Msg("experts: a backward pass panicked".into()))? =
                Some(saved);
        }
        Ok(out)
    }

    fn bwd_values(
        &self,
        x: &Tensor,
        gates: Option<&Tensor>,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let kept =
            self.saved.lock().map_err(|_| candle_core::Error::Msg("experts: a forward pass panicked".into()))?.take();
        let gate_values = gates.map(|t| t.contiguous()?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let gt = gate_values.as_deref();
        let (dx, dg, dp) = with_values(x, "experts", |xs| {
            with_values(p, "experts", |ps| {
                with_values(g, "experts", |gs| {
                    // A second backward through the same graph finds the intermediates gone: recompute them.
                    let saved = match kept {
                        Some(s) => s,
                        None => {
                            experts_forward(
                                &self.dims,
                                &self.quant,
                                Pass { residual: self.residual, keep: true },
                                xs,
                                None,
                                gt,
                                ps,
                            )?
                            .1
                        }
                    };
                    experts_backward(&self.dims, InputGrad::X { residual: self.residual }, xs, gt, ps, &saved, gs)
                })
            })
        })?;
        let dev = x.device();
        let dgates = gates.map(|t| Tensor::from_vec(dg, t.shape(), dev)).transpose()?;
        Ok((Tensor::from_vec(dx, x.shape(), dev)?, dgates, Tensor::from_vec(dp, p.shape(), dev)?))
    }
}

impl CustomOp2 for ExpertsOp {
    fn name(&self) -> &'static str {
        "ffn"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let out = self.fwd(f32s(s1, l1, name)?, None, f32s(s2, l2, name)?)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, p: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, _, dp) = self.bwd_values(x, None, p, g)?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for ExpertsOp {
    fn name(&self) -> &'static str {
        "gated-experts"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        let out = self.fwd(f32s(s1, l1, name)?, Some(f32s(s2, l2, name)?), f32s(s3, l3, name)?)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gates: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, dp) = self.bwd_values(x, Some(gates), p, g)?;
        Ok((Some(dx), dg, Some(dp)))
    }
}

/// The layer on f32 rows x (rows, d) with packed parameters: `x + Σ_j gate_j · expert_j(LN(x))`
/// (`residual`) or the sum alone; without gates there must be one expert, weighted 1. `train`
/// keeps what the backward pass needs; `quant` (inference only) runs the experts' weights on their
/// integer kernels.
pub fn experts(
    x: &Tensor,
    gates: Option<&Tensor>,
    packed: &Tensor,
    dims: ExpertsDims,
    quant: ExpertsQuant,
    residual: bool,
    train: bool,
) -> Result<Tensor> {
    if train && quant.any() {
        candle_core::bail!("experts: quantized weights are for inference; train the f32 model");
    }
    let op = ExpertsOp { dims, quant, residual, keep: train, saved: Mutex::new(None) };
    match gates {
        Some(g) => x.contiguous()?.apply_op3(&g.contiguous()?, &packed.contiguous()?, op),
        None if dims.experts == 1 => x.contiguous()?.apply_op2(&packed.contiguous()?, op),
        None => candle_core::bail!("experts: {} experts need gates", dims.experts),
    }
}
