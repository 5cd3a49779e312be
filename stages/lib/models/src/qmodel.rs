//! Quantizing a [`Model`] in place, and its GGUF checkpoint.
//!
//! Quantized: every linear layer's weight (SSM in/Δ/out projections, router, experts, dense
//! FFN; attention and MLP of the Transformer), and the tied embedding when asked (then the LM
//! head runs the integer kernel and token lookups read the dequantized rows). Kept in f32:
//! norms, biases, positions, the SSM's conv taps, `A_log`, `D`, `B` and `C`, which are small.
//! After quantizing, each variable holds the dequantized values, so anything reading the
//! variables sees exactly what the integer kernels compute with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::gguf::{f32_bytes, f32_from_bytes, pack_q4_0, unpack_q4_0, Gguf, GgufError, RawTensor, TensorType, Value};
use crate::model::{CheckpointError, Model, Net};
use crate::nn::{Linear, TiedEmbeddings};
use crate::quant::{QWeight, QuantError, Scheme};

pub const FORMAT_VERSION: u32 = 1;
const EMBED: &str = "embed.weight";

#[derive(Clone, Debug, PartialEq)]
pub struct QuantSpec {
    pub scheme: Scheme,
    /// INT4 block size (a multiple of 32); ignored for INT8.
    pub group_size: usize,
    /// Quantize the tied embedding / LM head too.
    pub embeddings: bool,
    /// Linear layers to keep in f32: a name (`layers.0.ssm.in_proj`) or a prefix of one (`layers.0`).
    pub exclude: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    pub f32_bytes: usize,
    pub stored_bytes: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QuantReport {
    pub quantized: Vec<TensorReport>,
    /// Tensors left in f32 (name and element count).
    pub kept_f32: Vec<(String, usize)>,
}

impl QuantReport {
    pub fn quantized_f32_bytes(&self) -> usize {
        self.quantized.iter().map(|t| t.f32_bytes).sum()
    }
    pub fn quantized_stored_bytes(&self) -> usize {
        self.quantized.iter().map(|t| t.stored_bytes).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantModelError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("`exclude` names `{0}`, which matches no linear layer of this model")]
    UnknownExclude(String),
}

/// Variable name → (shape, values).
pub type NamedValues = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tensor_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl Model {
    fn parts_mut(&mut self) -> (Vec<&mut Linear>, &mut TiedEmbeddings) {
        match &mut self.net {
            Net::IteraLite(m) => m.parts_mut(),
            Net::Transformer(m) => m.parts_mut(),
        }
    }

    /// Quantized weights by variable name (`layers.0.ssm.in_proj.weight`, `embed.weight`).
    pub fn quantized_weights(&mut self) -> BTreeMap<String, QWeight> {
        let (linears, emb) = self.parts_mut();
        let mut out: BTreeMap<String, QWeight> =
            linears.iter().filter_map(|l| l.quantized().map(|q| (format!("{}.weight", l.name()), q.clone()))).collect();
        if let Some(q) = emb.head_quantized() {
            out.insert(EMBED.to_string(), q.clone());
        }
        out
    }

    /// Every variable's shape and values (quantized weights hold their dequantized values).
    pub fn named_values(&self) -> candle_core::Result<NamedValues> {
        vars(self)?.into_iter().map(|(k, v)| Ok((k, (v.dims().to_vec(), tensor_values(&v)?)))).collect()
    }

    /// Drop the integer kernels: the layers then compute in f32 with the dequantized weights
    /// (what a runtime that dequantizes weights and keeps activations in f32 computes).
    pub fn use_dequantized_weights(&mut self) {
        let (linears, emb) = self.parts_mut();
        for l in linears {
            l.set_quantized(None);
        }
        emb.set_head_quantized(None);
    }

    /// A checkpoint folder (`config.json` + `model.safetensors`) or a quantized `.gguf` file.
    pub fn load_any(path: &Path) -> Result<Model, CheckpointError> {
        if path.is_file() {
            Model::load_gguf(path)
        } else {
            Model::load(path)
        }
    }

    /// The scheme of the quantized weights, if any.
    pub fn quant_scheme(&mut self) -> Option<Scheme> {
        let (linears, emb) = self.parts_mut();
        linears.iter().find_map(|l| l.quantized().map(|q| q.scheme)).or(emb.head_quantized().map(|q| q.scheme))
    }

    /// Replace weights by quantized ones (see the module docs for what is quantized).
    pub fn quantize(&mut self, spec: &QuantSpec) -> Result<QuantReport, QuantModelError> {
        let vars = vars(self)?;
        let mut report = QuantReport::default();
        let (linears, emb) = self.parts_mut();
        for ex in &spec.exclude {
            if !linears.iter().any(|l| l.name() == ex || l.name().starts_with(&format!("{ex}."))) {
                return Err(QuantModelError::UnknownExclude(ex.clone()));
            }
        }
        let mut done = BTreeMap::new();
        let quantize = |name: &str, w: &Tensor| -> Result<(Arc<QWeight>, Tensor, TensorReport), QuantModelError> {
            let (rows, cols) = w.dims2()?;
            let q = QWeight::quantize(name, &tensor_values(w)?, rows, cols, spec.scheme, spec.group_size)?;
            let deq = Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu)?;
            let r = TensorReport {
                name: name.to_string(),
                shape: vec![rows, cols],
                f32_bytes: 4 * rows * cols,
                stored_bytes: q.stored_bytes(),
            };
            Ok((Arc::new(q), deq, r))
        };
        for l in linears {
            let excluded = spec.exclude.iter().any(|ex| l.name() == ex || l.name().starts_with(&format!("{ex}.")));
            if excluded {
                continue;
            }
            let name = format!("{}.weight", l.name());
            let (q, deq, r) = quantize(&name, l.weight())?;
            l.set_quantized(Some(q));
            report.quantized.push(r);
            done.insert(name, deq);
        }
        if spec.embeddings {
            let (q, deq, r) = quantize(EMBED, emb.weight())?;
            emb.set_head_quantized(Some(q));
            report.quantized.push(r);
            done.insert(EMBED.to_string(), deq);
        }
        // The variables share storage with the layers' weight tensors: this updates both.
        for (name, var) in &vars {
            match done.get(name) {
                Some(deq) => var.set(deq)?,
                None => report.kept_f32.push((name.clone(), var.elem_count())),
            }
        }
        Ok(report)
    }

    /// The quantized checkpoint as one GGUF file: config in the metadata, quantized weights as
    /// `I8` (+ `<name>.scale` F32 per row) or `Q4_0`, everything else F32.
    pub fn to_gguf(&mut self) -> Result<Gguf, QuantModelError> {
        let config = serde_json::to_string(&self.config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let arch = match self.config {
            ModelConfig::IteraLite(_) => "itera_lite",
            ModelConfig::Transformer(_) => "transformer",
        };
        let values = vars(self)?;
        let mut quantized: BTreeMap<String, QWeight> = BTreeMap::new();
        let (linears, emb) = self.parts_mut();
        for l in linears {
            if let Some(q) = l.quantized() {
                quantized.insert(format!("{}.weight", l.name()), q.clone());
            }
        }
        if let Some(q) = emb.head_quantized() {
            quantized.insert(EMBED.to_string(), q.clone());
        }
        let mut g = Gguf::default();
        g.metadata.insert("general.architecture".into(), Value::Str(arch.into()));
        g.metadata.insert("general.alignment".into(), Value::U32(crate::gguf::ALIGNMENT as u32));
        g.metadata.insert("orchestrate.format_version".into(), Value::U32(FORMAT_VERSION));
        g.metadata.insert("orchestrate.config".into(), Value::Str(config));
        if let Some(q) = quantized.values().next() {
            g.metadata.insert("orchestrate.quant.scheme".into(), Value::Str(q.scheme.name().into()));
            g.metadata.insert("orchestrate.quant.group_size".into(), Value::U32(q.group as u32));
        }
        for (name, t) in values {
            match quantized.get(&name) {
                Some(q) if q.scheme == Scheme::Int8 => {
                    let data = q.q.iter().map(|&v| v as u8).collect();
                    g.tensors.insert(name.clone(), RawTensor { dims: vec![q.rows, q.cols], ty: TensorType::I8, data });
                    g.tensors.insert(
                        format!("{name}.scale"),
                        RawTensor { dims: vec![q.rows], ty: TensorType::F32, data: f32_bytes(&q.scales) },
                    );
                }
                Some(q) => {
                    // One scale per 32-block; a larger group repeats its scale over its blocks.
                    let per_group = q.group / 32;
                    let block_scales: Vec<f32> =
                        q.scales.iter().flat_map(|&s| std::iter::repeat_n(s, per_group)).collect();
                    g.tensors.insert(
                        name,
                        RawTensor {
                            dims: vec![q.rows, q.cols],
                            ty: TensorType::Q4_0,
                            data: pack_q4_0(&q.q, &block_scales),
                        },
                    );
                }
                None => {
                    g.tensors.insert(
                        name,
                        RawTensor {
                            dims: t.dims().to_vec(),
                            ty: TensorType::F32,
                            data: f32_bytes(&tensor_values(&t)?),
                        },
                    );
                }
            }
        }
        Ok(g)
    }

    pub fn save_gguf(&mut self, path: &Path) -> Result<(), CheckpointError> {
        let g = self
            .to_gguf()
            .map_err(|e| CheckpointError::Io { path: path.display().to_string(), message: e.to_string() })?;
        std::fs::write(path, g.to_bytes())
            .map_err(|e| CheckpointError::Io { path: path.display().to_string(), message: e.to_string() })
    }

    /// Load a checkpoint written by [`Model::save_gguf`].
    pub fn load_gguf(path: &Path) -> Result<Model, CheckpointError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io { path: p.clone(), message: e.to_string() })?;
        let g = Gguf::parse(&bytes)
            .map_err(|e: GgufError| CheckpointError::Io { path: p.clone(), message: e.to_string() })?;
        let mismatch = |message: String| CheckpointError::Mismatch { path: p.clone(), message };
        match g.u32("orchestrate.format_version") {
            Some(FORMAT_VERSION) => {}
            other => {
                return Err(mismatch(format!(
                    "not an orchestrate quantized checkpoint (format version {other:?}, expected {FORMAT_VERSION})"
                )))
            }
        }
        let text =
            g.str("orchestrate.config").ok_or_else(|| mismatch("metadata `orchestrate.config` is missing".into()))?;
        let config: ModelConfig = serde_json::from_str(text)
            .map_err(|e| CheckpointError::Config { path: p.clone(), message: e.to_string() })?;
        config.validate().map_err(|e| CheckpointError::Config { path: p.clone(), message: e.to_string() })?;
        let group = g.u32("orchestrate.quant.group_size").unwrap_or(32) as usize;
        let mut model = Model::new(&config, 0)?;
        let vars = vars(&model)?;
        let expected: std::collections::BTreeSet<String> = vars.keys().cloned().collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut quantized: BTreeMap<String, QWeight> = BTreeMap::new();
        for (name, raw) in &g.tensors {
            if let Some(base) = name.strip_suffix(".scale") {
                if g.tensors.get(base).is_some_and(|t| t.ty == TensorType::I8) {
                    continue;
                }
            }
            let Some(var) = vars.get(name) else { return Err(mismatch(format!("unexpected tensor `{name}`"))) };
            if raw.dims != var.dims() {
                return Err(mismatch(format!(
                    "tensor `{name}` has shape {:?}, the config needs {:?}",
                    raw.dims,
                    var.dims()
                )));
            }
            seen.insert(name.clone());
            let q = match raw.ty {
                TensorType::F32 => {
                    var.set(&Tensor::from_vec(f32_from_bytes(&raw.data), var.shape(), &Device::Cpu)?)?;
                    continue;
                }
                TensorType::I8 => {
                    let scale = g
                        .tensors
                        .get(&format!("{name}.scale"))
                        .ok_or_else(|| mismatch(format!("INT8 tensor `{name}` has no `{name}.scale`")))?;
                    let (rows, cols) = (raw.dims[0], raw.dims[1]);
                    let scales = f32_from_bytes(&scale.data);
                    if scales.len() != rows {
                        return Err(mismatch(format!("`{name}.scale` has {} values for {rows} rows", scales.len())));
                    }
                    QWeight::new(Scheme::Int8, rows, cols, cols, raw.data.iter().map(|&b| b as i8).collect(), scales)
                }
                TensorType::Q4_0 => {
                    let (rows, cols) = (raw.dims[0], raw.dims[1]);
                    if !group.is_multiple_of(32) || cols % group != 0 {
                        return Err(mismatch(format!(
                            "group size {group} does not fit tensor `{name}` ({cols} columns)"
                        )));
                    }
                    let (q, block_scales) = unpack_q4_0(&raw.data);
                    let scales = block_scales.iter().step_by(group / 32).copied().collect();
                    QWeight::new(Scheme::Int4, rows, cols, group, q, scales)
                }
            };
            var.set(&Tensor::from_vec(q.dequantize(), var.shape(), &Device::Cpu)?)?;
            quantized.insert(name.clone(), q);
        }
        let missing: Vec<&String> = expected.difference(&seen).collect();
        if !missing.is_empty() {
            return Err(mismatch(format!("missing tensors {missing:?}")));
        }
        let (linears, emb) = model.parts_mut();
        for l in linears {
            if let Some(q) = quantized.remove(&format!("{}.weight", l.name())) {
                l.set_quantized(Some(Arc::new(q)));
            }
        }
        if let Some(q) = quantized.remove(EMBED) {
            emb.set_head_quantized(Some(Arc::new(q)));
        }
        if let Some(name) = quantized.keys().next() {
            return Err(mismatch(format!("tensor `{name}` is quantized but is not a linear layer or the embedding")));
        }
        Ok(model)
    }
}

fn vars(model: &Model) -> candle_core::Result<BTreeMap<String, Var>> {
    let data = model.varmap.data().lock().map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}
