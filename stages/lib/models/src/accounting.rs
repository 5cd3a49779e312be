//! Parameter counts and forward FLOPs per token, from the config alone.
//!
//! FLOPs count 2 per multiply-accumulate: every weight a token's forward pass touches costs one
//! MAC (matmuls, the depthwise conv taps, B, C, D, A), plus the state work of the recurrence (N
//! MACs per step) and, for the Transformer, attention over the context (2·context·d MACs per
//! token per layer). Elementwise work (activations, norms, softmax, residual adds) is not
//! counted; it is small next to the matmuls and depends on the kernel. Embedding lookups cost
//! no MACs; the tied LM head costs d·vocab. See docs/models.md for the worked formula.

use serde::Serialize;

use crate::config::{IteraConfig, ModelConfig, TransformerConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    /// Token + position embeddings (the LM head is tied to the token embedding).
    pub embedding: u64,
    pub non_embedding: u64,
}

/// (d_model, d_inner, d_state, d_conv, expert_dim, vocab) as u64, for the counting formulas.
fn itera_dims(c: &IteraConfig) -> (u64, u64, u64, u64, u64, u64) {
    (c.d_model as u64, c.d_inner() as u64, c.d_state as u64, c.d_conv as u64, c.expert_dim as u64, c.vocab_size as u64)
}

fn itera_params(c: &IteraConfig) -> ParamCounts {
    let (d, di, n, k, e, v) = itera_dims(c);
    let ln = 2 * d;
    let ssm = ln + d * 2 * di + (k * di + di) + n + n * di + di * n + di + (di * di + di) + di * d;
    let expert = 2 * d * e;
    let moe = ln + d * c.n_experts as u64 + c.n_experts as u64 * expert;
    let ffn = ln + expert;
    let n_moe = c.moe_layers.len() as u64;
    let layers = c.n_layers as u64 * ssm + n_moe * moe + (c.n_layers as u64 - n_moe) * ffn;
    let embedding = v * d + c.max_seq_len as u64 * d;
    let non_embedding = layers + ln;
    ParamCounts { total: embedding + non_embedding, embedding, non_embedding }
}

fn transformer_params(c: &TransformerConfig) -> ParamCounts {
    let (d, f, v) = (c.d_model as u64, c.d_ff as u64, c.vocab_size as u64);
    let layer = 2 * (2 * d) + 3 * d * d + d * d + 2 * d * f;
    let embedding = v * d + c.max_seq_len as u64 * d;
    let non_embedding = c.n_layers as u64 * layer + 2 * d;
    ParamCounts { total: embedding + non_embedding, embedding, non_embedding }
}

pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    match cfg {
        ModelConfig::IteraLite(c) => itera_params(c),
        ModelConfig::Transformer(c) => transformer_params(c),
    }
}

/// Forward FLOPs for one token. `context` is how many positions a Transformer token attends
/// to (use (seq_len + 1) / 2 for the average over a full sequence); Itera-Lite ignores it.
/// MoE layers count only the `top_k` experts a token uses (the sparse inference path).
pub fn forward_flops_per_token(cfg: &ModelConfig, context: usize) -> u64 {
    let macs = match cfg {
        ModelConfig::IteraLite(c) => {
            let (d, di, n, k, e, v) = itera_dims(c);
            // in_proj, conv taps, Δ projection, A (exp(Δ·A)), B x, recurrence, C h, D ⊙ x, out_proj
            let ssm = d * 2 * di + k * di + di * di + n + di * n + n + n * di + di + di * d;
            let moe = d * c.n_experts as u64 + c.top_k as u64 * 2 * d * e;
            let ffn = 2 * d * e;
            let n_moe = c.moe_layers.len() as u64;
            c.n_layers as u64 * ssm + n_moe * moe + (c.n_layers as u64 - n_moe) * ffn + d * v
        }
        ModelConfig::Transformer(c) => {
            let (d, f, v) = (c.d_model as u64, c.d_ff as u64, c.vocab_size as u64);
            let layer = 3 * d * d + 2 * context as u64 * d + d * d + 2 * d * f;
            c.n_layers as u64 * layer + d * v
        }
    };
    2 * macs
}

/// Multiply-accumulates per token of the matmuls with a weight matrix (no attention scores, no
/// elementwise work): what an exported graph's constant-weight `MatMul`s add up to. `all_experts`
/// counts every expert (a dense MoE export) instead of the top-k.
pub fn weight_matmul_macs(cfg: &ModelConfig, all_experts: bool) -> u64 {
    match cfg {
        ModelConfig::IteraLite(c) => {
            let (d, di, n, e, v) =
                (c.d_model as u64, c.d_inner() as u64, c.d_state as u64, c.expert_dim as u64, c.vocab_size as u64);
            let ssm = d * 2 * di + di * di + di * n + n * di + di * d;
            let experts = if all_experts { c.n_experts } else { c.top_k } as u64;
            let moe = d * c.n_experts as u64 + experts * 2 * d * e;
            let n_moe = c.moe_layers.len() as u64;
            c.n_layers as u64 * ssm + n_moe * moe + (c.n_layers as u64 - n_moe) * 2 * d * e + d * v
        }
        ModelConfig::Transformer(c) => {
            let (d, f, v) = (c.d_model as u64, c.d_ff as u64, c.vocab_size as u64);
            c.n_layers as u64 * (4 * d * d + 2 * d * f) + d * v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    fn cfg(model: &str, preset: &str) -> ModelConfig {
        ModelConfig::build(model, preset, 256, &Default::default()).unwrap()
    }

    /// The original study's models at vocab 256 / max_seq_len 128 (../shared/peer/README.md).
    #[test]
    fn parameter_counts_match_the_study_and_the_allocated_tensors() {
        for (m, p, expected) in
            [("itera_lite", "tiny", 895_264u64), ("itera_lite", "micro", 182_040), ("transformer", "tiny", 837_888)]
        {
            let c = cfg(m, p);
            let counts = param_counts(&c);
            assert_eq!(counts.total, expected, "{m} {p}");
            assert_eq!(counts.embedding + counts.non_embedding, counts.total);
            assert_eq!(
                Model::new(&c, 0).unwrap().allocated_params() as u64,
                counts.total,
                "{m} {p}: formula vs tensors"
            );
        }
        let small = cfg("itera_lite", "small");
        assert_eq!(Model::new(&small, 0).unwrap().allocated_params() as u64, param_counts(&small).total);
    }

    /// A config small enough to count by hand.
    #[test]
    fn flops_match_a_hand_count() {
        let c = ModelConfig::IteraLite(IteraConfig {
            vocab_size: 10,
            d_model: 4,
            n_layers: 2,
            d_state: 2,
            expand: 2,
            d_conv: 4,
            n_experts: 3,
            expert_dim: 5,
            top_k: 2,
            moe_layers: vec![1],
            max_seq_len: 8,
            dropout: 0.0,
            aux_loss: crate::config::AuxLoss::Cv2,
            aux_weight: 0.01,
            ln_eps: 1e-5,
        });
        // d=4, d_inner=8, N=2. Per SSM layer, MACs:
        //   in_proj 4·16=64, conv 4·8=32, Δ proj 8·8=64, A 2, B·x 8·2=16, recurrence 2,
        //   C·h 2·8=16, D⊙x 8, out_proj 8·4=32                                     → 236
        // layer 0 FFN: 2·4·5 = 40; layer 1 MoE: router 4·3=12 + 2 experts·40 = 92
        // head: 4·10 = 40.  Total MACs = 2·236 + 40 + 92 + 40 = 644 → 1288 FLOPs.
        assert_eq!(forward_flops_per_token(&c, 1), 1288);
        let t = ModelConfig::Transformer(TransformerConfig {
            vocab_size: 10,
            d_model: 4,
            n_layers: 1,
            n_heads: 2,
            d_ff: 16,
            max_seq_len: 8,
            dropout: 0.0,
            ln_eps: 1e-5,
        });
        // qkv 48 + scores and values 2·3·4=24 (context 3) + proj 16 + mlp 128 + head 40 = 256 MACs
        assert_eq!(forward_flops_per_token(&t, 3), 512);
    }

    #[test]
    fn the_studys_flop_claim_was_far_too_low() {
        // The study claimed 327,680 FLOPs/token for a 1.89M-parameter model; a forward pass
        // touches nearly every non-embedding weight once, so it costs about 2 × params.
        let tiny = cfg("itera_lite", "tiny");
        let f = forward_flops_per_token(&tiny, 64);
        assert!(f > 1_500_000 && f < 2 * param_counts(&tiny).total, "{f}");
    }
}
