//! What the hand-written training steps ([`crate::itera_step`], [`crate::transformer_step`])
//! share: the token and position embeddings, the final LayerNorm with the head tied to the
//! token embedding and the next-token loss, their backwards, and the moves between candle's
//! parameters and the packed slices the fused pieces take.
//!
//! Through candle's autograd every node input's gradient is a freshly zeroed tensor plus an add
//! (`GradStore::or_insert`), and the fused nodes' packed parameters are concatenated in the
//! forward and narrowed apart in the backward. A hand-written step calls the fused pieces'
//! forwards and backwards on slices and sums each gradient in place where it arises; the tests
//! hold each step's gradients to autograd's.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use crate::fused;
use crate::linear_op::Product;
use crate::nn::{layer_norm_bwd, normalize_rows, row_stats, TiedEmbeddings};

/// A step's losses and every parameter's gradient.
pub struct StepGrads {
    /// Next-token cross-entropy, mean over the scored positions.
    pub ce: f32,
    /// The auxiliary balance loss, weighted (what the step minimises besides `ce`; zero for a
    /// model without one).
    pub aux: f32,
    pub grads: GradStore,
}

/// A tensor's values, copied out.
pub(crate) fn values(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    fused::with_values(t, op, |v| Ok(v.to_vec()))
}

/// Parameters concatenated, flattened, in order: the packing the fused nodes take.
pub(crate) fn pack(params: &[&Tensor], op: &str) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(params.iter().map(|t| t.elem_count()).sum());
    for t in params {
        fused::with_values(t, op, |v| {
            out.extend_from_slice(v);
            Ok(())
        })?;
    }
    Ok(out)
}

/// Hands each parameter its slice of a gradient packed as [`pack`] packs them: views into one
/// tensor that owns the packed vector (copying each slice out cost ≈ 0.4 % of a step).
pub(crate) fn unpack(params: &[&Tensor], grad: Vec<f32>, store: &mut GradStore, op: &str) -> Result<()> {
    let total: usize = params.iter().map(|t| t.elem_count()).sum();
    if total != grad.len() {
        candle_core::bail!("{op}: a packed gradient of {} values for parameters of {total}", grad.len());
    }
    let packed = Tensor::from_vec(grad, total, &Device::Cpu)?;
    let mut at = 0;
    for t in params {
        let n = t.elem_count();
        store.insert(t, packed.narrow(0, at, n)?.reshape(t.shape())?);
        at += n;
    }
    Ok(())
}

/// candle 0.11's `GradStore` has no public constructor; the backward of a constant (nothing
/// behind it) returns a store holding only the constant's own gradient, removed here.
pub(crate) fn empty_store() -> Result<GradStore> {
    let c = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut store = c.backward()?;
    store.remove(&c);
    Ok(store)
}

/// A batch of token ids (batch, seq) checked against the model, and the token embedding's and
/// position embedding's values (the head reads the first again).
pub(crate) struct Tokens {
    pub(crate) ids: Vec<u32>,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    emb: Vec<f32>,
    pos: Vec<f32>,
}

impl Tokens {
    /// Checks `ids` and returns them with the input rows (batch · seq, d): each token's
    /// embedding plus its position's.
    pub(crate) fn embed(e: &TiedEmbeddings, ids: &Tensor, op: &str) -> Result<(Tokens, Vec<f32>)> {
        let (batch, seq) = ids.dims2()?;
        let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let (emb, pos) = (values(e.weight(), op)?, values(e.pos.embeddings(), op)?);
        let d = e.pos.hidden_size();
        let (vocab, max_seq) = (emb.len() / d.max(1), pos.len() / d.max(1));
        if seq < 2 {
            candle_core::bail!("need at least 2 tokens per sequence for a next-token loss");
        }
        if seq > max_seq {
            candle_core::bail!("sequence of {seq} tokens exceeds max_seq_len {max_seq}");
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token id {t} is outside the vocabulary of {vocab}");
        }
        let mut x = Vec::with_capacity(ids.len() * d);
        for (r, &t) in ids.iter().enumerate() {
            let (tok, at) = (&emb[t as usize * d..(t as usize + 1) * d], &pos[(r % seq) * d..(r % seq + 1) * d]);
            x.extend(tok.iter().zip(at).map(|(a, p)| a + p));
        }
        Ok((Tokens { ids, batch, seq, emb, pos }, x))
    }

    /// The final LayerNorm on the last block's rows `x`, the head tied to the token embedding,
    /// the next-token loss and its backward to `x`: the loss, x's gradient, and the head's
    /// share of the token embedding's gradient. The LayerNorm's gradients go into `store`.
    pub(crate) fn head_loss(&self, e: &TiedEmbeddings, x: &[f32], store: &mut GradStore, op: &str) -> Result<Head> {
        let norm_f = &e.norm_f;
        let (d, rows, l) = (norm_f.weight.elem_count(), self.ids.len(), self.seq);
        let vocab = self.emb.len() / d.max(1);
        let (wf, bf) = (values(&norm_f.weight, op)?, values(&norm_f.bias, op)?);
        let stats = row_stats(x, d, norm_f.eps);
        let normed = normalize_rows(x, &wf, &bf, &stats)?;
        let (logits, _) = Product::ABt.run((&normed, rows, d), (&self.emb, vocab, d))?;
        let count = self.batch * (l - 1);
        let ce = (fused::nll_sum(&logits, vocab, &self.ids, l) / count as f64) as f32;
        let mut dlogits = vec![0f32; rows * vocab];
        fused::nll_grad(&logits, vocab, &self.ids, l, 1.0 / count as f32, &mut dlogits);
        drop(logits);
        let (demb, _) = Product::AtB.run((&dlogits, rows, vocab), (&normed, rows, d))?;
        let (dnormed, _) = Product::AB.run((&dlogits, rows, vocab), (&self.emb, vocab, d))?;
        drop(dlogits);
        let (dx, dw, db) = layer_norm_bwd(x, &wf, &stats, &dnormed, None)?;
        store.insert(&norm_f.weight, Tensor::from_vec(dw, d, &Device::Cpu)?);
        store.insert(&norm_f.bias, Tensor::from_vec(db, d, &Device::Cpu)?);
        Ok(Head { ce, dx, demb })
    }

    /// The embeddings' gradients from the input rows' gradient `dx` and the head's share of the
    /// token embedding's (`demb`): each row's, by token and by position.
    pub(crate) fn embed_backward(
        &self,
        e: &TiedEmbeddings,
        dx: &[f32],
        mut demb: Vec<f32>,
        store: &mut GradStore,
    ) -> Result<()> {
        let d = e.pos.hidden_size();
        let l = self.seq;
        let mut dpos = vec![0f32; self.pos.len()];
        for (r, (&t, g)) in self.ids.iter().zip(dx.chunks_exact(d)).enumerate() {
            let row = &mut demb[t as usize * d..(t as usize + 1) * d];
            row.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
            let at = &mut dpos[(r % l) * d..(r % l + 1) * d];
            at.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
        }
        let (w, pos) = (e.weight(), e.pos.embeddings());
        store.insert(w, Tensor::from_vec(demb, w.shape(), &Device::Cpu)?);
        store.insert(pos, Tensor::from_vec(dpos, pos.shape(), &Device::Cpu)?);
        Ok(())
    }
}

/// What [`Tokens::head_loss`] returns.
pub(crate) struct Head {
    pub(crate) ce: f32,
    /// The last block's output rows' gradient.
    pub(crate) dx: Vec<f32>,
    /// The head's share of the token embedding's gradient (the lookups' is added later).
    pub(crate) demb: Vec<f32>,
}
