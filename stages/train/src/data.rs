//! Tokenized text → training batches and evaluation windows.

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use stage_api::StageError;
use tokenizers::Tokenizer;

/// Token ids of a text. Encoded per document-sized piece so memory stays flat on large corpora.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, StageError> {
    let mut ids = Vec::with_capacity(text.len());
    let mut start = 0;
    // Split on line boundaries about every 64 KiB; the tokenizers here never merge across "\n".
    while start < text.len() {
        let mut end = (start + 65_536).min(text.len());
        while end < text.len() && !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            if let Some(nl) = text[start..end].rfind('\n') {
                end = start + nl + 1;
            }
        }
        let enc = tok.encode(&text[start..end], false).map_err(|e| StageError::failed(format!("tokenizing: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        start = end;
    }
    Ok(ids)
}

/// `batch` windows of `len` tokens at random offsets.
pub fn random_batch(ids: &[u32], batch: usize, len: usize, rng: &mut ChaCha8Rng) -> Result<Tensor, StageError> {
    let mut flat = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let off = crate::sample_offset(rng, ids.len(), len);
        flat.extend_from_slice(&ids[off..off + len]);
    }
    Tensor::from_vec(flat, (batch, len), &Device::Cpu).map_err(|e| StageError::failed(e.to_string()))
}

/// Non-overlapping windows of `len` tokens from the start, covering at most `max_tokens`.
pub fn eval_windows(ids: &[u32], len: usize, max_tokens: usize) -> Vec<&[u32]> {
    let n = (ids.len() / len).min(max_tokens.div_ceil(len).max(1));
    (0..n).map(|i| &ids[i * len..(i + 1) * len]).collect()
}
