//! A pre-LN feed-forward layer — LayerNorm, then E experts Linear(d→e)–GELU–Linear(e→d) weighted
//! by per-row gates and summed, then the residual — as one autograd node over f32 rows. With one
//! expert and no gates it is Itera-Lite's dense FFN; with the router's gates it is the MoE layer's
//! dense training form (gates are zero off each row's top-k, so the sum is the sparse one).
//!
//! Why one node: as for the SSM block (see `ssm_block`), candle's backward sums every node's input
//! gradients into freshly zeroed buffers, and the layer's (rows, E·e) activations made that
//! bookkeeping a large share of a training step. Parameters travel packed ([`pack`]): LayerNorm
//! weight and bias, the experts' up weights stacked (E·e, d), their down weights side by side
//! (d, E·e). Tested against the op-by-op layers and their autograd gradients.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::*;
use crate::linear_op::{Matrix, Product};
use crate::nn::{layer_norm_bwd, row_stats};

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
    /// LayerNorm weight, bias; up (E·e, d); down (d, E·e).
    fn sizes(&self) -> [usize; 4] {
        [self.d, self.d, self.width() * self.d, self.d * self.width()]
    }
    fn packed_len(&self) -> usize {
        self.sizes().iter().sum()
    }
}

/// The layer's parameters as one vector: LayerNorm weight and bias, the up weights stacked
/// (`Tensor::cat(ups, 0)`), the down weights side by side (`Tensor::cat(downs, 1)`).
pub fn pack(dims: &ExpertsDims, ln_w: &Tensor, ln_b: &Tensor, ups: &[&Tensor], downs: &[&Tensor]) -> Result<Tensor> {
    let up = Tensor::cat(ups, 0)?;
    let down = Tensor::cat(downs, 1)?;
    let parts = [ln_w, ln_b, &up, &down];
    let flat = parts
        .iter()
        .zip(dims.sizes())
        .map(|(t, size)| {
            if t.elem_count() != size {
                candle_core::bail!("experts: a parameter of shape {:?} where {size} values were expected", t.dims());
            }
            t.flatten_all()
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

struct Saved {
    stats: Vec<(f32, f32)>,
    normed: Vec<f32>,
    pre: Vec<f32>,
    hidden: Vec<f32>,
    gated: Vec<f32>,
}

struct ExpertsOp {
    dims: ExpertsDims,
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
    if let Some(g) = gates {
        if g.len() != rows * dims.experts {
            candle_core::bail!("experts: {} gates for {rows} rows of {} experts", g.len(), dims.experts);
        }
    }
    if p_len != dims.packed_len() {
        candle_core::bail!("experts: {p_len} packed parameters, expected {}", dims.packed_len());
    }
    Ok(rows)
}

simd_dispatch! {
    fn experts_forward(dims: &ExpertsDims, residual: bool, x: &[f32], gates: Option<&[f32]>, p: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let rows = check(dims, x.len(), gates, p.len())?;
        let (d, e, w) = (dims.d, dims.hidden, dims.width());
        let (ln_w, rest) = p.split_at(d);
        let (ln_b, rest) = rest.split_at(d);
        let (up, down) = rest.split_at(w * d);
        let stats = row_stats(x, d, dims.eps);
        let mut normed = vec![0f32; x.len()];
        for ((out, row), &(mean, rstd)) in normed.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(&stats) {
            for (((o, &v), &lw), &lb) in out.iter_mut().zip(row).zip(ln_w).zip(ln_b) {
                *o = (v - mean) * rstd * lw + lb;
            }
        }
        let pre = gemm(Product::ABt, (&normed, rows, d), (up, w, d))?;
        let mut hidden = vec![0f32; rows * w];
        let mut gated = vec![0f32; rows * w];
        let per = rows_per_task(w);
        for_chunks2(&mut hidden, per * w, &mut gated, per * w, |i, hs, gs| {
            for (r, ((hr, gr), pr)) in hs.chunks_exact_mut(w).zip(gs.chunks_exact_mut(w)).zip(pre[i * per * w..].chunks_exact(w)).enumerate() {
                let row = i * per + r;
                for ((h, &v), g) in hr.iter_mut().zip(pr).zip(gr.iter_mut()) {
                    *h = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    *g = *h;
                }
                if let Some(gt) = gates {
                    for (j, ge) in gr.chunks_exact_mut(e).enumerate() {
                        let s = gt[row * dims.experts + j];
                        ge.iter_mut().for_each(|v| *v *= s);
                    }
                }
            }
        });
        let mut out = if residual { x.to_vec() } else { vec![0f32; x.len()] };
        Product::ABt.write_into((&gated, rows, w), (down, d, w), &mut out, residual)?;
        Ok((out, Saved { stats, normed, pre, hidden, gated }))
    }
}

simd_dispatch! {
    /// Gradients of x, of the gates (when given) and of the packed parameters.
    fn experts_backward(dims: &ExpertsDims, residual: bool, x: &[f32], gates: Option<&[f32]>, p: &[f32], s: &Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let rows = check(dims, x.len(), gates, p.len())?;
        let (d, e, w, ne) = (dims.d, dims.hidden, dims.width(), dims.experts);
        let (ln_w, rest) = p.split_at(d);
        let (up, down) = rest[d..].split_at(w * d);
        let mut dp = vec![0f32; p.len()];
        {
            let (_, rest) = dp.split_at_mut(2 * d);
            let (_, d_down) = rest.split_at_mut(w * d);
            Product::AtB.write_into((g, rows, d), (&s.gated, rows, w), d_down, false)?;
        }
        // dgated → the gates' gradient and the GELU input's.
        let mut dpre = gemm(Product::AB, (g, rows, d), (down, d, w))?;
        let mut dgates = vec![0f32; if gates.is_some() { rows * ne } else { 0 }];
        if let Some(gt) = gates {
            for (r, (dr, hr)) in dpre.chunks_exact(w).zip(s.hidden.chunks_exact(w)).enumerate() {
                for (j, (dj, hj)) in dr.chunks_exact(e).zip(hr.chunks_exact(e)).enumerate() {
                    dgates[r * ne + j] = dj.iter().zip(hj).map(|(a, b)| a * b).sum::<f32>();
                }
            }
            let per = rows_per_task(w);
            for_chunks(&mut dpre, per * w, |i, ch| {
                for (r, dr) in ch.chunks_exact_mut(w).enumerate() {
                    let row = i * per + r;
                    for (j, dj) in dr.chunks_exact_mut(e).enumerate() {
                        let s = gt[row * ne + j];
                        dj.iter_mut().for_each(|v| *v *= s);
                    }
                }
            });
        }
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for_chunks(&mut dpre, 16_384, |i, ch| {
            for (dv, &v) in ch.iter_mut().zip(&s.pre[i * 16_384..]) {
                let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                *dv *= cdf + v * INV_SQRT_2PI * exp(-0.5 * v * v);
            }
        });
        {
            let (_, rest) = dp.split_at_mut(2 * d);
            let (d_up, _) = rest.split_at_mut(w * d);
            Product::AtB.write_into((&dpre, rows, w), (&s.normed, rows, d), d_up, false)?;
        }
        let dnormed = gemm(Product::AB, (&dpre, rows, w), (up, w, d))?;
        let mut dx = if residual { g.to_vec() } else { vec![0f32; x.len()] };
        let (dw, db) = layer_norm_bwd(x, ln_w, &s.stats, &dnormed, &mut dx);
        dp[..d].copy_from_slice(&dw);
        dp[d..2 * d].copy_from_slice(&db);
        Ok((dx, dgates, dp))
    }
}

impl ExpertsOp {
    fn fwd(&self, x: &[f32], gates: Option<&[f32]>, p: &[f32]) -> Result<Vec<f32>> {
        let (out, saved) = experts_forward(&self.dims, self.residual, x, gates, p)?;
        if self.keep {
            *self.saved.lock().map_err(|_| candle_core::Error::Msg("experts: a backward pass panicked".into()))? = Some(saved);
        }
        Ok(out)
    }

    fn bwd_values(&self, x: &Tensor, gates: Option<&Tensor>, p: &Tensor, g: &Tensor) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let kept = self.saved.lock().map_err(|_| candle_core::Error::Msg("experts: a forward pass panicked".into()))?.take();
        let gate_values = gates.map(|t| t.contiguous()?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let gt = gate_values.as_deref();
        let (dx, dg, dp) = with_values(x, "experts", |xs| {
            with_values(p, "experts", |ps| {
                with_values(g, "experts", |gs| {
                    // A second backward through the same graph finds the intermediates gone: recompute them.
                    let saved = match kept {
                        Some(s) => s,
                        None => experts_forward(&self.dims, self.residual, xs, gt, ps)?.1,
                    };
                    experts_backward(&self.dims, self.residual, xs, gt, ps, &saved, gs)
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
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        let out = self.fwd(f32s(s1, l1, name)?, Some(f32s(s2, l2, name)?), f32s(s3, l3, name)?)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, gates: &Tensor, p: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, dp) = self.bwd_values(x, Some(gates), p, g)?;
        Ok((Some(dx), dg, Some(dp)))
    }
}

/// The layer on f32 rows x (rows, d) with packed parameters: `x + Σ_j gate_j · expert_j(LN(x))`
/// (`residual`) or the sum alone; without gates there must be one expert, weighted 1. `train`
/// keeps what the backward pass needs.
pub fn experts(x: &Tensor, gates: Option<&Tensor>, packed: &Tensor, dims: ExpertsDims, residual: bool, train: bool) -> Result<Tensor> {
    let op = ExpertsOp { dims, residual, keep: train, saved: Mutex::new(None) };
    match gates {
        Some(g) => x.contiguous()?.apply_op3(&g.contiguous()?, &packed.contiguous()?, op),
        None if dims.experts == 1 => x.contiguous()?.apply_op2(&packed.contiguous()?, op),
        None => candle_core::bail!("experts: {} experts need gates", dims.experts),
    }
}
