//! One handle for either model: build (seeded), forward, loss, generation, checkpoints.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::decode::{IteraDecodeState, IteraDecoder};
use crate::decode_transformer::{TransformerDecodeState, TransformerDecoder};
use crate::itera::{Forward, IteraLite, SsmState};
use crate::nn::{fresh_builder, init_deterministic, Train};
use crate::transformer::{KvCache, Transformer};

pub enum Net {
    IteraLite(IteraLite),
    Transformer(Transformer),
}

pub struct Model {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub net: Net,
}

/// Batch-1 decoding one token at a time on the slice decoders (see [`Model::decoder`]).
pub enum Decoder {
    Itera(Box<IteraDecoder>, Box<IteraDecodeState>),
    Transformer(Box<TransformerDecoder>, Box<TransformerDecodeState>),
}

impl Decoder {
    /// Feed `tokens` after those fed so far; the next-token logits after the last of them.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            candle_core::bail!("the decoder needs at least one token");
        }
        match self {
            Decoder::Itera(d, st) => {
                let mut last = Vec::new();
                for &t in tokens {
                    last = d.step(t, st)?;
                }
                Ok(last)
            }
            Decoder::Transformer(d, st) => {
                let mut last = Vec::new();
                for &t in tokens {
                    last = d.step(t, st)?;
                }
                Ok(last)
            }
        }
    }
}

/// Decoding state: the Itera-Lite recurrent state or the Transformer's KV cache.
pub enum DecodeState {
    Recurrent(Vec<SsmState>),
    Kv(KvCache),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Sample from softmax(logits / temperature), optionally among the top k only.
    Sample {
        temperature: f64,
        top_k: Option<usize>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: invalid config.json: {message}")]
    Config { path: String, message: String },
    #[error("{path}: the checkpoint does not match its config: {message}")]
    Mismatch { path: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Model {
    /// A fresh model with every weight drawn from `seed` (deterministic across runs and
    /// thread counts).
    pub fn new(config: &ModelConfig, seed: u64) -> Result<Model> {
        config.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (varmap, vb) = fresh_builder();
        let net = match config {
            ModelConfig::IteraLite(c) => Net::IteraLite(IteraLite::new(c, vb)?),
            ModelConfig::Transformer(c) => Net::Transformer(Transformer::new(c, vb)?),
        };
        init_deterministic(&varmap, seed)?;
        Ok(Model { config: config.clone(), varmap, net })
    }

    pub fn forward(&self, ids: &Tensor, train: Train) -> Result<Forward> {
        match &self.net {
            Net::IteraLite(m) => m.forward(ids, train),
            Net::Transformer(m) => m.forward(ids, train),
        }
    }

    /// Next-token cross-entropy (mean over positions) and the weighted auxiliary loss.
    pub fn loss(&self, ids: &Tensor, train: Train) -> Result<(Tensor, Tensor)> {
        let f = self.forward(ids, train)?;
        Ok((next_token_loss(&f.logits, ids)?, f.aux))
    }

    /// Gradients of `ce + aux` for every parameter, with the cross-entropy and the weighted
    /// auxiliary loss: f32 models without dropout take their hand-written step
    /// ([`crate::itera_step`], [`crate::transformer_step`]), anything else candle's autograd
    /// through [`Self::loss`].
    pub fn loss_grads(&self, ids: &Tensor, train: Train) -> Result<(candle_core::backprop::GradStore, f32, f32)> {
        if train.is_some() {
            let hand = match &self.net {
                Net::IteraLite(m) if crate::itera_step::supported(m) => Some(crate::itera_step::step(m, ids)?),
                Net::Transformer(m) if crate::transformer_step::supported(m) => {
                    Some(crate::transformer_step::step(m, ids)?)
                }
                _ => None,
            };
            if let Some(s) = hand {
                return Ok((s.grads, s.ce, s.aux));
            }
        }
        let (ce, aux) = self.loss(ids, train)?;
        let (ce_v, aux_v) = (ce.to_scalar::<f32>()?, aux.to_scalar::<f32>()?);
        Ok(((ce + aux)?.backward()?, ce_v, aux_v))
    }

    pub fn start(&self, batch: usize) -> Result<DecodeState> {
        Ok(match &self.net {
            Net::IteraLite(m) => DecodeState::Recurrent(m.zero_state(batch)?),
            Net::Transformer(m) => DecodeState::Kv(m.empty_cache()),
        })
    }

    /// Logits (batch, t, vocab) for `ids` (batch, t) placed at position `pos`. Itera-Lite
    /// consumes one token at a time (O(1) each); the Transformer can take several (prefill).
    pub fn step(&self, ids: &Tensor, pos: usize, state: &mut DecodeState) -> Result<Tensor> {
        match (&self.net, state) {
            (Net::IteraLite(m), DecodeState::Recurrent(s)) => {
                let t = ids.dim(1)?;
                let mut out = Vec::with_capacity(t);
                for i in 0..t {
                    out.push(m.step(&ids.narrow(1, i, 1)?, pos + i, s)?);
                }
                Tensor::cat(&out, 1)
            }
            (Net::Transformer(m), DecodeState::Kv(c)) => m.step(ids, pos, c),
            _ => candle_core::bail!("decode state does not belong to this model"),
        }
    }

    /// A batch-1 decoder on plain slices: Itera-Lite with its recurrent state
    /// ([`crate::decode`]), the Transformer with its KV cache ([`crate::decode_transformer`]).
    pub fn decoder(&self) -> Result<Decoder> {
        Ok(match &self.net {
            Net::IteraLite(m) => {
                let d = IteraDecoder::new(m)?;
                let st = d.start();
                Decoder::Itera(Box::new(d), Box::new(st))
            }
            Net::Transformer(m) => {
                let d = TransformerDecoder::new(m)?;
                let st = d.start();
                Decoder::Transformer(Box::new(d), Box::new(st))
            }
        })
    }

    /// Generate `new_tokens` after `prompt` (batch 1) with the recurrent state / KV cache.
    pub fn generate(&self, prompt: &[u32], new_tokens: usize, sampling: Sampling, seed: u64) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            candle_core::bail!("generation needs a prompt of at least one token");
        }
        let max = self.config.max_seq_len();
        if prompt.len() + new_tokens > max {
            candle_core::bail!("prompt ({}) + new tokens ({new_tokens}) exceed max_seq_len {max}", prompt.len());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut decoder = self.decoder()?;
        let mut last = decoder.feed(prompt)?;
        let mut out = Vec::with_capacity(new_tokens);
        for i in 0..new_tokens {
            let next = sample(&last, sampling, &mut rng);
            out.push(next);
            if i + 1 == new_tokens {
                break;
            }
            last = decoder.feed(&[next])?;
        }
        Ok(out)
    }

    /// Save `model.safetensors` + `config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> std::result::Result<(), CheckpointError> {
        let io = |path: &Path, e: &dyn std::fmt::Display| CheckpointError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
        let cfg = serde_json::to_string_pretty(&self.config).map_err(|e| io(dir, &e))?;
        std::fs::write(dir.join("config.json"), cfg + "\n").map_err(|e| io(&dir.join("config.json"), &e))?;
        self.varmap.save(dir.join("model.safetensors")).map_err(|e| io(&dir.join("model.safetensors"), &e))?;
        Ok(())
    }

    /// Load a checkpoint saved by [`Model::save`], checking every tensor's name and shape.
    pub fn load(dir: &Path) -> std::result::Result<Model, CheckpointError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| CheckpointError::Io { path: cfg_path.display().to_string(), message: e.to_string() })?;
        let config: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| CheckpointError::Config { path: cfg_path.display().to_string(), message: e.to_string() })?;
        config
            .validate()
            .map_err(|e| CheckpointError::Config { path: cfg_path.display().to_string(), message: e.to_string() })?;
        let model = Model::new(&config, 0)?;
        let st_path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
            .map_err(|e| CheckpointError::Io { path: st_path.display().to_string(), message: e.to_string() })?;
        let mismatch = |message: String| CheckpointError::Mismatch { path: st_path.display().to_string(), message };
        let data = model.varmap.data().lock().map_err(|_| mismatch("variable map lock poisoned".into()))?;
        let mut missing: Vec<&String> = data.keys().filter(|k| !tensors.contains_key(*k)).collect();
        let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
        missing.sort();
        unexpected.sort();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(mismatch(format!("missing tensors {missing:?}, unexpected tensors {unexpected:?}")));
        }
        for (name, var) in data.iter() {
            let t = &tensors[name];
            if t.dims() != var.dims() {
                return Err(mismatch(format!(
                    "tensor `{name}` has shape {:?}, the config needs {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        drop(data);
        Ok(model)
    }

    /// Number of scalar parameters actually allocated.
    pub fn allocated_params(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// Cross-entropy with ONE shift: position t predicts token t+1. For tokens [a, b, c, d] the
/// terms are exactly a→b, b→c, c→d.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    if l < 2 {
        candle_core::bail!("need at least 2 tokens per sequence for a next-token loss");
    }
    if logits.dtype() == DType::F32 {
        return crate::fused::next_token_cross_entropy(logits, ids);
    }
    let pred = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), v))?;
    let target = ids.narrow(1, 1, l - 1)?.reshape(b * (l - 1))?;
    candle_nn::loss::cross_entropy(&pred, &target)
}

fn sample(v: &[f32], sampling: Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) })
            .0 as u32
    };
    match sampling {
        Sampling::Greedy => argmax(v),
        Sampling::Sample { temperature, top_k } => {
            if temperature <= 0.0 {
                return argmax(v);
            }
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
            if let Some(k) = top_k {
                idx.truncate(k.max(1));
            }
            let m = v[idx[0]] as f64;
            let w: Vec<f64> = idx.iter().map(|&i| ((v[i] as f64 - m) / temperature).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut r = rng.random::<f64>() * total;
            for (j, &i) in idx.iter().enumerate() {
                r -= w[j];
                if r <= 0.0 {
                    return i as u32;
                }
            }
            idx[idx.len() - 1] as u32
        }
    }
}

/// log-probabilities over the vocabulary, for evaluation code that needs them.
pub fn log_probs(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
}
