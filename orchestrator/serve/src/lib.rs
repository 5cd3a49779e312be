//! `orchestrate serve`: an OpenAI-compatible HTTP server for one trained model (f32 checkpoint
//! or INT8/INT4 GGUF, with its `tokenizer.json`). axum on tokio answers HTTP; one engine thread
//! decodes every request in flight together ([`engine`]); a bounded queue in between turns
//! overload into 503s. README's "Serving" says what it accepts; docs/architecture.md how it works.

pub mod api;
pub mod engine;
pub mod logprobs;
pub mod metrics;
pub mod prompt;
mod request;
mod respond;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use itera_models::shared_decoder::SharedDecoder;
use itera_models::Model;
use tokenizers::Tokenizer;

use crate::engine::Loaded;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the model from {path}: {message}")]
    Model { path: String, message: String },
    #[error("loading the tokenizer from {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("the tokenizer has {tokenizer} tokens but the model's vocabulary is {model}: they do not belong together")]
    Mismatch { tokenizer: usize, model: usize },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// What the server accepts.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting beyond the batch before new ones get 503.
    pub queue: usize,
    /// Largest request body, bytes (larger: 413).
    pub body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_tokens: 512, max_batch: 32, queue: 256, body_bytes: 1 << 20 }
    }
}

/// Load a checkpoint folder or GGUF file and its tokenizer, and prepare the shared decoder.
pub fn load(model: &Path, tokenizer: &Path) -> Result<Loaded, ServeError> {
    let m = Model::load_any(model)
        .map_err(|e| ServeError::Model { path: model.display().to_string(), message: e.to_string() })?;
    let tok = Tokenizer::from_file(tokenizer)
        .map_err(|e| ServeError::Tokenizer { path: tokenizer.display().to_string(), message: e.to_string() })?;
    let (tv, mv) = (tok.get_vocab_size(true), m.config.vocab_size());
    if tv > mv {
        return Err(ServeError::Mismatch { tokenizer: tv, model: mv });
    }
    let decoder = SharedDecoder::new(&m)
        .map_err(|e| ServeError::Model { path: model.display().to_string(), message: e.to_string() })?;
    let eot = tok.token_to_id("<|endoftext|>").or_else(|| tok.token_to_id("<eos>"));
    Ok(Loaded { decoder, tokenizer: tok, eot, max_seq_len: m.config.max_seq_len() })
}

/// The HTTP routes over a running engine.
pub fn router(state: Arc<api::AppState>) -> Router {
    let body = state.limits.body_bytes;
    Router::new()
        .route("/v1/models", get(api::models).fallback(api::wrong_method))
        .route("/v1/models/{model}", get(api::model).fallback(api::wrong_method))
        .route("/v1/completions", post(api::completions).fallback(api::wrong_method))
        .route("/v1/chat/completions", post(api::chat).fallback(api::wrong_method))
        .route("/health", get(api::health).fallback(api::wrong_method))
        .route("/metrics", get(api::metrics).fallback(api::wrong_method))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(body))
        .with_state(state)
}

/// Serve `model` as `name` on `listener` until `shutdown` resolves; then stop taking
/// connections, let requests in flight finish (bounded by their `max_tokens`), and return.
/// Every response carries `fingerprint` as OpenAI's `system_fingerprint`.
/// What the API says about the model it serves.
pub struct Card {
    /// The model's name: requests must name it.
    pub name: String,
    /// OpenAI's `system_fingerprint`, on every response.
    pub fingerprint: String,
    /// `/v1/models`' `created`: when the model was made (Unix seconds).
    pub created: u64,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Loaded,
    card: Card,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let model = Arc::new(model);
    let metrics = Arc::new(Metrics::new());
    let (jobs, rx) = std::sync::mpsc::sync_channel(limits.queue);
    let engine = {
        let (model, metrics, max_batch) = (model.clone(), metrics.clone(), limits.max_batch);
        std::thread::Builder::new().name("decode".into()).spawn(move || engine::run(model, rx, metrics, max_batch))?
    };
    let next_id = AtomicU64::new(1);
    let Card { name, fingerprint, created } = card;
    let state = Arc::new(api::AppState { model, name, fingerprint, created, jobs, metrics, limits, next_id });
    let app = router(state);
    // The router (and with it the last job sender) is dropped when serving ends, which lets
    // the engine finish what is in flight and return.
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    Ok(())
}
