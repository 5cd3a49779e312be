//! itera-models: the study's models in candle.
//!
//! - [`itera::IteraLite`]: SSM blocks (the recurrence is one custom op, [`scan::diag_scan`])
//!   with a mixture of experts on the odd layers; recurrent-state generation ([`decode`]: the
//!   batch-1 step on plain slices).
//! - [`transformer::Transformer`]: the baseline; KV-cache generation.
//! - [`itera_step`], [`transformer_step`]: each model's training step on slices, without
//!   candle's autograd graph (f32, no dropout).
//! - [`model::Model`]: seeded construction, next-token loss, generation, safetensors checkpoints.
//! - [`quant`], [`qmodel`], [`gguf`]: INT8/INT4 weights with integer matmuls, GGUF checkpoints.
//! - [`training`]: hyper-parameters, data windows, the AdamW loop, evaluation, distillation loss;
//!   [`adamw`]: the optimizer, candle's AdamW in one pass per parameter.
//! - [`accounting`]: parameter counts and forward FLOPs per token from a config.

pub mod accounting;
pub mod adamw;
pub mod config;
pub mod decode;
pub mod decode_transformer;
pub mod fused;
pub mod gguf;
mod hand_step;
mod head_product;
pub mod itera;
pub mod itera_step;
pub mod linear_op;
pub mod measure;
pub mod model;
pub mod nn;
pub mod qmodel;
pub mod quant;
pub mod scan;
pub mod shared_decoder;
pub mod simd;
pub mod testing;
pub mod training;
pub mod transformer;
pub mod transformer_step;

pub use config::{ConfigError, IteraConfig, ModelConfig, TransformerConfig};
pub use model::{next_token_loss, CheckpointError, DecodeState, Decoder, Model, Sampling};

/// Which SIMD code the kernels run, as they choose it at run time (see [`simd`]): the fused f32
/// kernels (`baseline`, `avx2+fma` or `avx512`), candle's f32 GEMM ([`simd::gemm_path`]) and the
/// INT8/INT4 matmuls (`portable`, `avx2` or `vnni`). Stages record it with their results, so a
/// figure says which code produced it.
pub fn simd_path() -> String {
    let fused = match simd::active() {
        simd::Level::Portable => "baseline",
        simd::Level::Avx2 => "avx2+fma",
        simd::Level::Vnni => "avx512",
    };
    format!("f32 {fused}, gemm {}; int8/int4 {}", simd::gemm_path(), simd::active().name())
}

#[cfg(test)]
mod tests;
