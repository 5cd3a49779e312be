//! Answering a prepared request: the whole answer as one JSON object, or server-sent events as
//! the engine makes it. With `n` > 1 each choice is its own sequence with its own seed, decoded
//! in the same batch as every other sequence in flight.

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Event, TokenLogprob};
use crate::logprobs::{Kind, Shape};
use crate::request::ApiError;

/// A validated request, its choices' jobs already queued: per choice its events and the shape
/// of its answer (the echoed prompt is its prompt's).
pub(crate) struct Prepared {
    pub(crate) id: u64,
    pub(crate) choices: Vec<(UnboundedReceiver<Event>, Arc<Shape>)>,
    /// Choices per prompt in the answer (`n`).
    pub(crate) per_prompt: usize,
    /// Sequences drawn per prompt (`best_of`, else `n`): `choices` i·d … i·d + d − 1 are
    /// prompt i's; with more than `n`, the `n` of highest mean log-probability answer.
    pub(crate) drawn: usize,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

/// The response's header fields: id, object, created, model.
struct Header {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Header {
    /// A response (or chunk) with these choices, and usage when given.
    fn with(&self, chunk: bool, choices: Value, usage: Option<Value>) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
                           "system_fingerprint": self.fingerprint, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// One choice's whole answer.
struct Collected {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// The mean log-probability of the generated tokens (−∞ when none), which ranks
    /// `best_of` draws.
    score: f64,
}

async fn collect(mut rx: UnboundedReceiver<Event>, shape: &Shape) -> Result<Collected, ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    let (mut sum, mut count) = (0.0f64, 0usize);
    while let Some(e) = rx.recv().await {
        match e {
            Event::Prompt(scored) => {
                text.push_str(shape.echo.as_ref().map_or("", |e| e.text.as_str()));
                logprobs.extend(shape.prompt(scored));
            }
            Event::Logprob(t) => {
                sum += f64::from(t.logprob.unwrap_or(0.0));
                count += 1;
                logprobs.push(shape.generated(t));
            }
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                let score = if count == 0 { f64::NEG_INFINITY } else { sum / count as f64 };
                let finish = finish.as_str();
                return Ok(Collected { text, logprobs, finish, prompt_tokens, completion_tokens, score });
            }
            Event::Failed(m) => return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, m, None)),
        }
    }
    Err(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped", None))
}

pub(crate) async fn respond(
    p: Prepared,
    kind: Kind,
    created: u64,
    model: String,
    fingerprint: String,
) -> Result<Response, ApiError> {
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let header = Header { id: format!("{prefix}-{}", p.id), kind, created, model, fingerprint };
    if p.stream {
        return Ok(streamed(header, p.choices, p.per_prompt, p.include_usage));
    }
    let collected = futures::future::join_all(
        p.choices.into_iter().map(|(rx, shape)| async move { (collect(rx, &shape).await, shape) }),
    )
    .await;
    let collected = collected.into_iter().map(|(c, shape)| c.map(|c| (c, shape))).collect::<Result<Vec<_>, _>>()?;
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (Vec::new(), 0, 0);
    for (i, (c, _)) in collected.iter().enumerate() {
        // A prompt's draws read it once each; it counts once, as in OpenAI's usage. Every
        // draw's tokens count, the ones `best_of` left out too.
        if i.is_multiple_of(p.drawn) {
            prompt_tokens += c.prompt_tokens;
        }
        completion_tokens += c.completion_tokens;
    }
    for (index, (c, shape)) in best(collected, p.drawn, p.per_prompt).into_iter().enumerate() {
        let logprobs = shape.field(&c.logprobs);
        choices.push(match kind {
            Kind::Completion => {
                json!({"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish})
            }
            Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": logprobs, "finish_reason": c.finish}),
        });
    }
    let body = header.with(false, Value::Array(choices), Some(usage(prompt_tokens, completion_tokens)));
    Ok(Json(body).into_response())
}

/// Per prompt, the `keep` of its `drawn` draws with the highest mean log-probability, best
/// first (ties: the earlier draw); all of them, in order, when it drew no more than it keeps.
fn best<T>(all: Vec<(Collected, T)>, drawn: usize, keep: usize) -> Vec<(Collected, T)> {
    if drawn <= keep {
        return all;
    }
    let mut out = Vec::new();
    let mut rest = all.into_iter();
    loop {
        let mut group: Vec<(Collected, T)> = rest.by_ref().take(drawn).collect();
        if group.is_empty() {
            return out;
        }
        group.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
        out.extend(group.into_iter().take(keep));
    }
}

/// Where a streamed response is: per choice the log-probabilities waiting for the text piece
/// that carries their tokens, the choices not finished yet, and the tokens counted so far.
struct Streaming {
    shapes: Vec<Arc<Shape>>,
    per_prompt: usize,
    pending: Vec<Vec<TokenLogprob>>,
    left: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    over: bool,
}

/// Server-sent events: the choices' pieces as they come, each chunk naming its choice's index;
/// each choice's closing chunk with its finish reason; then usage (if asked) and `[DONE]`
/// once every choice has finished.
fn streamed(
    header: Header,
    choices: Vec<(UnboundedReceiver<Event>, Arc<Shape>)>,
    per_prompt: usize,
    include_usage: bool,
) -> Response {
    let (kind, n) = (header.kind, choices.len());
    let sse = move |v: Value| Sse::default().data(v.to_string());
    let header = Arc::new(header);
    let first: Vec<Sse> = match kind {
        Kind::Chat => (0..n)
            .map(|i| {
                let role = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
                sse(header.with(true, role, None))
            })
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let (receivers, shapes): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
    let events: Vec<BoxStream<'static, (usize, Event)>> = (receivers.into_iter().enumerate())
        .map(|(i, rx)| {
            stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) }).map(move |e| (i, e)).boxed()
        })
        .collect();
    let pending = vec![Vec::new(); n];
    let state = Streaming { shapes, per_prompt, pending, left: n, prompt_tokens: 0, completion_tokens: 0, over: false };
    let chunks = stream::select_all(events)
        .scan(state, move |st, (i, e)| {
            let out = if st.over { None } else { Some(step(st, i, e, &header, include_usage)) };
            futures::future::ready(out)
        })
        .flat_map(stream::iter);
    let all = stream::iter(first).chain(chunks).map(Ok::<_, Infallible>);
    axum::response::Sse::new(all).keep_alive(KeepAlive::default()).into_response()
}

/// The chunks one engine event of choice `i` makes.
fn step(st: &mut Streaming, i: usize, e: Event, header: &Header, include_usage: bool) -> Vec<Sse> {
    let chunk = |choice: Value| Sse::default().data(header.with(true, json!([choice]), None).to_string());
    let shape = st.shapes[i].clone();
    match e {
        Event::Prompt(scored) => {
            let text = shape.echo.as_ref().map_or("", |e| e.text.as_str());
            vec![chunk(piece(header.kind, i, Some(text), None, shape.field(&shape.prompt(scored))))]
        }
        Event::Logprob(t) => {
            st.pending[i].push(shape.generated(t));
            vec![]
        }
        Event::Text(t) => {
            let logprobs = shape.field(&std::mem::take(&mut st.pending[i]));
            vec![chunk(piece(header.kind, i, Some(&t), None, logprobs))]
        }
        Event::Done { finish, prompt_tokens, completion_tokens } => {
            let pending = std::mem::take(&mut st.pending[i]);
            let logprobs = if pending.is_empty() { Value::Null } else { shape.field(&pending) };
            let mut out = vec![chunk(piece(header.kind, i, None, Some(finish.as_str()), logprobs))];
            if i.is_multiple_of(st.per_prompt) {
                st.prompt_tokens += prompt_tokens;
            }
            st.completion_tokens += completion_tokens;
            st.left -= 1;
            if st.left == 0 {
                if include_usage {
                    let u = usage(st.prompt_tokens, st.completion_tokens);
                    out.push(Sse::default().data(header.with(true, json!([]), Some(u)).to_string()));
                }
                out.push(Sse::default().data("[DONE]"));
                st.over = true;
            }
            out
        }
        Event::Failed(m) => {
            st.over = true;
            let e = json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}});
            vec![Sse::default().data(e.to_string())]
        }
    }
}

/// One streamed choice: a text piece, or the closing one with its finish reason.
fn piece(kind: Kind, index: usize, text: Option<&str>, finish: Option<&str>, logprobs: Value) -> Value {
    match kind {
        Kind::Completion => {
            json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Chat => {
            let delta = text.map_or(json!({}), |t| json!({"content": t}));
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(text: &str, score: f64) -> (Collected, ()) {
        let c = Collected {
            text: text.into(),
            logprobs: Vec::new(),
            finish: "length",
            prompt_tokens: 1,
            completion_tokens: 1,
            score,
        };
        (c, ())
    }

    #[test]
    fn best_of_keeps_each_prompts_most_likely_draws_best_first() {
        let texts = |v: Vec<(Collected, ())>| v.into_iter().map(|(c, _)| c.text).collect::<Vec<_>>();
        // Two prompts, three draws each, two kept; a tie keeps the earlier draw first.
        let all = vec![
            draw("a0", -2.0),
            draw("a1", -0.5),
            draw("a2", -1.0),
            draw("b0", -1.0),
            draw("b1", f64::NEG_INFINITY),
            draw("b2", -1.0),
        ];
        assert_eq!(texts(best(all, 3, 2)), ["a1", "a2", "b0", "b2"]);
        // Nothing to choose: every draw, in order.
        assert_eq!(texts(best(vec![draw("x", -3.0), draw("y", -1.0)], 2, 2)), ["x", "y"]);
    }
}
