//! The SSM block's chains: depthwise causal conv + SiLU, the step size Δ, the output gate.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::*;

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

/// Refuses buffers that are not all one length of whole sequences of l rows of c values: the
/// loops below write every row of every sequence of their outputs, which is what lets them skip
/// zero fills.
fn whole_sequences(op: &str, lens: &[usize], l: usize, c: usize) -> Result<()> {
    let first = lens.first().copied().unwrap_or(0);
    if lens.iter().any(|&n| n != first) || (first > 0 && (l * c == 0 || !first.is_multiple_of(l * c))) {
        candle_core::bail!("{op}: buffers of {lens:?} values are not whole sequences of {l} rows of {c}");
    }
    Ok(())
}

/// Adds row t of one sequence's conv, Σ_j wt[j,c] · xb[t+j-(k-1), c], to `row` (which the
/// callers start at the bias).
#[inline(always)]
fn conv_row(xb: &[f32], wt: &[f32], t: usize, k: usize, row: &mut [f32]) {
    let c = row.len();
    for j in 0..k {
        let Some(src) = (t + j).checked_sub(k - 1) else { continue };
        let xr = &xb[src * c..(src + 1) * c];
        for ((r, &w), &x) in row.iter_mut().zip(&wt[j * c..(j + 1) * c]).zip(xr) {
            *r += w * x;
        }
    }
}

simd_dispatch! {
    /// y[b,t,c] = bias[c] + Σ_j w[c,j] · x[b, t+j-(k-1), c] (zero before the start).
    pub(super) fn conv_pre(x: &[f32], w: &[f32], bias: &[f32], l: usize, c: usize, k: usize, out: &mut [f32]) -> () {
        let wt = taps_by_offset(w, c, k);
        for_chunks(out, l * c, |bi, o| {
            let xb = &x[bi * l * c..(bi + 1) * l * c];
            for (t, row) in o.chunks_exact_mut(c).enumerate() {
                row.copy_from_slice(bias);
                conv_row(xb, &wt, t, k, row);
            }
        });
    }
}

simd_dispatch! {
    /// The SSM block's conv and SiLU in one pass, row by row while the conv output is in L1:
    /// xc = silu(conv_pre(x)); `lck`: sequence length, channels, taps. Every slot of xc is
    /// written (it is checked to hold whole sequences). silu′ is not kept for the backward:
    /// [`conv_backward`] recomputes it from x, which it reads anyway.
    pub(super) fn conv_silu(x: &[f32], w: &[f32], bias: &[f32], lck: (usize, usize, usize), xc: &mut [MaybeUninit<f32>]) -> Result<()> {
        let (l, c, k) = lck;
        whole_sequences("ssm conv", &[x.len(), xc.len()], l, c)?;
        let wt = taps_by_offset(w, c, k);
        for_chunks(xc, l * c, |bi, xo| {
            let xb = &x[bi * l * c..(bi + 1) * l * c];
            let mut row = vec![0f32; c];
            for (t, xr) in xo.chunks_exact_mut(c).enumerate() {
                row.copy_from_slice(bias);
                conv_row(xb, &wt, t, k, &mut row);
                for (o, &v) in xr.iter_mut().zip(&row) {
                    o.write(v * sigmoid(v));
                }
            }
        });
        Ok(())
    }
}

simd_dispatch! {
    /// silu′ at the conv's output, silu′(v) = σ(v)·(1 + v·(1 − σ(v))) for v = conv_pre(x): what
    /// the backward multiplies ∂xc by, computed as [`conv_backward`]'s fused walk recomputes it
    /// (the same expressions, so the same bits at each level).
    pub(super) fn conv_silu_grad(x: &[f32], w: &[f32], bias: &[f32], l: usize, c: usize, k: usize) -> Result<Vec<f32>> {
        whole_sequences("ssm conv", &[x.len()], l, c)?;
        let mut out = vec![0f32; x.len()];
        conv_pre(x, w, bias, l, c, k, &mut out);
        for_chunks(&mut out, 16_384, |_, ch| ch.iter_mut().for_each(|v| *v = silu_grad(*v, sigmoid(*v))));
        Ok(out)
    }
}

/// Row s of one sequence's conv input gradient into `row`: Σ_j gy[s+(k-1)-j] · wt[j] over the
/// taps whose row lies inside the sequence, the first of them written into the slots (never
/// zeroed first), the rest added.
#[inline(always)]
fn conv_t_row(gb: &[f32], wt: &[f32], s: usize, l: usize, k: usize, row: &mut [MaybeUninit<f32>]) {
    let c = row.len();
    if k == 0 {
        for r in row.iter_mut() {
            r.write(0.0);
        }
        return;
    }
    // Tap j reads row s + (k-1) - j, inside the sequence from j0 on (j = k-1 reads row s, so
    // j0 ≤ k-1 and the first tap below always runs).
    let j0 = (s + k).saturating_sub(l);
    let tap = |j: usize| {
        let t = s + (k - 1) - j;
        (&gb[t * c..(t + 1) * c], &wt[j * c..(j + 1) * c])
    };
    let (gr, wr) = tap(j0);
    for ((r, &w), &g) in row.iter_mut().zip(wr).zip(gr) {
        r.write(w * g);
    }
    // SAFETY: the loop above wrote all c slots (gr and wr hold c values each).
    let row = unsafe { &mut *(row as *mut [MaybeUninit<f32>] as *mut [f32]) };
    for j in j0 + 1..k {
        let (gr, wr) = tap(j);
        for ((r, &w), &g) in row.iter_mut().zip(wr).zip(gr) {
            *r += w * g;
        }
    }
}

simd_dispatch! {
    /// dx[b,s,c] = Σ_j gy[b, s+(k-1)-j, c] · w[c,j] (within each sequence of `l` rows).
    pub(super) fn conv_transpose(gy: &[f32], w: &[f32], l: usize, c: usize, k: usize) -> Result<Vec<f32>> {
        whole_sequences("causal-conv-transpose", &[gy.len()], l, c)?;
        let wt = taps_by_offset(w, c, k);
        let mut dx = slots(gy.len());
        for_chunks(&mut dx, l * c, |bi, o| {
            let gb = &gy[bi * l * c..(bi + 1) * l * c];
            for (s, row) in o.chunks_exact_mut(c).enumerate() {
                conv_t_row(gb, &wt, s, l, k, row);
            }
        });
        // SAFETY: gy and so dx hold whole sequences of l rows of c (checked above), and
        // conv_t_row writes every row of c slots of each.
        Ok(unsafe { written(dx) })
    }
}

simd_dispatch! {
    /// The SSM block's conv backward from ∂xc, a sequence at a time while it is in cache: scales
    /// `g` in place by silu′ (g becomes ∂ of the conv output, which conv_param_grad then reads)
    /// and returns conv_transpose of it.
    pub(super) fn silu_conv_transpose(g: &mut [f32], dsilu: &[f32], w: &[f32], l: usize, c: usize, k: usize) -> Result<Vec<f32>> {
        whole_sequences("ssm conv backward", &[g.len(), dsilu.len()], l, c)?;
        let wt = taps_by_offset(w, c, k);
        let mut dx = slots(g.len());
        for_chunks2(g, l * c, &mut dx, l * c, |bi, gb, o| {
            for (g, &ds) in gb.iter_mut().zip(&dsilu[bi * l * c..]) {
                *g *= ds;
            }
            for (s, row) in o.chunks_exact_mut(c).enumerate() {
                conv_t_row(gb, &wt, s, l, k, row);
            }
        });
        // SAFETY: g and dx have one length, whole sequences of l rows of c (checked above); conv_t_row
        // writes every row of c slots of every sequence.
        Ok(unsafe { written(dx) })
    }
}

simd_dispatch! {
    /// (c, k+1): dw[c,j] = Σ_{b,t} gy[b,t,c] · x[b, t+j-(k-1), c]; last column db[c] = Σ gy[b,t,c].
    pub(super) fn conv_param_grad(x: &[f32], gy: &[f32], l: usize, c: usize, k: usize) -> Vec<f32> {
        let b = x.len() / (l * c).max(1);
        // Per sequence partial sums in f32 (l terms each), then reduced in order in f64.
        // Each holds (k + 1) rows of c: one per tap offset, then the bias; transposed at the end.
        let mut partial = vec![0f32; b * (k + 1) * c];
        for_chunks(&mut partial, (k + 1) * c, |bi, acc| {
            let (xb, gb) = (&x[bi * l * c..(bi + 1) * l * c], &gy[bi * l * c..(bi + 1) * l * c]);
            for t in 0..l {
                let gr = &gb[t * c..(t + 1) * c];
                for j in 0..k {
                    let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                    let xr = &xb[src * c..(src + 1) * c];
                    for ((a, &g), &x) in acc[j * c..(j + 1) * c].iter_mut().zip(gr).zip(xr) {
                        *a = fma(g, x, *a);
                    }
                }
                for (a, &g) in acc[k * c..].iter_mut().zip(gr) {
                    *a += g;
                }
            }
        });
        conv_param_reduce(&partial, c, k)
    }
}

/// The per-sequence partial sums of the conv's parameter gradient ((k + 1) rows of c each: the
/// taps by offset, then the bias) added up in order in f64, as (c, k + 1).
fn conv_param_reduce(partial: &[f32], c: usize, k: usize) -> Vec<f32> {
    let sum = column_sums(partial, (k + 1) * c);
    let mut out = vec![0f32; c * (k + 1)];
    for j in 0..=k {
        for ch in 0..c {
            out[ch * (k + 1) + j] = sum[j * c + ch];
        }
    }
    out
}

/// Taps of the conv [`conv_backward`] fuses: the study's (`d_conv` is 4; other widths take the
/// two-pass path).
const FUSED_TAPS: usize = 4;

/// N values of row t, channels c0.., of a sequence laid out as rows of c.
#[inline(always)]
fn lanes<const N: usize>(s: &[f32], t: usize, c: usize, c0: usize) -> [f32; N] {
    let r = &s[t * c + c0..][..N];
    std::array::from_fn(|i| r[i])
}

/// Rows ahead of the walk whose lines are asked for (see [`prefetch`]).
const AHEAD: usize = 8;

/// Where [`prefetch`] asks for a line: into L1, for rows [`AHEAD`] of the walk (its reads are a
/// row apart, 4 to a page, and the hardware's stride prefetchers stop at page boundaries), or
/// into L2, for the sequence the walk reaches next.
#[derive(Clone, Copy)]
enum Cache {
    L1,
    L2,
}

/// A hint to load the line holding `s[i]` (nothing past the end).
#[inline(always)]
fn prefetch(into: Cache, s: &[f32], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = s.get(i) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let at = (v as *const f32).cast();
        // SAFETY: a prefetch only hints the cache; the address is inside `s`.
        unsafe {
            match into {
                Cache::L1 => _mm_prefetch::<_MM_HINT_T0>(at),
                Cache::L2 => _mm_prefetch::<_MM_HINT_T1>(at),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (into, s, i);
}

/// One sequence's conv backward on channels c0..c0 + N, 4 taps, walking down the rows with
/// everything in registers: the conv's pre-activation v again from the bias and the x window
/// the walk holds anyway (summed as the forward's `conv_row` sums it, so the same v), the conv
/// output's gradient g′ = g · silu′(v) (never stored), row
/// s = t − 3 of its transpose into `dx` once g′[t] is known, and the parameter sums into `acc`
/// ((k + 1) rows of c, as [`conv_param_grad`]'s partials). Each output sums its terms in the
/// two-pass kernels' order, so the results are theirs bit for bit (but for the sign of a zero
/// in the last three rows, see below); what goes is a pass that
/// wrote g′ back and one that read it again, the per-tap load-add-store of every sum, and
/// silu′ kept from the forward (written there, read back here: 2 MB a layer written and read
/// again, for four multiplies, four adds and a sigmoid a value). `fma` and `silu_grad_at`
/// (v ↦ silu′(v)) are the calling copy's, so its math is that copy's.
///
/// Walking down the rows reads each 64-byte line of the inputs on its own, a row apart; a
/// row-major pass (all channels of a row, what it carries from row to row in L1) was tried and
/// was slower. The walk asks for the lines [`AHEAD`] rows on, and for the next sequence's
/// lines, one of g and one of x a step, into L2. On a Zen 4, a layer of Itera-Lite tiny (16
/// sequences of 128 rows of 256 channels, one thread): 0.45–0.49 ms with its inputs in cache,
/// 0.73–0.95 ms with them in memory (1.3 ms without the next sequence's prefetch). When the
/// rows before t lived in arrays indexed by a loop variable (for the first and last rows), the
/// compiler kept them on the stack, and each step reloaded 512-bit values it had just stored:
/// 1.6–2.0 ms and 2.2 ms, 3.6–6.7 % of a training step (now 1.8–3.1 %; docs/results.md).
#[inline(always)]
fn conv_backward_lanes<const N: usize>(
    (gb, xb): (&[f32], &[f32]),
    (wt, bias): (&[f32], &[f32]),
    (l, c, c0): (usize, usize, usize),
    (dx, acc): (&mut [MaybeUninit<f32>], &mut [f32]),
    next: (&[f32], &[f32]),
    fma: impl Fn(f32, f32, f32) -> f32,
    silu_grad_at: impl Fn(f32) -> f32,
) {
    let w: [[f32; N]; 4] = std::array::from_fn(|j| lanes(wt, j, c, c0));
    let b: [f32; N] = lanes(bias, 0, c, c0);
    let mut a = [[0f32; N]; 5];
    // g′ and x at rows t − 1, t − 2, t − 3, each its own value: an array of them indexed by a
    // loop variable anywhere would live in memory, and on a Zen 4 reloading a 512-bit value
    // just stored stalls the walk (it ran at half speed so).
    let zero = [0f32; N];
    let (mut g1, mut g2, mut g3) = (zero, zero, zero);
    let (mut x1, mut x2, mut x3) = (zero, zero, zero);
    let step0 = c0 / 16 * l;
    // Rows before the sequence are zeros to the taps, which adds nothing to a sum (the forward
    // skips those taps; x + 0 is x). Three steps past its end, with g′ = 0, finish the
    // transpose's last rows s ≥ l − 3, whose taps past the end add zeros: the same values
    // as summing only the taps inside (a zero result's sign aside).
    for t in 0..l + 3 {
        prefetch(Cache::L1, gb, (t + AHEAD) * c + c0);
        prefetch(Cache::L1, xb, (t + AHEAD) * c + c0);
        // Step t of this block's walk asks for line `step0 + t` of the next sequence's g and
        // x: with N = 16 the whole sequence's walk covers each of their lines once.
        prefetch(Cache::L2, next.0, (step0 + t) * 16);
        prefetch(Cache::L2, next.1, (step0 + t) * 16);
        let (g, x) = if t < l { (lanes::<N>(gb, t, c, c0), lanes::<N>(xb, t, c, c0)) } else { (zero, zero) };
        let (mut gt, mut r) = ([0f32; N], [0f32; N]);
        for i in 0..N {
            // The forward's sum: bias, then taps 0..3 in order, each a multiply then an add.
            let v = b[i] + w[0][i] * x3[i] + w[1][i] * x2[i] + w[2][i] * x1[i] + w[3][i] * x[i];
            gt[i] = g[i] * silu_grad_at(v);
            a[0][i] = fma(gt[i], x3[i], a[0][i]);
            a[1][i] = fma(gt[i], x2[i], a[1][i]);
            a[2][i] = fma(gt[i], x1[i], a[2][i]);
            a[3][i] = fma(gt[i], x[i], a[3][i]);
            a[4][i] += gt[i];
            // dx[s] = Σ_j w[j] · g′[s + 3 − j], tap 0 first, as conv_t_row adds them.
            r[i] = w[0][i] * gt[i] + w[1][i] * g1[i] + w[2][i] * g2[i] + w[3][i] * g3[i];
        }
        if let Some(s) = t.checked_sub(3) {
            for (o, &v) in dx[s * c + c0..][..N].iter_mut().zip(&r) {
                o.write(v);
            }
        }
        (g3, g2, g1) = (g2, g1, gt);
        (x3, x2, x1) = (x2, x1, x);
    }
    for (j, aj) in a.iter().enumerate() {
        acc[j * c + c0..][..N].copy_from_slice(aj);
    }
}

simd_dispatch! {
    /// The SSM block's conv backward from ∂xc (`g`), the conv's input `x`, taps and bias:
    /// (∂x, the parameter gradient as (c, k + 1): taps, then the bias) — what
    /// [`silu_conv_transpose`] then [`conv_param_grad`] compute from [`conv_silu_grad`], in one
    /// pass over each sequence when k is 4 (bit for bit theirs), through them otherwise.
    pub(super) fn conv_backward(g: &[f32], x: &[f32], w: &[f32], bias: &[f32], l: usize, c: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        whole_sequences("ssm conv backward", &[g.len(), x.len()], l, c)?;
        if w.len() != c * k || bias.len() != c {
            candle_core::bail!("ssm conv backward: {} taps and {} biases for {c} channels of {k} taps", w.len(), bias.len());
        }
        if k != FUSED_TAPS {
            let mut gc = g.to_vec();
            let dx = silu_conv_transpose(&mut gc, &conv_silu_grad(x, w, bias, l, c, k)?, w, l, c, k)?;
            return Ok((dx, conv_param_grad(x, &gc, l, c, k)));
        }
        let wt = taps_by_offset(w, c, k);
        let mut dx = slots(g.len());
        let mut partial = vec![0f32; g.len() / (l * c).max(1) * (k + 1) * c];
        let blocks = c - c % 16;
        let silu_grad_at = |v: f32| silu_grad(v, sigmoid(v));
        for_chunks2(&mut dx, l * c, &mut partial, (k + 1) * c, |bi, o, acc| {
            let r = bi * l * c..(bi + 1) * l * c;
            let seq = (&g[r.clone()], &x[r.clone()]);
            let next = (g.get(r.end..).unwrap_or(&[]), x.get(r.end..).unwrap_or(&[]));
            let next = (&next.0[..next.0.len().min(l * c)], &next.1[..next.1.len().min(l * c)]);
            for c0 in (0..blocks).step_by(16) {
                conv_backward_lanes::<16>(seq, (&wt, bias), (l, c, c0), (&mut *o, &mut *acc), next, fma, silu_grad_at);
            }
            for c0 in blocks..c {
                conv_backward_lanes::<1>(seq, (&wt, bias), (l, c, c0), (&mut *o, &mut *acc), (&[], &[]), fma, silu_grad_at);
            }
        });
        // SAFETY: g and so dx hold whole sequences of l rows of c (checked above), and every
        // channel of every row of each was written: rows 0..l − 3 in the walk, the rest after it.
        Ok((unsafe { written(dx) }, conv_param_reduce(&partial, c, k)))
    }
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
    if l == 0 || !rows.is_multiple_of(l) {
        candle_core::bail!("{op}: {rows} rows are not whole sequences of {l}");
    }
    Ok((l, c))
}

impl CustomOp3 for ConvSilu {
    fn name(&self) -> &'static str {
        "causal-conv-silu"
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
        let (x, w, bias) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let (l, c) = seq_dims(l1, self.l, self.name())?;
        let k = w.len() / c.max(1);
        let mut y = vec![0f32; x.len()];
        conv_pre(x, w, bias, l, c, k, &mut y);
        for_chunks(&mut y, 16_384, |_, ch| ch.iter_mut().for_each(|v| *v *= sigmoid(*v)));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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
                *v = g * silu_grad(*v, s);
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
        let dx = conv_transpose(gy, w, l, c, k)?;
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
        let out = conv_param_grad(x, gy, l, c, self.k);
        let k = self.k;
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
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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
        Ok((CpuStorage::F32(column_sums(x, c)), Shape::from(c)))
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
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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
                *d = g * y * silu_grad(z, s);
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
