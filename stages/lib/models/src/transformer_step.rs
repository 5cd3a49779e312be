//! One Transformer training step — forward, loss and the whole backward — on plain slices,
//! without candle's autograd graph ([`crate::hand_step`] says why).
//!
//! Through candle the step is already a handful of fused nodes (attention, MLP, head, loss), but
//! its backward still built a zeroed buffer and an add per node input and concatenated the
//! blocks' packed parameters each step: ≈ 3.5 % of a step in profiles (`Tensor::add`, `zeros_like`,
//! the graph walk, `cat`). Here the attention and MLP nodes' forwards and backwards are called on
//! slices and each gradient lands where it arises. It covers the f32 model without dropout
//! ([`supported`]); anything else trains through autograd, which the tests hold this step's
//! gradients to.

use candle_core::{DType, Result, Tensor};

use crate::fused::{self, AttentionQuant, AttentionSaved, ExpertsQuant, ExpertsSaved, InputGrad, Pass};
use crate::hand_step::{empty_store, pack, unpack, StepGrads, Tokens};
use crate::transformer::Transformer;

const OP: &str = "transformer step";

/// Whether [`step`] covers this model: f32 weights on the CPU, no dropout, no quantized copies
/// (training quantized weights is refused anyway).
pub fn supported(m: &Transformer) -> bool {
    let quantized = m.emb.head_quantized().is_some()
        || m.blocks.iter().any(|b| [&b.qkv, &b.proj, &b.up, &b.down].iter().any(|l| l.quantized().is_some()));
    m.cfg.dropout <= 0.0 && !quantized && m.emb.weight().dtype() == DType::F32 && m.emb.weight().device().is_cpu()
}

/// What one block's backward needs: each sub-block's input, packed parameters and kept
/// intermediates.
struct Block {
    x_att: Vec<f32>,
    p_att: Vec<f32>,
    att: AttentionSaved,
    x_mlp: Vec<f32>,
    p_mlp: Vec<f32>,
    mlp: ExpertsSaved,
}

/// The training step of `m` on ids (batch, seq): the loss and every parameter's gradient.
/// Call only when [`supported`].
pub fn step(m: &Transformer, ids: &Tensor) -> Result<StepGrads> {
    let (tokens, mut x) = Tokens::embed(&m.emb, ids, OP)?;
    let (d, l) = (m.cfg.d_model, tokens.seq);
    let pass = Pass { residual: true, keep: true };
    let mut saved = Vec::with_capacity(m.blocks.len());
    for block in &m.blocks {
        let p_att = pack(&block.attention_params(), OP)?;
        let dims = block.attention_dims(d, l);
        let (out, att) = fused::attention_forward(&dims, &AttentionQuant::default(), true, true, &x, &p_att)?;
        let x_att = std::mem::replace(&mut x, out);
        let layout = block.mlp_layout(d)?;
        let p_mlp = pack(&layout.params, OP)?;
        let (out, mlp) = fused::experts_forward(&layout.dims, &ExpertsQuant::default(), pass, &x, None, None, &p_mlp)?;
        let x_mlp = std::mem::replace(&mut x, out);
        saved.push(Block { x_att, p_att, att, x_mlp, p_mlp, mlp });
    }

    let mut store = empty_store()?;
    let head = tokens.head_loss(&m.emb, &x, &mut store, OP)?;
    let mut dx = head.dx;
    for (block, s) in m.blocks.iter().zip(saved).rev() {
        let layout = block.mlp_layout(d)?;
        let want = InputGrad::X { residual: true };
        let (dx_mlp, _, dp) = fused::experts_backward(&layout.dims, want, &s.x_mlp, None, &s.p_mlp, &s.mlp, &dx)?;
        unpack(&layout.params, dp, &mut store, OP)?;
        let dims = block.attention_dims(d, l);
        let (dx_att, dp) = fused::attention_backward(&dims, true, &s.x_att, &s.p_att, &s.att, &dx_mlp)?;
        unpack(&block.attention_params(), dp, &mut store, OP)?;
        dx = dx_att;
    }
    tokens.embed_backward(&m.emb, &dx, head.demb, &mut store)?;
    Ok(StepGrads { ce: head.ce, aux: 0.0, grads: store })
}
