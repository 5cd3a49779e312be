//! The decoding loop: one thread owns the model and every sequence in flight. Each step it
//! samples one token for every active sequence, sends each its new text, and feeds all the
//! sampled tokens back in one batched step ([`SharedDecoder::step_many`]). New requests join
//! between steps, up to `max_batch` at once; the rest wait in the bounded queue in front.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use itera_models::shared_decoder::{SeqState, SharedDecoder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// How to pick each next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
}

/// What a request adds to the model's logits before each draw, as OpenAI defines it: the
/// penalties lower a token already generated in this choice (not in the prompt), by
/// `presence` once and by `frequency` per time; `bias` is added to the listed tokens' logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shaping {
    pub presence: f32,
    pub frequency: f32,
    pub bias: Vec<(u32, f32)>,
}

impl Shaping {
    /// The logits to draw from: `logits` itself when nothing applies.
    pub fn apply<'a>(&self, logits: &'a [f32], generated: &BTreeMap<u32, u32>) -> Cow<'a, [f32]> {
        let penalised = (self.presence != 0.0 || self.frequency != 0.0) && !generated.is_empty();
        if !penalised && self.bias.is_empty() {
            return Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        for &(t, b) in &self.bias {
            if let Some(x) = out.get_mut(t as usize) {
                *x += b;
            }
        }
        if penalised {
            for (&t, &n) in generated {
                if let Some(x) = out.get_mut(t as usize) {
                    *x -= self.presence + self.frequency * n as f32;
                }
            }
        }
        Cow::Owned(out)
    }
}

/// One request for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub shaping: Shaping,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and those of the n most likely tokens.
    pub logprobs: Option<usize>,
    /// Send the prompt back first ([`Event::Prompt`]), scored when `logprobs` is asked for.
    /// With `max_tokens` 0 nothing is generated: the prompt is only scored.
    pub echo: bool,
    pub events: UnboundedSender<Event>,
    pub queued_at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` or the model's context was reached.
    Length,
    /// A stop string or the end-of-text token.
    Stop,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

/// A token's log-probability under the model — its own distribution, before temperature,
/// top-k and top-p shape the draw — and the most likely tokens at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's text on its own (a piece of a UTF-8 character shows as U+FFFD).
    pub token: String,
    /// None for a prompt's first token, which nothing predicts.
    pub logprob: Option<f32>,
    /// Where the token's text starts in the generated text, in characters (prompt tokens: 0;
    /// the API places them).
    pub offset: usize,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id).
    pub top: Vec<(String, f32)>,
}

/// What the engine tells a request, in order: the scored prompt (echo only), each token's
/// log-probability (when asked) before the text piece that carries it, text pieces, then
/// `Done` (or `Failed`).
#[derive(Debug, PartialEq)]
pub enum Event {
    Prompt(Vec<TokenLogprob>),
    Logprob(TokenLogprob),
    Text(String),
    Done { finish: Finish, prompt_tokens: usize, completion_tokens: usize },
    Failed(String),
}

/// The model as the engine uses it.
pub struct Loaded {
    pub decoder: SharedDecoder,
    pub tokenizer: Tokenizer,
    /// The end-of-text token, when the vocabulary has one.
    pub eot: Option<u32>,
    pub max_seq_len: usize,
}

struct Seq {
    job: Job,
    state: SeqState,
    logits: Vec<f32>,
    rng: ChaCha8Rng,
    ids: Vec<u32>,
    /// How often each token is in `ids`, for the penalties.
    counts: BTreeMap<u32, u32>,
    /// Bytes of the generated text already sent.
    sent: usize,
    /// Characters of the generated text decoded so far: where the next token's text starts.
    chars: usize,
    /// Log-probabilities of tokens whose text has not gone out yet (see [`release`]).
    pending: Vec<TokenLogprob>,
}

/// The next token from `logits` under `s`, drawing from `rng` unless greedy.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    if s.temperature <= 0.0 {
        return argmax() as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p as f64
        });
        probs.truncate(keep.map_or(probs.len(), |k| k + 1));
    }
    let mut u = rng.random::<f64>() * probs.iter().sum::<f64>();
    for (p, &i) in probs.iter().zip(&order) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

/// The log-probability of token `t` in the distribution of `logits`, and the `n` most likely
/// tokens' (softmax in f64, so a flat distribution over a large vocabulary keeps its digits).
pub fn logprob(logits: &[f32], t: u32, n: usize, tokenizer: &Tokenizer) -> (f32, Vec<(String, f32)>) {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits.get(i).map_or(f64::NEG_INFINITY, |&v| v as f64) - lse) as f32;
    if n == 0 {
        return (lp(t as usize), Vec::new());
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal logits keep the lower id first.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top = order.into_iter().take(n).map(|i| (token_text(tokenizer, i as u32), lp(i))).collect();
    (lp(t as usize), top)
}

/// A token's text on its own.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Bytes at the end of `text` that must wait: an unfinished UTF-8 character (decoded as
/// U+FFFD) or the start of a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    let partial = text.len() - text.trim_end_matches('\u{FFFD}').len();
    let stop_prefix = stop
        .iter()
        .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0);
    partial.max(stop_prefix)
}

/// The log-probabilities that go out with the text up to character `end`: the tokens that
/// start inside it. Once the sequence is done, every token left goes too — unless a stop string
/// ended it: the tokens that start in the stop string (or after it) are not in the answer, so
/// the listed tokens stay those of the returned text, as `text_offset` says.
fn release(pending: &mut Vec<TokenLogprob>, end: usize, done: bool, stop_string: bool) -> Vec<TokenLogprob> {
    let n = if done && !stop_string { pending.len() } else { pending.iter().take_while(|t| t.offset < end).count() };
    let out = pending.drain(..n).collect();
    if done {
        pending.clear();
    }
    out
}

impl Seq {
    fn send(&self, e: Event) -> bool {
        self.job.events.send(e).is_ok()
    }

    /// Take the sampled token `t`: send the text it completes; `Some(finish)` when this
    /// sequence is done (or its client went away: `Some(Stop)` without a `Done`).
    fn take(&mut self, t: u32, m: &Loaded) -> Option<Finish> {
        let finish = if Some(t) == m.eot {
            Some(Finish::Stop)
        } else {
            self.ids.push(t);
            *self.counts.entry(t).or_default() += 1;
            None
        };
        let text = m.tokenizer.decode(&self.ids, true).unwrap_or_default();
        // Only log-probabilities place tokens in the text; counting characters costs a pass.
        if self.job.logprobs.is_some() {
            self.chars = text.chars().count();
        }
        let rest = text.get(self.sent.min(text.len())..).unwrap_or("");
        let stop_at = self.job.stop.iter().filter_map(|s| rest.find(s.as_str())).min();
        // Another token needs this one fed first, at position pos, which must be inside the context.
        let full = self.ids.len() >= self.job.max_tokens || self.state.pos() >= m.max_seq_len;
        let (end, finish) = match (stop_at, finish) {
            (Some(i), _) => (self.sent + i, Some(Finish::Stop)),
            (None, Some(f)) => (text.len(), Some(f)),
            (None, None) if full => (text.len(), Some(Finish::Length)),
            (None, None) => (text.len() - held_back(&text, &self.job.stop), None),
        };
        if self.job.logprobs.is_some() {
            // Characters up to `end`: the whole text's count less the few held back after it.
            let end_chars = self.chars - text.get(end..).map_or(0, |t| t.chars().count());
            for t in release(&mut self.pending, end_chars, finish.is_some(), stop_at.is_some()) {
                if !self.send(Event::Logprob(t)) {
                    return Some(Finish::Stop);
                }
            }
        }
        // Only whole characters go out; a piece that does not end on one waits for the next token.
        if let Some(piece) = text.get(self.sent..end).filter(|p| !p.is_empty()) {
            let piece = piece.to_string();
            self.sent = end;
            if !self.send(Event::Text(piece)) {
                return Some(Finish::Stop);
            }
        }
        if let Some(f) = finish {
            self.send(Event::Done {
                finish: f,
                prompt_tokens: self.job.prompt.len(),
                completion_tokens: self.ids.len(),
            });
        }
        finish
    }
}

/// Run until every sender of `jobs` is gone and nothing is in flight (graceful shutdown).
pub fn run(model: Arc<Loaded>, jobs: Receiver<Job>, metrics: Arc<Metrics>, max_batch: usize) {
    let mut active: Vec<Seq> = Vec::new();
    loop {
        if active.is_empty() {
            match jobs.recv() {
                Ok(j) => admit(j, &model, &metrics, &mut active),
                Err(_) => return,
            }
        }
        while active.len() < max_batch {
            match jobs.try_recv() {
                Ok(j) => admit(j, &model, &metrics, &mut active),
                Err(_) => break,
            }
        }
        let mut next = Vec::with_capacity(active.len());
        active.retain_mut(|s| {
            let t = sample(&s.job.shaping.apply(&s.logits, &s.counts), &s.job.sampling, &mut s.rng);
            if let (Some(n), false) = (s.job.logprobs, Some(t) == model.eot) {
                let (lp, top) = logprob(&s.logits, t, n, &model.tokenizer);
                let token = token_text(&model.tokenizer, t);
                s.pending.push(TokenLogprob { token, logprob: Some(lp), offset: s.chars, top });
            }
            let done = s.take(t, &model).is_some();
            if done {
                metrics.finished(s.ids.len(), s.job.queued_at);
            } else {
                next.push(t);
            }
            !done
        });
        metrics.set_active(active.len());
        if active.is_empty() {
            continue;
        }
        metrics.step(active.len());
        let mut states: Vec<&mut SeqState> = active.iter_mut().map(|s| &mut s.state).collect();
        match model.decoder.step_many(&next, &mut states) {
            Ok(logits) => active.iter_mut().zip(logits).for_each(|(s, l)| s.logits = l),
            Err(e) => {
                for s in active.drain(..) {
                    s.send(Event::Failed(format!("decoding failed: {e}")));
                }
            }
        }
    }
}

fn admit(job: Job, model: &Loaded, metrics: &Metrics, active: &mut Vec<Seq>) {
    metrics.dequeued(job.queued_at);
    let mut state = model.decoder.start();
    let fed = match (job.echo, job.logprobs) {
        (true, Some(n)) => score_prompt(model, &mut state, &job.prompt, n),
        _ => model.decoder.feed(&mut state, &job.prompt).map(|l| (l, Vec::new())).map_err(|e| e.to_string()),
    };
    match fed {
        Ok((logits, scored)) => {
            if job.echo {
                let _ = job.events.send(Event::Prompt(scored));
            }
            if job.max_tokens == 0 {
                metrics.finished(0, job.queued_at);
                let done =
                    Event::Done { finish: Finish::Length, prompt_tokens: job.prompt.len(), completion_tokens: 0 };
                let _ = job.events.send(done);
                return;
            }
            let rng = ChaCha8Rng::seed_from_u64(job.seed);
            let (ids, counts) = (Vec::new(), BTreeMap::new());
            active.push(Seq { job, state, logits, rng, ids, counts, sent: 0, chars: 0, pending: Vec::new() });
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(format!("reading the prompt failed: {e}")));
        }
    }
}

/// Feed the prompt one token at a time, scoring each token after the first by the logits
/// before it (the decoder's `feed` steps token by token too, so the state is the same); the
/// logits after the last token, and the scored tokens.
fn score_prompt(
    model: &Loaded,
    state: &mut SeqState,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<f32>, Vec<TokenLogprob>), String> {
    let mut scored = Vec::with_capacity(prompt.len());
    let mut logits: Option<Vec<f32>> = None;
    for &t in prompt {
        let token = token_text(&model.tokenizer, t);
        let (logprob, top) = match &logits {
            Some(l) => {
                let (lp, top) = logprob(l, t, n, &model.tokenizer);
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };
        scored.push(TokenLogprob { token, logprob, offset: 0, top });
        logits = Some(model.decoder.feed(state, &[t]).map_err(|e| e.to_string())?);
    }
    let logits = logits.ok_or_else(|| "the prompt is empty".to_string())?;
    Ok((logits, scored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0, 3.0, 1.0, 2.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        // top_k 1 or a tiny top_p leave only the most likely token, whatever the draw.
        for s in
            [Sampling { temperature: 1.0, top_k: 1, top_p: 1.0 }, Sampling { temperature: 1.0, top_k: 0, top_p: 0.01 }]
        {
            assert!((0..50).all(|_| sample(&logits, &s, &mut rng) == 1), "{s:?}");
        }
        // top_k 2 draws only from the two most likely, and both occur.
        let s = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
        let drawn: std::collections::BTreeSet<u32> = (0..200).map(|_| sample(&logits, &s, &mut rng)).collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), [1, 3]);
        // The same seed draws the same sequence.
        let full = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..20).map(|_| sample(&logits, &full, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn bias_and_penalties_shift_the_logits_as_openai_defines_them() {
        let logits = [1.0, 2.0, 3.0];
        let none = Shaping::default();
        let seen = BTreeMap::from([(2, 3), (0, 1)]);
        assert!(matches!(none.apply(&logits, &seen), Cow::Borrowed(_)));
        let s = Shaping { presence: 0.5, frequency: 0.25, bias: vec![(1, -2.0), (7, 100.0)] };
        // Token 2 seen 3 times: -0.5 - 3 × 0.25; token 0 once: -0.75; token 1 biased; 7 is outside.
        assert_eq!(s.apply(&logits, &seen).as_ref(), [0.25, 0.0, 1.75]);
        // Nothing generated yet: only the bias.
        assert_eq!(s.apply(&logits, &BTreeMap::new()).as_ref(), [1.0, 0.0, 3.0]);
        // Greedy follows the shaped logits.
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let heavy = Shaping { presence: 2.0, frequency: 0.0, bias: vec![] };
        assert_eq!(sample(&heavy.apply(&logits, &BTreeMap::from([(2, 1)])), &greedy, &mut rng), 1);
    }

    #[test]
    fn log_probabilities_go_with_their_text_and_not_past_a_stop_string() {
        let tok = |offset| TokenLogprob { token: String::new(), logprob: Some(-1.0), offset, top: Vec::new() };
        let offsets = |v: Vec<TokenLogprob>| v.into_iter().map(|t| t.offset).collect::<Vec<_>>();
        // Text out to character 3: the tokens starting at 0 and 2; the one at 3 waits.
        let mut pending = vec![tok(0), tok(2), tok(3)];
        assert_eq!(offsets(release(&mut pending, 3, false, false)), [0, 2]);
        assert_eq!(offsets(std::mem::take(&mut pending)), [3]);
        // Done by length (or end of text): everything left goes, also a token with no text.
        let mut pending = vec![tok(3), tok(5), tok(5)];
        assert_eq!(offsets(release(&mut pending, 5, true, false)), [3, 5, 5]);
        // Done by a stop string starting at character 4: the tokens inside it are dropped.
        let mut pending = vec![tok(3), tok(4), tok(6)];
        assert_eq!(offsets(release(&mut pending, 4, true, true)), [3]);
        assert!(pending.is_empty());
    }

    #[test]
    fn partial_characters_and_stop_prefixes_wait() {
        let stop = vec!["END".to_string()];
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("hello E", &stop), 1);
        assert_eq!(held_back("hello EN", &stop), 2);
        assert_eq!(held_back("caf\u{FFFD}", &stop), 3);
    }
}
