//! The `onnx_export` and `onnx_check` stages.

pub mod export;
pub mod graph;
pub mod runtime;

#[cfg(test)]
mod tests;
