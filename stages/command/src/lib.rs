//! The `command` stage: run any external program with declared inputs and outputs.
//!
//! `cmd` is either a list (an argv, no shell involved) or a string (run with `sh -c`).
//! `${inputs.NAME}` and `${outputs.NAME}` inside it are replaced with paths relative to the
//! stage's working folder (its current folder) where they are inside the stage's scratch area
//! (`../in/NAME`, `../out/NAME`), so a command's length does not depend on where the store
//! lives; every path is also in the environment, absolute, as `ORCH_IN_NAME` / `ORCH_OUT_NAME`.
//! `${inputs.@list}` is a file naming every input, one relative path a line, for commands over
//! more inputs than fit on a command line (`xargs cat < ${inputs.@list}`). A command may write
//! a JSON object of metrics to `$ORCH_METRICS`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use stage_api::{
    External, InputSpec, IoContext, ParamError, Params, RunSpec, Stage, StageContext, StageError, StageProfile,
};

pub struct CommandStage;

/// How the program is started.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// `cmd: "..."`: one string for `sh -c`.
    Shell(String),
    /// `cmd: [prog, arg, ...]`: an argv.
    Argv(Vec<String>),
}

impl Invocation {
    pub fn from_params(params: &Params) -> Result<Invocation, ParamError> {
        match params.field("cmd") {
            None => Err(ParamError::new("kind", "a `command` stage needs `cmd`")
                .with_help("add `cmd: \"...\"` (run with sh -c) or `cmd: [program, arg, ...]`")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(ParamError::new("cmd", "`cmd` is empty")),
            Some(Value::String(s)) => Ok(Invocation::Shell(s.clone())),
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(ParamError::new("cmd", "`cmd` is an empty list; it needs at least the program"));
                }
                let mut argv = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => argv.push(s.clone()),
                        Value::Number(n) => argv.push(n.to_string()),
                        Value::Bool(b) => argv.push(b.to_string()),
                        other => {
                            return Err(ParamError::new(
                                format!("cmd.{i}"),
                                format!("`cmd` list items must be strings, got {other}"),
                            ))
                        }
                    }
                }
                Ok(Invocation::Argv(argv))
            }
            Some(other) => {
                Err(ParamError::new("cmd", format!("`cmd` must be a string or a list of strings, got {other}")))
            }
        }
    }
}

/// Environment variable name for an input or output: `ORCH_IN_TEXT`, `ORCH_OUT_UPPER`.
pub fn env_name(prefix: &str, name: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + name.len() + 1);
    s.push_str(prefix);
    s.push('_');
    for c in name.chars() {
        s.push(if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' });
    }
    s
}

/// Quote a path for `sh -c` only when it needs it, so simple commands stay readable in logs.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:@,%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The name `${inputs.@list}` refers to: a file listing every input path, one a line.
pub const INPUT_LIST: &str = "@list";

/// Linux caps one argument at 32 pages (`MAX_ARG_STRLEN`); the `sh` guard adds a little to a
/// shell script, so scripts are held to a bit less.
const MAX_ARG: usize = 32 * 4096 - 4096;

/// `path` as seen from `work_dir`: relative when both are in the same scratch folder (the
/// stage's `in/`, `out/` and `work/` are siblings), else as it is.
fn from_work_dir(path: &Path, work_dir: &Path) -> PathBuf {
    match (work_dir.parent(), path.parent().and_then(Path::parent)) {
        (Some(scratch), Some(p)) if p == scratch => Path::new("..").join(path.strip_prefix(scratch).unwrap_or(path)),
        _ => path.to_path_buf(),
    }
}

/// Replace `${inputs.X}` / `${outputs.X}` with paths. `$${` stays a literal `${`.
/// Everything else was resolved (or rejected) by the orchestrator before the stage runs.
pub fn substitute_paths(
    template: &str,
    inputs: &BTreeMap<String, PathBuf>,
    outputs: &BTreeMap<String, PathBuf>,
    quote: bool,
) -> Result<String, StageError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        if !after.starts_with("${") {
            out.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(StageError::failed(format!("unterminated `${{` in `{template}`")));
        };
        let expr = after[2..end].trim();
        let path = if let Some(name) = expr.strip_prefix("inputs.") {
            inputs.get(name)
        } else if let Some(name) = expr.strip_prefix("outputs.") {
            outputs.get(name)
        } else {
            None
        };
        let Some(path) = path else {
            return Err(StageError::failed(format!("`${{{expr}}}` names no input or output of this stage")));
        };
        let text = path.to_string_lossy();
        out.push_str(&if quote { shell_quote(&text) } else { text.into_owned() });
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn describe_exit(status: std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(9) => "was killed by SIGKILL (out of memory, a timeout, or cancelled)".to_string(),
        Some(sig) => format!("was killed by signal {sig}"),
        None => "ended abnormally".to_string(),
    }
}

impl Stage for CommandStage {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn describe(&self) -> &'static str {
        "run an external program (argv list or `sh -c` string) with declared inputs and outputs"
    }
    fn fields(&self) -> &'static [&'static str] {
        &["cmd", "env"]
    }

    fn check(&self, params: &Params, _io: &InputSpec) -> Result<StageProfile, ParamError> {
        Invocation::from_params(params)?;
        if let Some(env) = params.field("env") {
            let Value::Object(map) = env else {
                return Err(ParamError::new("env", "`env` must be a map of NAME: value"));
            };
            for (k, v) in map {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(ParamError::new(
                        format!("env.{k}"),
                        format!("`{k}` is not a valid environment variable name"),
                    ));
                }
                if v.is_object() || v.is_array() || v.is_null() {
                    return Err(ParamError::new(format!("env.{k}"), format!("env `{k}` must be a string or number")));
                }
            }
        }
        Ok(StageProfile::default())
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let Some(ext) = self.external(ctx.spec())? else {
            return Err(StageError::failed("the command stage always has a program"));
        };
        let mut command = Command::new(&ext.program);
        command.args(&ext.args).current_dir(ctx.work_dir()).stdin(Stdio::null()).envs(ext.env.iter().cloned());
        let status =
            command.status().ctx(|| format!("could not start `{}` (is it installed and on PATH?)", ext.program))?;
        if !status.success() {
            return Err(StageError::failed(format!("command {}", describe_exit(status))));
        }
        if let Some(path) = &ext.metrics_file {
            for (k, v) in stage_api::read_metrics_file(path)? {
                ctx.metric(k, v);
            }
        }
        Ok(())
    }

    fn external(&self, spec: &RunSpec) -> Result<Option<External>, StageError> {
        let invocation = Invocation::from_params(&spec.params)?;
        let mut inputs: BTreeMap<String, PathBuf> =
            spec.inputs.iter().map(|(k, p)| (k.clone(), from_work_dir(p, &spec.work_dir))).collect();
        let outputs: BTreeMap<String, PathBuf> =
            spec.outputs.iter().map(|(k, p)| (k.clone(), from_work_dir(p, &spec.work_dir))).collect();
        let uses_list = match &invocation {
            Invocation::Shell(s) => s.contains("inputs.@list"),
            Invocation::Argv(a) => a.iter().any(|s| s.contains("inputs.@list")),
        };
        if uses_list {
            inputs.insert(INPUT_LIST.to_string(), write_input_list(spec, &inputs)?);
        }
        let (program, args) = match invocation {
            Invocation::Shell(script) => {
                ("sh".to_string(), vec!["-c".to_string(), substitute_paths(&script, &inputs, &outputs, true)?])
            }
            Invocation::Argv(argv) => {
                let mut resolved = Vec::with_capacity(argv.len());
                for a in &argv {
                    resolved.push(substitute_paths(a, &inputs, &outputs, false)?);
                }
                let program = resolved.remove(0);
                (program, resolved)
            }
        };
        check_size(spec, &args)?;
        let metrics_file = spec.work_dir.join(".orch-metrics.json");
        let mut env = vec![
            ("ORCH_STAGE".to_string(), spec.stage_name.clone()),
            ("ORCH_THREADS".to_string(), spec.threads.to_string()),
            ("ORCH_SEED".to_string(), spec.seed.to_string()),
            ("ORCH_METRICS".to_string(), metrics_file.display().to_string()),
            // Common thread knobs, so numeric programs respect the stage's CPU budget.
            ("OMP_NUM_THREADS".to_string(), spec.threads.to_string()),
            ("RAYON_NUM_THREADS".to_string(), spec.threads.to_string()),
        ];
        for (name, path) in &spec.inputs {
            env.push((env_name("ORCH_IN", name), path.display().to_string()));
        }
        for (name, path) in &spec.outputs {
            env.push((env_name("ORCH_OUT", name), path.display().to_string()));
        }
        if let Some(Value::Object(user)) = spec.params.field("env") {
            for (k, v) in user {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                env.push((k.clone(), text));
            }
        }
        Ok(Some(External { program, args, env, metrics_file: Some(metrics_file) }))
    }
}

/// Write `${inputs.@list}`: every input path (relative to the working folder where it can be),
/// one a line, in input-name order. Returns its path as the command sees it.
fn write_input_list(spec: &RunSpec, inputs: &BTreeMap<String, PathBuf>) -> Result<PathBuf, StageError> {
    let mut text = String::new();
    for path in inputs.values() {
        text.push_str(&path.to_string_lossy());
        text.push('\n');
    }
    let file = spec.work_dir.join(".orch-inputs.txt");
    std::fs::write(&file, text).ctx(|| format!("writing {}", file.display()))?;
    Ok(PathBuf::from(".orch-inputs.txt"))
}

/// Refuse, before spawning, a command line the kernel would refuse (E2BIG): name the stage, the
/// limit, and the way around it.
fn check_size(spec: &RunSpec, args: &[String]) -> Result<(), StageError> {
    let Some(longest) = args.iter().map(String::len).max() else { return Ok(()) };
    if longest > MAX_ARG {
        return Err(StageError::failed(format!(
            "stage `{}`: its command is {longest} bytes, over the {MAX_ARG}-byte limit Linux puts on one \
             argument; with {} inputs, read their paths from a file instead: `${{inputs.@list}}` names a file \
             listing every input, one a line (e.g. `xargs cat < ${{inputs.@list}}`)",
            spec.stage_name,
            spec.inputs.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cmd: Value) -> Params {
        let mut p = Params::default();
        p.fields.insert("cmd".into(), cmd);
        p
    }

    #[test]
    fn env_names_are_upper_snake() {
        assert_eq!(env_name("ORCH_IN", "text"), "ORCH_IN_TEXT");
        assert_eq!(env_name("ORCH_OUT", "model.bin-2"), "ORCH_OUT_MODEL_BIN_2");
    }

    #[test]
    fn substitution_quotes_only_for_shell() {
        let ins = BTreeMap::from([("t".to_string(), PathBuf::from("/a b/t.txt"))]);
        let outs = BTreeMap::from([("u".to_string(), PathBuf::from("/o/u"))]);
        assert_eq!(
            substitute_paths("cat ${inputs.t} > ${outputs.u}", &ins, &outs, true).unwrap(),
            "cat '/a b/t.txt' > /o/u"
        );
        assert_eq!(substitute_paths("${inputs.t}", &ins, &outs, false).unwrap(), "/a b/t.txt");
        assert_eq!(substitute_paths("echo $${HOME} $HOME", &ins, &outs, true).unwrap(), "echo ${HOME} $HOME");
        assert!(substitute_paths("${inputs.nope}", &ins, &outs, true).is_err());
    }

    #[test]
    fn check_rejects_bad_cmd() {
        let s = CommandStage;
        assert!(s.check(&Params::default(), &InputSpec::default()).is_err());
        assert_eq!(s.check(&params(Value::Array(vec![])), &InputSpec::default()).unwrap_err().key, "cmd");
        assert_eq!(
            s.check(&params(serde_json::json!(["echo", {"a": 1}])), &InputSpec::default()).unwrap_err().key,
            "cmd.1"
        );
        assert!(s.check(&params(serde_json::json!("echo hi")), &InputSpec::default()).is_ok());
    }

    #[test]
    fn runs_and_collects_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let spec = RunSpec::new(
            "t",
            "command",
            params(serde_json::json!("printf hello > ${outputs.o} && echo '{\"n\": 3}' > \"$ORCH_METRICS\"")),
            BTreeMap::new(),
            BTreeMap::from([("o".to_string(), out.clone())]),
            dir.path(),
        );
        let mut ctx = StageContext::uncancelled(spec);
        CommandStage.run(&mut ctx).unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "hello");
        assert_eq!(ctx.metrics()["n"], serde_json::json!(3));
    }

    #[test]
    fn failing_command_reports_status() {
        let dir = tempfile::tempdir().unwrap();
        let spec = RunSpec::new(
            "t",
            "command",
            params(serde_json::json!(["sh", "-c", "exit 3"])),
            BTreeMap::new(),
            BTreeMap::new(),
            dir.path(),
        );
        let mut ctx = StageContext::uncancelled(spec);
        let err = CommandStage.run(&mut ctx).unwrap_err().to_string();
        assert!(err.contains("status 3"), "{err}");
    }
}
