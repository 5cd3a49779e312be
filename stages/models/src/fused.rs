//! The SSM block's elementwise chains as single autograd nodes (f32, CPU).
//!
//! Op by op, the depthwise conv + SiLU is ~14 graph nodes on (batch, time, d_inner) tensors, the
//! step size mean(softplus(· + bias)) 9, the output gate 3; in backward each node allocates its
//! gradient buffers and sums into them, and that bookkeeping — not arithmetic — dominated the
//! training step. Each function here is one node with a hand-written backward (itself run as
//! no-grad ops) and is tested against the op-by-op form and its autograd gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: contiguous f32 tensors expected"),
    }
}

/// e^x, branch-free so the loops calling it vectorize (libm's expf is a call per element and was
/// ~7 % of a training step). Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7
/// Taylor polynomial (truncation < 1e-8 relative) and 2^n built in the exponent bits; within
/// 2 ulp of the exact value on [−87, 88] (tested), saturating outside.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5·2^23: adding it leaves round(x·log2 e) in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_n = f32::from_bits(((t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32 + 127) as u32) << 23);
    p * two_n
}

/// ln(1 + y) for y in [0, 1] as 2·atanh(y / (2 + y)) (series to s^13, s ≤ 1/3): accurate for
/// tiny y too, and branch-free.
#[inline(always)]
fn ln_1p_unit(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let s2 = s * s;
    2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0)))))))
}

/// Σ v in 8 interleaved partial sums (vectorizes; a fixed order, so still deterministic).
fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for ch in &mut chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

/// Rows of `len` values per parallel task: large enough to amortise the hand-off.
fn rows_per_task(len: usize) -> usize {
    (16_384 / len.max(1)).max(1)
}

/// Elements below which an op runs inline: handing a job to the rayon pool costs tens of µs,
/// more than a generation step's worth of these ops (it halved KV-cache decoding).
const PARALLEL_MIN: usize = 32_768;

/// `f(i, chunk)` for the `size`-long chunks of `out`: on the rayon pool when there are several
/// threads and enough work, inline otherwise. Chunks never share outputs, so the result is the
/// same either way.
pub(crate) fn for_chunks<T: Send>(out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let size = size.max(1);
    if rayon::current_num_threads() > 1 && out.len() > size && out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

// ---------------------------------------------------------------- depthwise causal conv + SiLU

/// Taps (c, k) as (k, c), so the per-channel loops below read both operands contiguously (and
/// vectorize; the (c, k) order made them gathers).
fn taps_by_offset(w: &[f32], c: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for ch in 0..c {
        for j in 0..k {
            t[j * c + ch] = w[ch * k + j];
        }
    }
    t
}

/// y[b,t,c] = bias[c] + Σ_j w[c,j] · x[b, t+j-(k-1), c] (zero before the start).
fn conv_pre(x: &[f32], w: &[f32], bias: &[f32], l: usize, c: usize, k: usize, out: &mut [f32]) {
    let wt = taps_by_offset(w, c, k);
    for_chunks(out, l * c, |bi, o| {
        let xb = &x[bi * l * c..(bi + 1) * l * c];
        for t in 0..l {
            let row = &mut o[t * c..(t + 1) * c];
            row.copy_from_slice(bias);
            for j in 0..k {
                let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                let xr = &xb[src * c..(src + 1) * c];
                for ((r, &w), &x) in row.iter_mut().zip(&wt[j * c..(j + 1) * c]).zip(xr) {
                    *r += w * x;
                }
            }
        }
    });
}

/// Rows are (batch · seq_len) time steps of `c` channels; the conv runs along each sequence.
struct ConvSilu {
    l: usize,
}

/// (seq_len, channels) of a conv input laid out as rows of channels.
fn seq_dims(layout: &Layout, l: usize, op: &str) -> Result<(usize, usize)> {
    let dims = layout.shape().dims();
    let c = dims.last().copied().unwrap_or(1);
    let rows = layout.shape().elem_count() / c.max(1);
    if l == 0 || rows % l != 0 {
        candle_core::bail!("{op}: {rows} rows are not whole sequences of {l}");
    }
    Ok((l, c))
}

impl CustomOp3 for ConvSilu {
    fn name(&self) -> &'static str {
        "causal-conv-silu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let (l, c) = seq_dims(l1, self.l, self.name())?;
        let k = w.len() / c.max(1);
        let mut y = vec![0f32; x.len()];
        conv_pre(x, w, bias, l, c, k, &mut y);
        for_chunks(&mut y, 16_384, |_, ch| ch.iter_mut().for_each(|v| *v *= sigmoid(*v)));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, bias: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        // Gradient at the pre-activation, recomputing it (cheaper than keeping it alive).
        let l = self.l;
        let gy = x.apply_op3_no_bwd(w, bias, &ConvSiluPreGrad { g: g.clone(), l })?;
        let dx = gy.apply_op2_no_bwd(w, &ConvTranspose { l })?;
        let (c, k) = w.dims2()?;
        let dwb = x.apply_op2_no_bwd(&gy, &ConvParamGrad { k, l })?; // (c, k + 1): taps, then bias
        let dw = dwb.narrow(1, 0, k)?;
        let db = dwb.narrow(1, k, 1)?.reshape(c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// g ⊙ silu'(conv(x)): silu'(v) = s(v)·(1 + v·(1 − s(v))).
struct ConvSiluPreGrad {
    g: Tensor,
    l: usize,
}

impl CustomOp3 for ConvSiluPreGrad {
    fn name(&self) -> &'static str {
        "causal-conv-silu-pre-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let (l, c) = seq_dims(l1, self.l, self.name())?;
        let k = w.len() / c.max(1);
        let mut pre = vec![0f32; x.len()];
        conv_pre(x, w, bias, l, c, k, &mut pre);
        let (gs, gl) = self.g.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else { candle_core::bail!("{}: CPU tensors expected", self.name()) };
        let g = f32s(gs, gl, self.name())?;
        for_chunks(&mut pre, 16_384, |i, p| {
            for (v, g) in p.iter_mut().zip(&g[i * 16_384..]) {
                let s = sigmoid(*v);
                *v = g * s * (1.0 + *v * (1.0 - s));
            }
        });
        Ok((CpuStorage::F32(pre), l1.shape().clone()))
    }
}

/// dx[b,s,c] = Σ_j gy[b, s+(k-1)-j, c] · w[c,j] (within the sequence).
struct ConvTranspose {
    l: usize,
}

impl CustomOp2 for ConvTranspose {
    fn name(&self) -> &'static str {
        "causal-conv-transpose"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gy, w) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (l, c) = seq_dims(l1, self.l, self.name())?;
        let k = w.len() / c.max(1);
        let wt = taps_by_offset(w, c, k);
        let mut dx = vec![0f32; gy.len()];
        for_chunks(&mut dx, l * c, |bi, o| {
            let gb = &gy[bi * l * c..(bi + 1) * l * c];
            for s in 0..l {
                let row = &mut o[s * c..(s + 1) * c];
                for j in 0..k {
                    let t = s + (k - 1) - j;
                    if t >= l {
                        continue;
                    }
                    let gr = &gb[t * c..(t + 1) * c];
                    for ((r, &w), &g) in row.iter_mut().zip(&wt[j * c..(j + 1) * c]).zip(gr) {
                        *r += w * g;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (c, k+1): dw[c,j] = Σ_{b,t} gy[b,t,c] · x[b, t+j-(k-1), c]; last column db[c] = Σ gy[b,t,c].
struct ConvParamGrad {
    k: usize,
    l: usize,
}

impl CustomOp2 for ConvParamGrad {
    fn name(&self) -> &'static str {
        "causal-conv-param-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (l, c) = seq_dims(l1, self.l, self.name())?;
        let b = x.len() / (l * c).max(1);
        let k = self.k;
        // Per sequence partial sums in f64 (summed over b·l terms), then reduced in order.
        // Each holds (k + 1) rows of c: one per tap offset, then the bias; transposed at the end.
        let mut partial = vec![0f64; b * (k + 1) * c];
        for_chunks(&mut partial, (k + 1) * c, |bi, acc| {
                let (xb, gb) = (&x[bi * l * c..(bi + 1) * l * c], &gy[bi * l * c..(bi + 1) * l * c]);
                for t in 0..l {
                    let gr = &gb[t * c..(t + 1) * c];
                    for j in 0..k {
                        let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                        let xr = &xb[src * c..(src + 1) * c];
                        for ((a, &g), &x) in acc[j * c..(j + 1) * c].iter_mut().zip(gr).zip(xr) {
                            *a += (g * x) as f64;
                        }
                    }
                    for (a, &g) in acc[k * c..].iter_mut().zip(gr) {
                        *a += g as f64;
                    }
                }
        });
        let mut sum = vec![0f64; (k + 1) * c];
        for p in partial.chunks_exact((k + 1) * c) {
            for (o, v) in sum.iter_mut().zip(p) {
                *o += v;
            }
        }
        let mut out = vec![0f32; c * (k + 1)];
        for j in 0..=k {
            for ch in 0..c {
                out[ch * (k + 1) + j] = sum[j * c + ch] as f32;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((c, k + 1))))
    }
}

/// silu(depthwise causal conv1d(x) + bias) for x (batch, time, channels) — or its rows flattened
/// to (batch · time, channels) — over sequences of `seq_len`; taps w (channels, k).
pub fn causal_conv_silu(x: &Tensor, seq_len: usize, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &bias.contiguous()?, ConvSilu { l: seq_len })
}

/// The op-by-op form: the reference in tests, and the path for other dtypes.
pub fn causal_conv_silu_ops(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, l, _) = x.dims3()?;
    let k = w.dim(1)?;
    let xp = x.pad_with_zeros(1, k - 1, 0)?;
    let mut y = bias.unsqueeze(0)?.unsqueeze(0)?.broadcast_as(x.shape())?.clone();
    for j in 0..k {
        let tap = w.narrow(1, j, 1)?.squeeze(1)?;
        y = (y + xp.narrow(1, j, l)?.broadcast_mul(&tap)?)?;
    }
    y.silu()
}

// ---------------------------------------------------------------- Δ = mean(softplus(x))

/// softplus(v) = max(v, 0) + log(1 + e^{−|v|}).
#[inline(always)]
fn softplus(v: f32) -> f32 {
    v.max(0.0) + ln_1p_unit(exp(-v.abs()))
}

/// mean_c softplus(x[row, c] + bias[c]) per row.
struct SoftplusMean;

impl CustomOp2 for SoftplusMean {
    fn name(&self) -> &'static str {
        "softplus-mean"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut dims = l1.shape().dims().to_vec();
        let c = dims.pop().unwrap_or(1);
        if bias.len() != c {
            candle_core::bail!("softplus-mean: bias of {} for rows of {c}", bias.len());
        }
        let mut out = vec![0f32; x.len() / c.max(1)];
        let per = rows_per_task(c);
        for_chunks(&mut out, per, |i, o| {
            let xr = &x[i * per * c..];
            let mut tmp = vec![0f32; c];
            for (o, row) in o.iter_mut().zip(xr.chunks_exact(c)) {
                // Evaluated into a buffer, then summed in 8 lanes: a running f32 sum cannot be
                // reordered, so the softplus inside it would stay scalar.
                for ((t, &v), b) in tmp.iter_mut().zip(row).zip(bias) {
                    *t = softplus(v + b);
                }
                *o = sum_lanes(&tmp) / c as f32;
            }
        });
        dims.push(1);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
    fn bwd(&self, x: &Tensor, bias: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(bias, &g.contiguous()?, &SoftplusMeanGrad)?;
        let dbias = dx.apply_op1_no_bwd(&ColumnSums)?;
        Ok((Some(dx), Some(dbias)))
    }
}

/// dx = g[row] / c · sigmoid(x + bias).
struct SoftplusMeanGrad;

impl CustomOp3 for SoftplusMeanGrad {
    fn name(&self) -> &'static str {
        "softplus-mean-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias, g) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let c = bias.len();
        let mut dx = vec![0f32; x.len()];
        let per = rows_per_task(c);
        for_chunks(&mut dx, per * c, |i, d| {
            let (xr, gr) = (&x[i * per * c..], &g[i * per..]);
            for ((d, xr), g) in d.chunks_exact_mut(c).zip(xr.chunks_exact(c)).zip(gr) {
                let scale = g / c as f32;
                for ((d, &v), b) in d.iter_mut().zip(xr).zip(bias) {
                    *d = scale * sigmoid(v + b);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Σ over rows of a (rows, c) tensor → (c). candle's `sum(0)` strides down the columns, which
/// cost more than the whole fused step-size op.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let c = l.shape().dims().last().copied().unwrap_or(1);
        let mut acc = vec![0f64; c];
        for row in x.chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        Ok((CpuStorage::F32(acc.into_iter().map(|v| v as f32).collect()), Shape::from(c)))
    }
}

/// mean over the last dim of softplus(x + bias), keeping it (size 1); bias is per last-dim entry.
pub fn softplus_mean(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, SoftplusMean)
}

// ---------------------------------------------------------------- y ⊙ silu(z)

struct Gate;

impl CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "silu-gate"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, z) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        if y.len() != z.len() {
            candle_core::bail!("silu-gate: shapes differ: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        let mut out = vec![0f32; y.len()];
        for_chunks(&mut out, 16_384, |i, o| {
            for ((o, y), z) in o.iter_mut().zip(&y[i * 16_384..]).zip(&z[i * 16_384..]) {
                *o = y * z * sigmoid(*z);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, y: &Tensor, z: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = y.apply_op3_no_bwd(z, &g.contiguous()?, &GateGrad)?; // (2, …): dy then dz
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Stacked [dy, dz]: dy = g·silu(z), dz = g·y·silu'(z).
struct GateGrad;

impl CustomOp3 for GateGrad {
    fn name(&self) -> &'static str {
        "silu-gate-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, z, g) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let n = y.len();
        let mut out = vec![0f32; 2 * n];
        let (dy, dz) = out.split_at_mut(n);
        const CH: usize = 16_384;
        for_chunks(dy, CH, |i, dy| {
            for (j, d) in dy.iter_mut().enumerate() {
                let (z, g) = (z[i * CH + j], g[i * CH + j]);
                *d = g * z * sigmoid(z);
            }
        });
        for_chunks(dz, CH, |i, dz| {
            for (j, d) in dz.iter_mut().enumerate() {
                let (y, z, g) = (y[i * CH + j], z[i * CH + j], g[i * CH + j]);
                let s = sigmoid(z);
                *d = g * y * s * (1.0 + z * (1.0 - s));
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// y ⊙ silu(z), one node.
pub fn silu_gate(y: &Tensor, z: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&z.contiguous()?, Gate)
}

// ---------------------------------------------------------------- exact (erf) GELU

/// erf(x), Abramowitz & Stegun 7.1.26 (≤ 1.5e-7, ≤ 5e-7 after f32 rounding; tested), branch-free on |x| with the sign
/// put back: libm's erff is a call per element, and candle's GELU backward is ~12 tensor ops.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        for_chunks(&mut y, 16_384, |i, y| {
            for (y, &v) in y.iter_mut().zip(&x[i * 16_384..]) {
                *y = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// g · (Φ(x) + x·φ(x)) with Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^{−x²/2}/√(2π).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for_chunks(&mut dx, 16_384, |i, d| {
            for ((d, &v), &g) in d.iter_mut().zip(&x[i * 16_384..]).zip(&g[i * 16_384..]) {
                let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                *d = g * (cdf + v * INV_SQRT_2PI * exp(-0.5 * v * v));
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// x · Φ(x), the exact GELU (PyTorch's `nn.GELU()`), one node.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

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
    /// (row of logits, its target) for every scored position.
    fn pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let b = self.ids.len() / self.l;
        (0..b).flat_map(move |bi| (0..self.l - 1).map(move |t| (bi * self.l + t, self.ids[bi * self.l + t + 1] as usize)))
    }
    fn count(&self) -> usize {
        (self.ids.len() / self.l) * (self.l - 1)
    }
}

/// max and ln Σ exp(v − max) of one row.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut tmp = vec![0f32; row.len()];
    for (t, &v) in tmp.iter_mut().zip(row) {
        *t = exp(v - max);
    }
    (max, sum_lanes(&tmp).ln())
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
        let mut total = 0f64;
        for (row, target) in self.pairs() {
            let r = &x[row * v..(row + 1) * v];
            if target >= v {
                candle_core::bail!("next-token loss: token id {target} is outside the vocabulary of {v}");
            }
            let (max, lse) = log_sum_exp(r);
            total += (max + lse - r[target]) as f64;
        }
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
        let mut dx = vec![0f32; x.len()];
        for (row, target) in self.loss.pairs() {
            let (r, d) = (&x[row * v..(row + 1) * v], &mut dx[row * v..(row + 1) * v]);
            let (max, lse) = log_sum_exp(r);
            for (d, &z) in d.iter_mut().zip(r) {
                *d = exp(z - max - lse) * self.scale;
            }
            d[target] -= self.scale;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward values and every input's gradient (against a random probe) of `fused` vs `ops`.
    fn agree(inputs: &[Var], fused: impl Fn(&[&Tensor]) -> Tensor, ops: impl Fn(&[&Tensor]) -> Tensor, tol: f32, what: &str) {
        let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (fused(&ts), ops(&ts));
        assert!(max_diff(&a, &b) < tol, "{what} forward: {}", max_diff(&a, &b));
        let probe = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).expect("fused gradient"), gb.get(v).expect("reference gradient"));
            assert_eq!(x.dims(), y.dims(), "{what} input {i}");
            let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(max_diff(x, y) / scale < tol, "{what} gradient of input {i}: {}", max_diff(x, y));
        }
    }

    fn var(shape: &[usize], mean: f32, std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn fast_exp_sigmoid_and_softplus_are_within_a_few_ulp() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let e = (x as f64).exp();
            worst.0 = worst.0.max(((exp(x) as f64) - e).abs() / e);
            let sig = 1.0 / (1.0 + (-(x as f64)).exp());
            worst.1 = worst.1.max(((sigmoid(x) as f64) - sig).abs() / sig.max(1e-30));
            let sp = (x as f64).max(0.0) + (-(x as f64).abs()).exp().ln_1p();
            worst.2 = worst.2.max(((softplus(x) as f64) - sp).abs() / sp.max(1e-30));
        }
        assert!(worst.0 < 2.5e-7 && worst.1 < 5e-7 && worst.2 < 5e-7, "relative errors exp/sigmoid/softplus: {worst:?}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite() && sigmoid(-1000.0) >= 0.0 && sigmoid(1000.0) == 1.0);
    }

    #[test]
    fn conv_silu_matches_the_op_by_op_form_and_its_gradients() {
        for (b, l, c, k) in [(3, 17, 12, 4), (2, 3, 5, 4), (1, 9, 8, 2)] {
            let vars = [var(&[b, l, c], 0.0, 1.0), var(&[c, k], 0.0, 0.5), var(&[c], 0.0, 0.3)];
            agree(&vars, |t| causal_conv_silu(t[0], l, t[1], t[2]).unwrap(), |t| causal_conv_silu_ops(t[0], t[1], t[2]).unwrap(), 1e-5, "conv+silu");
            // The same rows flattened to 2-D.
            let flat = |t: &[&Tensor]| causal_conv_silu(&t[0].reshape((b * l, c)).unwrap(), l, t[1], t[2]).unwrap().reshape((b, l, c)).unwrap();
            agree(&vars, flat, |t| causal_conv_silu_ops(t[0], t[1], t[2]).unwrap(), 1e-5, "conv+silu (2-D)");
        }
    }

    #[test]
    fn conv_silu_accepts_a_strided_view() {
        // The block feeds a narrow of in_proj's output.
        let xz = Tensor::randn(0f32, 1.0, (2, 7, 10), &Device::Cpu).unwrap();
        let x = xz.narrow(2, 0, 5).unwrap();
        let (w, bias) = (Tensor::randn(0f32, 0.5, (5, 4), &Device::Cpu).unwrap(), Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap());
        assert!(max_diff(&causal_conv_silu(&x, 7, &w, &bias).unwrap(), &causal_conv_silu_ops(&x, &w, &bias).unwrap()) < 1e-6);
        assert!(causal_conv_silu(&x, 3, &w, &bias).unwrap_err().to_string().contains("not whole sequences"));
    }

    #[test]
    fn softplus_mean_matches_the_op_by_op_form_and_its_gradients() {
        let vars = [var(&[3, 11, 20], 0.0, 4.0), var(&[20], 0.0, 1.0)];
        let ops = |t: &[&Tensor]| {
            let x = t[0].broadcast_add(t[1]).unwrap();
            (x.relu().unwrap() + (x.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()).unwrap().mean_keepdim(2).unwrap()
        };
        agree(&vars, |t| softplus_mean(t[0], t[1]).unwrap(), ops, 1e-5, "softplus-mean");
    }

    #[test]
    fn next_token_loss_matches_candle_cross_entropy_and_its_gradient() {
        let logits = var(&[3, 7, 11], 0.0, 3.0);
        let ids = Tensor::from_vec((0..21u32).map(|i| (i * 5 + 3) % 11).collect::<Vec<_>>(), (3, 7), &Device::Cpu).unwrap();
        let ops = |t: &[&Tensor]| {
            let pred = t[0].narrow(1, 0, 6).unwrap().reshape((18, 11)).unwrap();
            candle_nn::loss::cross_entropy(&pred, &ids.narrow(1, 1, 6).unwrap().reshape(18).unwrap()).unwrap()
        };
        agree(&[logits], |t| next_token_cross_entropy(t[0], &ids).unwrap(), ops, 1e-5, "next-token loss");
        let bad = Tensor::from_vec(vec![0u32, 11], (1, 2), &Device::Cpu).unwrap();
        let e = next_token_cross_entropy(&Tensor::zeros((1, 2, 11), candle_core::DType::F32, &Device::Cpu).unwrap(), &bad).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }

    #[test]
    fn causal_softmax_matches_masked_softmax_and_its_gradient() {
        for (l, keys, offset) in [(6, 6, 0), (1, 5, 4), (3, 7, 4)] {
            let scores = var(&[2, 3, l, keys], 0.0, 2.0);
            let scale = 0.35f32;
            let ops = |t: &[&Tensor]| {
                let mask: Vec<f32> = (0..l).flat_map(|i| (0..keys).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
                let mask = Tensor::from_vec(mask, (l, keys), &Device::Cpu).unwrap();
                candle_nn::ops::softmax(&(t[0] * scale as f64).unwrap().broadcast_add(&mask).unwrap(), 3).unwrap()
            };
            agree(&[scores], |t| causal_softmax(t[0], scale, offset).unwrap(), ops, 1e-5, "causal softmax");
        }
    }

    #[test]
    fn gelu_matches_candle_gelu_erf_and_its_gradient() {
        let vars = [var(&[5, 301], 0.0, 3.0)];
        agree(&vars, |t| gelu_erf(t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), 1e-5, "gelu");
        let worst = (0..=40_000).map(|i| -10.0 + 20.0 * i as f32 / 40_000.0).map(|x| ((erf(x) as f64) - libm_erf(x as f64)).abs()).fold(0.0, f64::max);
        assert!(worst < 6e-7, "erf: {worst}");
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn silu_gate_matches_the_op_by_op_form_and_its_gradients() {
        let vars = [var(&[2, 9, 33], 0.0, 1.0), var(&[2, 9, 33], 0.0, 3.0)];
        agree(&vars, |t| silu_gate(t[0], t[1]).unwrap(), |t| (t[0] * t[1].silu().unwrap()).unwrap(), 1e-5, "silu-gate");
    }
}
