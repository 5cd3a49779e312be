//! The `corpus` stage: text in, `train.txt` / `valid.txt` / `stats.json` out.
//!
//! Sources: `builtin` (a seeded synthetic story generator, for offline runs) or one or more
//! `file:` UTF-8 files, plain text or TinyStories (`<|endoftext|>`-separated). The split is by
//! document, deterministic in the seed, or given by an explicit `valid` file.

use std::collections::BTreeSet;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use stage_api::{InputSpec, IoContext, ParamError, Params, Stage, StageContext, StageError, StageProfile};

pub mod stories;

/// Document separator in the outputs (TinyStories' own marker; the vocab stage makes it one
/// special token).
pub const EOT: &str = "<|endoftext|>";

const KNOWN: &[&str] = &["source", "valid", "valid_fraction", "documents", "format", "seed"];

pub struct CorpusStage;

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Builtin { documents: usize },
    Files(Vec<String>),
}

fn file_list(v: &Value, key: &str) -> Result<Vec<String>, ParamError> {
    let one = |s: &Value| -> Result<String, ParamError> {
        match s.as_str().and_then(|s| s.strip_prefix("file:")) {
            Some(p) => Ok(p.to_string()),
            None => Err(ParamError::new(
                format!("params.{key}"),
                format!("`{key}` must be `builtin` or `file:PATH` (or a list of `file:PATH`), got {s}"),
            )),
        }
    };
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err(ParamError::new(format!("params.{key}"), format!("`{key}` is an empty list"))),
        other => Ok(vec![one(other)?]),
    }
}

fn source(p: &Params) -> Result<Source, ParamError> {
    let documents = stage_api::param_u64(p, "documents", 4000)? as usize;
    match p.param("source") {
        None => Ok(Source::Builtin { documents }),
        Some(Value::String(s)) if s == "builtin" => Ok(Source::Builtin { documents }),
        Some(v) => Ok(Source::Files(file_list(v, "source")?)),
    }
}

fn fraction(p: &Params) -> Result<f64, ParamError> {
    match p.param("valid_fraction") {
        None => Ok(0.1),
        Some(v) => match v.as_f64() {
            Some(f) if f > 0.0 && f < 1.0 => Ok(f),
            _ => Err(ParamError::new(
                "params.valid_fraction",
                format!("`valid_fraction` must be between 0 and 1 (exclusive), got {v}"),
            )),
        },
    }
}

/// Read a UTF-8 file, naming the byte offset of the first invalid sequence.
pub fn read_utf8(path: &Path) -> Result<String, StageError> {
    let bytes = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        StageError::failed(format!(
            "{} is not valid UTF-8: invalid byte sequence at byte offset {}",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Split text into documents: on `<|endoftext|>` lines if present (dropping a trailing
/// fragment after the last marker when the file was cut mid-story), else on blank lines.
pub fn documents(text: &str, format: &str) -> Vec<String> {
    let tinystories = match format {
        "tinystories" => true,
        "plain" => false,
        _ => text.contains(EOT),
    };
    if tinystories {
        let mut parts: Vec<&str> = text.split(EOT).collect();
        let tail_complete = text.trim_end().ends_with(EOT);
        if !tail_complete && parts.len() > 1 {
            parts.pop();
        }
        parts.into_iter().map(str::trim).filter(|d| !d.is_empty()).map(str::to_string).collect()
    } else {
        let mut docs = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            if line.trim().is_empty() {
                if !cur.trim().is_empty() {
                    docs.push(cur.trim().to_string());
                }
                cur.clear();
            } else {
                if !cur.is_empty() {
                    cur.push('\n');
                }
                cur.push_str(line);
            }
        }
        if !cur.trim().is_empty() {
            docs.push(cur.trim().to_string());
        }
        docs
    }
}

fn stats(docs: &[String]) -> Value {
    let chars: BTreeSet<char> = docs.iter().flat_map(|d| d.chars()).collect();
    let joined = join(docs);
    json!({
        "documents": docs.len(),
        "bytes": joined.len(),
        "characters": joined.chars().count(),
        "distinct_chars": chars.len(),
    })
}

fn join(docs: &[String]) -> String {
    let mut s = String::new();
    for d in docs {
        s.push_str(d);
        s.push('\n');
        s.push_str(EOT);
        s.push('\n');
    }
    s
}

fn load_files(paths: &[String], format: &str) -> Result<Vec<String>, StageError> {
    let mut docs = Vec::new();
    for p in paths {
        let text = read_utf8(Path::new(p))?;
        let d = documents(&text, format);
        if d.is_empty() {
            return Err(StageError::failed(format!("{p} holds no text (0 documents)")));
        }
        docs.extend(d);
    }
    Ok(docs)
}

impl Stage for CorpusStage {
    fn kind(&self) -> &'static str {
        "corpus"
    }
    fn describe(&self) -> &'static str {
        "builtin synthetic stories or UTF-8 files → train.txt, valid.txt, stats.json"
    }

    fn check(&self, params: &Params, _io: &InputSpec) -> Result<StageProfile, ParamError> {
        stage_api::check_known_params(params, KNOWN, "corpus")?;
        source(params)?;
        fraction(params)?;
        if let Some(v) = params.param("valid") {
            file_list(v, "valid")?;
        }
        match params.param("format").and_then(Value::as_str).unwrap_or("auto") {
            "auto" | "plain" | "tinystories" => {}
            other => {
                return Err(ParamError::new(
                    "params.format",
                    format!("`format` must be auto, plain or tinystories, got `{other}`"),
                ))
            }
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["train.txt".into(), "valid.txt".into(), "stats.json".into()],
            volatile_outputs: Vec::new(),
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = ctx.params().clone();
        let format = p.param("format").and_then(Value::as_str).unwrap_or("auto").to_string();
        let seed = ctx.seed();
        let src = source(&p)?;
        let (mut train, synthetic, described) = match &src {
            Source::Builtin { documents } => {
                let mut r = ChaCha8Rng::seed_from_u64(seed);
                let docs: Vec<String> = (0..*documents).map(|_| stories::story(&mut r)).collect();
                (docs, true, json!("builtin"))
            }
            Source::Files(paths) => (load_files(paths, &format)?, false, json!(paths)),
        };
        if train.is_empty() {
            return Err(StageError::failed("the corpus has no documents"));
        }
        let valid = match p.param("valid") {
            Some(v) => load_files(&file_list(v, "valid")?, &format)?,
            None => {
                let n_valid = ((train.len() as f64) * fraction(&p)?).round() as usize;
                if n_valid == 0 || n_valid >= train.len() {
                    return Err(StageError::failed(format!(
                        "{} documents cannot be split with valid_fraction {}: one side would be empty",
                        train.len(),
                        fraction(&p)?
                    )));
                }
                let mut idx: Vec<usize> = (0..train.len()).collect();
                idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5917));
                let mut valid_idx = idx[..n_valid].to_vec();
                valid_idx.sort_unstable();
                let valid_set: BTreeSet<usize> = valid_idx.iter().copied().collect();
                let valid = valid_idx.iter().map(|&i| train[i].clone()).collect();
                train = train.into_iter().enumerate().filter(|(i, _)| !valid_set.contains(i)).map(|(_, d)| d).collect();
                valid
            }
        };
        std::fs::write(ctx.output("train.txt")?, join(&train)).ctx(|| "writing train.txt".into())?;
        std::fs::write(ctx.output("valid.txt")?, join(&valid)).ctx(|| "writing valid.txt".into())?;
        let s = json!({
            "source": described,
            "synthetic": synthetic,
            "note": if synthetic { "SYNTHETIC text from a seeded template generator (stories.rs); not \
                TinyStories" } else { "text read from the source files" },
            "seed": seed,
            "train": stats(&train),
            "valid": stats(&valid),
        });
        let text = serde_json::to_string_pretty(&s).map_err(|e| StageError::failed(e.to_string()))?;
        std::fs::write(ctx.output("stats.json")?, text + "\n").ctx(|| "writing stats.json".into())?;
        ctx.metric("train_documents", train.len());
        ctx.metric("valid_documents", valid.len());
        ctx.metric("synthetic", synthetic);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn run(params: Value, dir: &Path) -> Result<(String, String, Value), StageError> {
        let p = Params { fields: BTreeMap::new(), params: params.as_object().unwrap().clone().into_iter().collect() };
        CorpusStage.check(&p, &InputSpec::default()).map_err(StageError::Params)?;
        let outputs: BTreeMap<String, PathBuf> =
            ["train.txt", "valid.txt", "stats.json"].iter().map(|n| (n.to_string(), dir.join(n))).collect();
        let spec = stage_api::RunSpec {
            seed: 5,
            ..stage_api::RunSpec::new("corpus", "corpus", p, BTreeMap::new(), outputs, dir)
        };
        let mut ctx = StageContext::uncancelled(spec);
        CorpusStage.run(&mut ctx)?;
        let r = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        Ok((r("train.txt"), r("valid.txt"), serde_json::from_str(&r("stats.json")).unwrap()))
    }

    #[test]
    fn builtin_is_seeded_varied_and_split() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (t1, v1, s) = run(json!({"documents": 200}), a.path()).unwrap();
        let (t2, v2, _) = run(json!({"documents": 200}), b.path()).unwrap();
        assert_eq!((&t1, &v1), (&t2, &v2), "same seed, same bytes");
        assert_eq!(s["synthetic"], true);
        assert_eq!(s["train"]["documents"], 180);
        assert_eq!(s["valid"]["documents"], 20);
        let docs: BTreeSet<&str> = t1.split(EOT).collect();
        assert!(docs.len() > 170, "stories are varied: {} distinct of 180", docs.len());
        let words: BTreeSet<&str> = t1.split_whitespace().collect();
        assert!(words.len() > 300, "vocabulary: {}", words.len());
    }

    #[test]
    fn tinystories_files_drop_a_cut_last_story() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ts.txt");
        std::fs::write(&f, "One.\n<|endoftext|>\nTwo.\n<|endoftext|>\nThree\n<|endoftext|>\nFour is cut mid").unwrap();
        let v = dir.path().join("v.txt");
        std::fs::write(&v, "A valid story.\n\nAnother paragraph.\n").unwrap();
        let (t, va, s) = run(
            json!({"source": format!("file:{}", f.display()), "valid": format!("file:{}", v.display())}),
            dir.path(),
        )
        .unwrap();
        assert_eq!(t, "One.\n<|endoftext|>\nTwo.\n<|endoftext|>\nThree\n<|endoftext|>\n");
        assert_eq!(s["valid"]["documents"], 2, "plain text splits on blank lines");
        assert!(va.starts_with("A valid story."));
    }

    #[test]
    fn invalid_utf8_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.txt");
        std::fs::write(&f, b"hello \xff world").unwrap();
        let e = run(json!({"source": format!("file:{}", f.display())}), dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.txt") && e.contains("byte offset 6"), "{e}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n\n  \n").unwrap();
        let e = run(json!({"source": format!("file:{}", empty.display())}), dir.path()).unwrap_err().to_string();
        assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
    }

    #[test]
    fn params_are_checked() {
        let bad = |v: Value| {
            let p = Params { fields: BTreeMap::new(), params: v.as_object().unwrap().clone().into_iter().collect() };
            CorpusStage.check(&p, &InputSpec::default()).unwrap_err()
        };
        assert_eq!(bad(json!({"valid_fraction": 1.5})).key, "params.valid_fraction");
        assert_eq!(bad(json!({"source": "/no/prefix"})).key, "params.source");
        assert_eq!(bad(json!({"sorce": "builtin"})).key, "params.sorce");
    }
}
