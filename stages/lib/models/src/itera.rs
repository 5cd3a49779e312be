//! Itera-Lite: token + learned position embeddings, then per layer an SSM block followed by a
//! mixture-of-experts layer (odd layers by default) or a dense FFN of one expert's shape;
//! final LayerNorm; LM head tied to the embedding.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{AuxLoss, IteraConfig};
use crate::fused;
use crate::nn::{apply, dropout, gelu, linear, matmul_t, silu, softplus, LayerNorm, Linear, TiedEmbeddings, Train};
use crate::quant::qmatmul_t;
use crate::scan::diag_scan;

/// The study's selective SSM block (pre-LN, residual).
pub struct SsmBlock {
    pub(crate) norm: LayerNorm,
    pub(crate) in_proj: Linear,
    pub(crate) conv_w: Tensor,
    pub(crate) conv_b: Tensor,
    pub(crate) a_log: Tensor,
    pub(crate) b: Tensor,
    pub(crate) c: Tensor,
    pub(crate) d: Tensor,
    pub(crate) delta_proj: Linear,
    pub(crate) out_proj: Linear,
    pub(crate) d_model: usize,
    pub(crate) d_inner: usize,
    pub(crate) k: usize,
    p_drop: f64,
}

/// Per-layer recurrent state for generation: the last `k-1` conv inputs and the SSM state.
#[derive(Clone, Debug)]
pub struct SsmState {
    pub conv: Tensor,
    pub h: Tensor,
}

impl SsmBlock {
    pub fn new(cfg: &IteraConfig, vb: VarBuilder) -> Result<Self> {
        let (d, di, n, k) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.d_conv);
        Ok(SsmBlock {
            norm: LayerNorm::new(d, cfg.ln_eps, vb.pp("norm"))?,
            in_proj: linear(d, 2 * di, false, vb.pp("in_proj"))?,
            conv_w: vb.get((di, k), "conv.weight")?,
            conv_b: vb.get(di, "conv.bias")?,
            a_log: vb.get(n, "A_log")?,
            b: vb.get((n, di), "B")?,
            c: vb.get((di, n), "C")?,
            d: vb.get(di, "D")?,
            delta_proj: linear(di, di, true, vb.pp("delta_proj"))?,
            out_proj: linear(di, d, false, vb.pp("out_proj"))?,
            d_model: d,
            d_inner: di,
            k,
            p_drop: cfg.dropout,
        })
    }

    /// Everything after the convolution, for a (batch, time, d_inner) input; returns the gated
    /// output before `out_proj`. `scan` runs the recurrence (full sequence or one step).
    fn mix(&self, xc: &Tensor, z: &Tensor, scan: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let f32 = xc.dtype() == DType::F32;
        let delta = match (f32, self.delta_proj.bias()) {
            // The bias add folded into the fused step-size op (also for quantized weights).
            (true, Some(bias)) => {
                let product = match self.delta_proj.quantized() {
                    Some(q) => qmatmul_t(xc, q)?,
                    None => matmul_t(xc, self.delta_proj.weight())?,
                };
                fused::softplus_mean(&product, bias)?
            }
            _ => softplus(&apply(&self.delta_proj, xc)?)?.mean_keepdim(D::Minus1)?,
        }; // (b, t, 1)
        let a_neg = self.a_log.exp()?.neg()?; // A = -exp(A_log), (n)
        let a = delta.broadcast_mul(&a_neg)?.exp()?; // exp(Δ·A), (b, t, n)
        let bx = matmul_t(xc, &self.b)?; // B x_t, (b, t, n)
        let u = delta.broadcast_mul(&bx)?;
        let h = scan(&a, &u)?; // (b, t, n)
        let y = (matmul_t(&h, &self.c)? + xc.broadcast_mul(&self.d)?)?;
        if f32 {
            fused::silu_gate(&y, z)
        } else {
            y * silu(z)?
        }
    }

    /// silu(causal depthwise conv(x)) for rows (batch · seq_len, d_inner); one fused node in f32.
    fn conv(&self, xs: &Tensor, seq_len: usize) -> Result<Tensor> {
        if xs.dtype() == DType::F32 {
            fused::causal_conv_silu(xs, seq_len, &self.conv_w, &self.conv_b)
        } else {
            let (rows, c) = xs.dims2()?;
            fused::causal_conv_silu_ops(&xs.reshape((rows / seq_len, seq_len, c))?, &self.conv_w, &self.conv_b)?
                .reshape((rows, c))
        }
    }

    /// in_proj's two halves, x and the gate z. In f32 as two GEMMs on the weight's halves: the
    /// backward of narrowing the (b, t, 2·d_inner) product instead costs a zeroed full-size
    /// gradient per half.
    fn project_in(&self, normed: &Tensor) -> Result<(Tensor, Tensor)> {
        let di = self.d_inner;
        if self.in_proj.quantized().is_some() {
            let xz = apply(&self.in_proj, normed)?;
            return Ok((xz.narrow(D::Minus1, 0, di)?, xz.narrow(D::Minus1, di, di)?));
        }
        let w = self.in_proj.weight();
        Ok((matmul_t(normed, &w.narrow(0, 0, di)?)?, matmul_t(normed, &w.narrow(0, di, di)?)?))
    }

    /// x: rows (batch · seq_len, d_model), sequence after sequence. In f32 the whole block is one
    /// fused node (quantized projections on their integer kernels at inference); training with
    /// quantized weights and other dtypes go op by op.
    pub fn forward(&self, x: &Tensor, seq_len: usize, train: &mut Train) -> Result<Tensor> {
        let quant = fused::SsmBlockQuant {
            in_proj: self.in_proj.quant.clone(),
            delta_proj: self.delta_proj.quant.clone(),
            out_proj: self.out_proj.quant.clone(),
        };
        let quantized = quant.in_proj.is_some() || quant.delta_proj.is_some() || quant.out_proj.is_some();
        let is_train = train.is_some();
        if x.dtype() == DType::F32 && x.rank() == 2 && !(quantized && is_train) {
            let dropped = is_train && self.p_drop > 0.0;
            let out = fused::ssm_block(x, &self.packed()?, self.dims(seq_len), quant, !dropped, is_train)?;
            return if dropped { x + dropout(&out, self.p_drop, train)? } else { Ok(out) };
        }
        self.forward_ops(x, seq_len, train)
    }

    pub(crate) fn dims(&self, seq_len: usize) -> fused::SsmBlockDims {
        fused::SsmBlockDims {
            d: self.d_model,
            di: self.d_inner,
            n: self.a_log.elem_count(),
            k: self.k,
            seq_len,
            eps: self.norm.eps,
        }
    }

    /// The block's parameters as the fused node takes them.
    fn packed(&self) -> Result<Tensor> {
        fused::pack_ssm_block(&self.dims(1), self.params()?)
    }

    /// The block's parameters in the fused node's packing order.
    pub(crate) fn params(&self) -> Result<[&Tensor; 12]> {
        let no_bias = || candle_core::Error::Msg("ssm block: delta_proj has no bias".into());
        let b_delta = self.delta_proj.bias().ok_or_else(no_bias)?;
        Ok([
            &self.norm.weight,
            &self.norm.bias,
            self.in_proj.weight(),
            &self.conv_w,
            &self.conv_b,
            self.delta_proj.weight(),
            &self.b,
            b_delta,
            &self.a_log,
            &self.c,
            &self.d,
            self.out_proj.weight(),
        ])
    }

    /// The block op by op (any dtype, quantized weights): the reference the fused node is
    /// tested against.
    pub fn forward_ops(&self, x: &Tensor, seq_len: usize, train: &mut Train) -> Result<Tensor> {
        let is_train = train.is_some();
        let (xs, z) = self.project_in(&self.norm.forward(x, is_train)?)?;
        let xc = self.conv(&xs, seq_len)?;
        let scan = |a: &Tensor, u: &Tensor| -> Result<Tensor> {
            let (rows, n) = a.dims2()?;
            let seqs = (rows / seq_len, seq_len, n);
            diag_scan(&a.reshape(seqs)?, &u.reshape(seqs)?)?.reshape((rows, n))
        };
        let out = apply(&self.out_proj, &self.mix(&xc, &z, scan)?)?;
        x + dropout(&out, self.p_drop, train)?
    }

    pub fn zero_state(&self, batch: usize, dtype: DType, dev: &candle_core::Device) -> Result<SsmState> {
        Ok(SsmState {
            conv: Tensor::zeros((batch, self.k - 1, self.d_inner), dtype, dev)?,
            h: Tensor::zeros((batch, self.a_log.dim(0)?), dtype, dev)?,
        })
    }

    /// One token: x is (batch, 1, d). O(1) in the context length.
    pub fn step(&self, x: &Tensor, state: &mut SsmState) -> Result<Tensor> {
        let xz = apply(&self.in_proj, &self.norm.forward(x, false)?)?;
        let xs = xz.narrow(2, 0, self.d_inner)?;
        let z = xz.narrow(2, self.d_inner, self.d_inner)?;
        let window = Tensor::cat(&[&state.conv, &xs], 1)?; // (b, k, d_inner)
        let mut y = self.conv_b.unsqueeze(0)?.unsqueeze(0)?.broadcast_as(xs.shape())?.clone();
        for j in 0..self.k {
            let tap = self.conv_w.narrow(1, j, 1)?.squeeze(1)?;
            y = (y + window.narrow(1, j, 1)?.broadcast_mul(&tap)?)?;
        }
        state.conv = window.narrow(1, 1, self.k - 1)?.contiguous()?;
        let xc = silu(&y)?;
        let h_prev = state.h.clone();
        let mut new_h = None;
        let mixed = self.mix(&xc, &z, |a, u| {
            let h = ((a.squeeze(1)? * &h_prev)? + u.squeeze(1)?)?;
            new_h = Some(h.clone());
            h.unsqueeze(1)
        })?;
        if let Some(h) = new_h {
            state.h = h;
        }
        x + apply(&self.out_proj, &mixed)?
    }
}

fn expert(d: usize, e: usize, vb: VarBuilder) -> Result<(Linear, Linear)> {
    Ok((linear(d, e, false, vb.pp("up"))?, linear(e, d, false, vb.pp("down"))?))
}

fn run_expert(ex: &(Linear, Linear), x: &Tensor) -> Result<Tensor> {
    apply(&ex.1, &gelu(&apply(&ex.0, x)?)?)
}

/// Pre-LN dense FFN with one expert's shape (the study's fallback on non-MoE layers).
pub struct Ffn {
    pub(crate) norm: LayerNorm,
    pub(crate) ff: (Linear, Linear),
    p_drop: f64,
}

impl Ffn {
    pub fn new(cfg: &IteraConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Ffn {
            norm: LayerNorm::new(cfg.d_model, cfg.ln_eps, vb.pp("norm"))?,
            ff: expert(cfg.d_model, cfg.expert_dim, vb)?,
            p_drop: cfg.dropout,
        })
    }
    /// The layer's parameters in the fused node's order, on rows of width d.
    pub(crate) fn layout(&self, d: usize) -> Result<fused::ExpertsLayout<'_>> {
        let ln = (&self.norm.weight, &self.norm.bias, self.norm.eps);
        fused::experts_layout(ln, &[(self.ff.0.weight(), self.ff.1.weight())], d)
    }
    /// In f32 the whole layer is one fused node (quantized weights on their integer kernels at
    /// inference); training with quantized weights goes op by op.
    pub fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let quant = fused::ExpertsQuant { up: vec![self.ff.0.quant.clone()], down: vec![self.ff.1.quant.clone()] };
        let quantized = self.ff.0.quantized().is_some() || self.ff.1.quantized().is_some();
        let is_train = train.is_some();
        if x.dtype() == DType::F32 && x.rank() == 2 && !(quantized && is_train) {
            let dropped = is_train && self.p_drop > 0.0;
            let layout = self.layout(x.dim(1)?)?;
            let out = fused::experts(x, None, &layout.pack()?, layout.dims, quant, !dropped, is_train)?;
            return if dropped { x + dropout(&out, self.p_drop, train)? } else { Ok(out) };
        }
        self.forward_ops(x, train)
    }

    /// The layer op by op: the reference the fused node is tested against.
    pub fn forward_ops(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let out = run_expert(&self.ff, &self.norm.forward(x, train.is_some())?)?;
        x + dropout(&out, self.p_drop, train)?
    }
}

/// What a MoE layer reports besides its output.
pub struct MoeOut {
    pub out: Tensor,
    /// Auxiliary balance loss (scalar, unweighted).
    pub aux: Tensor,
    /// Tokens routed to each expert (each token counts once per selected expert).
    pub load: Tensor,
}

pub struct Moe {
    pub(crate) norm: LayerNorm,
    pub(crate) router: Linear,
    pub(crate) experts: Vec<(Linear, Linear)>,
    pub(crate) top_k: usize,
    aux_kind: AuxLoss,
    p_drop: f64,
}

impl Moe {
    pub fn new(cfg: &IteraConfig, vb: VarBuilder) -> Result<Self> {
        let experts = (0..cfg.n_experts)
            .map(|e| expert(cfg.d_model, cfg.expert_dim, vb.pp(format!("experts.{e}"))))
            .collect::<Result<_>>()?;
        Ok(Moe {
            norm: LayerNorm::new(cfg.d_model, cfg.ln_eps, vb.pp("norm"))?,
            router: linear(cfg.d_model, cfg.n_experts, false, vb.pp("router"))?,
            experts,
            top_k: cfg.top_k,
            aux_kind: cfg.aux_loss,
            p_drop: cfg.dropout,
        })
    }
    /// The layer's parameters in the fused node's order (the router's apart), on rows of width d.
    pub(crate) fn layout(&self, d: usize) -> Result<fused::ExpertsLayout<'_>> {
        let pairs: Vec<_> = self.experts.iter().map(|ex| (ex.0.weight(), ex.1.weight())).collect();
        fused::experts_layout((&self.norm.weight, &self.norm.bias, self.norm.eps), &pairs, d)
    }

    /// Router → top-k → softmax over the k → weighted sum of the chosen experts; residual.
    /// In f32 one fused node runs each expert on its routed rows (training and inference); the
    /// op-by-op form computes training densely (gates are zero off the top-k, so the result is
    /// the same) and inference per expert.
    /// x: (batch, time, d) or its rows (batch · time, d); the output has x's shape.
    pub fn forward(&self, x: &Tensor, train: &mut Train) -> Result<MoeOut> {
        self.forward_with(x, train, true)
    }

    /// Training op by op: the reference the fused node is tested against.
    pub fn forward_ops(&self, x: &Tensor, train: &mut Train) -> Result<MoeOut> {
        self.forward_with(x, train, false)
    }

    fn forward_with(&self, x: &Tensor, train: &mut Train, fuse: bool) -> Result<MoeOut> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        let normed = self.norm.forward(x, train.is_some())?;
        let flat = if x.rank() == 2 { normed } else { normed.reshape((rows, d))? };
        let logits = apply(&self.router, &flat)?; // (T, E)
        let e = self.experts.len();
        let (sorted, _) = logits.detach().sort_last_dim(false)?;
        let kth = sorted.narrow(1, self.top_k - 1, 1)?;
        let mask = logits.detach().broadcast_ge(&kth)?.to_dtype(logits.dtype())?; // (T, E), k ones per row
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
        let weights = (shifted.exp()? * &mask)?;
        let gates = weights.broadcast_div(&weights.sum_keepdim(1)?)?; // softmax over the k
        let quantized = self.experts.iter().any(|(u, dn)| u.quantized().is_some() || dn.quantized().is_some());
        let fused_layer = fuse && x.dtype() == DType::F32 && x.rank() == 2 && !(quantized && train.is_some());
        let dropped = train.is_some() && self.p_drop > 0.0;
        let out = if fused_layer {
            // The whole layer (its own LayerNorm, each expert on its routed rows, the gates, the
            // residual) as one node; the LayerNorm above only feeds the router.
            let layout = self.layout(d)?;
            let (packed, dims) = (layout.pack()?, layout.dims);
            let quant = fused::ExpertsQuant {
                up: self.experts.iter().map(|ex| ex.0.quant.clone()).collect(),
                down: self.experts.iter().map(|ex| ex.1.quant.clone()).collect(),
            };
            fused::experts(x, Some(&gates), &packed, dims, quant, !dropped, train.is_some())?
        } else if train.is_some() {
            // Σ_j g_j · down_j(gelu(up_j x)) = [down_1 … down_E] · (g ⊗ gelu([up_1; …; up_E] x)):
            // every expert in two GEMMs and a handful of graph nodes instead of ~6 per expert.
            let ups: Vec<&Tensor> = self.experts.iter().map(|ex| ex.0.weight()).collect();
            let downs: Vec<&Tensor> = self.experts.iter().map(|ex| ex.1.weight()).collect();
            let hidden = gelu(&matmul_t(&flat, &Tensor::cat(&ups, 0)?)?)?; // (T, E·e)
            let t = hidden.dim(0)?;
            let ed = ups.first().map(|w| w.dim(0)).transpose()?.unwrap_or(0);
            let gated = hidden.reshape((t, e, ed))?.broadcast_mul(&gates.unsqueeze(2)?)?.reshape((t, e * ed))?;
            matmul_t(&gated, &Tensor::cat(&downs, 1)?)?
        } else {
            let mask_rows = mask.to_vec2::<f32>()?;
            let mut acc = Tensor::zeros_like(&flat)?;
            for (j, ex) in self.experts.iter().enumerate() {
                let idx: Vec<u32> =
                    mask_rows.iter().enumerate().filter(|(_, r)| r[j] > 0.0).map(|(t, _)| t as u32).collect();
                if idx.is_empty() {
                    continue;
                }
                let idx = Tensor::from_vec(idx.clone(), idx.len(), flat.device())?;
                let y = run_expert(ex, &flat.index_select(&idx, 0)?)?
                    .broadcast_mul(&gates.index_select(&idx, 0)?.narrow(1, j, 1)?)?;
                acc = acc.index_add(&idx, &y, 0)?;
            }
            acc
        };
        let probs = candle_nn::ops::softmax(&logits, 1)?;
        let p_mean = probs.mean(0)?; // (E)
        let aux = match self.aux_kind {
            AuxLoss::Cv2 => {
                // torch.var is unbiased; the study's loss is var(P) / mean(P)².
                let m = p_mean.mean_all()?;
                let var = (p_mean.broadcast_sub(&m)?.sqr()?.sum_all()? / ((e.max(2) - 1) as f64))?;
                (var / m.sqr()?)?
            }
            AuxLoss::Switch => {
                let f = (mask.sum(0)? / ((rows * self.top_k) as f64))?;
                ((f * &p_mean)?.sum_all()? * e as f64)?
            }
        };
        let out = if fused_layer && !dropped {
            out // the residual is already in
        } else {
            let out = if x.rank() == 2 { out } else { out.reshape(x.shape())? };
            (x + dropout(&out, self.p_drop, train)?)?
        };
        Ok(MoeOut { out, aux, load: mask.sum(0)? })
    }
}

pub enum FeedForward {
    Moe(Moe),
    Dense(Ffn),
}

impl FeedForward {
    /// The layer's parameters in the fused experts node's order, on rows of width d.
    pub(crate) fn layout(&self, d: usize) -> Result<fused::ExpertsLayout<'_>> {
        match self {
            FeedForward::Dense(f) => f.layout(d),
            FeedForward::Moe(m) => m.layout(d),
        }
    }
}

pub struct IteraLite {
    pub cfg: IteraConfig,
    pub(crate) emb: TiedEmbeddings,
    pub(crate) layers: Vec<(SsmBlock, FeedForward)>,
}

/// Output of a full-sequence forward.
pub struct Forward {
    pub logits: Tensor,
    /// Weighted auxiliary loss (zero for models without one).
    pub aux: Tensor,
    /// Per MoE layer, tokens routed to each expert.
    pub load: Vec<Vec<f32>>,
}

impl IteraLite {
    pub fn new(cfg: &IteraConfig, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let lv = vb.pp(format!("layers.{i}"));
            let ff = if cfg.moe_layers.contains(&i) {
                FeedForward::Moe(Moe::new(cfg, lv.pp("moe"))?)
            } else {
                FeedForward::Dense(Ffn::new(cfg, lv.pp("ffn"))?)
            };
            layers.push((SsmBlock::new(cfg, lv.pp("ssm"))?, ff));
        }
        Ok(IteraLite {
            cfg: cfg.clone(),
            emb: TiedEmbeddings::new(cfg.vocab_size, cfg.d_model, cfg.max_seq_len, cfg.ln_eps, &vb)?,
            layers,
        })
    }

    pub fn embed_weight(&self) -> &Tensor {
        self.emb.weight()
    }

    /// Every linear layer in model order, and the embeddings (for quantization).
    pub fn parts_mut(&mut self) -> (Vec<&mut Linear>, &mut TiedEmbeddings) {
        let mut out = Vec::new();
        for (ssm, ff) in &mut self.layers {
            out.extend([&mut ssm.in_proj, &mut ssm.delta_proj, &mut ssm.out_proj]);
            match ff {
                FeedForward::Dense(f) => out.extend([&mut f.ff.0, &mut f.ff.1]),
                FeedForward::Moe(m) => {
                    out.push(&mut m.router);
                    for e in &mut m.experts {
                        out.extend([&mut e.0, &mut e.1]);
                    }
                }
            }
        }
        (out, &mut self.emb)
    }

    pub fn forward(&self, ids: &Tensor, mut train: Train) -> Result<Forward> {
        let is_train = train.is_some();
        let (b, l) = ids.dims2()?;
        // Carried as rows (batch · seq, d) from here to the head: see `matmul_t`.
        let mut x =
            dropout(&self.emb.embed_at(ids, 0)?, self.cfg.dropout, &mut train)?.reshape((b * l, self.cfg.d_model))?;
        let mut aux = Tensor::zeros((), x.dtype(), x.device())?;
        let mut load = Vec::new();
        for (ssm, ff) in &self.layers {
            x = ssm.forward(&x, l, &mut train)?;
            x = match ff {
                FeedForward::Dense(f) => f.forward(&x, &mut train)?,
                FeedForward::Moe(m) => {
                    let o = m.forward(&x, &mut train)?;
                    aux = (aux + o.aux)?;
                    load.push(o.load.to_vec1::<f32>()?);
                    o.out
                }
            };
        }
        let aux = (aux * self.cfg.aux_weight)?;
        let logits = self.emb.head_seq(&x, is_train, (b, l))?;
        Ok(Forward { logits, aux, load })
    }

    pub fn zero_state(&self, batch: usize) -> Result<Vec<SsmState>> {
        let w = self.emb.weight();
        self.layers.iter().map(|(s, _)| s.zero_state(batch, w.dtype(), w.device())).collect()
    }

    /// Logits for one new token per sequence at position `pos`, updating `state`.
    pub fn step(&self, ids: &Tensor, pos: usize, state: &mut [SsmState]) -> Result<Tensor> {
        let mut x = self.emb.embed_at(ids, pos)?;
        for ((ssm, ff), st) in self.layers.iter().zip(state.iter_mut()) {
            x = ssm.step(&x, st)?;
            x = match ff {
                FeedForward::Dense(f) => f.forward(&x, &mut None)?,
                FeedForward::Moe(m) => m.forward(&x, &mut None)?.out,
            };
        }
        self.emb.head(&x, false)
    }
}
