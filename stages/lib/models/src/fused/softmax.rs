//! Softmax nodes: the Transformer's causal attention softmax and the next-token cross-entropy.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::*;

// ---------------------------------------------------------------- causal attention softmax

/// softmax(scale · scores) over each row's visible keys: query i of a block of `l` (absolute
/// position offset + i) sees keys 0..=offset+i; the rest get probability 0. Op by op: a scale,
/// a mask add and a softmax of ~5 nodes on (batch, heads, l, keys) tensors.
struct CausalSoftmax {
    scale: f32,
    offset: usize,
    l: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let keys = l.shape().dims().last().copied().unwrap_or(1);
        if keys < self.offset + self.l {
            candle_core::bail!("causal softmax: {keys} keys for queries up to position {}", self.offset + self.l - 1);
        }
        let mut y = vec![0f32; x.len()];
        for_chunks(&mut y, keys * self.l, |bi, yb| {
            let xb = &x[bi * keys * self.l..(bi + 1) * keys * self.l];
            for i in 0..self.l {
                let visible = self.offset + i + 1;
                let (xr, yr) = (&xb[i * keys..i * keys + visible], &mut yb[i * keys..i * keys + visible]);
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = exp(self.scale * (v - max));
                }
                let inv = 1.0 / sum_lanes(yr);
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

/// dx = scale · y ⊙ (g − Σ g ⊙ y) per row (masked entries have y = 0, so dx = 0).
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let keys = l1.shape().dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; y.len()];
        let per = rows_per_task(keys);
        for_chunks(&mut dx, per * keys, |i, d| {
            let (y, g) = (&y[i * per * keys..], &g[i * per * keys..]);
            let mut tmp = vec![0f32; keys];
            for ((d, y), g) in d.chunks_exact_mut(keys).zip(y.chunks_exact(keys)).zip(g.chunks_exact(keys)) {
                for ((t, &y), &g) in tmp.iter_mut().zip(y).zip(g) {
                    *t = y * g;
                }
                let dot = sum_lanes(&tmp);
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = self.scale * y * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Attention probabilities from raw scores (…, l queries, keys) with causal masking; the
/// queries sit at absolute positions offset..offset+l.
pub fn causal_softmax(scores: &Tensor, scale: f32, offset: usize) -> Result<Tensor> {
    let dims = scores.dims();
    let l = dims.get(dims.len().wrapping_sub(2)).copied().unwrap_or(1);
    scores.contiguous()?.apply_op1(CausalSoftmax { scale, offset, l })
}

// ---------------------------------------------------------------- next-token cross-entropy

/// Mean over (b, t < l−1) of −log softmax(logits[b, t])[ids[b, t+1]]: position t predicts
/// token t+1 (one shift). Op by op this was a narrow, a copy, a log-softmax of ~6 nodes and a
/// gather over the (batch, seq, vocab) logits.
struct NextTokenLoss {
    /// ids (b, l), row-major.
    ids: Vec<u32>,
    l: usize,
}

impl NextTokenLoss {
    fn count(&self) -> usize {
        (self.ids.len() / self.l) * (self.l - 1)
    }
}

/// (row of logits, its target) for every scored position of ids (b, l): position t predicts t+1.
fn scored(ids: &[u32], l: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..ids.len() / l).flat_map(move |bi| (0..l - 1).map(move |t| (bi * l + t, ids[bi * l + t + 1] as usize)))
}

/// exp(v − max) of one row into `out`; returns (max, Σ out).
#[inline(always)]
fn exp_shifted(row: &[f32], out: &mut [f32]) -> (f32, f32) {
    let max = max_lanes(row);
    for (t, &v) in out.iter_mut().zip(row) {
        *t = exp(v - max);
    }
    (max, sum_lanes(out))
}

simd_dispatch! {
    /// Σ over the scored rows of −log softmax(row)[target], in f64 (targets checked by the caller).
    pub(crate) fn nll_sum(x: &[f32], v: usize, ids: &[u32], l: usize) -> f64 {
        let mut tmp = vec![0f32; v];
        let mut total = 0f64;
        for (row, target) in scored(ids, l) {
            let r = &x[row * v..(row + 1) * v];
            let (max, sum) = exp_shifted(r, &mut tmp);
            total += (max + sum.ln() - r[target]) as f64;
        }
        total
    }
}

simd_dispatch! {
    /// dx = (softmax(row) − one-hot(target)) · scale on the scored rows; other rows untouched.
    pub(crate) fn nll_grad(x: &[f32], v: usize, ids: &[u32], l: usize, scale: f32, dx: &mut [f32]) -> () {
        for (row, target) in scored(ids, l) {
            let (r, d) = (&x[row * v..(row + 1) * v], &mut dx[row * v..(row + 1) * v]);
            let (_, sum) = exp_shifted(r, d);
            let k = scale / sum;
            d.iter_mut().for_each(|d| *d *= k);
            d[target] -= scale;
        }
    }
}

impl CustomOp1 for NextTokenLoss {
    fn name(&self) -> &'static str {
        "next-token-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let v = l.shape().dims().last().copied().unwrap_or(1);
        if x.len() != self.ids.len() * v {
            candle_core::bail!("next-token loss: logits {:?} do not match {} ids", l.shape(), self.ids.len());
        }
        if let Some((_, target)) = scored(&self.ids, self.l).find(|&(_, t)| t >= v) {
            candle_core::bail!("next-token loss: token id {target} is outside the vocabulary of {v}");
        }
        let total = nll_sum(x, v, &self.ids, self.l);
        Ok((CpuStorage::F32(vec![(total / self.count() as f64) as f32]), Shape::from(())))
    }
    fn bwd(&self, logits: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let scale = g.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / self.count() as f32;
        Ok(Some(logits.apply_op1_no_bwd(&NextTokenLossGrad { loss: self, scale })?))
    }
}

/// (softmax − one-hot(target)) · scale on scored rows, 0 on each sequence's last position.
struct NextTokenLossGrad<'a> {
    loss: &'a NextTokenLoss,
    scale: f32,
}

impl CustomOp1 for NextTokenLossGrad<'_> {
    fn name(&self) -> &'static str {
        "next-token-cross-entropy-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let v = l.shape().dims().last().copied().unwrap_or(1);
        if x.len() != self.loss.ids.len() * v {
            candle_core::bail!("next-token loss: logits {:?} do not match {} ids", l.shape(), self.loss.ids.len());
        }
        let mut dx = vec![0f32; x.len()];
        nll_grad(x, v, &self.loss.ids, self.loss.l, self.scale, &mut dx);
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// Next-token cross-entropy of logits (batch, seq, vocab) against ids (batch, seq), as one node.
pub fn next_token_cross_entropy(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, l) = ids.dims2()?;
    if l < 2 {
        candle_core::bail!("need at least 2 tokens per sequence for a next-token loss");
    }
    let ids: Vec<u32> = ids.to_dtype(candle_core::DType::U32)?.flatten_all()?.to_vec1()?;
    debug_assert_eq!(ids.len(), b * l);
    logits.contiguous()?.apply_op1(NextTokenLoss { ids, l })
}
