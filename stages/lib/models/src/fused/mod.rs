//! The models' hot elementwise chains as single autograd nodes (f32, CPU): the SSM block's conv +
//! SiLU, step size and output gate (`ssm`), the exact GELU (`gelu`), the Transformer's causal
//! attention softmax and the next-token cross-entropy (`softmax`).
//!
//! Op by op, the depthwise conv + SiLU is ~14 graph nodes on (batch, time, d_inner) tensors, the
//! step size mean(softplus(· + bias)) 9, the output gate 3, GELU's backward ~12; in backward each
//! node allocates its gradient buffers and sums into them, and that bookkeeping — not arithmetic —
//! dominated the training step. Each function here is one node with a hand-written backward
//! (itself run as no-grad ops) and is tested against the op-by-op form and its autograd gradients.
//! This module holds what they share: vectorizable math and the inline-or-parallel loop.

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: contiguous f32 tensors expected"),
    }
}

/// Defines a free function three times: as written (baseline x86-64 codegen, SSE2), compiled
/// for AVX2 + FMA, and compiled for AVX-512, chosen at run time by the CPU's features and the
/// `ITERA_SIMD` cap ([`crate::simd`]). The elementwise loops here vectorize to 4 lanes, 8 and 16;
/// closures inside the body (the per-chunk loops handed to rayon) inherit the copy's target
/// features. A `-C target-cpu` build flag would do the same for the whole binary but make it
/// crash on CPUs without those features.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                // Each copy's body sees `fused_mad`'s math (fma in one instruction) before the
                // module's `split_mad` (multiply, then add), which the portable copy keeps.
                #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
                unsafe fn avx512($($a: $t),*) -> $ret {
                    #[allow(unused_imports)]
                    use $crate::fused::fused_mad::*;
                    $body
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2_fma($($a: $t),*) -> $ret {
                    #[allow(unused_imports)]
                    use $crate::fused::fused_mad::*;
                    $body
                }
                match $crate::simd::active() {
                    // SAFETY: the CPU has AVX-512 F/BW/VL (the VNNI level includes them).
                    $crate::simd::Level::Vnni => return unsafe { avx512($($a),*) },
                    // SAFETY: the CPU has AVX2 and FMA.
                    $crate::simd::Level::Avx2 => return unsafe { avx2_fma($($a),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            $body
        }
    };
}
pub(crate) use simd_dispatch;

/// `f` on a CPU f32 tensor's values, borrowed (made contiguous first if needed).
pub(crate) fn with_values<R>(t: &candle_core::Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("{op}: CPU tensors expected") };
    f(f32s(cpu, layout, op)?)
}

/// Parameters as one vector for a fused node: each part must hold its expected number of values
/// (`op` names the node in the error); the concatenation's backward hands each its slice.
pub(crate) fn pack_parts(op: &str, parts: &[(&candle_core::Tensor, usize)]) -> Result<candle_core::Tensor> {
    let flat = parts
        .iter()
        .map(|&(t, size)| {
            if t.elem_count() != size {
                candle_core::bail!("{op}: a parameter of shape {:?} where {size} values were expected", t.dims());
            }
            t.flatten_all()
        })
        .collect::<Result<Vec<_>>>()?;
    candle_core::Tensor::cat(&flat, 0)
}

/// A fused block on f32 rows with packed parameters whose forward keeps its intermediates for a
/// hand-written backward (see `ssm_block`, `attention`).
pub(crate) trait KeptBlock: Send + Sync + 'static {
    type Saved: Send + Sync + 'static;
    const NAME: &'static str;
    /// The output and the intermediates; without `keep` (inference) the intermediates the
    /// backward alone needs may be left out.
    fn forward(&self, x: &[f32], p: &[f32], keep: bool) -> Result<(Vec<f32>, Self::Saved)>;
    /// Gradients of x and of the packed parameters, given the output's gradient `g`.
    fn backward(&self, x: &[f32], p: &[f32], saved: &Self::Saved, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)>;
}

/// The autograd node of a [`KeptBlock`]: keeps the forward's intermediates when training.
pub(crate) struct Kept<B: KeptBlock> {
    block: B,
    keep: bool,
    saved: std::sync::Mutex<Option<B::Saved>>,
}

impl<B: KeptBlock> Kept<B> {
    /// `block` on x (rows) with its packed parameters; `train` keeps what the backward needs.
    pub(crate) fn apply(
        block: B,
        x: &candle_core::Tensor,
        packed: &candle_core::Tensor,
        train: bool,
    ) -> Result<candle_core::Tensor> {
        let node = Kept { block, keep: train, saved: std::sync::Mutex::new(None) };
        x.contiguous()?.apply_op2(&packed.contiguous()?, node)
    }
}

impl<B: KeptBlock> candle_core::CustomOp2 for Kept<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (x, p) = (f32s(s1, l1, B::NAME)?, f32s(s2, l2, B::NAME)?);
        let (out, saved) = self.block.forward(x, p, self.keep)?;
        if self.keep {
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{}: a backward pass panicked", B::NAME)))? = Some(saved);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &candle_core::Tensor,
        p: &candle_core::Tensor,
        _out: &candle_core::Tensor,
        g: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let kept = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: a forward pass panicked", B::NAME)))?
            .take();
        let (dx, dp) = with_values(x, B::NAME, |xs| {
            with_values(p, B::NAME, |ps| {
                with_values(g, B::NAME, |gs| {
                    // A second backward through the same graph finds the intermediates gone: recompute them.
                    let saved = match kept {
                        Some(s) => s,
                        None => self.block.forward(xs, ps, true)?.1,
                    };
                    self.block.backward(xs, ps, &saved, gs)
                })
            })
        })?;
        Ok((
            Some(candle_core::Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(candle_core::Tensor::from_vec(dp, p.shape(), p.device())?),
        ))
    }
}

/// max v (−∞ for none) in 16 interleaved partial maxima, which vectorize: `f32::max`'s NaN rule
/// and a fold's running order keep the compiler to one lane. The maximum is exact in any order.
#[inline(always)]
fn max_lanes(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for ch in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    acc.iter().fold(tail, |a, &x| if x > a { x } else { a })
}

/// Σ v in 8 interleaved partial sums (vectorizes; a fixed order, so still deterministic).
#[inline(always)]
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

/// Rows of `len` values per parallel task: large enough to amortise the hand-off.
fn rows_per_task(len: usize) -> usize {
    (16_384 / len.max(1)).max(1)
}

/// Elements below which an op runs inline: handing a job to the rayon pool costs tens of µs,
/// more than a generation step's worth of these ops (it halved KV-cache decoding).
const PARALLEL_MIN: usize = 32_768;

/// `len` fresh slots for a loop that writes every one: zero-filling a buffer first is a pass over
/// memory the loop then repeats (it was ~1 % of a training step per fused block). [`written`]
/// turns the slots into values.
pub(crate) fn slots(len: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation, and the capacity holds `len`.
    unsafe { v.set_len(len) };
    v
}

/// `s` zero-filled and handed out as values: for a loop that zeroes a chunk of [`slots`] just
/// before it writes there, in cache, rather than a pass over the whole buffer ahead of it.
pub(crate) fn zeroed(s: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    s.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was just written, and MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(s as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// The values of [`slots`] once a loop has written them all.
///
/// # Safety
/// Every element of `v` has been written.
pub(crate) unsafe fn written(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f32> has f32's layout, the allocation is handed over whole (pointer,
    // length, capacity), and the caller guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

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

/// `f(i, a_chunk, b_chunk)` over matching chunks of two outputs, in parallel like [`for_chunks`].
pub(crate) fn for_chunks2<A: Send, B: Send>(
    a: &mut [A],
    size_a: usize,
    b: &mut [B],
    size_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) {
    let (size_a, size_b) = (size_a.max(1), size_b.max(1));
    if rayon::current_num_threads() > 1 && a.len() > size_a && a.len() >= PARALLEL_MIN {
        a.par_chunks_mut(size_a).zip(b.par_chunks_mut(size_b)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    } else {
        a.chunks_mut(size_a).zip(b.chunks_mut(size_b)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    }
}

/// `f(i, chunks)` over matching chunks of four outputs, in parallel like [`for_chunks`].
pub(crate) fn for_chunks4<A: Send, B: Send, C: Send, D: Send>(
    (a, b, c, d): (&mut [A], &mut [B], &mut [C], &mut [D]),
    sizes: [usize; 4],
    f: impl Fn(usize, (&mut [A], &mut [B], &mut [C], &mut [D])) + Sync + Send,
) {
    let [sa, sb, sc, sd] = sizes.map(|s| s.max(1));
    if rayon::current_num_threads() > 1 && a.len() > sa && a.len() >= PARALLEL_MIN {
        let chunks = (a.par_chunks_mut(sa), b.par_chunks_mut(sb), c.par_chunks_mut(sc), d.par_chunks_mut(sd));
        chunks.into_par_iter().enumerate().for_each(|(i, t)| f(i, t));
    } else {
        let chunks = a.chunks_mut(sa).zip(b.chunks_mut(sb)).zip(c.chunks_mut(sc)).zip(d.chunks_mut(sd));
        chunks.enumerate().for_each(|(i, (((a, b), c), d))| f(i, (a, b, c, d)));
    }
}

/// Σ over rows of a (rows, c) matrix, in f64 (the rows are partial sums over blocks of rows).
pub(crate) fn column_sums(x: &[f32], c: usize) -> Vec<f32> {
    let mut acc = vec![0f64; c];
    for row in x.chunks_exact(c.max(1)) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// The shared elementwise math with `fma` rounding once: for the AVX2 and AVX-512 copies.
pub(crate) mod fused_mad {
    /// a·b + c rounded once.
    #[inline(always)]
    pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    include!("math.rs");
}

/// The shared elementwise math with `fma` a multiply then an add: for the portable copy and
/// code outside `simd_dispatch`.
pub(crate) mod split_mad {
    /// a·b + c, two roundings.
    #[inline(always)]
    pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    include!("math.rs");
}
pub(crate) use split_mad::*;

mod attention;
mod experts;
mod gelu;
mod softmax;
mod ssm;
mod ssm_block;
mod ssm_gate;

pub use attention::{attention_block, pack as pack_attention, AttentionDims, AttentionQuant};
pub use experts::{experts, layout as experts_layout, ExpertsDims, ExpertsLayout, ExpertsQuant};
pub use gelu::gelu_erf;
pub(crate) use gelu::gelu_in_place;
pub use softmax::{causal_softmax, next_token_cross_entropy};
pub use ssm::{causal_conv_silu, causal_conv_silu_ops, silu_gate, softplus_mean};
pub use ssm_block::{pack as pack_ssm_block, ssm_block, SsmBlockDims, SsmBlockQuant};
// The fused pieces on plain slices, for the hand-written steps (`crate::itera_step`,
// `crate::transformer_step`).
pub(crate) use attention::{attention_backward, attention_forward, Saved as AttentionSaved};
pub(crate) use experts::{experts_backward, experts_forward, experts_norm, InputGrad, Pass, Saved as ExpertsSaved};
pub(crate) use softmax::{nll_grad, nll_sum};
pub(crate) use ssm_block::{
    block_backward as ssm_block_backward, block_forward as ssm_block_forward, Saved as SsmSaved,
};

#[cfg(test)]
mod tests;
