//! A completions prompt as the API takes it — text, or token ids as evaluation harnesses send
//! them — turned into the ids the engine feeds and, for echo, the text and where each token
//! starts in it.

use serde_json::Value;
use tokenizers::Tokenizer;

/// One prompt, as sent.
#[derive(Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A prompt ready for the engine.
pub struct Encoded {
    pub ids: Vec<u32>,
    /// The prompt's text: as sent, or the ids decoded.
    pub text: String,
    /// Where each token starts in `text`, in characters.
    pub offsets: Vec<usize>,
}

const SHAPES: &str = "prompt must be a string, a list of token ids, or a list of several of either";

/// The `prompt` field: a string, a list of token ids, or a list of several strings or several
/// lists of token ids (a batch: each prompt gets its own choices).
pub fn read(v: Value) -> Result<Vec<Prompt>, String> {
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
    };
    let one = |v: &Value| match v {
        Value::String(s) => Some(Prompt::Text(s.clone())),
        Value::Array(inner) => ids(inner).map(Prompt::Ids),
        _ => None,
    };
    match &v {
        Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => Err("prompt is an empty list".to_string()),
        Value::Array(items) if items.iter().all(|x| x.is_string() || x.is_array()) => {
            items.iter().map(one).collect::<Option<Vec<_>>>().ok_or_else(|| SHAPES.to_string())
        }
        Value::Array(items) => ids(items).map(|ids| vec![Prompt::Ids(ids)]).ok_or_else(|| SHAPES.to_string()),
        _ => Err(SHAPES.to_string()),
    }
}

/// Tokenize text, or check ids against the vocabulary and decode them.
pub fn encode(tokenizer: &Tokenizer, prompt: Prompt) -> Result<Encoded, String> {
    match prompt {
        Prompt::Text(text) => {
            let e = tokenizer
                .encode_char_offsets(text.as_str(), false)
                .map_err(|e| format!("the prompt could not be tokenized: {e}"))?;
            let offsets = e.get_offsets().iter().map(|o| o.0).collect();
            Ok(Encoded { ids: e.get_ids().to_vec(), text, offsets })
        }
        Prompt::Ids(ids) => {
            let size = tokenizer.get_vocab_size(true);
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
                return Err(format!("token id {bad} is outside the vocabulary ({size} tokens, ids 0 to {})", size - 1));
            }
            let decode = |ids: &[u32]| tokenizer.decode(ids, false).map_err(|e| format!("decoding the prompt: {e}"));
            // Each token starts where the text of the tokens before it ends.
            let offsets =
                (0..ids.len()).map(|i| decode(&ids[..i]).map(|t| t.chars().count())).collect::<Result<_, _>>()?;
            Ok(Encoded { text: decode(&ids)?, ids, offsets })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_shape_of_a_prompt_and_of_a_batch_and_what_is_refused() {
        assert_eq!(read(json!("hi")), Ok(vec![Prompt::Text("hi".into())]));
        assert_eq!(read(json!(["hi"])), Ok(vec![Prompt::Text("hi".into())]));
        assert_eq!(read(json!([3, 1, 2])), Ok(vec![Prompt::Ids(vec![3, 1, 2])]));
        assert_eq!(read(json!([[3, 1]])), Ok(vec![Prompt::Ids(vec![3, 1])]));
        assert_eq!(read(json!(["a", "b"])), Ok(vec![Prompt::Text("a".into()), Prompt::Text("b".into())]));
        assert_eq!(read(json!([[1], [2, 3]])), Ok(vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])]));
        assert!(read(json!([])).unwrap_err().contains("empty"));
        for bad in
            [json!([1, -2]), json!([1, "a"]), json!(5), json!([1.5]), json!([[1, "x"]]), json!({}), json!(["a", 1])]
        {
            assert_eq!(read(bad.clone()), Err(SHAPES.to_string()), "{bad}");
        }
    }
}
