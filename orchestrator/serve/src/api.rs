//! The OpenAI HTTP API over the engine: `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (JSON or server-sent events), `/health`, `/metrics`. Every error is
//! OpenAI's `{"error": {message, type, param, code}}` with a 4xx/5xx status.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::{Event, Job, Loaded, Sampling};
use crate::metrics::Metrics;
use crate::Limits;

pub struct AppState {
    pub model: Arc<Loaded>,
    pub name: String,
    pub jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub next_id: AtomicU64,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    fn server(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> ApiError {
        ApiError { status, message: message.into(), kind: "server_error", param: None, code }
    }
    fn with_code(mut self, status: StatusCode, code: &'static str) -> ApiError {
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

/// A request body as JSON, with the extractor's own failures (too large, unreadable) and
/// malformed JSON turned into OpenAI errors.
fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
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
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The sampling and length fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

/// A validated request, ready for the engine.
struct Prepared {
    id: u64,
    job: Job,
    stream: bool,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
}

fn prepare(st: &AppState, c: Common, prompt: &str, default_max: u64) -> Result<Prepared, ApiError> {
    if c.model != st.name {
        return Err(ApiError::invalid(
            format!("the model `{}` does not exist; this server serves `{}`", c.model, st.name),
            Some("model"),
        )
        .with_code(StatusCode::NOT_FOUND, "model_not_found"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(default_max);
    if max_tokens == 0 || max_tokens > st.limits.max_tokens as u64 {
        return Err(ApiError::invalid(
            format!("max_tokens must be between 1 and {} (got {max_tokens})", st.limits.max_tokens),
            Some("max_tokens"),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2 (got {temperature})"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("top_p must be in (0, 1] (got {top_p})"), Some("top_p")));
    }
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop takes up to 4 non-empty strings", Some("stop")));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let ids = st
        .model
        .tokenizer
        .encode(prompt, false)
        .map_err(|e| ApiError::invalid(format!("the prompt could not be tokenized: {e}"), Some("prompt")))?
        .get_ids()
        .to_vec();
    if ids.is_empty() || ids.len() >= st.model.max_seq_len {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {} tokens; this model's context is {} tokens, and at least one must be left to generate",
                ids.len(),
                st.model.max_seq_len
            ),
            Some("prompt"),
        )
        .with_code(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt: ids,
        max_tokens: max_tokens as usize,
        sampling: Sampling { temperature, top_k: c.top_k.unwrap_or(0) as usize, top_p },
        seed: c.seed.unwrap_or(id),
        stop,
        events: tx,
        queued_at: Instant::now(),
    };
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared { id, job, stream: c.stream, include_usage, rx })
}

/// Put a job in the queue; a full queue is 503 with Retry-After, not unbounded memory.
fn enqueue(st: &AppState, job: Job) -> Result<(), ApiError> {
    st.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
    st.metrics.queue_depth.inc();
    match st.jobs.try_send(job) {
        Ok(()) => Ok(()),
        Err(e) => {
            st.metrics.queue_depth.dec();
            let why = match e {
                TrySendError::Full(_) => "the server is at capacity (queue full); retry shortly",
                TrySendError::Disconnected(_) => "the server is shutting down",
            };
            Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, why, Some("overloaded")))
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Which endpoint: completions (`text_completion`) or chat (`chat.completion`).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<(String, &'static str, usize, usize), ApiError> {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                return Ok((text, finish.as_str(), prompt_tokens, completion_tokens))
            }
            Event::Failed(m) => return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, m, None)),
        }
    }
    Err(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped", None))
}

async fn respond(st: Arc<AppState>, kind: Kind, p: Prepared) -> Result<Response, ApiError> {
    let (created, name) = (now(), st.name.clone());
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, p.id);
    let (stream, include_usage, rx) = (p.stream, p.include_usage, p.rx);
    enqueue(&st, p.job)?;
    if !stream {
        let (text, finish, pt, ct) = collect(rx).await?;
        let choice = match kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        return Ok(Json(json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice], "usage": usage(pt, ct)}))
            .into_response());
    }
    let chunk = move |choice: Value, usage: Option<Value>| {
        let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": id, "object": object, "created": created, "model": name, "choices": choice});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Sse::default().data(v.to_string())
    };
    let first = (kind == Kind::Chat).then(|| {
        chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]), None)
    });
    let events = stream::unfold(Some(rx), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            let out: Vec<Sse> = match rx.recv().await {
                Some(Event::Text(t)) => vec![chunk(piece(kind, Some(&t), None), None)],
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    let mut v = vec![chunk(piece(kind, None, Some(finish.as_str())), None)];
                    if include_usage {
                        v.push(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens))));
                    }
                    v.push(Sse::default().data("[DONE]"));
                    return Some((v, None));
                }
                Some(Event::Failed(m)) => {
                    let e = json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}});
                    return Some((vec![Sse::default().data(e.to_string())], None));
                }
                None => return None,
            };
            Some((out, Some(rx)))
        }
    })
    .flat_map(stream::iter);
    let all = stream::iter(first).chain(events).map(Ok::<_, Infallible>);
    Ok(axum::response::Sse::new(all).keep_alive(KeepAlive::default()).into_response())
}

/// One streamed choice: a text piece, or the closing one with its finish reason.
fn piece(kind: Kind, text: Option<&str>, finish: Option<&str>) -> Value {
    match kind {
        Kind::Completion => {
            json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}])
        }
        Kind::Chat => {
            let delta = text.map_or(json!({}), |t| json!({"content": t}));
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        }
    }
}

fn counted(st: &AppState, kind: Kind, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request(kind.endpoint(), r.status().as_u16());
    r
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: CompletionRequest = parse(body)?;
        let prompt = match req.prompt {
            OneOrMany::One(p) => p,
            OneOrMany::Many(mut v) if v.len() == 1 => v.remove(0),
            OneOrMany::Many(_) => return Err(ApiError::invalid("give one prompt (a string)", Some("prompt"))),
        };
        let p = prepare(&st, req.common, &prompt, 16)?;
        respond(st.clone(), Kind::Completion, p).await
    }
    .await;
    counted(&st, Kind::Completion, r)
}

/// The chat template: every message's content on its own line, in order, then a newline
/// for the reply — these are plain language models without chat training.
pub fn chat_prompt(messages: &[(String, String)]) -> String {
    let mut p = String::new();
    for (_, content) in messages {
        p.push_str(content);
        p.push('\n');
    }
    p
}

pub async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: ChatRequest = parse(body)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages is empty", Some("messages")));
        }
        if let Some(m) =
            req.messages.iter().find(|m| !["system", "user", "assistant", "developer"].contains(&m.role.as_str()))
        {
            return Err(ApiError::invalid(format!("unknown role `{}`", m.role), Some("messages")));
        }
        let msgs: Vec<(String, String)> = req.messages.into_iter().map(|m| (m.role, m.content)).collect();
        let default = st.limits.max_tokens as u64;
        let p = prepare(&st, req.common, &chat_prompt(&msgs), default)?;
        respond(st.clone(), Kind::Chat, p).await
    }
    .await;
    counted(&st, Kind::Chat, r)
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/v1/models", 200);
    Json(json!({"object": "list", "data": [{"id": st.name, "object": "model", "created": 0, "owned_by": "orchestrate"}]}))
        .into_response()
}

pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({"status": "ok", "model": st.name})).into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.encode()).into_response()
}

pub async fn not_found() -> Response {
    ApiError::invalid(
        "no such endpoint; this server has /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics",
        None,
    )
    .with_code(StatusCode::NOT_FOUND, "not_found")
    .into_response()
}
