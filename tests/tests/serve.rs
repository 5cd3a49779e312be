//! `orchestrate serve` end to end: the real server on a free port, driven by the official
//! Python `openai` client and raw HTTP (tests/serve/client.py): models, completions and chat,
//! streamed or not, seeded determinism, stop strings, every bad input, many concurrent streams
//! batched (each with the text it gets alone), a full queue answered with 503, SIGTERM during a
//! stream, an INT8 model and the Transformer; log-probabilities and echo, whose score of a text
//! is held to the evaluate stage's (f32 Itera-Lite and Transformer, INT8 Itera-Lite);
//! `logit_bias` and the penalties (greedy: each token the best under the shaped log-probabilities);
//! `best_of` (the `n` draws of highest mean log-probability);
//! and the CLI's own errors.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e_tests::{venv_python, Project};

/// A tiny Itera-Lite and Transformer (12 steps on the builtin corpus) and the Itera-Lite in INT8.
const MODELS: &str = r#"name: serve
stages:
  corpus: {kind: corpus, params: {source: builtin, documents: 300, seed: 1}}
  vocab: {kind: vocab, inputs: {text: corpus.train.txt, valid: corpus.valid.txt}, params: {type: bpe, size: 300}}
  itera:
    kind: train
    inputs: &data {train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}
    params: &p {model: itera_lite, preset: tiny, steps: 12, batch: 4, seq_len: 32, eval_interval: 6, eval_tokens: 512, seed: 1}
  transformer: {kind: train, inputs: *data, params: {<<: *p, model: transformer}}
  int8:
    kind: quantize
    inputs: {model: itera.best, tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt}
    params: {scheme: int8, seq_len: 32, eval_tokens: 1024, bench_runs: 1}
"#;

fn trained() -> Project {
    let p = Project::new();
    p.write("serve.yaml", MODELS);
    p.run(&["run", "serve.yaml"]).assert_ok();
    p
}

/// A running `orchestrate serve`, killed if a test ends without stopping it.
struct Server {
    child: Child,
    base: String,
    /// Kept open: a server printing to a closed pipe would be killed by it.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    fn start(p: &Project, args: &[&str]) -> Server {
        let mut child = p
            .cmd()
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting orchestrate serve");
        let mut first = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut first).expect("reading stdout");
        let base = first.split(" on ").nth(1).map(|s| s.trim().to_string());
        let Some(base) = base.filter(|b| b.starts_with("http://127.0.0.1:")) else {
            let _ = child.kill();
            let out = child.wait_with_output().expect("server output");
            panic!("no address in {first:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        };
        Server { child, base, _stdout: stdout }
    }

    /// Run one check of tests/serve/client.py against this server.
    fn check(&self, model: &str, check: &str) {
        self.check_with(model, check, &[]);
    }

    /// A check that reads what it compares against from the environment.
    fn check_with(&self, model: &str, check: &str, env: &[(&str, String)]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("serve/client.py");
        let out = Command::new(venv_python())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg(script)
            .args([self.base.as_str(), model, check, &self.child.id().to_string()])
            .output()
            .expect("running the Python client");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "check `{check}` against `{model}` failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("{check} ok")), "{stdout}");
    }

    /// The `system_fingerprint` of a one-token completion, over raw HTTP.
    fn fingerprint(&self, model: &str) -> String {
        let port = self.base.rsplit(':').next().and_then(|p| p.trim_end_matches("/v1").parse().ok()).unwrap_or(0);
        let body = serde_json::json!({"model": model, "prompt": "the", "max_tokens": 1}).to_string();
        let reply = e2e_tests::http(port, "POST", "/v1/completions", body.as_bytes());
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        v["system_fingerprint"].as_str().unwrap_or_else(|| panic!("no fingerprint in {}", reply.text())).to_string()
    }

    /// Wait for the server to exit by itself; its exit code and stderr.
    fn wait(mut self) -> (Option<i32>, String) {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status.code(), err);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not exit");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_answers_the_openai_client_and_every_bad_request() {
    let p = trained();
    let s = Server::start(&p, &["serve.yaml", "itera"]);
    s.check("itera", "api");
    s.check("itera", "errors");
    // Still serving after all of that.
    s.check("itera", "api");
}

/// The evaluate stage's score of a short text, for the server's log-probabilities to match.
const SCORED: &str = r#"  score:
    kind: evaluate
    inputs: {tokenizer: vocab.tokenizer.json, text: file:probe.txt, itera: itera.best, transformer: transformer.best, int8: int8.model.gguf}
    params: {seq_len: 128, generate: 4, generate_runs: 1, prompt: 4}
"#;

#[test]
fn logprobs_and_echo_score_a_text_as_the_evaluate_stage_does() {
    let p = Project::new();
    // Shorter than the context, so the evaluate stage scores it in one window, as echo does.
    p.write("probe.txt", "Once upon a time, a little girl named Lily found a red ball in the park.\n");
    p.write("serve.yaml", &format!("{MODELS}{SCORED}"));
    p.run(&["run", "serve.yaml"]).assert_ok();
    p.run(&["export", "serve.yaml", "score.evaluation.json", "evaluation.json"]).assert_ok();
    let eval: serde_json::Value = serde_json::from_str(&p.read("evaluation.json")).expect("evaluation.json");
    // The same text as token ids, as evaluation harnesses send prompts.
    p.run(&["export", "serve.yaml", "vocab.tokenizer.json", "tokenizer.json"]).assert_ok();
    let tokenizer = tokenizers::Tokenizer::from_file(p.path().join("tokenizer.json")).expect("tokenizer.json");
    let probe = p.read("probe.txt");
    let ids = tokenizer.encode(probe.as_str(), false).expect("encoding the probe").get_ids().to_vec();
    for model in ["itera", "transformer", "int8"] {
        let record = eval["models"].as_array().and_then(|m| m.iter().find(|r| r["label"] == model));
        let nats = record.and_then(|r| r["nats_per_token"].as_f64()).expect("the model's nats/token");
        let env = [
            ("PROBE_TEXT", p.path().join("probe.txt").display().to_string()),
            ("PROBE_NATS", nats.to_string()),
            ("PROBE_IDS", serde_json::json!(ids).to_string()),
        ];
        Server::start(&p, &["serve.yaml", model]).check_with(model, "logprobs", &env);
    }
}

#[test]
fn concurrent_streams_are_batched_and_each_gets_its_own_text() {
    let p = trained();
    let s = Server::start(&p, &["serve.yaml", "itera", "--name", "tiny"]);
    s.check("tiny", "concurrent");
}

#[test]
fn the_int8_model_and_the_transformer_serve_too() {
    let p = trained();
    let int8 = Server::start(&p, &["serve.yaml", "int8"]);
    int8.check("int8", "api");
    let transformer = Server::start(&p, &["serve.yaml", "transformer"]);
    transformer.check("transformer", "api");
    // --model: the GGUF file copied out of the store, with its tokenizer.
    p.run(&["export", "serve.yaml", "int8.model.gguf", "m/int8.gguf"]).assert_ok();
    p.run(&["export", "serve.yaml", "vocab.tokenizer.json", "m/tokenizer.json"]).assert_ok();
    let copied = Server::start(&p, &["--model", "m/int8.gguf"]);
    copied.check("int8", "api");
    // The fingerprint follows the bytes served: the same model either way, another model not.
    let (a, b, c) = (int8.fingerprint("int8"), copied.fingerprint("int8"), transformer.fingerprint("transformer"));
    assert!(a == b && a != c, "int8 {a}, its copy {b}, transformer {c}");
    // --run: the model a past run recorded, with the tokenizer its manifest names.
    let past = Server::start(&p, &["serve.yaml", "int8", "--run", "latest"]);
    past.check("int8", "api");
    assert_eq!(past.fingerprint("int8"), a, "the same bytes as the pipeline's own");
    // /v1/models' `created`: when the stage computed the model, or the file's modification time.
    let shown = p.run(&["show", "serve.yaml", "int8", "--json"]).json();
    let span = shown["duration_s"].as_f64().unwrap_or(0.0).ceil().to_string();
    int8.check_with(
        "int8",
        "card",
        &[("CREATED_FROM", shown["started_at"].as_str().unwrap_or("").into()), ("CREATED_SPAN", span)],
    );
    let mtime = std::fs::metadata(p.path().join("m/int8.gguf")).and_then(|m| m.modified()).expect("the copy's mtime");
    let mtime = mtime.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    copied.check_with("int8", "card", &[("CREATED_FROM", mtime.to_string()), ("CREATED_SPAN", "0".into())]);
}

#[test]
fn a_full_queue_is_answered_with_503_not_unbounded_memory() {
    let p = trained();
    let s = Server::start(&p, &["serve.yaml", "itera", "--max-batch", "1", "--queue", "1"]);
    s.check("itera", "overload");
}

#[test]
fn sigterm_lets_the_stream_in_flight_finish_then_stops() {
    let p = trained();
    let s = Server::start(&p, &["serve.yaml", "itera"]);
    s.check("itera", "graceful");
    let (code, stderr) = s.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("requests in flight finished"), "{stderr}");
}

#[test]
fn serve_says_what_is_wrong_with_its_arguments() {
    let p = trained();
    let fails = |args: &[&str], code: i32, text: &str| {
        let r = p.run(args);
        assert_eq!(r.code, code, "{args:?}\n{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(text), "{args:?}: expected `{text}` in:\n{}", r.stderr);
    };
    fails(&["serve", "serve.yaml", "iterra"], 2, "no stage `iterra`");
    fails(&["serve", "serve.yaml", "corpus"], 2, "holds no model to serve");
    fails(&["serve", "serve.yaml", "itera.metrics.csv"], 1, "loading the model");
    fails(&["serve"], 2, "serve needs PIPELINE STAGE[.OUTPUT], or --model PATH");
    fails(&["serve", "serve.yaml", "itera", "--run", "nope"], 2, "--run nope: no run is named `nope`");
    fails(&["serve", "serve.yaml", "nothere", "--run", "latest"], 2, "has no result of `nothere`");
    fails(&["serve", "--model", "missing/ckpt", "--tokenizer", "t.json"], 1, "loading the model from missing/ckpt");
    fails(&["serve", "serve.yaml", "itera", "--host", "localhost:1"], 2, "is not an IP address");
    // A port already taken is named, with what to do.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    fails(&["serve", "serve.yaml", "itera", "--port", &port], 1, "another server on that port?");
}
