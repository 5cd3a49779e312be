//! Every kernel level this CPU supports (portable, AVX2, AVX-512 VNNI; see `itera_models::simd`)
//! computes what the portable code computes: both models' logits and every parameter's gradient
//! in f32, the INT8 and INT4 models' logits, and the batch-1 decoders' logits.
//!
//! The level is fixed per process (`ITERA_SIMD` is read once), so the test runs this binary again
//! once per level, as a child that runs only `probe_for_parent` and writes its results to a
//! file, and compares the children's results with the portable child's.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use itera_models::qmodel::QuantSpec;
use itera_models::quant::Scheme;
use itera_models::simd::Level;
use itera_models::{Model, ModelConfig};
use rand::SeedableRng;

/// Where a child writes its results; unset in the parent.
const OUT: &str = "ITERA_SIMD_PROBE_OUT";

type Results = BTreeMap<String, Vec<f32>>;

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn config(name: &str) -> candle_core::Result<ModelConfig> {
    ModelConfig::build(name, "tiny", 256, &Default::default()).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

fn probe() -> candle_core::Result<Results> {
    let mut out = Results::new();
    let ids: Vec<u32> = (0..2 * 40u32).map(|i| 5 + (i * 37) % 250).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 40), &Device::Cpu)?;
    out.insert("level".into(), vec![itera_models::simd::active() as u8 as f32]);
    for name in ["itera_lite", "transformer"] {
        let cfg = config(name)?;
        let model = Model::new(&cfg, 7)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let f = model.forward(&x, Some(&mut rng))?;
        out.insert(format!("{name} f32 logits"), flat(&f.logits)?);
        let loss = (itera_models::next_token_loss(&f.logits, &x)? + f.aux)?;
        let grads = loss.backward()?;
        let vars = model.varmap.data().lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?.clone();
        for (var_name, var) in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                out.insert(format!("{name} grad {var_name}"), flat(g)?);
            }
        }
        // The training step as `fit` takes it (both models: the hand-written steps).
        let (step_grads, ce, _) = model.loss_grads(&x, Some(&mut rng))?;
        out.insert(format!("{name} step ce"), vec![ce]);
        for (var_name, var) in &vars {
            if let Some(g) = step_grads.get(var.as_tensor()) {
                out.insert(format!("{name} step grad {var_name}"), flat(g)?);
            }
        }
        out.insert(format!("{name} f32 decoder"), model.decoder()?.feed(&ids[..24])?);
        for scheme in [Scheme::Int8, Scheme::Int4] {
            let mut q = Model::new(&cfg, 7)?;
            let spec = QuantSpec { scheme, group_size: 32, embeddings: true, exclude: vec![] };
            q.quantize(&spec).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            out.insert(format!("{name} {} logits", scheme.name()), flat(&q.forward(&x, None)?.logits)?);
            out.insert(format!("{name} {} decoder", scheme.name()), q.decoder()?.feed(&ids[..24])?);
        }
    }
    Ok(out)
}

/// The child's part, run by the test below with `--ignored`.
#[test]
#[ignore = "a child process of every_level_this_cpu_supports_matches_the_portable_code"]
fn probe_for_parent() {
    let path = std::env::var(OUT).expect("ITERA_SIMD_PROBE_OUT names the results file");
    let results = probe().unwrap();
    std::fs::write(path, serde_json::to_vec(&results).unwrap()).unwrap();
}

fn run_child(level: Level, dir: &std::path::Path) -> Results {
    let path = dir.join(format!("{}.json", level.name()));
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["probe_for_parent", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
        .env(itera_models::simd::ENV, level.name())
        .env(OUT, &path)
        .env("RAYON_NUM_THREADS", "2")
        .status()
        .unwrap();
    assert!(status.success(), "the {} child failed", level.name());
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn every_level_this_cpu_supports_matches_the_portable_code() {
    let levels = Level::supported();
    eprintln!("levels compared on this CPU: {levels:?}");
    let dir = tempfile::tempdir().unwrap();
    let portable = run_child(Level::Portable, dir.path());
    assert_eq!(portable["level"], [Level::Portable as u8 as f32], "the portable child ran another level");
    assert!(portable.keys().filter(|k| k.contains(" grad ")).count() > 20, "gradients missing");
    for &level in &levels[1..] {
        let got = run_child(level, dir.path());
        assert_eq!(got["level"], [level as u8 as f32], "the {} child ran another level", level.name());
        assert_eq!(got.keys().collect::<Vec<_>>(), portable.keys().collect::<Vec<_>>());
        let mut closest = (0f32, "");
        for (name, want) in portable.iter().filter(|(k, _)| *k != "level") {
            let have = &got[name];
            // The levels differ in summation order and FMA contraction only; a wrong kernel
            // is off by the values' own size. INT8/INT4: an activation that lands on the other
            // side of a rounding step moves a value by one quantization step (≈ 1 % of its row).
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let tol = if name.contains("int") { 2e-2 } else { 1e-5 };
            let worst = want.iter().zip(have).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                worst <= tol * scale,
                "{}: {name} differs from the portable code by {worst} (largest value {scale})",
                level.name()
            );
            if worst / scale >= closest.0 {
                closest = (worst / scale, name);
            }
        }
        eprintln!(
            "{}: {} results, largest difference {:.1e} of the values' size ({})",
            level.name(),
            portable.len() - 1,
            closest.0,
            closest.1
        );
    }
}
