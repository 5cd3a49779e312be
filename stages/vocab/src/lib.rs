//! The `vocab` stage: train a tokenizer with Hugging Face `tokenizers` and write a standard
//! `tokenizer.json` (loadable by the Python `tokenizers` package) plus `stats.json`.
//!
//! - `char`: one token per character seen in training text (frequency order), `<unk>` otherwise.
//! - `bpe`: byte-level BPE to a target size (lossless: never `<unk>`).
//! - `word`: the study's approach: the `size` most frequent words, plus `<unk>`; spaces and
//!   punctuation are tokens of their own, so decoding gives the text back.
//!
//! Every tokenizer has the special tokens `<pad> <unk> <bos> <eos>` (ids 0–3) and
//! `<|endoftext|>` (id 4), the corpus stage's document separator.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::wordlevel::WordLevelTrainer;
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const SPECIALS: [&str; 5] = ["<pad>", "<unk>", "<bos>", "<eos>", "<|endoftext|>"];
const KNOWN: &[&str] = &["type", "size", "min_frequency"];

pub struct VocabStage;

fn kind(p: &Params) -> Result<&str, ParamError> {
    match p.param("type").map(|v| v.as_str()) {
        None => Ok("char"),
        Some(Some(t @ ("char" | "bpe" | "word"))) => Ok(t),
        Some(other) => Err(ParamError::new(
            "params.type",
            format!(
                "`type` must be char, bpe or word, got {}",
                other.map_or("a non-string".to_string(), |s| format!("`{s}`"))
            ),
        )),
    }
}

fn specials() -> Vec<AddedToken> {
    SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect()
}

/// A tokenizer.json for a character vocabulary (WordLevel over single characters). The split
/// pattern is `[\s\S]` rather than `(?s).`: Python's tokenizers uses Oniguruma, which rejects
/// the inline flag.
fn char_tokenizer(text: &str) -> Result<Tokenizer, StageError> {
    let mut counts: HashMap<char, u64> = HashMap::new();
    for c in text.replace(SPECIALS[4], "").chars() {
        *counts.entry(c).or_default() += 1;
    }
    let mut chars: Vec<(char, u64)> = counts.into_iter().collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (c, _) in &chars {
        let id = vocab.len();
        vocab.entry(c.to_string()).or_insert(json!(id));
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    spec.to_string().parse::<Tokenizer>().context(|| "building the character tokenizer".into())
}

fn trained_tokenizer(kind: &str, size: usize, min_frequency: u64, train_file: &Path) -> Result<Tokenizer, StageError> {
    let files = vec![train_file.display().to_string()];
    match kind {
        "bpe" => {
            let mut tok = Tokenizer::new(BPE::default());
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
            tok.with_decoder(Some(ByteLevel::default()));
            let trainer = BpeTrainer::builder()
                .vocab_size(size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(specials())
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build();
            let mut t: TrainerWrapper = trainer.into();
            tok.train_from_files(&mut t, files)
                .context(|| format!("training a BPE tokenizer on {}", train_file.display()))?;
            Ok(tok)
        }
        _ => {
            // Start from a valid WordLevel tokenizer, then let the trainer fill the vocabulary.
            let spec = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\w+|[^\\w\\s]|\\s"}, "behavior": "Isolated", "invert": false},
                "post_processor": null, "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"},
            });
            let mut tok: Tokenizer = spec.to_string().parse().context(|| "building the word tokenizer".into())?;
            let trainer = WordLevelTrainer::builder()
                .vocab_size(size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(specials())
                .build()
                .context(|| format!("configuring the word-level trainer (size {size})"))?;
            let mut t: TrainerWrapper = trainer.into();
            tok.train_from_files(&mut t, files)
                .context(|| format!("training a word tokenizer on {}", train_file.display()))?;
            Ok(tok)
        }
    }
}

/// Tokens per byte and the `<unk>` rate of `text` under `tok`.
pub fn measure(tok: &Tokenizer, text: &str) -> Result<(usize, f64, f64), StageError> {
    let enc = tok.encode(text, false).context(|| "encoding the validation text".into())?;
    let ids = enc.get_ids();
    let unk = tok.token_to_id("<unk>");
    let unks = ids.iter().filter(|&&i| Some(i) == unk).count();
    let n = ids.len().max(1);
    Ok((ids.len(), ids.len() as f64 / text.len().max(1) as f64, unks as f64 / n as f64))
}

impl Stage for VocabStage {
    fn kind(&self) -> &'static str {
        "vocab"
    }
    fn describe(&self) -> &'static str {
        "train a Hugging Face tokenizer (char, bpe or word) → tokenizer.json, stats.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        stage_api::check_known_params(params, KNOWN, "vocab")?;
        let t = kind(params)?;
        let size = stage_api::param_u64(params, "size", 0)?;
        if t != "char" && size < 16 {
            return Err(ParamError::new(
                "params.size",
                format!("`{t}` needs `size`, the target vocabulary size (at least 16)"),
            ));
        }
        stage_api::param_u64(params, "min_frequency", 0)?;
        for needed in ["text", "valid"] {
            if !io.inputs.iter().any(|i| i == needed) {
                return Err(ParamError::new(
                    "inputs",
                    format!("the vocab stage needs an input named `{needed}` (training and validation text)"),
                )
                .with_help("e.g. inputs: {text: corpus.train.txt, valid: corpus.valid.txt}"));
            }
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["tokenizer.json".into(), "stats.json".into()],
            volatile_outputs: Vec::new(),
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = ctx.params().clone();
        let t = kind(&p)?.to_string();
        let size = stage_api::param_u64(&p, "size", 0)? as usize;
        let min_frequency = stage_api::param_u64(&p, "min_frequency", 0)?;
        let train_path = ctx.input("text")?.to_path_buf();
        let train = std::fs::read_to_string(&train_path)
            .map_err(|e| StageError::io(format!("reading {}", train_path.display()), e))?;
        let valid_path = ctx.input("valid")?.to_path_buf();
        let valid = std::fs::read_to_string(&valid_path)
            .map_err(|e| StageError::io(format!("reading {}", valid_path.display()), e))?;
        ctx.progress(&format!("training a {t} tokenizer"));
        let tok = if t == "char" {
            char_tokenizer(&train)?
        } else {
            trained_tokenizer(&t, size, min_frequency, &train_path)?
        };
        let out = ctx.output("tokenizer.json")?.to_path_buf();
        tok.save(&out, true).context(|| format!("writing {}", out.display()))?;
        // Reload what we wrote, so the statistics describe the file users get.
        let tok = Tokenizer::from_file(&out).context(|| format!("reading back {}", out.display()))?;
        let (valid_tokens, tokens_per_byte, unk_rate) = measure(&tok, &valid)?;
        let vocab_size = tok.get_vocab_size(true);
        let stats = json!({
            "type": t,
            "requested_size": if t == "char" { Value::Null } else { json!(size) },
            "vocab_size": vocab_size,
            "special_tokens": SPECIALS,
            "valid_tokens": valid_tokens,
            "valid_bytes": valid.len(),
            "tokens_per_byte": tokens_per_byte,
            "unk_rate": unk_rate,
        });
        stage_api::write_json(ctx.output("stats.json")?, &stats)?;
        ctx.metric("vocab_size", vocab_size);
        ctx.metric("tokens_per_byte", tokens_per_byte);
        ctx.metric("unk_rate", unk_rate);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    const TRAIN: &str =
        "Once upon a time, a cat sat.\n<|endoftext|>\nThe cat ran to the park. The dog ran too!\n<|endoftext|>\n";
    const VALID: &str = "A cat ran. Zebra!\n<|endoftext|>\n";

    fn run(params: Value) -> (Tokenizer, Value) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.txt"), TRAIN.repeat(20)).unwrap();
        std::fs::write(dir.path().join("valid.txt"), VALID).unwrap();
        let p = Params { fields: BTreeMap::new(), params: params.as_object().unwrap().clone().into_iter().collect() };
        let io = InputSpec { inputs: vec!["text".into(), "valid".into()], outputs: vec![] };
        VocabStage.check(&p, &io).unwrap();
        let inputs = BTreeMap::from([
            ("text".to_string(), dir.path().join("train.txt")),
            ("valid".to_string(), dir.path().join("valid.txt")),
        ]);
        let outputs: BTreeMap<String, PathBuf> =
            ["tokenizer.json", "stats.json"].iter().map(|n| (n.to_string(), dir.path().join(n))).collect();
        let spec = stage_api::RunSpec::new("v", "vocab", p, inputs, outputs, dir.path());
        let mut ctx = StageContext::uncancelled(spec);
        VocabStage.run(&mut ctx).unwrap();
        let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let stats = serde_json::from_str(&std::fs::read_to_string(dir.path().join("stats.json")).unwrap()).unwrap();
        (tok, stats)
    }

    #[test]
    fn char_tokenizer_round_trips_and_counts_unknowns() {
        let (tok, stats) = run(json!({"type": "char"}));
        for (i, s) in SPECIALS.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32), "{s}");
        }
        let text = "The cat sat.\n<|endoftext|>\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids().iter().filter(|&&i| i == 4).count(), 1, "the separator is one token");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        // "A", "Z" and "b" never occur in the training text: 3 unknowns in the validation text.
        let (n, _, unk) = measure(&tok, VALID).unwrap();
        assert!((unk - 3.0 / n as f64).abs() < 1e-12, "{unk} of {n}");
        assert_eq!(stats["vocab_size"], tok.get_vocab_size(true));
    }

    #[test]
    fn bpe_is_lossless_and_hits_its_size() {
        let (tok, stats) = run(json!({"type": "bpe", "size": 300}));
        let text = "The zebra ran!\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(stats["unk_rate"], 0.0);
        assert!(stats["vocab_size"].as_u64().unwrap() <= 300);
        assert!(stats["tokens_per_byte"].as_f64().unwrap() < 1.0);
    }

    #[test]
    fn word_level_keeps_the_top_words() {
        let (tok, stats) = run(json!({"type": "word", "size": 20}));
        assert!(tok.get_vocab_size(true) <= 20);
        assert!(tok.token_to_id("cat").is_some());
        assert!(stats["unk_rate"].as_f64().unwrap() > 0.0, "rare words map to <unk>");
    }

    #[test]
    fn params_are_checked() {
        let io = InputSpec { inputs: vec!["text".into(), "valid".into()], outputs: vec![] };
        let p =
            |v: Value| Params { fields: BTreeMap::new(), params: v.as_object().unwrap().clone().into_iter().collect() };
        assert_eq!(VocabStage.check(&p(json!({"type": "bpe"})), &io).unwrap_err().key, "params.size");
        assert_eq!(VocabStage.check(&p(json!({"type": "sentencepiece"})), &io).unwrap_err().key, "params.type");
        assert_eq!(VocabStage.check(&p(json!({})), &InputSpec::default()).unwrap_err().key, "inputs");
    }
}
