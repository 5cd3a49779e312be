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
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::{Event, Job, Loaded, Sampling, TokenLogprob};
use crate::logprobs::{Echo, Kind, Shape};
use crate::metrics::Metrics;
use crate::prompt::{self, Prompt};
use crate::request::{
    message_text, parse, refuse_unsupported, ApiError, ChatRequest, Common, CompletionRequest, OneOrMany,
    MAX_TOP_LOGPROBS,
};
use crate::Limits;

pub struct AppState {
    pub model: Arc<Loaded>,
    pub name: String,
    pub jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub next_id: AtomicU64,
}

/// A validated request, ready for the engine.
struct Prepared {
    id: u64,
    job: Job,
    stream: bool,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    shape: Arc<Shape>,
}

/// What one endpoint's own fields ask for: the number of most likely tokens to list per
/// position (None: no log-probabilities), and the prompt echoed (completions).
struct Extra {
    kind: Kind,
    logprobs: Option<u64>,
    echo: bool,
}

fn prepare(st: &AppState, c: Common, prompt: Prompt, default_max: u64, extra: Extra) -> Result<Prepared, ApiError> {
    refuse_unsupported(&c)?;
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
    // Zero only with echo: the prompt scored, nothing generated.
    let least = u64::from(!extra.echo);
    if max_tokens < least || max_tokens > st.limits.max_tokens as u64 {
        return Err(ApiError::invalid(
            format!("max_tokens must be between {least} and {} (got {max_tokens})", st.limits.max_tokens),
            Some("max_tokens"),
        ));
    }
    if let Some(n) = extra.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        let param = if extra.kind == Kind::Chat { "top_logprobs" } else { "logprobs" };
        return Err(ApiError::invalid(
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS} (got {n})"),
            Some(param),
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
    let encoded = prompt::encode(&st.model.tokenizer, prompt).map_err(|m| ApiError::invalid(m, Some("prompt")))?;
    if encoded.text.is_empty() && encoded.ids.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let ids = encoded.ids;
    // A prompt only scored (echo, max_tokens 0) may fill the whole context.
    let generates = max_tokens > 0;
    if ids.is_empty() || ids.len() + usize::from(generates) > st.model.max_seq_len {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {} tokens; this model's context is {} tokens{}",
                ids.len(),
                st.model.max_seq_len,
                if generates { ", and at least one must be left to generate" } else { "" }
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
        logprobs: extra.logprobs.map(|n| n as usize),
        echo: extra.echo,
        events: tx,
        queued_at: Instant::now(),
    };
    let include_usage = c.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let echo = extra.echo.then_some(Echo { text: encoded.text, offsets: encoded.offsets });
    let shape = Arc::new(Shape { kind: extra.kind, logprobs: extra.logprobs.is_some(), echo });
    Ok(Prepared { id, job, stream: c.stream.unwrap_or(false), include_usage, rx, shape })
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

fn endpoint(kind: Kind) -> &'static str {
    match kind {
        Kind::Completion => "/v1/completions",
        Kind::Chat => "/v1/chat/completions",
    }
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// A whole answer: its text, log-probabilities, finish reason, prompt and completion tokens.
struct Collected {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: &'static str,
    usage: Value,
}

async fn collect(mut rx: UnboundedReceiver<Event>, shape: &Shape) -> Result<Collected, ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(e) = rx.recv().await {
        match e {
            Event::Prompt(scored) => {
                text.push_str(shape.echo.as_ref().map_or("", |e| e.text.as_str()));
                logprobs.extend(shape.prompt(scored));
            }
            Event::Logprob(t) => logprobs.push(shape.generated(t)),
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                let usage = usage(prompt_tokens, completion_tokens);
                return Ok(Collected { text, logprobs, finish: finish.as_str(), usage });
            }
            Event::Failed(m) => return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, m, None)),
        }
    }
    Err(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped", None))
}

async fn respond(st: Arc<AppState>, kind: Kind, p: Prepared) -> Result<Response, ApiError> {
    let (created, name) = (now(), st.name.clone());
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, p.id);
    let (stream, include_usage, rx, shape) = (p.stream, p.include_usage, p.rx, p.shape);
    enqueue(&st, p.job)?;
    if !stream {
        let c = collect(rx, &shape).await?;
        let (text, logprobs, finish) = (c.text, shape.field(&c.logprobs), c.finish);
        let choice = match kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        return Ok(Json(json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice], "usage": c.usage}))
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
    // Log-probabilities wait for the text piece that carries their tokens (a token's text can
    // be held back), or else go with the closing chunk.
    let events = stream::unfold(Some((rx, Vec::new())), move |state| {
        let (chunk, shape) = (chunk.clone(), shape.clone());
        async move {
            let (mut rx, mut pending) = state?;
            let out: Vec<Sse> = match rx.recv().await {
                Some(Event::Prompt(scored)) => {
                    let text = shape.echo.as_ref().map_or("", |e| e.text.as_str());
                    vec![chunk(piece(kind, Some(text), None, shape.field(&shape.prompt(scored))), None)]
                }
                Some(Event::Logprob(t)) => {
                    pending.push(shape.generated(t));
                    vec![]
                }
                Some(Event::Text(t)) => {
                    let logprobs = shape.field(&std::mem::take(&mut pending));
                    vec![chunk(piece(kind, Some(&t), None, logprobs), None)]
                }
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    let logprobs = if pending.is_empty() { Value::Null } else { shape.field(&pending) };
                    let mut v = vec![chunk(piece(kind, None, Some(finish.as_str()), logprobs), None)];
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
            Some((out, Some((rx, pending))))
        }
    })
    .flat_map(stream::iter);
    let all = stream::iter(first).chain(events).map(Ok::<_, Infallible>);
    Ok(axum::response::Sse::new(all).keep_alive(KeepAlive::default()).into_response())
}

/// One streamed choice: a text piece, or the closing one with its finish reason.
fn piece(kind: Kind, text: Option<&str>, finish: Option<&str>, logprobs: Value) -> Value {
    match kind {
        Kind::Completion => {
            json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}])
        }
        Kind::Chat => {
            let delta = text.map_or(json!({}), |t| json!({"content": t}));
            json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        }
    }
}

fn counted(st: &AppState, kind: Kind, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request(endpoint(kind), r.status().as_u16());
    r
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let (req, common): (CompletionRequest, Common) = parse(body)?;
        let prompt = prompt::read(req.prompt).map_err(|m| ApiError::invalid(m, Some("prompt")))?;
        if req.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "best_of is not supported (one completion per request); leave it out or set 1",
                Some("best_of"),
            ));
        }
        if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix is not supported: these models only continue text", Some("suffix")));
        }
        let extra = Extra { kind: Kind::Completion, logprobs: req.logprobs, echo: req.echo.unwrap_or(false) };
        let p = prepare(&st, common, prompt, 16, extra)?;
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
        let (req, common): (ChatRequest, Common) = parse(body)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages is empty", Some("messages")));
        }
        if let Some(m) =
            req.messages.iter().find(|m| !["system", "user", "assistant", "developer"].contains(&m.role.as_str()))
        {
            return Err(ApiError::invalid(format!("unknown role `{}`", m.role), Some("messages")));
        }
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools are not supported: these are plain language models", Some("tools")));
        }
        if let Some(kind) = req.response_format.as_ref().and_then(|f| f.get("type")).filter(|t| *t != "text") {
            return Err(ApiError::invalid(
                format!("response_format {kind} is not supported; only text"),
                Some("response_format"),
            ));
        }
        let want_logprobs = req.logprobs.unwrap_or(false);
        if req.top_logprobs.is_some() && !want_logprobs {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs")));
        }
        let msgs = (req.messages.into_iter().enumerate())
            .map(|(i, m)| Ok((m.role.clone(), message_text(i, m)?)))
            .collect::<Result<Vec<(String, String)>, ApiError>>()?;
        let default = st.limits.max_tokens as u64;
        let logprobs = want_logprobs.then_some(req.top_logprobs.unwrap_or(0));
        let extra = Extra { kind: Kind::Chat, logprobs, echo: false };
        let p = prepare(&st, common, Prompt::Text(chat_prompt(&msgs)), default, extra)?;
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
