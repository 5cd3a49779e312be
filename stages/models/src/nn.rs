//! Building blocks shared by both models: a differentiable LayerNorm, seeded dropout,
//! seeded initialisation, and activations.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Training mode carries the RNG for dropout; inference passes `None`.
pub type Train<'a> = Option<&'a mut ChaCha8Rng>;

/// LayerNorm with weight and bias. candle-nn's LayerNorm takes a fused path without a
/// gradient for contiguous input, so training uses the op-by-op form here.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let n = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

pub fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        candle_nn::linear(i, o, vb)
    } else {
        candle_nn::linear_no_bias(i, o, vb)
    }
}

/// `x @ w^T (+ b)` with the leading dims flattened into one GEMM. candle-nn's Linear broadcasts
/// the weight over the batch instead, which in backward builds a (batch, in, out) gradient and
/// then sums it: several times slower for training.
pub fn apply(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = matmul_t(x, l.weight())?;
    match l.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x @ w^T` for x of any rank ≥ 2 and a 2-D `w` (out, in), as one GEMM.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out = w.dim(0)?;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    y.reshape(shape)
}

/// Inverted dropout with a mask drawn from the caller's seeded RNG.
pub fn dropout(x: &Tensor, p: f64, train: &mut Train) -> Result<Tensor> {
    let Some(rng) = train.as_deref_mut() else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < p { 0.0 } else { scale as f32 }).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

/// softplus(x) = log(1 + e^x), computed stably as max(x, 0) + log(1 + e^{-|x|}).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// The exact (erf) GELU, as PyTorch's nn.GELU().
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Standard normal sample (Box–Muller) from our seeded RNG.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// How a variable is initialised, decided by its name.
fn init_values(name: &str, shape: &[usize], rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = name.contains("norm");
    match leaf {
        "A_log" => (1..=n).map(|i| (i as f32).ln()).collect(),
        "D" => vec![1.0; n],
        "weight" if is_norm => vec![1.0; n],
        "bias" => vec![0.0; n],
        _ => {
            // Conv taps and the Δ projection get fan-in scaled uniform init (as nn.Conv1d /
            // nn.Linear); everything else N(0, 0.02) as GPT-2 style models do.
            if name.contains("conv") || name.contains("delta_proj") {
                let fan_in = if name.contains("conv") { shape.last().copied().unwrap_or(1) } else { shape.get(1).copied().unwrap_or(1) };
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
            } else {
                (0..n).map(|_| (normal(rng) * 0.02) as f32).collect()
            }
        }
    }
}

/// Overwrite every variable from a ChaCha8 RNG seeded with `seed`, in sorted-name order, so
/// the same seed gives the same weights whatever order the model was built in.
pub fn init_deterministic(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let shape = var.dims().to_vec();
        let values = init_values(name, &shape, &mut rng);
        var.set(&Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A VarBuilder over a fresh VarMap (f32, CPU).
pub fn fresh_builder() -> (VarMap, VarBuilder<'static>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (varmap, vb)
}

/// Token + learned position embeddings, and the LM head tied to the token embedding, with the
/// final LayerNorm before it: the parts both models share.
pub struct TiedEmbeddings {
    embed: candle_nn::Embedding,
    pos: candle_nn::Embedding,
    norm_f: LayerNorm,
    max_seq_len: usize,
}

impl TiedEmbeddings {
    pub fn new(vocab: usize, d_model: usize, max_seq_len: usize, ln_eps: f64, vb: &VarBuilder) -> Result<Self> {
        Ok(TiedEmbeddings {
            embed: candle_nn::embedding(vocab, d_model, vb.pp("embed"))?,
            pos: candle_nn::embedding(max_seq_len, d_model, vb.pp("pos"))?,
            norm_f: LayerNorm::new(d_model, ln_eps, vb.pp("norm_f"))?,
            max_seq_len,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.embed.embeddings()
    }

    /// Embeddings of `ids` (batch, t) placed at positions start..start+t.
    pub fn embed_at(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        use candle_core::Module;
        let l = ids.dim(1)?;
        if start + l > self.max_seq_len {
            candle_core::bail!("sequence of {} tokens exceeds max_seq_len {}", start + l, self.max_seq_len);
        }
        let positions = Tensor::arange(start as u32, (start + l) as u32, ids.device())?;
        self.embed.forward(ids)?.broadcast_add(&self.pos.forward(&positions)?)
    }

    /// Final LayerNorm, then logits through the tied embedding.
    pub fn head(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        matmul_t(&self.norm_f.forward(x, train)?, self.embed.embeddings())
    }
}
