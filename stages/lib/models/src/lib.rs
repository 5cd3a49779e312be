//! itera-models: the study's models in candle.
//!
//! - [`itera::IteraLite`]: SSM blocks (the recurrence is one custom op, [`scan::diag_scan`])
//!   with a mixture of experts on the odd layers; recurrent-state generation ([`decode`]: the
//!   batch-1 step on plain slices).
//! - [`transformer::Transformer`]: the baseline; KV-cache generation.
//! - [`model::Model`]: seeded construction, next-token loss, generation, safetensors checkpoints.
//! - [`quant`], [`qmodel`], [`gguf`]: INT8/INT4 weights with integer matmuls, GGUF checkpoints.
//! - [`training`]: hyper-parameters, data windows, the AdamW loop, evaluation, distillation loss.
//! - [`accounting`]: parameter counts and forward FLOPs per token from a config.

pub mod accounting;
pub mod config;
pub mod decode;
pub mod decode_transformer;
pub mod fused;
pub mod gguf;
pub mod itera;
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

pub use config::{ConfigError, IteraConfig, ModelConfig, TransformerConfig};
pub use model::{next_token_loss, CheckpointError, DecodeState, Decoder, Model, Sampling};

/// Which SIMD code the kernels run, as they choose it at run time (see [`simd`]): the f32 fused
/// kernels (`avx2+fma` or the `baseline` build) and the INT8/INT4 matmuls (`vnni`, `avx2` or
/// `portable`). Stages record it with their results, so a figure says which code produced it.
pub fn simd_path() -> String {
    let f32_path = if simd::avx2() { "avx2+fma" } else { "baseline" };
    format!("f32 {f32_path}; int8/int4 {}", simd::active().name())
}
#[cfg(test)]
mod tests;
