//! One Itera-Lite training step — forward, loss and the whole backward — on plain slices,
//! without candle's autograd graph.
//!
//! Through candle, every node input's gradient is a freshly zeroed tensor plus an add
//! (`GradStore::or_insert`), the fused nodes' packed parameters are concatenated in the forward
//! and narrowed apart in the backward, and the MoE router runs as a dozen small nodes: ≈ 4.75 %
//! of a step (docs/results.md). Here the fused pieces' forwards and backwards (SSM block,
//! experts, LayerNorm, next-token loss) are called directly, each gradient is summed in place
//! where it arises, and the router, the embeddings and the tied head are written out. It covers
//! the f32 model without dropout ([`supported`]); anything else trains through autograd, which
//! the tests hold this step's gradients to.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use crate::config::AuxLoss;
use crate::fused::{self, ExpertsQuant, ExpertsSaved, InputGrad, Pass, SsmBlockQuant, SsmSaved};
use crate::itera::{FeedForward, IteraLite, Moe};
use crate::linear_op::Product;
use crate::nn::{layer_norm_bwd, normalize_rows, row_stats};

const OP: &str = "itera-lite step";

/// A step's losses and every parameter's gradient.
pub struct StepGrads {
    /// Next-token cross-entropy, mean over the scored positions.
    pub ce: f32,
    /// The auxiliary balance loss, weighted (what the step minimises besides `ce`).
    pub aux: f32,
    pub grads: GradStore,
}

/// Whether [`step`] covers this model: f32 weights, no dropout, no quantized copies (training
/// quantized weights is refused anyway).
pub fn supported(m: &IteraLite) -> bool {
    let quantized = {
        let mut any = m.emb.head_quantized().is_some();
        for (ssm, ff) in &m.layers {
            any |= [&ssm.in_proj, &ssm.delta_proj, &ssm.out_proj].iter().any(|l| l.quantized().is_some());
            any |= match ff {
                FeedForward::Dense(f) => f.ff.0.quantized().is_some() || f.ff.1.quantized().is_some(),
                FeedForward::Moe(moe) => {
                    moe.router.quantized().is_some()
                        || moe.experts.iter().any(|(u, d)| u.quantized().is_some() || d.quantized().is_some())
                }
            };
        }
        any
    };
    m.cfg.dropout <= 0.0 && !quantized && m.emb.weight().dtype() == DType::F32 && m.emb.weight().device().is_cpu()
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    fused::with_values(t, OP, |v| Ok(v.to_vec()))
}

/// Parameters concatenated, flattened, in order: the packing the fused nodes take.
fn pack(params: &[&Tensor]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(params.iter().map(|t| t.elem_count()).sum());
    for t in params {
        fused::with_values(t, OP, |v| {
            out.extend_from_slice(v);
            Ok(())
        })?;
    }
    Ok(out)
}

/// Hands each parameter its slice of a gradient packed as [`pack`] packs them: views into one
/// tensor that owns the packed vector (copying each slice out cost ≈ 0.4 % of a step).
fn unpack(params: &[&Tensor], grad: Vec<f32>, store: &mut GradStore) -> Result<()> {
    let total: usize = params.iter().map(|t| t.elem_count()).sum();
    if total != grad.len() {
        candle_core::bail!("{OP}: a packed gradient of {} values for parameters of {total}", grad.len());
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
fn empty_store() -> Result<GradStore> {
    let c = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut store = c.backward()?;
    store.remove(&c);
    Ok(store)
}

/// What the router's backward needs besides the LayerNorm's output (kept by the experts): the
/// gates (softmax over each row's top k, zero elsewhere) and the full softmax the balance loss
/// averages.
struct Router {
    gates: Vec<f32>,
    probs: Vec<f32>,
    /// Per expert, the fraction of routing slots it took (the Switch loss's f, not differentiated).
    share: Vec<f32>,
    /// Per expert, the balance loss's derivative by that expert's mean probability, unweighted.
    daux_dpmean: Vec<f32>,
}

/// The MoE router on the layer's LayerNorm output (rows, d) — the experts' too: as
/// `Moe::forward` computes it (linear, top k by value with ties kept, softmax over the chosen),
/// with the unweighted balance loss.
fn router_forward(moe: &Moe, kind: AuxLoss, normed: &[f32], rows: usize, d: usize) -> Result<(Router, f32)> {
    let wr = values(moe.router.weight())?;
    let e = wr.len() / d.max(1);
    if moe.top_k == 0 || moe.top_k > e {
        candle_core::bail!("{OP}: top_k {} of {e} experts", moe.top_k);
    }
    let (logits, _) = Product::ABt.run((normed, rows, d), (&wr, e, d))?;
    let (mut gates, mut probs) = (vec![0f32; rows * e], vec![0f32; rows * e]);
    let mut chosen = vec![0usize; e];
    let mut sorted = vec![0f32; e];
    for ((lr, gr), pr) in logits.chunks_exact(e).zip(gates.chunks_exact_mut(e)).zip(probs.chunks_exact_mut(e)) {
        sorted.copy_from_slice(lr);
        sorted.sort_by(|a, b| b.total_cmp(a));
        let (max, kth) = (sorted[0], sorted[moe.top_k - 1]);
        let (mut sum_g, mut sum_p) = (0f32, 0f32);
        for (j, ((&l, g), p)) in lr.iter().zip(gr.iter_mut()).zip(pr.iter_mut()).enumerate() {
            let ex = (l - max).exp();
            *p = ex;
            sum_p += ex;
            if l >= kth {
                *g = ex;
                sum_g += ex;
                chosen[j] += 1;
            }
        }
        gr.iter_mut().for_each(|g| *g /= sum_g);
        pr.iter_mut().for_each(|p| *p /= sum_p);
    }
    let mut p_mean = vec![0f32; e];
    for pr in probs.chunks_exact(e) {
        p_mean.iter_mut().zip(pr).for_each(|(m, &p)| *m += p);
    }
    p_mean.iter_mut().for_each(|m| *m /= rows as f32);
    let share: Vec<f32> = chosen.iter().map(|&c| c as f32 / (rows * moe.top_k) as f32).collect();
    let (aux, daux_dpmean) = match kind {
        AuxLoss::Cv2 => {
            // var(P) / mean(P)², var unbiased (torch.var).
            let m = p_mean.iter().sum::<f32>() / e as f32;
            let c = (e.max(2) - 1) as f32;
            let var = p_mean.iter().map(|p| (p - m) * (p - m)).sum::<f32>() / c;
            let d: Vec<f32> =
                p_mean.iter().map(|p| 2.0 * (p - m) / c / (m * m) - 2.0 * var / (m * m * m) / e as f32).collect();
            (var / (m * m), d)
        }
        AuxLoss::Switch => {
            let aux = e as f32 * share.iter().zip(&p_mean).map(|(f, p)| f * p).sum::<f32>();
            (aux, share.iter().map(|f| e as f32 * f).collect())
        }
    };
    Ok((Router { gates, probs, share, daux_dpmean }, aux))
}

/// The router's backward: from the gates' gradient and the balance loss's weight to the
/// router's weight gradient, adding the router's share of the LayerNorm output's gradient into
/// `dnormed` (which holds the experts' share; one LayerNorm backward then serves both).
fn router_backward(
    moe: &Moe,
    r: &Router,
    normed: &[f32],
    dgates: &[f32],
    aux_weight: f32,
    dnormed: &mut [f32],
    store: &mut GradStore,
) -> Result<()> {
    let e = r.share.len();
    let rows = dgates.len() / e.max(1);
    let d = normed.len() / rows.max(1);
    let dprob: Vec<f32> = r.daux_dpmean.iter().map(|g| aux_weight * g / rows as f32).collect();
    let mut dlogits = vec![0f32; rows * e];
    for (((dl, g), p), dg) in dlogits
        .chunks_exact_mut(e)
        .zip(r.gates.chunks_exact(e))
        .zip(r.probs.chunks_exact(e))
        .zip(dgates.chunks_exact(e))
    {
        let gdot: f32 = g.iter().zip(dg).map(|(a, b)| a * b).sum();
        let pdot: f32 = p.iter().zip(&dprob).map(|(a, b)| a * b).sum();
        for ((((o, &gj), &pj), &dgj), &dpj) in dl.iter_mut().zip(g).zip(p).zip(dg).zip(&dprob) {
            *o = gj * (dgj - gdot) + pj * (dpj - pdot);
        }
    }
    let wr = values(moe.router.weight())?;
    let (dwr, _) = Product::AtB.run((&dlogits, rows, e), (normed, rows, d))?;
    store.insert(moe.router.weight(), Tensor::from_vec(dwr, (e, d), &Device::Cpu)?);
    Product::AB.write_into((&dlogits, rows, e), (&wr, e, d), dnormed, true)
}

/// What one layer's backward needs.
struct Layer {
    x_ssm: Vec<f32>,
    p_ssm: Vec<f32>,
    ssm: SsmSaved,
    x_ff: Vec<f32>,
    p_ff: Vec<f32>,
    ff: ExpertsSaved,
    router: Option<Router>,
}

/// The training step of `m` on ids (batch, seq): losses and every parameter's gradient of
/// `ce + aux`. Call only when [`supported`].
pub fn step(m: &IteraLite, ids: &Tensor) -> Result<StepGrads> {
    let (b, l) = ids.dims2()?;
    let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let cfg = &m.cfg;
    let (d, vocab, rows) = (cfg.d_model, cfg.vocab_size, b * l);
    if l < 2 {
        candle_core::bail!("need at least 2 tokens per sequence for a next-token loss");
    }
    if l > cfg.max_seq_len {
        candle_core::bail!("sequence of {l} tokens exceeds max_seq_len {}", cfg.max_seq_len);
    }
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("token id {t} is outside the vocabulary of {vocab}");
    }
    let (emb, pos) = (values(m.emb.weight())?, values(m.emb.pos.embeddings())?);
    let mut x = Vec::with_capacity(rows * d);
    for (r, &t) in ids.iter().enumerate() {
        let (tok, at) = (&emb[t as usize * d..(t as usize + 1) * d], &pos[(r % l) * d..(r % l + 1) * d]);
        x.extend(tok.iter().zip(at).map(|(a, p)| a + p));
    }

    let mut saved = Vec::with_capacity(m.layers.len());
    let mut aux = 0f32;
    for (ssm, ff) in &m.layers {
        let p_ssm = pack(&ssm.params()?)?;
        let (out, s) = fused::ssm_block_forward(&ssm.dims(l), &SsmBlockQuant::default(), true, true, &x, &p_ssm)?;
        let x_ssm = std::mem::replace(&mut x, out);
        let layout = ff.layout(d)?;
        let (params, dims) = (layout.params, layout.dims);
        let p_ff = pack(&params)?;
        let (router, ln) = match ff {
            FeedForward::Dense(_) => (None, None),
            FeedForward::Moe(moe) => {
                let ln = fused::experts_norm(&dims, &x, &p_ff)?;
                let (r, a) = router_forward(moe, cfg.aux_loss, &ln.out, rows, d)?;
                aux += a;
                (Some(r), Some(ln))
            }
        };
        let gates = router.as_ref().map(|r| &r.gates[..]);
        let pass = Pass { residual: true, keep: true };
        let (out, s_ff) = fused::experts_forward(&dims, &ExpertsQuant::default(), pass, &x, ln, gates, &p_ff)?;
        let x_ff = std::mem::replace(&mut x, out);
        saved.push(Layer { x_ssm, p_ssm, ssm: s, x_ff, p_ff, ff: s_ff, router });
    }

    // Final LayerNorm, the head tied to the token embedding, the loss and its gradient.
    let norm_f = &m.emb.norm_f;
    let (wf, bf) = (values(&norm_f.weight)?, values(&norm_f.bias)?);
    let stats_f = row_stats(&x, d, norm_f.eps);
    let normed_f = normalize_rows(&x, &wf, &bf, &stats_f)?;
    let (logits, _) = Product::ABt.run((&normed_f, rows, d), (&emb, vocab, d))?;
    let count = b * (l - 1);
    let ce = (fused::nll_sum(&logits, vocab, &ids, l) / count as f64) as f32;
    let mut dlogits = vec![0f32; rows * vocab];
    fused::nll_grad(&logits, vocab, &ids, l, 1.0 / count as f32, &mut dlogits);
    drop(logits);

    let mut store = empty_store()?;
    let (mut demb, _) = Product::AtB.run((&dlogits, rows, vocab), (&normed_f, rows, d))?;
    let (dnormed_f, _) = Product::AB.run((&dlogits, rows, vocab), (&emb, vocab, d))?;
    drop(dlogits);
    let (mut dx, dw, db) = layer_norm_bwd(&x, &wf, &stats_f, &dnormed_f, None)?;
    store.insert(&norm_f.weight, Tensor::from_vec(dw, d, &Device::Cpu)?);
    store.insert(&norm_f.bias, Tensor::from_vec(db, d, &Device::Cpu)?);

    for ((ssm, ff), s) in m.layers.iter().zip(saved).rev() {
        let layout = ff.layout(d)?;
        let (params, dims) = (layout.params, layout.dims);
        let gates = s.router.as_ref().map(|r| &r.gates[..]);
        // With a router, the experts stop at their LayerNorm's output: the router reads the same
        // LayerNorm, and one backward of it takes both gradients.
        let want = if s.router.is_some() { InputGrad::Normed } else { InputGrad::X { residual: true } };
        let (first, dgates, mut dp) = fused::experts_backward(&dims, want, &s.x_ff, gates, &s.p_ff, &s.ff, &dx)?;
        dx = match (ff, &s.router) {
            (FeedForward::Moe(moe), Some(r)) => {
                let mut dnormed = first;
                router_backward(moe, r, &s.ff.ln.out, &dgates, cfg.aux_weight as f32, &mut dnormed, &mut store)?;
                let (dx_in, dw, db) = layer_norm_bwd(&s.x_ff, &s.p_ff[..d], &s.ff.ln.stats, &dnormed, Some(&dx))?;
                dp[..d].copy_from_slice(&dw);
                dp[d..2 * d].copy_from_slice(&db);
                dx_in
            }
            _ => first,
        };
        unpack(&params, dp, &mut store)?;
        let (dx_ssm, dp) = fused::ssm_block_backward(&ssm.dims(l), true, &s.x_ssm, &s.p_ssm, &s.ssm, &dx)?;
        unpack(&ssm.params()?, dp, &mut store)?;
        dx = dx_ssm;
    }

    // The embeddings: the head's gradient plus each row's, by token and by position.
    let mut dpos = vec![0f32; pos.len()];
    for (r, (&t, g)) in ids.iter().zip(dx.chunks_exact(d)).enumerate() {
        let row = &mut demb[t as usize * d..(t as usize + 1) * d];
        row.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
        let at = &mut dpos[(r % l) * d..(r % l + 1) * d];
        at.iter_mut().zip(g).for_each(|(a, &v)| *a += v);
    }
    store.insert(m.emb.weight(), Tensor::from_vec(demb, (vocab, d), &Device::Cpu)?);
    let pos_t = m.emb.pos.embeddings();
    store.insert(pos_t, Tensor::from_vec(dpos, pos_t.shape(), &Device::Cpu)?);
    Ok(StepGrads { ce, aux: aux * cfg.aux_weight as f32, grads: store })
}
