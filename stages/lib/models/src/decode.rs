//! Batch-1 recurrent decoding of Itera-Lite on plain slices.
//!
//! A generated token costs about 0.6 M multiply-adds here; through candle the same step is a few
//! hundred tensor ops on vectors of 128–512 values, and their dispatch and allocation cost several
//! times the arithmetic. This path runs the same computation as [`crate::itera::IteraLite::step`]
//! (tested equal to 1e-5) as matrix-vector products and loops over the weights, copied once
//! when the decoder is built. Quantized layers keep their integer kernels.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::itera::{FeedForward, IteraLite, Moe, SsmBlock};
use crate::nn::{LayerNorm, Linear};
use crate::quant::QWeight;

mod many;

pub(crate) fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

enum Weights {
    F32(Vec<f32>),
    Quant(Arc<QWeight>),
}

/// `y = W x (+ b)` for one vector.
pub(crate) struct Dense {
    w: Weights,
    bias: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
}

impl Dense {
    pub(crate) fn new(l: &Linear) -> Result<Self> {
        let (rows, cols) = l.weight().dims2()?;
        let w = match &l.quant {
            Some(q) => Weights::Quant(q.clone()),
            None => Weights::F32(values(l.weight())?),
        };
        Ok(Dense { w, bias: l.bias().map(values).transpose()?, rows, cols })
    }

    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        match &self.w {
            Weights::F32(w) => matvec(w, self.cols, x, out),
            Weights::Quant(q) => out.copy_from_slice(&q.matmul_t(x, 1)),
        }
        if let Some(b) = &self.bias {
            for (o, b) in out.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
}

pub(crate) struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Norm {
    pub(crate) fn new(n: &LayerNorm) -> Result<Self> {
        Ok(Norm { w: values(&n.weight)?, b: values(&n.bias)?, eps: n.eps as f32 })
    }

    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for (((o, v), w), b) in out.iter_mut().zip(x).zip(&self.w).zip(&self.b) {
            *o = (v - mean) * inv * w + b;
        }
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn softplus(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

struct Ssm {
    norm: Norm,
    in_proj: Dense,
    /// (d_inner, k) taps.
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    /// A = -exp(A_log), (N).
    a: Vec<f32>,
    /// (N, d_inner).
    b: Vec<f32>,
    /// (d_inner, N).
    c: Vec<f32>,
    d: Vec<f32>,
    delta_proj: Dense,
    out_proj: Dense,
    d_inner: usize,
    k: usize,
}

impl Ssm {
    fn new(s: &SsmBlock) -> Result<Self> {
        Ok(Ssm {
            norm: Norm::new(&s.norm)?,
            in_proj: Dense::new(&s.in_proj)?,
            conv_w: values(&s.conv_w)?,
            conv_b: values(&s.conv_b)?,
            a: values(&s.a_log)?.into_iter().map(|v| -v.exp()).collect(),
            b: values(&s.b)?,
            c: values(&s.c)?,
            d: values(&s.d)?,
            delta_proj: Dense::new(&s.delta_proj)?,
            out_proj: Dense::new(&s.out_proj)?,
            d_inner: s.d_inner,
            k: s.k,
        })
    }

    /// x += block(x), advancing this layer's conv window and SSM state.
    fn step(&self, x: &mut [f32], st: &mut LayerState, s: &mut Scratch) {
        let (di, k, n) = (self.d_inner, self.k, self.a.len());
        self.norm.apply(x, &mut s.normed);
        self.in_proj.apply(&s.normed, &mut s.xz);
        let (xs, z) = s.xz.split_at(di);
        // Depthwise causal conv over the last k inputs: the window holds the k-1 before this one.
        for (c, (xc, &x_new)) in s.xc[..di].iter_mut().zip(xs).enumerate() {
            let taps = &self.conv_w[c * k..(c + 1) * k];
            let mut y = self.conv_b[c];
            for (j, tap) in taps[..k - 1].iter().enumerate() {
                y += st.conv[j * di + c] * tap;
            }
            y += x_new * taps[k - 1];
            *xc = silu(y);
        }
        st.conv.copy_within(di.., 0);
        st.conv[(k - 2) * di..].copy_from_slice(xs);
        self.delta_proj.apply(&s.xc, &mut s.inner);
        let delta = s.inner.iter().map(|&v| softplus(v)).sum::<f32>() / di as f32;
        for (i, h) in st.h.iter_mut().enumerate() {
            let bx: f32 = self.b[i * di..(i + 1) * di].iter().zip(&s.xc).map(|(b, x)| b * x).sum();
            *h = (delta * self.a[i]).exp() * *h + delta * bx;
        }
        for (c, (out, &zc)) in s.inner[..di].iter_mut().zip(z).enumerate() {
            let ch: f32 = self.c[c * n..(c + 1) * n].iter().zip(&st.h).map(|(c, h)| c * h).sum();
            *out = (ch + self.d[c] * s.xc[c]) * silu(zc);
        }
        self.out_proj.apply(&s.inner, &mut s.model);
        for (x, o) in x.iter_mut().zip(&s.model) {
            *x += o;
        }
    }
}

struct Expert {
    up: Dense,
    down: Dense,
}

impl Expert {
    fn new(e: &(Linear, Linear)) -> Result<Self> {
        Ok(Expert { up: Dense::new(&e.0)?, down: Dense::new(&e.1)? })
    }

    /// out = down(gelu(up(x))).
    fn apply(&self, x: &[f32], hidden: &mut Vec<f32>, out: &mut [f32]) {
        hidden.resize(self.up.rows, 0.0);
        self.up.apply(x, hidden);
        crate::fused::gelu_in_place(hidden);
        self.down.apply(hidden, out);
    }
}

enum Ff {
    Dense { norm: Norm, ff: Expert },
    Moe { norm: Norm, router: Dense, experts: Vec<Expert>, top_k: usize },
}

impl Ff {
    fn new(f: &FeedForward) -> Result<Self> {
        Ok(match f {
            FeedForward::Dense(f) => Ff::Dense { norm: Norm::new(&f.norm)?, ff: Expert::new(&f.ff)? },
            FeedForward::Moe(Moe { norm, router, experts, top_k, .. }) => Ff::Moe {
                norm: Norm::new(norm)?,
                router: Dense::new(router)?,
                experts: experts.iter().map(Expert::new).collect::<Result<_>>()?,
                top_k: *top_k,
            },
        })
    }

    /// x += ff(x). The MoE runs only the chosen experts, gated by the softmax over the top k.
    fn step(&self, x: &mut [f32], s: &mut Scratch) {
        match self {
            Ff::Dense { norm, ff } => {
                norm.apply(x, &mut s.normed);
                ff.apply(&s.normed, &mut s.hidden, &mut s.model);
                for (x, o) in x.iter_mut().zip(&s.model) {
                    *x += o;
                }
            }
            Ff::Moe { norm, router, experts, top_k } => {
                norm.apply(x, &mut s.normed);
                s.route.resize(router.rows, 0.0);
                router.apply(&s.normed, &mut s.route);
                // As the full forward: every expert whose logit reaches the k-th largest.
                s.sorted.clone_from(&s.route);
                s.sorted.sort_by(|a, b| b.total_cmp(a));
                let kth = s.sorted[(*top_k).min(s.sorted.len()) - 1];
                let max = s.sorted[0];
                let total: f32 = s.route.iter().filter(|&&l| l >= kth).map(|&l| (l - max).exp()).sum();
                s.acc.iter_mut().for_each(|v| *v = 0.0);
                for (j, ex) in experts.iter().enumerate() {
                    let l = s.route[j];
                    if l < kth {
                        continue;
                    }
                    let gate = (l - max).exp() / total;
                    ex.apply(&s.normed, &mut s.hidden, &mut s.model);
                    for (a, o) in s.acc.iter_mut().zip(&s.model) {
                        *a += o * gate;
                    }
                }
                for (x, a) in x.iter_mut().zip(&s.acc) {
                    *x += a;
                }
            }
        }
    }
}

/// Per-layer recurrent state: the last k-1 conv inputs (oldest first) and h.
struct LayerState {
    conv: Vec<f32>,
    h: Vec<f32>,
}

/// Buffers reused across steps (sized once).
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    xz: Vec<f32>,
    xc: Vec<f32>,
    inner: Vec<f32>,
    model: Vec<f32>,
    acc: Vec<f32>,
    hidden: Vec<f32>,
    route: Vec<f32>,
    sorted: Vec<f32>,
}

/// Itera-Lite prepared for batch-1 decoding; see the module docs.
pub struct IteraDecoder {
    embed: Vec<f32>,
    pos: Vec<f32>,
    norm_f: Norm,
    head: Option<Arc<QWeight>>,
    layers: Vec<(Ssm, Ff)>,
    d_model: usize,
    vocab: usize,
    max_seq_len: usize,
}

/// A sequence being decoded by an [`IteraDecoder`].
pub struct IteraDecodeState {
    layers: Vec<LayerState>,
    x: Vec<f32>,
    scratch: Scratch,
    /// Position of the next token.
    pub pos: usize,
}

impl IteraDecoder {
    pub fn new(m: &IteraLite) -> Result<Self> {
        let layers = m.layers.iter().map(|(s, f)| Ok((Ssm::new(s)?, Ff::new(f)?))).collect::<Result<Vec<_>>>()?;
        Ok(IteraDecoder {
            embed: values(m.emb.embed.embeddings())?,
            pos: values(m.emb.pos.embeddings())?,
            norm_f: Norm::new(&m.emb.norm_f)?,
            head: m.emb.head_quantized().map(|q| Arc::new(q.clone())),
            layers,
            d_model: m.cfg.d_model,
            vocab: m.cfg.vocab_size,
            max_seq_len: m.cfg.max_seq_len,
        })
    }

    pub fn start(&self) -> IteraDecodeState {
        let d = self.d_model;
        let layers = self
            .layers
            .iter()
            .map(|(s, _)| LayerState { conv: vec![0.0; (s.k - 1) * s.d_inner], h: vec![0.0; s.a.len()] })
            .collect();
        let di = self.layers.iter().map(|(s, _)| s.d_inner).max().unwrap_or(0);
        let scratch = Scratch {
            normed: vec![0.0; d],
            xz: vec![0.0; 2 * di],
            xc: vec![0.0; di],
            inner: vec![0.0; di],
            model: vec![0.0; d],
            acc: vec![0.0; d],
            ..Scratch::default()
        };
        IteraDecodeState { layers, x: vec![0.0; d], scratch, pos: 0 }
    }

    /// Feed `token` at the state's position; returns the next-token logits (vocab).
    pub fn step(&self, token: u32, st: &mut IteraDecodeState) -> Result<Vec<f32>> {
        let d = self.d_model;
        embed_token(&self.embed, &self.pos, (self.vocab, self.max_seq_len), token, st.pos, &mut st.x)?;
        for ((ssm, ff), ls) in self.layers.iter().zip(st.layers.iter_mut()) {
            ssm.step(&mut st.x, ls, &mut st.scratch);
            ff.step(&mut st.x, &mut st.scratch);
        }
        st.pos += 1;
        let normed = &mut st.scratch.normed;
        self.norm_f.apply(&st.x, normed);
        Ok(match &self.head {
            Some(q) => q.matmul_t(normed, 1),
            None => {
                let mut logits = vec![0.0; self.vocab];
                matvec(&self.embed, d, normed, &mut logits);
                logits
            }
        })
    }
}

/// x = token embedding + position embedding at `pos`, after checking both are in range.
pub(crate) fn embed_token(
    embed: &[f32],
    pos_emb: &[f32],
    (vocab, max_seq_len): (usize, usize),
    token: u32,
    pos: usize,
    x: &mut [f32],
) -> Result<()> {
    let (d, t) = (x.len(), token as usize);
    if t >= vocab {
        candle_core::bail!("token id {token} is outside the vocabulary of {vocab}");
    }
    if pos >= max_seq_len {
        candle_core::bail!("sequence of {} tokens exceeds max_seq_len {max_seq_len}", pos + 1);
    }
    for ((x, e), p) in x.iter_mut().zip(&embed[t * d..(t + 1) * d]).zip(&pos_emb[pos * d..(pos + 1) * d]) {
        *x = e + p;
    }
    Ok(())
}

/// out[r] = W[r] · x for a row-major W with `cols` columns.
pub(crate) fn matvec(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`simd::avx2` checks it).
            unsafe { matvec_avx2(w, cols, x, out) };
            return;
        }
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// out[b · rows + r] = W[r] · xs[b] for `n` vectors xs (n × cols) and a row-major W: each
/// weight row is read once for all n vectors. Every dot product is the one [`matvec`]
/// computes, so the results are bit-identical to n separate matrix-vector products.
pub(crate) fn matmul_rows(w: &[f32], cols: usize, xs: &[f32], n: usize, out: &mut [f32]) {
    let rows = w.len() / cols.max(1);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx2() {
            for (r, row) in w.chunks_exact(cols).enumerate() {
                for (b, x) in xs.chunks_exact(cols).take(n).enumerate() {
                    // SAFETY: the CPU has AVX2 and FMA (`simd::avx2` checks it).
                    out[b * rows + r] = unsafe { dot_avx2(row, x) };
                }
            }
            return;
        }
    }
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for (b, x) in xs.chunks_exact(cols).take(n).enumerate() {
            out[b * rows + r] = row.iter().zip(x).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matvec_avx2(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
        *o = dot_avx2(row, &x[..cols]);
    }
}

/// row · x with AVX2 + FMA (4 accumulators of 8, then the tail); `x` at least as long as `row`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(row: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let cols = row.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= cols {
        for (j, a) in acc.iter_mut().enumerate() {
            let (p, q) = (row.as_ptr().add(i + 8 * j), x.as_ptr().add(i + 8 * j));
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(q), *a);
        }
        i += 32;
    }
    while i + 8 <= cols {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(row.as_ptr().add(i)), _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    let mut sum = _mm_cvtss_f32(s);
    for j in i..cols {
        sum += row[j] * x[j];
    }
    sum
}
