//! Model configurations, presets and validation.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown preset `{preset}` for {model}; presets: {known}")]
    UnknownPreset { model: String, preset: String, known: String },
    #[error("unknown model `{0}`; models: itera_lite, transformer")]
    UnknownModel(String),
    #[error("invalid override `{key}`: {message}")]
    Override { key: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxLoss {
    /// The study's: squared coefficient of variation of the mean routing probabilities.
    Cv2,
    /// Switch Transformer: E · Σ_e f_e · P_e (fraction routed × mean probability).
    Switch,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IteraConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// SSM state size N.
    pub d_state: usize,
    /// d_inner = expand · d_model.
    pub expand: usize,
    pub d_conv: usize,
    pub n_experts: usize,
    pub expert_dim: usize,
    pub top_k: usize,
    /// Layers whose feed-forward is the mixture of experts; the others get a dense FFN of one
    /// expert's shape (the study's fallback). Default: the odd layers.
    pub moe_layers: Vec<usize>,
    pub max_seq_len: usize,
    pub dropout: f64,
    pub aux_loss: AuxLoss,
    pub aux_weight: f64,
    pub ln_eps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub max_seq_len: usize,
    pub dropout: f64,
    pub ln_eps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum ModelConfig {
    IteraLite(IteraConfig),
    Transformer(TransformerConfig),
}

impl IteraConfig {
    pub fn preset(name: &str, vocab_size: usize) -> Result<IteraConfig, ConfigError> {
        let (d_model, n_layers, d_state, n_experts, expert_dim) = match name {
            "tiny" => (128, 4, 8, 4, 64),
            "micro" => (64, 3, 8, 4, 32),
            "small" => (256, 6, 16, 8, 128),
            other => {
                return Err(ConfigError::UnknownPreset {
                    model: "itera_lite".into(),
                    preset: other.into(),
                    known: "tiny, micro, small".into(),
                })
            }
        };
        Ok(IteraConfig {
            vocab_size,
            d_model,
            n_layers,
            d_state,
            expand: 2,
            d_conv: 4,
            n_experts,
            expert_dim,
            top_k: 2,
            moe_layers: (0..n_layers).filter(|l| l % 2 == 1).collect(),
            max_seq_len: 128,
            dropout: 0.0,
            aux_loss: AuxLoss::Cv2,
            aux_weight: 0.01,
            ln_eps: 1e-5,
        })
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vocab_size == 0 || self.d_model == 0 || self.n_layers == 0 || self.d_state == 0 || self.expand == 0 {
            return bad("vocab_size, d_model, n_layers, d_state and expand must be positive".into());
        }
        if self.d_conv != 4 {
            return bad(format!("d_conv must be 4 (the study's causal conv), got {}", self.d_conv));
        }
        if self.n_experts == 0 || self.expert_dim == 0 || self.top_k == 0 || self.top_k > self.n_experts {
            return bad(format!("need 1 ≤ top_k ({}) ≤ n_experts ({}) and expert_dim > 0", self.top_k, self.n_experts));
        }
        if let Some(l) = self.moe_layers.iter().find(|&&l| l >= self.n_layers) {
            return bad(format!("moe_layers names layer {l}, but there are {} layers", self.n_layers));
        }
        if self.max_seq_len == 0 || !(0.0..1.0).contains(&self.dropout) {
            return bad("max_seq_len must be positive and dropout in [0, 1)".into());
        }
        Ok(())
    }
}

impl TransformerConfig {
    pub fn preset(name: &str, vocab_size: usize) -> Result<TransformerConfig, ConfigError> {
        let (d_model, n_layers, n_heads) = match name {
            "tiny" => (128, 4, 4),
            "small" => (256, 6, 8),
            other => {
                return Err(ConfigError::UnknownPreset {
                    model: "transformer".into(),
                    preset: other.into(),
                    known: "tiny, small".into(),
                })
            }
        };
        Ok(TransformerConfig {
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            d_ff: 4 * d_model,
            max_seq_len: 128,
            dropout: 0.0,
            ln_eps: 1e-5,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vocab_size == 0 || self.d_model == 0 || self.n_layers == 0 || self.n_heads == 0 || self.d_ff == 0 {
            return Err(ConfigError::Invalid("every size must be positive".into()));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ConfigError::Invalid(format!(
                "d_model ({}) must be divisible by n_heads ({})",
                self.d_model, self.n_heads
            )));
        }
        if self.max_seq_len == 0 || !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::Invalid("max_seq_len must be positive and dropout in [0, 1)".into()));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// `model` (itera_lite | transformer) + `preset` + field overrides, e.g. `{"d_model": 96}`.
    pub fn build(
        model: &str,
        preset: &str,
        vocab_size: usize,
        overrides: &serde_json::Map<String, Value>,
    ) -> Result<ModelConfig, ConfigError> {
        let base = match model {
            "itera_lite" => serde_json::to_value(IteraConfig::preset(preset, vocab_size)?),
            "transformer" => serde_json::to_value(TransformerConfig::preset(preset, vocab_size)?),
            other => return Err(ConfigError::UnknownModel(other.into())),
        }
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let Value::Object(mut map) = base else { return Err(ConfigError::Invalid("preset is not an object".into())) };
        // Changing the number of layers moves the default MoE layers with it.
        let layers_overridden = overrides.contains_key("n_layers") && !overrides.contains_key("moe_layers");
        for (k, v) in overrides {
            if !map.contains_key(k) {
                let known: Vec<&String> = map.keys().collect();
                return Err(ConfigError::Override {
                    key: k.clone(),
                    message: format!("no such field; fields: {known:?}"),
                });
            }
            map.insert(k.clone(), v.clone());
        }
        let cfg = match model {
            "itera_lite" => {
                let mut c: IteraConfig = serde_json::from_value(Value::Object(map))
                    .map_err(|e| ConfigError::Override { key: "itera_lite".into(), message: e.to_string() })?;
                if layers_overridden {
                    c.moe_layers = (0..c.n_layers).filter(|l| l % 2 == 1).collect();
                }
                c.validate()?;
                ModelConfig::IteraLite(c)
            }
            _ => {
                let c: TransformerConfig = serde_json::from_value(Value::Object(map))
                    .map_err(|e| ConfigError::Override { key: "transformer".into(), message: e.to_string() })?;
                c.validate()?;
                ModelConfig::Transformer(c)
            }
        };
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ModelConfig::IteraLite(c) => c.validate(),
            ModelConfig::Transformer(c) => c.validate(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::IteraLite(c) => c.vocab_size,
            ModelConfig::Transformer(c) => c.vocab_size,
        }
    }

    pub fn max_seq_len(&self) -> usize {
        match self {
            ModelConfig::IteraLite(c) => c.max_seq_len,
            ModelConfig::Transformer(c) => c.max_seq_len,
        }
    }

    pub fn dropout(&self) -> f64 {
        match self {
            ModelConfig::IteraLite(c) => c.dropout,
            ModelConfig::Transformer(c) => c.dropout,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ModelConfig::IteraLite(_) => "itera_lite",
            ModelConfig::Transformer(_) => "transformer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_overrides() {
        let c = ModelConfig::build("itera_lite", "tiny", 256, &Default::default()).unwrap();
        let ModelConfig::IteraLite(i) = &c else { panic!() };
        assert_eq!((i.d_model, i.n_layers, i.d_state, i.n_experts, i.expert_dim, i.top_k), (128, 4, 8, 4, 64, 2));
        assert_eq!(i.moe_layers, vec![1, 3]);
        let o = serde_json::json!({"n_layers": 6, "d_model": 96}).as_object().unwrap().clone();
        let ModelConfig::IteraLite(i) = ModelConfig::build("itera_lite", "tiny", 256, &o).unwrap() else { panic!() };
        assert_eq!((i.n_layers, i.d_model, i.moe_layers.clone()), (6, 96, vec![1, 3, 5]));
        let round: ModelConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(
            ModelConfig::build("itera_lite", "huge", 256, &Default::default()),
            Err(ConfigError::UnknownPreset { .. })
        ));
        assert!(matches!(
            ModelConfig::build("lstm", "tiny", 256, &Default::default()),
            Err(ConfigError::UnknownModel(_))
        ));
        let o = serde_json::json!({"d_modle": 3}).as_object().unwrap().clone();
        let e = ModelConfig::build("transformer", "tiny", 256, &o).unwrap_err().to_string();
        assert!(e.contains("d_modle"), "{e}");
        let o = serde_json::json!({"n_heads": 3}).as_object().unwrap().clone();
        assert!(ModelConfig::build("transformer", "tiny", 256, &o).unwrap_err().to_string().contains("divisible"));
        let o = serde_json::json!({"top_k": 9}).as_object().unwrap().clone();
        assert!(ModelConfig::build("itera_lite", "tiny", 256, &o).is_err());
    }
}
