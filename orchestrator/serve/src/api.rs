//! The OpenAI HTTP API over the engine: `/v1/models` (and one by name), `/v1/completions`,
//! `/v1/chat/completions` (JSON or server-sent events), `/health`, `/metrics`. Every error is
//! OpenAI's `{"error": {message, type, param, code}}` with a 4xx/5xx status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::engine::{Job, Loaded, Sampling, Shaping};
use crate::logprobs::{Echo, Kind, Shape};
use crate::metrics::Metrics;
use crate::prompt::{self, Prompt};
use crate::request::{
    message_text, parse, shaping, ApiError, ChatRequest, Common, CompletionRequest, OneOrMany, MAX_TOP_LOGPROBS,
};
use crate::respond::{respond, Prepared};
use crate::Limits;

pub struct AppState {
    pub model: Arc<Loaded>,
    pub name: String,
    /// OpenAI's `system_fingerprint`: changes when what decides a seed's text changes.
    pub fingerprint: String,
    /// When the model was made (Unix seconds), as `/v1/models` says.
    pub created: u64,
    pub jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub next_id: AtomicU64,
}

/// What one endpoint's own fields ask for: the number of most likely tokens to list per
/// position (None: no log-probabilities), and the prompt echoed (completions).
struct Extra {
    kind: Kind,
    logprobs: Option<u64>,
    echo: bool,
    /// Completions: draw this many per prompt and answer with the `n` of highest mean
    /// log-probability per token.
    best_of: Option<u64>,
}

/// Most sequences one prompt may ask for (`n`, or `best_of` drawn to choose `n` from), and one
/// request in all (prompts × that): each is decoded as a sequence of its own.
const MAX_CHOICES: u64 = 16;
const MAX_REQUEST_CHOICES: usize = 64;

/// How every choice of a request is drawn.
struct Settings {
    n: u64,
    /// Sequences drawn per prompt: `n`, or `best_of`.
    draws: u64,
    max_tokens: u64,
    sampling: Sampling,
    shaping: Shaping,
    stop: Vec<String>,
}

/// The shared fields checked: model, `n` and `best_of`, length, log-probabilities, sampling,
/// penalties and logit bias, and stop.
fn settings(st: &AppState, c: &Common, default_max: u64, extra: &Extra) -> Result<Settings, ApiError> {
    if c.model != st.name {
        return Err(ApiError::invalid(
            format!("the model `{}` does not exist; this server serves `{}`", c.model, st.name),
            Some("model"),
        )
        .with_code(StatusCode::NOT_FOUND, "model_not_found"));
    }
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid(format!("n must be between 1 and {MAX_CHOICES} (got {n})"), Some("n")));
    }
    let draws = extra.best_of.unwrap_or(n);
    if !(n..=MAX_CHOICES).contains(&draws) {
        let m = format!("best_of must be between n ({n}) and {MAX_CHOICES} (got {draws})");
        return Err(ApiError::invalid(m, Some("best_of")));
    }
    if draws > n && c.stream.unwrap_or(false) {
        return Err(ApiError::invalid(
            "best_of cannot be used with stream: choices are ranked once all are done",
            Some("best_of"),
        ));
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
    let stop = match &c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop takes up to 4 non-empty strings", Some("stop")));
    }
    let sampling = Sampling { temperature, top_k: c.top_k.unwrap_or(0) as usize, top_p };
    let shaping = shaping(c, st.model.tokenizer.get_vocab_size(true))?;
    Ok(Settings { n, draws, max_tokens, sampling, shaping, stop })
}

/// One prompt tokenized and checked against the context (`which`: its place in a batch).
fn encode(st: &AppState, prompt: Prompt, generates: bool, which: Option<usize>) -> Result<prompt::Encoded, ApiError> {
    let name = which.map_or("the prompt".to_string(), |i| format!("prompt {i}"));
    let invalid = |m: String| ApiError::invalid(m, Some("prompt"));
    let encoded = prompt::encode(&st.model.tokenizer, prompt).map_err(|m| invalid(format!("{name}: {m}")))?;
    let len = encoded.ids.len();
    if encoded.text.is_empty() && len == 0 {
        return Err(invalid(format!("{name} is empty")));
    }
    // A prompt only scored (echo, max_tokens 0) may fill the whole context.
    if len == 0 || len + usize::from(generates) > st.model.max_seq_len {
        let left = if generates { ", and at least one must be left to generate" } else { "" };
        let m = format!("{name} is {len} tokens; this model's context is {} tokens{left}", st.model.max_seq_len);
        return Err(invalid(m).with_code(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    Ok(encoded)
}

/// A request checked and turned into its choices' jobs (queued by [`answer`]): `n` per prompt,
/// in the order of the response's `choices`.
fn prepare(
    st: &AppState,
    c: Common,
    prompts: Vec<Prompt>,
    default_max: u64,
    extra: Extra,
) -> Result<(Vec<Job>, Prepared), ApiError> {
    let s = settings(st, &c, default_max, &extra)?;
    if prompts.len() * s.draws as usize > MAX_REQUEST_CHOICES {
        let each = if s.draws > s.n { "best_of" } else { "n" };
        let m = format!(
            "{} prompts × {each} = {} asks for more than {MAX_REQUEST_CHOICES} choices",
            prompts.len(),
            s.draws
        );
        return Err(ApiError::invalid(m, Some("prompt")));
    }
    let batch = prompts.len() > 1;
    let encoded = (prompts.into_iter().enumerate())
        .map(|(i, p)| encode(st, p, s.max_tokens > 0, batch.then_some(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let seed = c.seed.unwrap_or(id);
    let (mut jobs, mut choices) = (Vec::new(), Vec::new());
    for e in encoded {
        let echo = extra.echo.then_some(Echo { text: e.text, offsets: e.offsets });
        let shape = Arc::new(Shape { kind: extra.kind, logprobs: extra.logprobs.is_some(), echo });
        // Choice i of a prompt draws with seed + i: choice 0 is the answer n = 1 gives for the
        // same seed, and a prompt in a batch answers as it would alone. Ranking `best_of` draws
        // needs each token's log-probability, asked for or not.
        let ranked = s.draws > s.n;
        let logprobs = extra.logprobs.map(|n| n as usize).or(ranked.then_some(0));
        for i in 0..s.draws {
            let (tx, rx) = unbounded_channel();
            jobs.push(Job {
                prompt: e.ids.clone(),
                max_tokens: s.max_tokens as usize,
                sampling: s.sampling,
                shaping: s.shaping.clone(),
                seed: seed.wrapping_add(i),
                stop: s.stop.clone(),
                logprobs,
                echo: extra.echo,
                events: tx,
                queued_at: Instant::now(),
            });
            choices.push((rx, shape.clone()));
        }
    }
    let include_usage = c.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let (per_prompt, drawn) = (s.n as usize, s.draws as usize);
    Ok((jobs, Prepared { id, choices, per_prompt, drawn, stream: c.stream.unwrap_or(false), include_usage }))
}

/// Queue a prepared request's jobs and answer it.
async fn answer(st: &AppState, kind: Kind, (jobs, p): (Vec<Job>, Prepared)) -> Result<Response, ApiError> {
    // A job queued before a later one is refused has its receiver dropped with `p`: the engine
    // drops that sequence at its next token.
    for job in jobs {
        enqueue(st, job)?;
    }
    respond(p, kind, now(), st.name.clone(), st.fingerprint.clone()).await
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

fn counted(st: &AppState, kind: Kind, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request(endpoint(kind), r.status().as_u16());
    r
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let (req, common): (CompletionRequest, Common) = parse(body)?;
        let prompts = prompt::read(req.prompt).map_err(|m| ApiError::invalid(m, Some("prompt")))?;
        if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix is not supported: these models only continue text", Some("suffix")));
        }
        let echo = req.echo.unwrap_or(false);
        let extra = Extra { kind: Kind::Completion, logprobs: req.logprobs, echo, best_of: req.best_of };
        answer(&st, Kind::Completion, prepare(&st, common, prompts, 16, extra)?).await
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
        let extra = Extra { kind: Kind::Chat, logprobs, echo: false, best_of: None };
        answer(&st, Kind::Chat, prepare(&st, common, vec![Prompt::Text(chat_prompt(&msgs))], default, extra)?).await
    }
    .await;
    counted(&st, Kind::Chat, r)
}

fn model_card(st: &AppState) -> serde_json::Value {
    json!({"id": st.name, "object": "model", "created": st.created, "owned_by": "orchestrate"})
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/v1/models", 200);
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

/// `GET /v1/models/{model}`: the served model, or OpenAI's 404 for any other name.
pub async fn model(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let r = if name == st.name {
        Json(model_card(&st)).into_response()
    } else {
        let m = format!("the model `{name}` does not exist; this server serves `{}`", st.name);
        ApiError::invalid(m, Some("model")).with_code(StatusCode::NOT_FOUND, "model_not_found").into_response()
    };
    st.metrics.request("/v1/models/{model}", r.status().as_u16());
    r
}

pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({"status": "ok", "model": st.name})).into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.encode()).into_response()
}

/// A known endpoint asked with a method it does not take: 405 with `Allow`, in JSON like
/// every other error (axum's own 405 has no body).
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let allowed = if uri.path().ends_with("completions") { "POST" } else { "GET" };
    let msg = format!("{} takes {allowed}, not {method}", uri.path());
    let mut r =
        ApiError::invalid(msg, None).with_code(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").into_response();
    r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    r
}

pub async fn not_found() -> Response {
    ApiError::invalid(
        "no such endpoint; this server has /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics",
        None,
    )
    .with_code(StatusCode::NOT_FOUND, "not_found")
    .into_response()
}
