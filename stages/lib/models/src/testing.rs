//! Fixtures for the stage crates' tests (not used by any stage at run time).

use std::path::Path;

/// A character-level Hugging Face `tokenizer.json` (WordLevel over single characters, with
/// `<pad> <unk> <bos> <eos> <|endoftext|>` first) for lowercase text with ` .!` and newlines,
/// written to `dir/tokenizer.json`. Returns its vocabulary size.
pub fn write_char_tokenizer(dir: &Path) -> std::io::Result<usize> {
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<pad>", "<unk>", "<bos>", "<eos>", "<|endoftext|>"].iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(i));
    }
    for c in "abcdefghijklmnopqrstuvwxyz .!\n".chars() {
        let id = vocab.len();
        vocab.insert(c.to_string(), serde_json::json!(id));
    }
    let n = vocab.len();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string())?;
    Ok(n)
}
