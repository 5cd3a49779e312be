//! Harness for end-to-end tests: a temp project folder with pipelines and a store, and the
//! `orchestrate` binary that cargo built for this workspace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `orchestrate` binary next to this test executable (`target/<profile>/orchestrate`).
/// `cargo build --workspace` (the README's test command does it first) puts it there.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/orchestrate
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("orchestrate");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace` (the README's test command does)",
        bin.display()
    );
    bin
}

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: o.status.code().unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
    /// Stage name → status from a `run --json` summary.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.json()["stages"]
            .as_array()
            .expect("stages array")
            .iter()
            .map(|s| (s["stage"].as_str().unwrap_or("").to_string(), s["status"].as_str().unwrap_or("").to_string()))
            .collect()
    }
    pub fn status_of(&self, stage: &str) -> String {
        self.statuses()
            .into_iter()
            .find(|(n, _)| n == stage)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no stage {stage} in {}", self.stdout))
    }
    pub fn assert_ok(&self) -> &Run {
        assert_eq!(self.code, 0, "expected success\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    pub fn new() -> Project {
        Project { dir: tempfile::tempdir().expect("temp dir") }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn store(&self) -> PathBuf {
        self.path().join("artifacts")
    }
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(binary());
        c.current_dir(self.path()).env_remove("ORCHESTRATE_STORE").env_remove("RUST_LOG");
        c
    }
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd().args(args).output().expect("running orchestrate"))
    }
    /// `run` with these environment variables set and every other `AWS_*` variable removed.
    pub fn run_env<S: AsRef<str>>(&self, args: &[S], env: &[(&str, String)]) -> Run {
        let mut c = self.cmd();
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Run::from(c.args(args.iter().map(AsRef::as_ref)).output().expect("running orchestrate"))
    }
    /// Every object file in the store.
    pub fn objects(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.store().join("objects");
        if let Ok(shards) = std::fs::read_dir(root) {
            for s in shards.flatten() {
                if let Ok(files) = std::fs::read_dir(s.path()) {
                    out.extend(files.flatten().map(|f| f.path()));
                }
            }
        }
        out.sort();
        out
    }
    /// Whether anything at all was written to the store.
    pub fn store_is_empty(&self) -> bool {
        self.objects().is_empty() && !self.store().join("index.sled").exists()
    }
}

/// The project venv's Python (.ci/venv creates it; the README's test command runs that first).
pub fn venv_python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(py.exists(), "{} is missing: run .ci/venv first (the README's test command does)", py.display());
    py
}

/// Verbs run on one pipeline file with one store and the same `--set` flags, as the pipeline
/// tests do: `cli.run("run", &["--json"])` is `orchestrate run FILE --store STORE SETS… --json`.
pub struct PipelineCli<'a> {
    project: &'a Project,
    file: String,
    store: String,
    sets: Vec<String>,
}

impl PipelineCli<'_> {
    pub fn args(&self, verb: &str, extra: &[&str]) -> Vec<String> {
        let mut v = vec![verb.to_string(), self.file.clone(), "--store".into(), self.store.clone()];
        v.extend(self.sets.iter().cloned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
    pub fn run(&self, verb: &str, extra: &[&str]) -> Run {
        let args = self.args(verb, extra);
        self.project.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl PipelineCli<'_> {
    /// The `--set KEY=VALUE` flags every verb gets.
    pub fn set_flags(&self) -> &[String] {
        &self.sets
    }
}

/// The tiny budget the shipped pipelines run with in tests, for a pipeline whose two trained
/// models are `itera` and `transformer` (`train.yaml`, `onnx.yaml`, `phase3.yaml`).
pub const TINY_TWO_MODELS: &[&str] = &[
    "steps=12",
    "batch=4",
    "seq_len=32",
    "corpus.documents=300",
    "itera.eval_interval=6",
    "transformer.eval_interval=6",
    "itera.eval_tokens=512",
    "transformer.eval_tokens=512",
];

/// Tiny budgets for pipelines/phase4.yaml: the `--set` overrides every verb gets in tests.
pub const PHASE4_SMALL: &[&str] = &[
    "steps=12",
    "batch=4",
    "seq_len=32",
    "corpus.documents=300",
    "teacher.eval_interval=6",
    "transformer.eval_interval=6",
    "student.eval_interval=6",
    "teacher.eval_tokens=512",
    "transformer.eval_tokens=512",
    "student.eval_tokens=512",
    "int8.eval_tokens=1024",
    "int4.eval_tokens=1024",
    "int8.bench_runs=1",
    "int4.bench_runs=1",
    "check_teacher.eval_tokens=512",
    "check_transformer.eval_tokens=512",
    "check_int8.eval_tokens=512",
    "check_teacher.generate=8",
    "check_transformer.generate=8",
    "check_int8.generate=8",
    "benchmark.runs=1",
    "benchmark.eval_tokens=256",
    "benchmark.generate=8",
];

/// A pipeline file shipped in the repository's `pipelines/`, by name: `shipped_pipeline("phase4")`.
pub fn shipped_pipeline(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../pipelines/{name}.yaml")).display().to_string()
}

impl Project {
    /// A copy of a shipped pipeline with the templates beside it, as the repository lays them
    /// out (`pipelines/NAME.yaml`, `templates/`), so its `publish:` destinations land in this
    /// project and not in the repository.
    pub fn shipped_copy(&self, name: &str) -> String {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(repo.join(format!("pipelines/{name}.yaml"))).expect("shipped pipeline");
        let file = self.write(&format!("pipelines/{name}.yaml"), &text);
        for t in std::fs::read_dir(repo.join("templates")).expect("templates/").flatten() {
            let body = std::fs::read_to_string(t.path()).expect("template");
            self.write(&format!("templates/{}", t.file_name().to_string_lossy()), &body);
        }
        file.display().to_string()
    }

    /// A [`PipelineCli`] for `file` on this project's store; `sets` are `KEY=VALUE` overrides.
    pub fn pipeline(&self, file: &str, sets: &[&str]) -> PipelineCli<'_> {
        PipelineCli {
            project: self,
            file: file.to_string(),
            store: self.store().display().to_string(),
            sets: sets.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect(),
        }
    }
}

/// An S3-compatible server (moto, from the project venv) on a free loopback port, stopped by
/// pid when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
}

/// Credentials the test server accepts (moto checks none); the secret is distinctive so tests
/// can show it is never printed or stored.
pub const TEST_SECRET: &str = "test-secret-5f1b2c9e-never-printed";

impl S3Server {
    pub fn start() -> S3Server {
        let bin = venv_python().with_file_name("moto_server");
        assert!(bin.exists(), "{} is missing: .ci/venv installs moto[server] (.ci/requirements.txt)", bin.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let server = S3Server { child, port };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 60, "moto_server did not listen on port {port} within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS variables that point orchestrate at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test-key".into()),
            ("AWS_SECRET_ACCESS_KEY", TEST_SECRET.into()),
        ]
    }

    /// One plain HTTP/1.1 request (moto does not check signatures): (status, body).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let r = http(self.port, method, path, body);
        (r.status, r.body)
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "creating bucket {bucket}: {}", String::from_utf8_lossy(&body));
    }

    /// Keys under `prefix` in `bucket` (one listing page is plenty for tests).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (_, body) = self.request("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), b"");
        let text = String::from_utf8_lossy(&body);
        text.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir`, recursively, whose bytes contain `needle`.
/// An HTTP response as it came: status, head (status line and headers) and body.
pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`, sent as written (the path is not
/// normalised, so tests can send `..` and odd bytes) and read to the end.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the server");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).expect("sending the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the reply");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    HttpReply { status, head, body: raw[split..].to_vec() }
}

pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            out.push(p);
        }
    }
    out
}

/// A one-node Slurm cluster on localhost (`.ci/slurm start`), stopped by pid when dropped
/// (`.ci/slurm stop`: every job cancelled first). One at a time per test binary: Slurm's
/// daemons use fixed ports, so the cluster holds a process-wide lock while it lives.
pub struct SlurmCluster {
    dir: tempfile::TempDir,
    /// Where the wrappers of the Slurm commands log each call (`slurm-calls.log`).
    pub calls: PathBuf,
    wrappers: PathBuf,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static SLURM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ci_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci").join(name)
}

impl SlurmCluster {
    /// Start the cluster; fails loudly (never skips) when Slurm is not installed.
    pub fn start() -> SlurmCluster {
        let guard = SLURM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for program in ["slurmctld", "slurmd", "sbatch", "munged"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {program}")]).output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "`{program}` is not installed: `bash .ci/slurm install` (run by .ci/setup) installs Debian's Slurm and munge"
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("bash")
            .arg(ci_script("slurm"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("running .ci/slurm");
        assert!(
            out.status.success(),
            ".ci/slurm start failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Wrappers that log every Slurm command call with its time, then run the real one.
        let wrappers = dir.path().join("bin");
        std::fs::create_dir_all(&wrappers).expect("mkdir");
        let calls = dir.path().join("slurm-calls.log");
        for program in ["sbatch", "squeue", "sacct", "scancel", "sinfo"] {
            let real = Command::new("sh").args(["-c", &format!("command -v {program}")]).output().expect("sh");
            let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
            let script = format!(
                "#!/bin/sh\necho \"{program} $(date +%s.%N)\" >> '{}'\nexec '{real}' \"$@\"\n",
                calls.display()
            );
            let p = wrappers.join(program);
            std::fs::write(&p, script).expect("write wrapper");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        SlurmCluster { dir, calls, wrappers, _one_at_a_time: guard }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// SLURM_CONF for this cluster, and PATH with the logging wrappers first.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let path = std::env::var("PATH").unwrap_or_default();
        vec![("SLURM_CONF", self.conf().display().to_string()), ("PATH", format!("{}:{path}", self.wrappers.display()))]
    }

    /// The calls of the Slurm command `program` logged so far: their times in seconds.
    pub fn calls_of(&self, program: &str) -> Vec<f64> {
        let text = std::fs::read_to_string(&self.calls).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(p, _)| *p == program)
            .filter_map(|(_, t)| t.trim().parse().ok())
            .collect()
    }

    /// Forget the calls logged so far.
    pub fn reset_calls(&self) {
        let _ = std::fs::remove_file(&self.calls);
    }

    /// Jobs the cluster has that are not finished: `(id, name, state)`.
    pub fn active_jobs(&self) -> Vec<(String, String, String)> {
        let out = Command::new("squeue")
            .env("SLURM_CONF", self.conf())
            .args(["--noheader", "--format=%i|%j|%T"])
            .output()
            .expect("squeue");
        assert!(out.status.success(), "squeue failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.splitn(3, '|').collect();
                (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
            })
            .collect()
    }

    /// Stop the daemons now (as if slurmctld went down); dropping does it too.
    pub fn stop(&self) {
        let _ = Command::new("bash").arg(ci_script("slurm")).arg("stop").arg(self.dir.path()).output();
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
