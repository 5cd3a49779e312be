//! One Itera-Lite training step — forward, loss and the whole backward — on plain slices,
//! without candle's autograd graph ([`crate::hand_step`] says why).
//!
//! Through candle, besides the zeroed gradient buffers and the packing every fused node costs,
//! the MoE router runs as a dozen small nodes: ≈ 4.75 % of a step (docs/results.md). Here the
//! fused pieces' forwards and backwards (SSM block, experts, LayerNorm, next-token loss) are
//! called directly, and the router is written out. It covers the f32 model without dropout
//! ([`supported`]); anything else trains through autograd, which the tests hold this step's
//! gradients to.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use crate::config::AuxLoss;
use crate::fused::{self, ExpertsQuant, ExpertsSaved, InputGrad, Pass, SsmBlockQuant, SsmSaved};
pub use crate::hand_step::StepGrads;
use crate::hand_step::{empty_store, Tokens};
use crate::itera::{FeedForward, IteraLite, Moe};
use crate::linear_op::Product;
use crate::nn::layer_norm_bwd;

const OP: &str = "itera-lite step";

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
    crate::hand_step::values(t, OP)
}

fn pack(params: &[&Tensor]) -> Result<Vec<f32>> {
    crate::hand_step::pack(params, OP)
}

fn unpack(params: &[&Tensor], grad: Vec<f32>, store: &mut GradStore) -> Result<()> {
    crate::hand_step::unpack(params, grad, store, OP)
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
    let (tokens, mut x) = Tokens::embed(&m.emb, ids, OP)?;
    let cfg = &m.cfg;
    let (d, l, rows) = (cfg.d_model, tokens.seq, tokens.ids.len());

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

    let mut store = empty_store()?;
    let head = tokens.head_loss(&m.emb, &x, &mut store, OP)?;
    let mut dx = head.dx;

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

    tokens.embed_backward(&m.emb, &dx, head.demb, &mut store)?;
    Ok(StepGrads { ce: head.ce, aux: aux * cfg.aux_weight as f32, grads: store })
}
