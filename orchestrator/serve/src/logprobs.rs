//! Log-probabilities and echo in a response, in the OpenAI API's two shapes: the completions
//! endpoint's columns `{tokens, token_logprobs, top_logprobs, text_offset}`, and chat's
//! `{content: [{token, logprob, bytes, top_logprobs}]}`.

use serde_json::{json, Map, Value};

use crate::engine::TokenLogprob;

/// Which endpoint: completions (`text_completion`) or chat (`chat.completion`).
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Completion,
    Chat,
}

/// What a request asked for beyond the text: log-probabilities, and (completions) its prompt
/// echoed in front of the text.
pub struct Shape {
    pub kind: Kind,
    pub logprobs: bool,
    pub echo: Option<Echo>,
}

/// The prompt as the client sent it, and where each of its tokens starts in it (characters).
pub struct Echo {
    pub text: String,
    pub offsets: Vec<usize>,
}

impl Shape {
    /// The echoed prompt's tokens, each placed at its characters in the prompt.
    pub fn prompt(&self, mut scored: Vec<TokenLogprob>) -> Vec<TokenLogprob> {
        if let Some(echo) = &self.echo {
            for (t, &at) in scored.iter_mut().zip(&echo.offsets) {
                t.offset = at;
            }
        }
        scored
    }

    /// A generated token placed in the returned text, which starts with the echoed prompt.
    pub fn generated(&self, mut t: TokenLogprob) -> TokenLogprob {
        t.offset += self.echo.as_ref().map_or(0, |e| e.text.chars().count());
        t
    }

    /// The `logprobs` field of a choice or chunk: null unless asked for.
    pub fn field(&self, tokens: &[TokenLogprob]) -> Value {
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Completion) => completion(tokens),
            (true, Kind::Chat) => chat(tokens),
        }
    }
}

/// The completions shape. As in OpenAI's, each position's `top_logprobs` holds the chosen
/// token beside the most likely ones; a prompt's first token has neither (null).
fn completion(tokens: &[TokenLogprob]) -> Value {
    let top = |t: &TokenLogprob| {
        t.logprob.map_or(Value::Null, |lp| {
            let mut m: Map<String, Value> = t.top.iter().map(|(s, v)| (s.clone(), json!(v))).collect();
            m.entry(t.token.clone()).or_insert(json!(lp));
            Value::Object(m)
        })
    };
    json!({
        "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(top).collect::<Vec<_>>(),
        "text_offset": tokens.iter().map(|t| t.offset).collect::<Vec<_>>(),
    })
}

/// The chat shape: per token its text, log-probability, UTF-8 bytes and the most likely tokens.
fn chat(tokens: &[TokenLogprob]) -> Value {
    let one = |token: &str, lp: f32| json!({"token": token, "logprob": lp, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut v = one(&t.token, t.logprob.unwrap_or(0.0));
            v["top_logprobs"] = t.top.iter().map(|(s, lp)| one(s, *lp)).collect();
            v
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(token: &str, logprob: Option<f32>, offset: usize, top: &[(&str, f32)]) -> TokenLogprob {
        let top = top.iter().map(|(s, v)| (s.to_string(), *v)).collect();
        TokenLogprob { token: token.into(), logprob, offset, top }
    }

    #[test]
    fn completions_columns_put_the_chosen_token_among_the_top_and_echo_shifts_offsets() {
        let echo = Echo { text: "hé y".into(), offsets: vec![0, 2] };
        let shape = Shape { kind: Kind::Completion, logprobs: true, echo: Some(echo) };
        let mut all = shape.prompt(vec![tok("hé", None, 0, &[]), tok(" y", Some(-1.5), 0, &[(" x", -0.5)])]);
        all.push(shape.generated(tok("o", Some(-2.0), 0, &[("a", -0.125)])));
        let v = shape.field(&all);
        assert_eq!(v["tokens"], json!(["hé", " y", "o"]));
        assert_eq!(v["token_logprobs"], json!([null, -1.5, -2.0]));
        assert_eq!(v["top_logprobs"], json!([null, {" x": -0.5, " y": -1.5}, {"a": -0.125, "o": -2.0}]));
        // Characters, not bytes: "é" is two bytes but one character.
        assert_eq!(v["text_offset"], json!([0, 2, 4]));
    }

    #[test]
    fn chat_lists_each_token_with_bytes_and_nothing_unless_asked() {
        let shape = Shape { kind: Kind::Chat, logprobs: true, echo: None };
        let v = shape.field(&[tok("é", Some(-0.25), 0, &[("é", -0.25), ("a", -2.0)])]);
        assert_eq!(v["content"][0]["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(v["content"][0]["top_logprobs"][1], json!({"token": "a", "logprob": -2.0, "bytes": [97]}));
        let off = Shape { kind: Kind::Chat, logprobs: false, echo: None };
        assert_eq!(off.field(&[tok("a", Some(-1.0), 0, &[])]), Value::Null);
    }
}
