//! The Transformer baseline: decoder-only, pre-LN, causal multi-head attention, GELU FFN,
//! learned positions, tied head; linear layers without bias (as the study's baseline, whose
//! parameter count this reproduces).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::TransformerConfig;
use crate::itera::Forward;
use crate::nn::{apply, dropout, gelu, linear, LayerNorm, Linear, TiedEmbeddings, Train};

pub(crate) struct Block {
    pub(crate) ln1: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) ln2: LayerNorm,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) heads: usize,
    p_drop: f64,
}

/// Keys and values seen so far, per layer: (batch, heads, time, head_dim).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Block {
    pub(crate) fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Block {
            ln1: LayerNorm::new(d, cfg.ln_eps, vb.pp("ln1"))?,
            qkv: linear(d, 3 * d, false, vb.pp("attn.qkv"))?,
            proj: linear(d, d, false, vb.pp("attn.proj"))?,
            ln2: LayerNorm::new(d, cfg.ln_eps, vb.pp("ln2"))?,
            up: linear(d, cfg.d_ff, false, vb.pp("mlp.up"))?,
            down: linear(cfg.d_ff, d, false, vb.pp("mlp.down"))?,
            heads: cfg.n_heads,
            p_drop: cfg.dropout,
        })
    }

    /// x: rows (batch · l, d), sequence after sequence. `past`: cached keys/values for earlier
    /// positions (generation); updated in place.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        shape: (usize, usize),
        train: &mut Train,
        past: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        self.forward_with(x, shape, train, past, true)
    }

    /// The attention node's sizes on rows of width d in sequences of l.
    pub(crate) fn attention_dims(&self, d: usize, l: usize) -> crate::fused::AttentionDims {
        crate::fused::AttentionDims { d, heads: self.heads, seq_len: l, eps: self.ln1.eps }
    }

    /// The attention node's parameters in its packing order.
    pub(crate) fn attention_params(&self) -> [&Tensor; 4] {
        [&self.ln1.weight, &self.ln1.bias, self.qkv.weight(), self.proj.weight()]
    }

    /// The MLP as the experts node's layout: one expert of width d_ff, on rows of width d.
    pub(crate) fn mlp_layout(&self, d: usize) -> Result<crate::fused::ExpertsLayout<'_>> {
        let ln = (&self.ln2.weight, &self.ln2.bias, self.ln2.eps);
        crate::fused::experts_layout(ln, &[(self.up.weight(), self.down.weight())], d)
    }

    /// The block op by op: the reference the fused nodes are tested against.
    #[cfg(test)]
    pub(crate) fn forward_ops(&self, x: &Tensor, shape: (usize, usize), train: &mut Train) -> Result<Tensor> {
        self.forward_with(x, shape, train, None, false)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        (b, l): (usize, usize),
        train: &mut Train,
        past: Option<&mut Option<(Tensor, Tensor)>>,
        fuse: bool,
    ) -> Result<Tensor> {
        let is_train = train.is_some();
        let quantized = self.qkv.quantized().is_some() || self.proj.quantized().is_some();
        if fuse && past.is_none() && x.dtype() == DType::F32 && !(quantized && is_train) {
            let quant = crate::fused::AttentionQuant { qkv: self.qkv.quant.clone(), out: self.proj.quant.clone() };
            // Full sequences: attention and MLP each one fused node.
            let dims = self.attention_dims(x.dim(1)?, l);
            let [ln_w, ln_b, w_qkv, w_out] = self.attention_params();
            let packed = crate::fused::pack_attention(&dims, ln_w, ln_b, w_qkv, w_out)?;
            let dropped = is_train && self.p_drop > 0.0;
            let a = crate::fused::attention_block(x, &packed, dims, quant, !dropped, is_train)?;
            let x = if dropped { (x + dropout(&a, self.p_drop, train)?)? } else { a };
            return self.mlp(&x, train, true);
        }
        let d = x.dim(1)?;
        let hd = d / self.heads;
        let qkv = apply(&self.qkv, &self.ln1.forward(x, is_train)?)?.reshape((b, l, 3, self.heads, hd))?;
        let q = qkv.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?; // (b, h, l, hd)
        let mut k = qkv.narrow(2, 1, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
        let mut v = qkv.narrow(2, 2, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
        let mut offset = 0;
        if let Some(cache) = past {
            if let Some((pk, pv)) = cache.as_ref() {
                offset = pk.dim(2)?;
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let scores = q.matmul(&k.t()?)?; // (b, h, l, offset + l)
        let scale = 1.0 / (hd as f64).sqrt();
        let att = if scores.dtype() == DType::F32 {
            crate::fused::causal_softmax(&scores, scale as f32, offset)?
        } else {
            // Query i (at absolute position offset+i) may see keys 0..=offset+i.
            let total = offset + l;
            let mask: Vec<f32> = (0..l)
                .flat_map(|i| (0..total).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (l, total), x.device())?.to_dtype(scores.dtype())?;
            candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)?
        };
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b * l, d))?;
        let x = (x + dropout(&apply(&self.proj, &y)?, self.p_drop, train)?)?;
        self.mlp(&x, train, fuse)
    }

    /// x + MLP(LN2(x)): in f32 one fused node (the experts op with a single expert of width
    /// d_ff; quantized weights on their integer kernels at inference), else op by op.
    fn mlp(&self, x: &Tensor, train: &mut Train, fuse: bool) -> Result<Tensor> {
        let is_train = train.is_some();
        let quantized = self.up.quantized().is_some() || self.down.quantized().is_some();
        if fuse && x.dtype() == DType::F32 && !(quantized && is_train) {
            let quant =
                crate::fused::ExpertsQuant { up: vec![self.up.quant.clone()], down: vec![self.down.quant.clone()] };
            let dropped = is_train && self.p_drop > 0.0;
            let layout = self.mlp_layout(x.dim(1)?)?;
            let out = crate::fused::experts(x, None, &layout.pack()?, layout.dims, quant, !dropped, is_train)?;
            return if dropped { x + dropout(&out, self.p_drop, train)? } else { Ok(out) };
        }
        let h = apply(&self.down, &gelu(&apply(&self.up, &self.ln2.forward(x, is_train)?)?)?)?;
        x + dropout(&h, self.p_drop, train)?
    }
}

pub struct Transformer {
    pub cfg: TransformerConfig,
    pub(crate) emb: TiedEmbeddings,
    pub(crate) blocks: Vec<Block>,
}

impl Transformer {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Transformer {
            cfg: cfg.clone(),
            emb: TiedEmbeddings::new(cfg.vocab_size, cfg.d_model, cfg.max_seq_len, cfg.ln_eps, &vb)?,
            blocks: (0..cfg.n_layers).map(|i| Block::new(cfg, vb.pp(format!("layers.{i}")))).collect::<Result<_>>()?,
        })
    }

    pub fn forward(&self, ids: &Tensor, mut train: Train) -> Result<Forward> {
        let is_train = train.is_some();
        let (b, l) = ids.dims2()?;
        // Rows (batch · seq, d) between the embedding and the head, as Itera-Lite's forward.
        let mut x =
            dropout(&self.emb.embed_at(ids, 0)?, self.cfg.dropout, &mut train)?.reshape((b * l, self.cfg.d_model))?;
        for block in &self.blocks {
            x = block.forward(&x, (b, l), &mut train, None)?;
        }
        let logits = self.emb.head_seq(&x, is_train, (b, l))?;
        Ok(Forward { aux: Tensor::zeros((), DType::F32, logits.device())?, logits, load: Vec::new() })
    }

    /// Every linear layer in model order, and the embeddings (for quantization).
    pub fn parts_mut(&mut self) -> (Vec<&mut Linear>, &mut TiedEmbeddings) {
        (
            self.blocks.iter_mut().flat_map(|b| [&mut b.qkv, &mut b.proj, &mut b.up, &mut b.down]).collect(),
            &mut self.emb,
        )
    }

    pub fn empty_cache(&self) -> KvCache {
        KvCache { layers: vec![None; self.blocks.len()] }
    }

    /// Logits for `ids` (batch, t) starting at position `pos`, using and extending the cache.
    pub fn step(&self, ids: &Tensor, pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.emb.embed_at(ids, pos)?.reshape((b * l, self.cfg.d_model))?;
        for (block, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, (b, l), &mut None, Some(c))?;
        }
        self.emb.head(&x, false)?.reshape((b, l, self.cfg.vocab_size))
    }
}
