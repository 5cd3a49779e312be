//! What a request may say: the bodies of `/v1/completions` and `/v1/chat/completions` read
//! field by field (a field that fails is named by its path), the options refused rather than
//! ignored, and the OpenAI-style error every failure becomes.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::Shaping;

/// An OpenAI-style error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }
    pub(crate) fn server(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> ApiError {
        ApiError { status, message: message.into(), kind: "server_error", param: None, code }
    }
    pub(crate) fn with_code(mut self, status: StatusCode, code: &'static str) -> ApiError {
        self.status = status;
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// A request body as the endpoint's own fields and the fields both endpoints share, each read
/// from the whole body (so that a field that fails is named by its path: serde loses the path
/// inside a flattened struct).
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, Common), ApiError> {
    let value = json_body(body)?;
    Ok((fields(value.clone())?, fields(value)?))
}

/// A request body as JSON, with the extractor's own failures (too large, unreadable) and
/// malformed JSON turned into OpenAI errors.
pub(crate) fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let e = ApiError::invalid(format!("could not read the request body: {}", r.body_text()), None);
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.with_code(status, "request_too_large")
        } else {
            e
        }
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    }
    Ok(value)
}

/// Typed fields out of a JSON body (unknown fields are ignored).
pub(crate) fn fields<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, ApiError> {
    // The path of the field that failed (`messages[0].content`), in the message and as `param`.
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let (what, param) =
            if path == "." { (String::new(), None) } else { (format!("{path}: "), Some(path.as_str())) };
        ApiError::invalid(format!("invalid request: {what}{}", e.inner()), param)
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The sampling and length fields both endpoints share.
#[derive(Deserialize)]
pub(crate) struct Common {
    pub(crate) model: String,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_completion_tokens: Option<u64>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<u64>,
    /// Any 64-bit integer, negative ones included (OpenAI's is a signed integer): as its
    /// two's-complement bits, so each seed draws its own sequence.
    #[serde(default, deserialize_with = "signed_seed")]
    pub(crate) seed: Option<u64>,
    pub(crate) stop: Option<OneOrMany>,
    pub(crate) n: Option<u64>,
    // Optional booleans are Options: clients send `null` for "not set".
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) logit_bias: Option<serde_json::Map<String, Value>>,
}

fn signed_seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Unsigned(u64),
        Signed(i64),
    }
    Ok(Option::<Seed>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected an integer between -2^63 and 2^64 - 1"))?
        .map(|s| match s {
            Seed::Unsigned(u) => u,
            Seed::Signed(i) => i as u64,
        }))
}

/// The most likely tokens a request may ask to see per position (OpenAI's chat limit).
pub(crate) const MAX_TOP_LOGPROBS: u64 = 20;

#[derive(Deserialize)]
pub(crate) struct StreamOptions {
    pub(crate) include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct CompletionRequest {
    /// Text or token ids ([`prompt::read`]).
    pub(crate) prompt: Value,
    /// How many of the most likely tokens to list per position (0: the chosen token's only).
    pub(crate) logprobs: Option<u64>,
    pub(crate) echo: Option<bool>,
    pub(crate) best_of: Option<u64>,
    pub(crate) suffix: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct Message {
    pub(crate) role: String,
    /// A string, a list of content parts (text only here), or null (an assistant turn).
    #[serde(default)]
    pub(crate) content: Value,
}

/// A message's text: its content string, or its text parts joined by newlines; an assistant
/// turn's may be null (empty).
pub(crate) fn message_text(i: usize, m: Message) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    let refuse = |why: String| ApiError::invalid(format!("{param}: {why}"), Some(param.as_str()));
    match m.content {
        Value::Null if m.role == "assistant" => Ok(String::new()),
        Value::Null => Err(refuse(format!("a {} message needs content", m.role))),
        Value::String(s) => Ok(s),
        Value::Array(parts) => {
            let text = |p: &Value| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str))
            {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                (Some("text"), None) => Err(refuse("a text part needs `text`".into())),
                (Some(other), _) => Err(refuse(format!("only text parts are supported (got `{other}`)"))),
                (None, _) => Err(refuse("each part needs a `type`".into())),
            };
            Ok(parts.iter().map(text).collect::<Result<Vec<_>, _>>()?.join("\n"))
        }
        _ => Err(refuse("must be a string or a list of text parts".into())),
    }
}

#[derive(Deserialize)]
pub(crate) struct ChatRequest {
    pub(crate) messages: Vec<Message>,
    pub(crate) logprobs: Option<bool>,
    pub(crate) top_logprobs: Option<u64>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) response_format: Option<Value>,
}

/// The penalties and logit bias, checked as OpenAI checks them (penalties in [-2, 2], bias
/// keys token ids of this vocabulary, values in [-100, 100]).
pub(crate) fn shaping(c: &Common, vocab: usize) -> Result<Shaping, ApiError> {
    let penalty = |name: &str, v: Option<f32>| match v.unwrap_or(0.0) {
        v if (-2.0..=2.0).contains(&v) => Ok(v),
        v => Err(ApiError::invalid(format!("{name} must be between -2 and 2 (got {v})"), Some(name))),
    };
    let presence = penalty("presence_penalty", c.presence_penalty)?;
    let frequency = penalty("frequency_penalty", c.frequency_penalty)?;
    let refuse = |why: String| ApiError::invalid(format!("logit_bias: {why}"), Some("logit_bias"));
    let mut bias = Vec::new();
    for (key, v) in c.logit_bias.iter().flatten() {
        let id = key.parse::<u32>().map_err(|_| refuse(format!("`{key}` is not a token id")))?;
        if id as usize >= vocab {
            let last = vocab.saturating_sub(1);
            return Err(refuse(format!("token id {id} is outside the vocabulary ({vocab} tokens, ids 0 to {last})")));
        }
        match v.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => bias.push((id, b as f32)),
            _ => return Err(refuse(format!("the bias of token {id} must be a number between -100 and 100 (got {v})"))),
        }
    }
    bias.sort_by_key(|&(id, _)| id);
    Ok(Shaping { presence, frequency, bias })
}
