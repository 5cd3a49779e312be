//! `orchestrate ui` end to end: the real server on a free port over a store two real runs made
//! (one ok; one with a changed param, a failed stage and a skipped one). Every page over plain
//! HTTP, every error page, the read-only promise (the store's files are unchanged, and a run
//! goes while the view is open), the live view's server-sent events during a run; and headless
//! Chromium (Debian's, through chromedriver) loading the pages and checking the rendered DOM,
//! with a screenshot of each page kept under `target/tmp/ui-screenshots/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e_tests::{http, venv_python, HttpReply, Project};

const PIPELINE: &str = r#"name: view
params: {scale: 1}
metrics: {fit.loss: min}
stages:
  data:
    kind: command
    cmd: "printf 'hello\n' > ${outputs.data.txt}"
    outputs: [data.txt]
  fit:
    kind: command
    foreach: {lr: [0.1, 0.2, 0.3]}
    inputs: {d: data.data.txt}
    cmd: "python3 -c 'import json; print(json.dumps({\"loss\": round(abs(${item.lr} - 0.2) * ${params.scale} + 0.5, 3), \"rate\": ${item.lr} / 3}))' > $ORCH_METRICS; echo fit-${item.lr} > ${outputs.model}; echo trained ${item.lr}"
    outputs: [model]
  bench:
    kind: command
    inputs: {m: {best_of: fit, by: loss, output: model}}
    cmd: "printf '{\"models\": [{\"label\": \"a\", \"tok_s\": 1200}, {\"label\": \"b\", \"tok_s\": 800}]}\n' > ${outputs.bench.json}"
    outputs: [bench.json]
  report:
    kind: report
    inputs: {bench: bench.bench.json}
    params: {template: "file:t.md.j2"}
  train:
    kind: command
    cmd: "printf 'step,tokens,train_loss,val_loss\n1,100,3.${params.scale},2.${params.scale}\n2,200,1.5,1.2\n' > ${outputs.metrics.csv}"
    outputs: [metrics.csv]
  flaky:
    kind: command
    inputs: {d: data.data.txt}
    cmd: "test ${params.scale} = 1 || { echo 'boom: scale is not 1' >&2; exit 3; }; echo ok > ${outputs.o}"
    outputs: [o]
  after:
    kind: command
    inputs: {o: flaky.o}
    cmd: "cp ${inputs.o} ${outputs.o}"
    outputs: [o]
"#;

const TEMPLATE: &str = "# View report\n\nFastest: **{{ inputs.bench.models[0].label }}**\n\n\
![speed]({{ bars(\"speed.png\", \"forward speed\", inputs.bench.models, \"tok_s\", \"tokens/s\") }})\n";

/// A run that waits in its second stage until the test creates `gate`.
fn gated(gate: &Path) -> String {
    format!(
        "name: gated\nstages:\n  first: {{kind: command, cmd: \"echo a > ${{outputs.o}}\", outputs: [o]}}\n  \
         wait: {{kind: command, inputs: {{i: first.o}}, cmd: \"while [ ! -e {} ]; do sleep 0.1; done; cp ${{inputs.i}} ${{outputs.o}}\", outputs: [o]}}\n",
        gate.display()
    )
}

/// Two runs: `view.yaml` as written (ok, named `base`), then with scale=2 and --keep-going (fit reruns,
/// flaky fails, after is skipped, data is reused). Returns the project and both run ids.
fn project() -> (Project, String, String) {
    let p = Project::new();
    p.write("view.yaml", PIPELINE);
    p.write("t.md.j2", TEMPLATE);
    p.run(&["run", "view.yaml", "--name", "base"]).assert_ok();
    let second = p.run(&["run", "view.yaml", "--set", "scale=2", "--keep-going"]);
    assert_eq!(second.code, 1, "the second run fails in `flaky`: {}", second.stderr);
    let runs = p.run(&["runs", "--json"]);
    let ids: Vec<String> =
        (runs.json().as_array().expect("runs")).iter().map(|r| r["id"].as_str().expect("id").to_string()).collect();
    assert_eq!(ids.len(), 2, "{}", runs.stdout);
    (p, ids[1].clone(), ids[0].clone())
}

/// A running `orchestrate ui`, killed when dropped.
struct Ui {
    child: Child,
    port: u16,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Ui {
    fn start(p: &Project) -> Ui {
        let mut child = (p.cmd().args(["ui", "--port", "0"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting orchestrate ui");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("reading the address");
        let port = (first.split("http://127.0.0.1:").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let out = child.wait_with_output().expect("ui output");
            panic!("no address in {first:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        };
        Ui { child, port, _stdout: stdout }
    }

    fn get(&self, path: &str) -> HttpReply {
        http(self.port, "GET", path, b"")
    }

    /// A page that must be there: 200, HTML, and its text (with the `/` that minijinja writes
    /// as `&#x2f;` in attributes put back, so links read as written).
    fn page(&self, path: &str) -> String {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/html")), "GET {path}: {}", r.head);
        r.text().replace("&#x2f;", "/")
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn short(id: &str) -> &str {
    &id[..12]
}

/// Every file under the store with its size and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("listing the store").flatten() {
            let m = e.metadata().expect("stat");
            if m.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().expect("mtime")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_page_over_http_and_nothing_written() {
    let (p, first, second) = project();
    let before = snapshot(&p.store());
    let ui = Ui::start(&p);
    let (a, b) = (short(&first), short(&second));

    let runs = ui.page("/");
    assert!(runs.contains(a) && runs.contains(b), "{runs}");
    assert!(runs.contains("st-failed") && runs.contains("st-ok"), "{runs}");
    assert!(ui.page("/?pipeline=view").contains(a) && !ui.page("/?pipeline=other").contains(a));
    // A metric column, as `runs --metric`: a sweep's best variant, named; the declared ones offered.
    assert!(runs.contains(r#"<option value="fit.loss">"#), "{runs}");
    let with = ui.page("/?metric=fit.loss");
    assert!(with.contains(r#"<th class="num" id="metric-head">fit.loss</th>"#), "{with}");
    assert_eq!(
        with.matches(r#"<td class="num metric">0.5 <span class="muted">(fit@lr=0.2)</span></td>"#).count(),
        2,
        "{with}"
    );
    let worst = ui.page("/?metric=fit.loss:max&pipeline=view");
    assert!(worst.contains(r#"<td class="num metric">0.7 <span class="muted">(fit@lr=0.1)</span></td>"#), "{worst}");

    let run = ui.page(&format!("/runs/{b}"));
    for (stage, status) in [("data", "cached"), ("flaky", "failed"), ("after", "skipped"), ("fit@lr=0.1", "ran")] {
        assert!(run.contains(&format!(r#"<g class="node st-{status}" data-stage="{stage}">"#)), "{stage}: {run}");
    }
    assert!(run.contains(r#"class="edge" data-from="flaky" data-to="after""#), "{run}");
    assert!(
        run.contains(&format!("/runs/{b}/sweeps/fit")) && run.contains(&format!("/runs/{b}/reports/report")),
        "{run}"
    );
    assert!(run.contains(&format!("/compare?a={a}&amp;b={b}")), "{run}");
    assert_eq!(ui.page("/runs/latest"), run, "`latest` is the newest run");
    // A run's name is shown and taken where an id is.
    assert!(runs.contains(r#"<span class="run-name">base</span>"#), "{runs}");
    assert_eq!(ui.page("/runs/base"), ui.page(&format!("/runs/{a}")));
    let by_name = ui.page(&format!("/compare?a=base&b={b}"));
    assert!(by_name.contains(r#"<span class="run-name">base</span> · view"#), "{by_name}");

    // A stage: params, inputs, outputs with a download link that gives the bytes, metrics, log.
    let stage = ui.page(&format!("/runs/{b}/stages/fit@lr%3D0.1"));
    for needle in ["computed in this run", "loss", "0.7", "trained 0.1", "peak memory", "echo fit-0.1 &gt;", "command"]
    {
        assert!(stage.contains(needle), "`{needle}` missing: {stage}");
    }
    // How to get it with the command line.
    let export = format!("<code>orchestrate export view.yaml fit@lr=0.1.OUTPUT DEST --run {b}</code>");
    assert!(stage.contains(&export), "{stage}");
    // A metric as the tables round it, the exact value on hover.
    assert!(stage.contains(r#"<td class="num" title="0.03333333333333333"><code>0.033333</code></td>"#), "{stage}");
    let href = stage.split("<a href=\"/objects/").nth(2).and_then(|s| s.split('"').next()).expect("an output link");
    let file = ui.get(&format!("/objects/{}", href.replace("&amp;", "&")));
    assert_eq!((file.status, file.text().as_str()), (200, "fit-0.1\n"), "{}", file.head);
    assert!(ui.page(&format!("/runs/{b}/stages/data")).contains("reused: computed"));
    let failed = ui.page(&format!("/runs/{b}/stages/flaky"));
    assert!(failed.contains("boom: scale is not 1") && failed.contains("exit"), "{failed}");

    // compare and sweeps, as the command line computes them.
    let cmp = ui.page(&format!("/compare?a={a}&b={b}"));
    assert!(cmp.contains("<td>fit@lr=0.1.cmd</td>"), "{cmp}");
    let loss_row = r#"<td>fit@lr=0.1.loss</td><td class="num">0.6</td><td class="num">0.7</td><td class="num">0.1</td><td class="num">+16.67%</td><td>worse</td>"#;
    assert!(cmp.contains(loss_row), "{cmp}");
    assert!(cmp.contains("<td>fit@lr=0.2</td><td>reran</td><td>cmd changed:"), "{cmp}");
    // A run beside itself: no metric differs, and the page says where the rest is.
    let same = ui.page(&format!("/compare?a={a}&b={a}"));
    assert!(
        same.contains(&format!(r#"no declared metric differs; <a href="/compare?a={a}&amp;b={a}&amp;all=1">"#)),
        "{same}"
    );
    let sweep = ui.page(&format!("/runs/{a}/sweeps/fit"));
    let order: Vec<usize> =
        ["fit@lr=0.2", "fit@lr=0.1", "fit@lr=0.3"].iter().map(|v| sweep.find(v).expect(v)).collect();
    assert!(order[0] < order[1] && order[1] < order[2], "best first: {sweep}");

    // Training curves: a stage with a metrics CSV (tokens and a loss), the two runs' in one chart.
    let png_at = |path: &str| {
        let r = ui.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("image/png"), "{path}");
        assert!(r.body.starts_with(b"\x89PNG"), "{path}: not a PNG");
    };
    assert!(ui
        .page(&format!("/runs/{b}/stages/train"))
        .contains(&format!(r#"id="curves" src="/runs/{b}/stages/train/curves.png""#)));
    png_at(&format!("/runs/{b}/stages/train/curves.png"));
    assert!(!ui.page(&format!("/runs/{b}/stages/data")).contains(r#"id="curves""#), "no CSV, no chart");
    assert!(
        cmp.contains(&format!(
            r#"<img class="curves" data-stage="train" src="/compare/curves.png?a={a}&amp;b={b}&amp;stage=train""#
        )),
        "{cmp}"
    );
    png_at(&format!("/compare/curves.png?a={a}&b={b}&stage=train"));
    assert!(!same.contains(r#"class="curves""#), "the same curves are not drawn twice: {same}");

    // The report with its plot, served from the stored folder.
    let report = ui.page(&format!("/runs/{b}/reports/report"));
    assert!(report.contains("<h1>View report</h1>") && report.contains("<strong>a</strong>"), "{report}");
    let png = ui.get(&format!("/runs/{b}/reports/report/files/speed.png"));
    assert_eq!(png.status, 200, "{}", png.head);
    assert_eq!(png.header("content-type").as_deref(), Some("image/png"));
    assert!(png.body.starts_with(b"\x89PNG"), "not a PNG");

    // A stored folder (the report's output) lists its files, each a link to its bytes.
    let report_stage = ui.page(&format!("/runs/{b}/stages/report"));
    let folder = (report_stage.split("<a href=\"/objects/").nth(2))
        .and_then(|s| s.split('"').next())
        .expect("the report folder's link");
    let listing = ui.page(&format!("/objects/{}", folder.replace("&amp;", "&")));
    assert!(listing.contains(">speed.png</a>") && listing.contains(">report.md</a>"), "{listing}");
    for (path, kind) in [("/static/ui.css", "text/css"), ("/static/ui.js", "text/javascript")] {
        assert_eq!(ui.get(path).header("content-type").as_deref(), Some(kind), "{path}");
    }

    // A live view of the last run, which has ended.
    let live: serde_json::Value = serde_json::from_slice(&ui.get("/live/state").body).expect("live JSON");
    assert_eq!((live["pipeline"].as_str(), live["status"].as_str()), (Some("view"), Some("failed")), "{live}");
    assert!(
        live["run"].as_str().is_some_and(|id| id.starts_with(&second)),
        "the live file names the recorded run: {live}"
    );
    assert!(ui.page("/live").contains(r#"data-stage="after""#));

    // Bad requests: 404/400/405 pages, and the server keeps serving.
    let errors: [(&str, &str, u16, &str); 18] = [
        ("GET", "/?metric=fit.loss:up", 400, "the direction is `min` or `max`"),
        ("GET", &format!("/runs/{b}/stages/data/curves.png"), 404, "has no training curves"),
        ("GET", &format!("/compare/curves.png?a=zz&b={b}&stage=train"), 400, "is not a run id"),
        ("GET", &format!("/compare/curves.png?a={a}&b={b}"), 400, "stage"),
        ("GET", "/runs/zz", 404, "is not a run id"),
        ("GET", "/runs/ffffffffffff", 404, "no run `ffffffffffff`"),
        ("GET", "/runs/latest~9", 404, "has only 2 runs"),
        ("GET", &format!("/runs/{b}/stages/nope"), 404, "has no stage `nope`"),
        ("GET", &format!("/runs/{b}/sweeps/data"), 404, "has no variants of `data`"),
        ("GET", &format!("/runs/{b}/reports/data"), 404, "no report.md"),
        ("GET", &format!("/runs/{b}/reports/report/files/../../LOCK"), 404, "has no file"),
        ("GET", &format!("/runs/{b}/reports/report/files/%2e%2e%2fLOCK"), 404, "has no file"),
        ("GET", "/objects/..%2fLOCK", 404, "is not an object digest"),
        ("GET", &format!("/objects/{}", "0".repeat(64)), 404, "is not in the store"),
        ("GET", "/compare?a=nope&b=latest", 400, "is not a run id"),
        ("GET", "/no/such/page", 404, "nothing at /no/such/page"),
        ("POST", "/", 405, ""),
        ("DELETE", &format!("/runs/{b}"), 405, ""),
    ];
    for (method, path, code, says) in errors {
        let r = http(ui.port, method, path, b"");
        assert_eq!(r.status, code, "{method} {path}: {}", r.text());
        assert!(r.text().contains(says), "{method} {path}: {}", r.text());
    }
    assert_eq!(ui.get("/").status, 200, "still serving after bad requests");
    assert_eq!(snapshot(&p.store()), before, "the view changed files in the store");
}

/// A name given with `orchestrate name` while the view is open shows in it and is taken where
/// an id is, as `run --name`'s are.
#[test]
fn a_name_given_later_shows_in_the_open_view() {
    let (p, first, second) = project();
    let ui = Ui::start(&p);
    assert!(!ui.page("/").contains(r#"<span class="run-name">fixed</span>"#));
    p.run(&["name", &second, "fixed"]).assert_ok();
    let runs = ui.page("/");
    assert!(runs.contains(r#"<span class="run-name">fixed</span>"#), "{runs}");
    assert_eq!(ui.page("/runs/fixed"), ui.page(&format!("/runs/{}", short(&second))));
    // `base` moved to the second run: the name means the run that took it last.
    p.run(&["name", &second, "base"]).assert_ok();
    assert_eq!(ui.page("/runs/base"), ui.page(&format!("/runs/{}", short(&second))));
    assert_ne!(ui.page("/runs/base"), ui.page(&format!("/runs/{}", short(&first))));
    // The first run keeps its name in the list, marked as moved on; so does compare.
    let moved = r#"<span class="run-name moved" title="`base` now means a run that took it later">base</span>"#;
    assert!(ui.page("/").contains(moved));
    let compared = ui.page(&format!("/compare?a={}&b=base", short(&first)));
    assert!(compared.contains(moved) && compared.contains(r#"<span class="run-name">base</span>"#), "{compared}");
}

/// A teammate's run pulled into the store: the list says who ran each run once more than one
/// person did, and so do the run and compare pages.
#[test]
fn a_teammates_pulled_run_shows_who_ran_it() {
    let pipeline = "name: team\nparams: {n: 3}\nstages:\n  a: {kind: command, cmd: \"seq ${params.n} > ${outputs.o}\", outputs: [o]}\n";
    let remote = Project::new();
    let remote = remote.path().join("remote").display().to_string();
    let (ana, ben) = (Project::new(), Project::new());
    for (p, user, n) in [(&ana, "ana", "3"), (&ben, "ben", "4")] {
        p.write("p.yaml", pipeline);
        let set = format!("params.n={n}");
        p.run_env(&["run", "p.yaml", "--set", &set, "--remote", &remote, "--push"], &[("USER", user.into())])
            .assert_ok();
    }
    ben.run(&["pull", "--remote", &remote]).assert_ok();
    let ui = Ui::start(&ben);
    let runs = ui.page("/");
    assert!(runs.contains("<th>by</th>") && runs.contains("<td class=\"by\">ana@"), "{runs}");
    assert!(runs.contains("<td class=\"by\">ben@"), "{runs}");
    let compare = ui.page("/compare?a=latest~1&b=latest");
    assert!(compare.contains(" · by ana@") && compare.contains(" · by ben@"), "{compare}");
    assert!(ui.page("/runs/latest~1").contains("<dt>by</dt><dd id=\"by\">ana@"));
    let text = ben.run(&["compare", "latest~1", "latest"]);
    assert!(text.stdout.contains(", ok, by ana@") && text.stdout.contains(", ok, by ben@"), "{}", text.stdout);
    let listed = ben.run(&["runs"]).stdout;
    let by_column = |l: &str| l.split_whitespace().nth(2).map(str::to_string);
    let column: Vec<_> = listed.lines().filter_map(by_column).collect();
    assert!(column[0] == "by" && column[1].starts_with("ben@") && column[2].starts_with("ana@"), "{listed}");
    // Alone, ana's own lists have no `by` column.
    let ui = Ui::start(&ana);
    assert!(!ui.page("/").contains("<th>by</th>"));
    assert!(!ana.run(&["runs"]).stdout.contains(" by "));
}

#[test]
fn no_store_is_a_clear_error() {
    let p = Project::new();
    let r = p.run(&["ui", "--store", "nowhere", "--port", "0"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no store at nowhere") && r.stderr.contains("run a pipeline first"), "{}", r.stderr);
    let r = p.run(&["ui", "--host", "not-an-ip"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`not-an-ip` is not an IP address"), "{}", r.stderr);
}

/// Read server-sent events until one satisfies `want`; panics with what came if none does.
fn until_event(stream: &mut BufReader<std::net::TcpStream>, want: impl Fn(&serde_json::Value) -> bool) {
    let mut seen = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match stream.read_line(&mut line) {
            Ok(0) | Err(_) => panic!("the event stream ended or timed out; events seen:\n{}", seen.join("\n")),
            Ok(_) => {}
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        let state: serde_json::Value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
        if want(&state) {
            return;
        }
        seen.push(data.to_string());
    }
}

fn status_of(state: &serde_json::Value, stage: &str) -> String {
    (state["stages"].as_array().into_iter().flatten())
        .find(|s| s["name"] == stage)
        .and_then(|s| s["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Starts the gated pipeline in the background; the run holds the store while it waits.
fn start_gated(p: &Project, gate: &Path) -> Child {
    p.write("gated.yaml", &gated(gate));
    p.cmd().args(["run", "gated.yaml"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("orchestrate run")
}

#[test]
fn a_run_goes_while_the_view_is_open_and_the_live_view_follows_it() {
    let (p, first, _) = project();
    let ui = Ui::start(&p);
    let gate = p.path().join("gate");
    let mut run = start_gated(&p, &gate);

    let mut events = std::net::TcpStream::connect(("127.0.0.1", ui.port)).expect("connecting");
    events.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    write!(events, "GET /live/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n").expect("request");
    let mut events = BufReader::new(events);
    until_event(&mut events, |s| s["pipeline"] == "gated" && status_of(s, "wait") == "running");

    // The store is held by the run; the history is still there.
    let runs = ui.page("/");
    assert!(runs.contains(short(&first)) && runs.contains("is in progress"), "{runs}");
    let live = ui.page("/live");
    assert!(live.contains(r#"<g class="node st-running" data-stage="wait">"#), "{live}");

    std::fs::write(&gate, "go").expect("opening the gate");
    until_event(&mut events, |s| s["status"] == "ok" && status_of(s, "wait") == "ran");
    let out = run.wait_with_output_status();
    assert!(out.0, "the run failed while the view was open: {}", out.1);
    let runs = ui.page("/");
    assert!(runs.contains("gated"), "the finished run is listed: {runs}");
    // A run limited by --target says so, and compare calls the stages it left out so.
    p.run(&["run", "view.yaml", "--target", "data"]).assert_ok();
    assert!(ui.page("/").contains("--target data"), "{}", ui.page("/"));
    let targeted = p.run(&["runs", "--json"]).json()[0]["id"].as_str().unwrap_or("?").to_string();
    let cmp = ui.page(&format!("/compare?a=base&b={targeted}"));
    assert!(cmp.contains("<code>--target data</code>"), "{cmp}");
    assert!(cmp.contains("<td>flaky</td><td>left out</td><td>run B ran with --target data</td>"), "{cmp}");

    // SIGTERM with a live page open: the event stream ends and the server exits cleanly.
    let mut ui = ui;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(ui.child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = ui.child.try_wait().expect("waiting for the ui") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the ui did not stop on SIGTERM with an event stream open");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    let _ = events.read_to_string(&mut rest);
}

trait WaitOutput {
    fn wait_with_output_status(&mut self) -> (bool, String);
}

impl WaitOutput for Child {
    fn wait_with_output_status(&mut self) -> (bool, String) {
        let status = self.wait().expect("waiting for the run");
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.success(), err)
    }
}

/// Chromium must be there: CI installs it (`.ci/chromium`); a machine without it fails here
/// with the command that installs it, never skips.
fn require_chromium() {
    for program in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(program).exists(),
            "{program} is missing: `bash .ci/chromium` installs Debian's chromium and chromium-driver (the README's test command runs it)"
        );
    }
}

#[test]
fn headless_chromium_renders_the_pages() {
    require_chromium();
    let (p, first, second) = project();
    let ui = Ui::start(&p);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let gate = p.path().join("gate");
    let (a, b) = (short(&first), short(&second));
    let mut checks = vec![
        "runs".to_string(),
        format!("run:{b}"),
        format!("stage:{b}:fit@lr=0.2"),
        format!("report:{b}:report"),
        format!("compare:{a}:{b}"),
        format!("curves:{a}:{b}:train"),
    ];
    let browse = |checks: &[String]| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/browser.py");
        let out = Command::new(venv_python())
            .arg(script)
            .arg(ui.base())
            .arg(&shots)
            .args(checks)
            .output()
            .expect("running tests/ui/browser.py");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "browser checks failed:\n{stdout}\n{stderr}");
        for c in checks {
            assert!(stdout.contains(&format!("{c} ok")), "{c}: {stdout}");
        }
    };
    browse(&checks);
    // The live page, opened while a run waits, follows it to its end by server-sent events.
    let mut run = start_gated(&p, &gate);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ui.get("/live/state").text().contains("\"gated\"") {
        assert!(std::time::Instant::now() < deadline, "the gated run never showed up live");
        std::thread::sleep(Duration::from_millis(100));
    }
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            std::fs::write(gate, "go")
        })
    };
    checks = vec!["live".to_string()];
    browse(&checks);
    opener.join().expect("gate thread").expect("opening the gate");
    assert!(run.wait_with_output_status().0);
    eprintln!("screenshots: {}", shots.display());
}
