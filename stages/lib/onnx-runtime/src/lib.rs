//! Running an exported ONNX graph in tract or ONNX Runtime with the same named inputs, and
//! finding the ONNX Runtime shared library (`ORT_DYLIB_PATH` or the project venv's wheel).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use tract_onnx::prelude::*;

/// A named input: int64 ids or f32 states, row-major with a shape.
#[derive(Clone, Debug)]
pub enum Input {
    I64(Vec<usize>, Vec<i64>),
    F32(Vec<usize>, Vec<f32>),
}

/// A named f32 output with its shape.
#[derive(Clone, Debug)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("tract: {0}")]
    Tract(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error(
        "the ONNX Runtime library was not found ({0}). Run `bash .ci/venv` in the project (it \
            installs onnxruntime==1.31.1 into .venv), or set ORT_DYLIB_PATH to a libonnxruntime.so \
            of version ≥ 1.31"
    )]
    OrtMissing(String),
}

fn tract_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tract(format!("{e:#}"))
}

fn ort_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Ort(e.to_string())
}

pub enum Engine {
    Tract { model: std::sync::Arc<TypedRunnableModel>, inputs: Vec<String>, outputs: Vec<String> },
    Ort(Box<Session>),
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Tract { .. } => "tract",
            Engine::Ort(_) => "onnxruntime",
        }
    }

    pub fn tract(path: &Path) -> Result<Engine, RuntimeError> {
        let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(tract_err)?;
        let graph = proto.graph.as_ref().ok_or_else(|| RuntimeError::Tract("the file has no graph".into()))?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs =
            graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).map(|i| i.name.clone()).collect();
        let outputs = graph.output.iter().map(|o| o.name.clone()).collect();
        let model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(tract_err)?
            .into_optimized()
            .map_err(tract_err)?
            .into_runnable()
            .map_err(tract_err)?;
        Ok(Engine::Tract { model, inputs, outputs })
    }

    pub fn ort(path: &Path, threads: usize) -> Result<Engine, RuntimeError> {
        let env = ort_environment()?;
        let session = Session::builder(env)
            .map_err(ort_err)?
            .with_intra_threads(threads.max(1))
            .map_err(ort_err)?
            .with_inter_threads(1)
            .map_err(ort_err)?
            .commit_from_file(path)
            .map_err(ort_err)?;
        Ok(Engine::Ort(Box::new(session)))
    }

    /// Run with named inputs; returns every graph output in declaration order.
    pub fn run(&mut self, inputs: &[(&str, Input)]) -> Result<Vec<Output>, RuntimeError> {
        match self {
            Engine::Tract { model, inputs: names, outputs } => {
                let mut values = TVec::new();
                for name in names.iter() {
                    let (_, input) = inputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .ok_or_else(|| RuntimeError::Tract(format!("no value for input `{name}`")))?;
                    let t: Tensor = match input {
                        Input::I64(shape, data) => {
                            tract_ndarray::ArrayD::from_shape_vec(shape.as_slice(), data.clone())
                                .map_err(tract_err)?
                                .into()
                        }
                        Input::F32(shape, data) => {
                            tract_ndarray::ArrayD::from_shape_vec(shape.as_slice(), data.clone())
                                .map_err(tract_err)?
                                .into()
                        }
                    };
                    values.push(t.into_tvalue());
                }
                let result = model.run(values).map_err(tract_err)?;
                result
                    .iter()
                    .zip(outputs.iter())
                    .map(|(v, name)| {
                        let a = v.to_plain_array_view::<f32>().map_err(tract_err)?;
                        Ok(Output { name: name.clone(), shape: a.shape().to_vec(), data: a.iter().copied().collect() })
                    })
                    .collect()
            }
            Engine::Ort(session) => {
                let mut values: Vec<(String, ort::value::DynValue)> = Vec::new();
                for (name, input) in inputs {
                    let v = match input {
                        Input::I64(shape, data) => {
                            ort::value::Tensor::from_array((shape.clone(), data.clone())).map_err(ort_err)?.into_dyn()
                        }
                        Input::F32(shape, data) => {
                            ort::value::Tensor::from_array((shape.clone(), data.clone())).map_err(ort_err)?.into_dyn()
                        }
                    };
                    values.push((name.to_string(), v));
                }
                let out = session.run(values).map_err(ort_err)?;
                let mut result = Vec::new();
                for (name, v) in out.iter() {
                    let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
                    result.push(Output {
                        name: name.to_string(),
                        shape: shape.iter().map(|&d| d as usize).collect(),
                        data: data.to_vec(),
                    });
                }
                Ok(result)
            }
        }
    }
}

/// Where the ONNX Runtime shared library is: `ORT_DYLIB_PATH`, else the project venv's
/// `onnxruntime` wheel, looked for above the running binary and the current folder.
pub fn find_onnxruntime() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(RuntimeError::OrtMissing(format!("ORT_DYLIB_PATH={} does not exist", p.display())))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    for root in roots {
        let lib = root.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python")))
            .collect();
        pythons.sort();
        for py in pythons {
            let capi = py.join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else { continue };
            let mut libs: Vec<PathBuf> = files
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
                .collect();
            libs.sort();
            if let Some(l) = libs.pop() {
                return Ok(l);
            }
        }
    }
    Err(RuntimeError::OrtMissing(
        "no ORT_DYLIB_PATH and no .venv with the onnxruntime wheel above the binary or the current folder".into(),
    ))
}

static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn ort_environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    let env = ORT_ENV.get_or_init(|| {
        // Keep only the cause: the error below states it once, with what to do.
        let path = find_onnxruntime().map_err(|e| match e {
            RuntimeError::OrtMissing(why) => why,
            other => other.to_string(),
        })?;
        let builder = ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        builder.with_name("orchestrate").build().map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|e| {
        if e.contains("ORT_DYLIB_PATH") {
            RuntimeError::OrtMissing(e.clone())
        } else {
            RuntimeError::Ort(e.clone())
        }
    })
}

/// The ONNX Runtime library in use, for the record.
pub fn onnxruntime_path() -> Option<PathBuf> {
    find_onnxruntime().ok()
}

/// The recurrent-state layout of a step graph: per layer `conv_state.<i>` and `ssm_state.<i>`.
#[derive(Clone, Debug)]
pub struct StepLayout {
    pub layers: usize,
    /// Shape of one conv state without the batch dimension: [d_conv − 1, d_inner].
    pub conv: Vec<usize>,
    /// Shape of one SSM state without the batch dimension: [d_state].
    pub ssm: Vec<usize>,
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

fn logits(outputs: &[Output]) -> Result<&Output, RuntimeError> {
    outputs
        .iter()
        .find(|o| o.name == "logits")
        .ok_or_else(|| RuntimeError::Tract("the graph has no output named `logits`".into()))
}

/// Greedy decoding at batch 1 after `prompt`: through a step graph with its recurrent state
/// when `step` is given, otherwise by re-running the full graph on the growing prefix. Returns
/// the new tokens and each new token's latency in seconds.
pub fn greedy(
    engine: &mut Engine,
    step: Option<&StepLayout>,
    vocab: usize,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f64>), RuntimeError> {
    let mut out = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let Some(layout) = step else {
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let t = std::time::Instant::now();
            let o = engine
                .run(&[("input_ids", Input::I64(vec![1, seq.len()], seq.iter().map(|&v| v as i64).collect()))])?;
            latencies.push(t.elapsed().as_secs_f64());
            let l = logits(&o)?;
            let next = argmax(&l.data[(seq.len() - 1) * vocab..seq.len() * vocab]) as u32;
            out.push(next);
            seq.push(next);
        }
        return Ok((out, latencies));
    };
    let conv_len: usize = layout.conv.iter().product();
    let ssm_len: usize = layout.ssm.iter().product();
    let mut states: Vec<(Vec<f32>, Vec<f32>)> =
        (0..layout.layers).map(|_| (vec![0.0; conv_len], vec![0.0; ssm_len])).collect();
    let Some(&first) = prompt.first() else { return Ok((out, latencies)) };
    let mut token = first;
    for t in 0..prompt.len() - 1 + n {
        let mut inputs: Vec<(String, Input)> = vec![
            ("input_ids".into(), Input::I64(vec![1, 1], vec![token as i64])),
            ("position".into(), Input::I64(vec![1], vec![t as i64])),
        ];
        for (i, (c, h)) in states.iter().enumerate() {
            let mut cs = vec![1];
            cs.extend(&layout.conv);
            let mut hs = vec![1];
            hs.extend(&layout.ssm);
            inputs.push((format!("conv_state.{i}"), Input::F32(cs, c.clone())));
            inputs.push((format!("ssm_state.{i}"), Input::F32(hs, h.clone())));
        }
        let named: Vec<(&str, Input)> = inputs.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        let clock = std::time::Instant::now();
        let o = engine.run(&named)?;
        let elapsed = clock.elapsed().as_secs_f64();
        for (i, st) in states.iter_mut().enumerate() {
            let find = |name: String| {
                o.iter()
                    .find(|x| x.name == name)
                    .map(|x| x.data.clone())
                    .ok_or_else(|| RuntimeError::Tract(format!("the step graph has no output `{name}`")))
            };
            st.0 = find(format!("conv_state_out.{i}"))?;
            st.1 = find(format!("ssm_state_out.{i}"))?;
        }
        if t + 1 < prompt.len() {
            token = prompt[t + 1];
        } else {
            token = argmax(&logits(&o)?.data) as u32;
            out.push(token);
            latencies.push(elapsed);
        }
    }
    Ok((out, latencies))
}

/// Multiply-accumulates per token of every `MatMul` whose right operand is a constant weight
/// (an initializer, possibly through the `Cast`/`Mul`/`Reshape` dequantization chain): Σ in·out.
/// Products of two activations (attention scores) are not counted.
pub fn weight_matmul_macs(path: &Path) -> Result<u64, RuntimeError> {
    use std::collections::HashMap;
    let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(tract_err)?;
    let graph = proto.graph.as_ref().ok_or_else(|| RuntimeError::Tract("the file has no graph".into()))?;
    let mut shapes: HashMap<&str, Vec<i64>> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t.dims.clone())).collect();
    let ints: HashMap<&str, Vec<i64>> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == tract_onnx::pb::tensor_proto::DataType::Int64 as i32)
        .map(|t| {
            (
                t.name.as_str(),
                if t.int64_data.is_empty() {
                    t.raw_data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                        .collect()
                } else {
                    t.int64_data.clone()
                },
            )
        })
        .collect();
    let mut macs = 0u64;
    for node in &graph.node {
        let out = node.output.first().map(String::as_str).unwrap_or("");
        match node.op_type.as_str() {
            "Cast" => {
                if let Some(s) = node.input.first().and_then(|i| shapes.get(i.as_str())).cloned() {
                    shapes.insert(out, s);
                }
            }
            "Mul" => {
                if let (Some(a), Some(_)) = (
                    node.input.first().and_then(|i| shapes.get(i.as_str())).cloned(),
                    node.input.get(1).and_then(|i| shapes.get(i.as_str())),
                ) {
                    shapes.insert(out, a);
                }
            }
            "Reshape" if node.input.first().is_some_and(|i| shapes.contains_key(i.as_str())) => {
                if let Some(s) = node.input.get(1).and_then(|i| ints.get(i.as_str())) {
                    shapes.insert(out, s.clone());
                }
            }
            "MatMul" => {
                if let Some(w) = node.input.get(1).and_then(|i| shapes.get(i.as_str())) {
                    if w.len() == 2 {
                        macs += (w[0] * w[1]) as u64;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(macs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_onnxruntime_library_says_what_to_run() {
        // The only test in this crate that touches the environment, so no other test races it.
        std::env::set_var("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so");
        let e = find_onnxruntime().unwrap_err().to_string();
        std::env::remove_var("ORT_DYLIB_PATH");
        assert!(
            e.contains("bash .ci/venv") && e.contains("ORT_DYLIB_PATH") && e.contains("/nonexistent/libonnxruntime.so"),
            "{e}"
        );
        // Without the variable, the project venv (made by the README's commands) is found.
        let found = find_onnxruntime().unwrap();
        assert!(found.to_string_lossy().contains("libonnxruntime.so"), "{}", found.display());
    }
}

/// The runtimes a stage can be asked for.
pub const RUNTIMES: [&str; 2] = ["tract", "onnxruntime"];

/// A stage's `runtimes` param: absent → both; otherwise a list of names from [`RUNTIMES`]
/// (possibly empty). The error says what is wrong, for `params.runtimes`.
pub fn parse_runtimes(v: Option<&serde_json::Value>) -> Result<Vec<String>, String> {
    let Some(v) = v else { return Ok(RUNTIMES.iter().map(|r| r.to_string()).collect()) };
    let list = v.as_array().ok_or_else(|| format!("`runtimes` must be a list ({}), got {v}", RUNTIMES.join(", ")))?;
    list.iter()
        .map(|r| match r.as_str() {
            Some(s) if RUNTIMES.contains(&s) => Ok(s.to_string()),
            _ => Err(format!("unknown runtime {r}; runtimes: {}", RUNTIMES.join(", "))),
        })
        .collect()
}

/// Summed next-token cross-entropy (nats, f64) over (batch, seq) ids and their logits
/// (batch · seq · vocab, row-major), and the number of scored positions (batch · (seq − 1)).
pub fn next_token_nll(logits: &[f32], ids: &[u32], batch: usize, seq: usize, vocab: usize) -> (f64, usize) {
    let mut total = 0.0;
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let row = &logits[(b * seq + t) * vocab..(b * seq + t + 1) * vocab];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
            total += lse - row[ids[b * seq + t + 1] as usize] as f64;
        }
    }
    (total, batch * seq.saturating_sub(1))
}

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn runtimes_param_and_next_token_nll() {
        assert_eq!(parse_runtimes(None).unwrap(), ["tract", "onnxruntime"]);
        assert_eq!(parse_runtimes(Some(&serde_json::json!(["onnxruntime"]))).unwrap(), ["onnxruntime"]);
        assert!(parse_runtimes(Some(&serde_json::json!(["trt"]))).unwrap_err().contains("unknown runtime"));
        assert!(parse_runtimes(Some(&serde_json::json!("tract"))).unwrap_err().contains("must be a list"));
        // Uniform logits over 4 tokens: ln 4 per scored position; 2 sequences × 2 positions.
        let (nll, n) = next_token_nll(&[0.0; 2 * 3 * 4], &[0, 1, 2, 3, 2, 1], 2, 3, 4);
        assert_eq!(n, 4);
        assert!((nll - 4.0 * 4f64.ln()).abs() < 1e-12);
    }
}
