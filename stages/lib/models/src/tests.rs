//! Model-level tests: loss pairing, step vs full equivalence, MoE paths, determinism,
//! checkpoints.

use candle_core::{Device, Tensor, D};
use candle_nn::Optimizer;
use rand::SeedableRng;

use crate::config::ModelConfig;
use crate::model::{next_token_loss, Model, Sampling};

fn small(model: &str) -> ModelConfig {
    let o = serde_json::json!({"max_seq_len": 32});
    ModelConfig::build(model, if model == "itera_lite" { "micro" } else { "tiny" }, 40, o.as_object().unwrap()).unwrap()
}

fn ids(b: usize, l: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * l).map(|i| (i as u32 * 7 + seed * 13) % 40).collect();
    Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn loss_pairs_each_position_with_the_next_token() {
    // Vocabulary 4, tokens [a, b, c, d] = [0, 1, 2, 3]; logits at position t put all mass on
    // token (t+1) except where noted, so the loss terms are exactly a→b, b→c, c→d.
    let big = 20.0f32;
    let mut logits = vec![0f32; 4 * 4];
    for t in 0..3 {
        logits[t * 4 + (t + 1)] = big;
    }
    logits[3 * 4] = big; // the last position predicts nothing; making it "wrong" must not matter
    let logits = Tensor::from_vec(logits, (1, 4, 4), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).unwrap();
    let loss = next_token_loss(&logits, &ids).unwrap().to_scalar::<f32>().unwrap();
    assert!(loss < 1e-6, "a→b, b→c, c→d are all predicted: {loss}");
    // Shifting twice (the original study's bug) would pair a→c: that must score badly here.
    let twice = Tensor::new(&[[0u32, 2, 3, 3]], &Device::Cpu).unwrap();
    assert!(next_token_loss(&logits, &twice).unwrap().to_scalar::<f32>().unwrap() > 5.0);
}

#[test]
fn step_by_step_decoding_equals_the_full_forward() {
    for m in ["itera_lite", "transformer"] {
        let model = Model::new(&small(m), 3).unwrap();
        let x = ids(2, 20, 1);
        let full = model.forward(&x, None).unwrap().logits;
        let mut state = model.start(2).unwrap();
        let mut steps = Vec::new();
        for t in 0..20 {
            steps.push(model.step(&x.narrow(1, t, 1).unwrap(), t, &mut state).unwrap());
        }
        let stepped = Tensor::cat(&steps, 1).unwrap();
        let d = max_abs(&full, &stepped);
        assert!(d <= 1e-5, "{m}: max |full − step| = {d}");
    }
}

#[test]
fn training_and_inference_forwards_agree() {
    // Dense (training) and sparse (inference) MoE, op-by-op and fused LayerNorm: same numbers.
    let model = Model::new(&small("itera_lite"), 4).unwrap();
    let x = ids(3, 16, 2);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let train = model.forward(&x, Some(&mut rng)).unwrap().logits;
    let infer = model.forward(&x, None).unwrap().logits;
    assert!(max_abs(&train, &infer) < 1e-5);
}

#[test]
fn moe_reports_load_and_a_balance_loss() {
    let model = Model::new(&small("itera_lite"), 5).unwrap();
    let f = model.forward(&ids(2, 16, 3), None).unwrap();
    assert_eq!(f.load.len(), 1, "micro has one MoE layer");
    let routed: f32 = f.load[0].iter().sum();
    assert_eq!(routed, 2.0 * 16.0 * 2.0, "every token goes to top_k = 2 experts");
    let aux = f.aux.to_scalar::<f32>().unwrap();
    assert!(aux >= 0.0 && aux.is_finite());
}

#[test]
fn same_seed_same_weights_and_loss_bits() {
    let c = small("itera_lite");
    let run = || {
        let model = Model::new(&c, 11).unwrap();
        let mut opt = candle_nn::AdamW::new(model.varmap.all_vars(), Default::default()).unwrap();
        let mut losses = Vec::new();
        for s in 0..3 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
            let (ce, aux) = model.loss(&ids(2, 16, s as u32), Some(&mut rng)).unwrap();
            let total = (ce + aux).unwrap();
            losses.push(total.to_scalar::<f32>().unwrap().to_bits());
            opt.backward_step(&total).unwrap();
        }
        losses
    };
    assert_eq!(run(), run());
    let a = Model::new(&c, 11).unwrap();
    let b = Model::new(&c, 12).unwrap();
    let w = |m: &Model| m.varmap.data().lock().unwrap()["layers.0.ssm.in_proj.weight"].as_tensor().clone();
    assert!(max_abs(&w(&a), &w(&b)) > 0.0, "different seeds give different weights");
}

#[test]
fn gradients_reach_every_parameter() {
    let model = Model::new(&small("itera_lite"), 6).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (ce, aux) = model.loss(&ids(2, 16, 4), Some(&mut rng)).unwrap();
    let grads = (ce + aux).unwrap().backward().unwrap();
    let data = model.varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for n in names {
        let g = grads.get(data[n].as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite(), "{n}");
        // The position embedding rows past the sequence length legitimately get zero.
        if !n.starts_with("pos") {
            assert!(norm > 0.0, "zero gradient for {n}");
        }
    }
}

#[test]
fn checkpoints_round_trip_and_reject_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(&small("transformer"), 7).unwrap();
    model.save(dir.path()).unwrap();
    let first = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    model.save(dir.path()).unwrap();
    assert_eq!(first, std::fs::read(dir.path().join("model.safetensors")).unwrap(), "same weights, same bytes");
    let back = Model::load(dir.path()).unwrap();
    let x = ids(1, 8, 5);
    assert_eq!(max_abs(&model.forward(&x, None).unwrap().logits, &back.forward(&x, None).unwrap().logits), 0.0);

    // A config that disagrees with the weights is named, not panicked on.
    let other = small("itera_lite");
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&other).unwrap()).unwrap();
    let e = Model::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("missing tensors") && e.contains("model.safetensors"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"model\": \"transformer\", \"d_model\": 3}").unwrap();
    let e = Model::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert!(Model::load(empty.path()).err().unwrap().to_string().contains("config.json"));
}

#[test]
fn generation_is_seeded_and_greedy_is_argmax() {
    let model = Model::new(&small("itera_lite"), 8).unwrap();
    let prompt = [1u32, 2, 3];
    let g1 = model.generate(&prompt, 10, Sampling::Greedy, 0).unwrap();
    let g2 = model.generate(&prompt, 10, Sampling::Greedy, 99).unwrap();
    assert_eq!(g1, g2, "greedy ignores the seed");
    let s = Sampling::Sample { temperature: 1.0, top_k: Some(5) };
    assert_eq!(model.generate(&prompt, 10, s, 1).unwrap(), model.generate(&prompt, 10, s, 1).unwrap());
    // The first greedy token is the argmax of the full forward's last position.
    let logits =
        model.forward(&Tensor::new(&prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap().logits;
    let best =
        logits.narrow(1, 2, 1).unwrap().flatten_all().unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(g1[0], best);
    assert!(model.generate(&prompt, 40, Sampling::Greedy, 0).is_err(), "past max_seq_len is an error");
}

mod quantized {
    use super::*;
    use crate::qmodel::QuantSpec;
    use crate::quant::Scheme;
    use crate::DecodeState;

    fn spec(scheme: Scheme, embeddings: bool) -> QuantSpec {
        QuantSpec { scheme, group_size: 32, embeddings, exclude: Vec::new() }
    }

    fn rel_rms(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let n = a.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / n
    }

    /// Random weights through every block, weights and activations rounded: the logits' relative
    /// RMS error measured 0.8 % (Itera-Lite micro) and 2.3 % (Transformer tiny) at INT8, 11 % and
    /// 25 % at INT4 (group 32); a wrong scale or kernel is off by the logits' whole size.
    #[test]
    fn quantized_forward_stays_close_to_f32_and_step_matches_full() {
        for name in ["itera_lite", "transformer"] {
            for (scheme, tol) in [(Scheme::Int8, 0.05), (Scheme::Int4, 0.4)] {
                let f32_model = Model::new(&small(name), 11).unwrap();
                let mut q = Model::new(&small(name), 11).unwrap();
                let report = q.quantize(&spec(scheme, true)).unwrap();
                assert!(report.quantized.iter().any(|t| t.name == "embed.weight"));
                assert!(report.kept_f32.iter().any(|(n, _)| n == "pos.weight"));
                let x = ids(2, 24, 3);
                let exact = f32_model.forward(&x, None).unwrap().logits;
                let got = q.forward(&x, None).unwrap().logits;
                let e = rel_rms(&exact, &got);
                assert!(e < tol && e > 0.0, "{name} {scheme:?}: relative RMS logit error {e}");
                // Recurrent / KV-cache decoding with quantized weights equals the full forward.
                let mut st = q.start(2).unwrap();
                let steps: Vec<Tensor> =
                    (0..24).map(|t| q.step(&x.narrow(1, t, 1).unwrap(), t, &mut st).unwrap()).collect();
                let stepped = Tensor::cat(&steps, 1).unwrap();
                // Itera-Lite's recurrent step does the full forward's row arithmetic in its order.
                // The Transformer's KV-cache step runs the attention op by op (the full forward
                // fused), and an activation within float rounding of a quantization boundary
                // then rounds the other way: 0.27 % (INT8) and 0.10 % (INT4) relative RMS here,
                // against 2.3 % and 25 % from the quantization itself.
                let (bound, diff) = if name == "itera_lite" {
                    (1e-4, max_abs(&stepped, &got))
                } else {
                    (5e-3, rel_rms(&got, &stepped))
                };
                assert!(diff < bound, "{name} {scheme:?}: step vs full {diff}");
                assert!(matches!(st, DecodeState::Recurrent(_)) == (name == "itera_lite"));
            }
        }
    }

    /// The slice decoder's logits at every position against the full forward's.
    fn decoder_vs_full(model: &Model, len: usize) -> f32 {
        let x = ids(1, len, 4);
        let full = model.forward(&x, None).unwrap().logits.squeeze(0).unwrap();
        let mut dec = model.decoder().unwrap();
        let itera = matches!(model.config, ModelConfig::IteraLite(_));
        assert_eq!(matches!(dec, crate::Decoder::Itera(..)), itera, "each model decodes on its own slice decoder");
        let tokens: Vec<u32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let rows: Vec<Tensor> =
            tokens.iter().map(|&t| Tensor::new(dec.feed(&[t]).unwrap(), &Device::Cpu).unwrap()).collect();
        max_abs(&Tensor::stack(&rows, 0).unwrap(), &full)
    }

    /// Itera-Lite micro at widths that are no multiple of the vector length (the kernels' tails).
    fn odd_itera() -> ModelConfig {
        let o = serde_json::json!({"d_model": 36, "expert_dim": 20, "max_seq_len": 32});
        ModelConfig::build("itera_lite", "micro", 40, o.as_object().unwrap()).unwrap()
    }

    /// Sequences at different positions decoded together give each exactly (bit for bit) the
    /// logits it gets alone, so what a request generates never depends on what it is batched with.
    #[test]
    fn batched_decoding_equals_one_sequence_at_a_time() {
        let odd = odd_itera();
        let mut models: Vec<(String, Model)> =
            [small("itera_lite"), odd].into_iter().map(|c| ("f32".into(), Model::new(&c, 9).unwrap())).collect();
        for scheme in [Scheme::Int8, Scheme::Int4] {
            let mut q = Model::new(&small("itera_lite"), 9).unwrap();
            q.quantize(&spec(scheme, true)).unwrap();
            models.push((format!("{scheme:?}"), q));
        }
        for (name, model) in &models {
            let crate::model::Net::IteraLite(m) = &model.net else { unreachable!() };
            let dec = crate::decode::IteraDecoder::new(m).unwrap();
            let tok = |s: usize, t: usize| ((s * 7 + t * 3) % 39 + 1) as u32;
            // Sequence s has already seen 2·s tokens, fed one at a time, alone and batched alike.
            let (mut alone, mut batched): (Vec<_>, Vec<_>) = (0..3).map(|_| (dec.start(), dec.start())).unzip();
            for s in 0..3 {
                for t in 0..2 * s {
                    dec.step(tok(s, t), &mut alone[s]).unwrap();
                    dec.step(tok(s, t), &mut batched[s]).unwrap();
                }
            }
            for step in 0..8 {
                let tokens: Vec<u32> = (0..3).map(|s| tok(s, 2 * s + step)).collect();
                let mut refs: Vec<&mut _> = batched.iter_mut().collect();
                let many = dec.step_many(&tokens, &mut refs).unwrap();
                for s in 0..3 {
                    let one = dec.step(tokens[s], &mut alone[s]).unwrap();
                    let d = one.iter().zip(&many[s]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(d == 0.0, "{name}: sequence {s}, step {step}: max |batched − alone| = {d}");
                }
            }
            assert!(dec.step_many(&[1], &mut []).is_err(), "a token count that does not match is refused");
        }
    }

    #[test]
    fn slice_decoder_equals_the_full_forward_in_f32_int8_and_int4() {
        // micro (d 64), tiny (d 128, AVX2 main loop) and odd widths (vector tails), all with MoE
        // and dense layers; then quantized weights and head through the integer kernels.
        let odd = odd_itera();
        let tiny =
            ModelConfig::build("itera_lite", "tiny", 40, serde_json::json!({"max_seq_len": 32}).as_object().unwrap())
                .unwrap();
        // The Transformer: tiny (4 heads of 32) and an odd shape (3 heads of 12).
        let t_tiny =
            ModelConfig::build("transformer", "tiny", 40, serde_json::json!({"max_seq_len": 32}).as_object().unwrap())
                .unwrap();
        let t_odd = ModelConfig::build(
            "transformer",
            "tiny",
            40,
            serde_json::json!({"d_model": 36, "n_heads": 3, "n_layers": 2, "max_seq_len": 32}).as_object().unwrap(),
        )
        .unwrap();
        for cfg in [small("itera_lite"), tiny, odd, t_tiny, t_odd] {
            let model = Model::new(&cfg, 9).unwrap();
            let d = decoder_vs_full(&model, 24);
            assert!(d <= 1e-5, "f32 {cfg:?}: max |decoder − full| = {d}");
        }
        for name in ["itera_lite", "transformer"] {
            for scheme in [Scheme::Int8, Scheme::Int4] {
                let mut q = Model::new(&small(name), 9).unwrap();
                q.quantize(&spec(scheme, true)).unwrap();
                let d = decoder_vs_full(&q, 24);
                assert!(d <= 1e-4, "{name} {scheme:?}: max |decoder − full| = {d}");
            }
        }
    }

    #[test]
    fn generation_on_the_slice_decoder_matches_the_tensor_step() {
        for name in ["itera_lite", "transformer"] {
            let model = Model::new(&small(name), 12).unwrap();
            let prompt = [3u32, 1, 4, 1, 5];
            let fast = model.generate(&prompt, 20, Sampling::Greedy, 0).unwrap();
            // Reference: candle's recurrent step, greedy.
            let mut st = model.start(1).unwrap();
            let p = Tensor::new(&prompt[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let mut last = model.step(&p, 0, &mut st).unwrap().narrow(1, prompt.len() - 1, 1).unwrap();
            let mut slow = Vec::new();
            for i in 0..20 {
                let next = last.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
                slow.push(next);
                last = model.step(&Tensor::new(&[[next]], &Device::Cpu).unwrap(), prompt.len() + i, &mut st).unwrap();
            }
            assert_eq!(fast, slow, "{name}");
            let mut dec = model.decoder().unwrap();
            assert!(dec.feed(&[40]).unwrap_err().to_string().contains("outside the vocabulary"));
        }
    }

    #[test]
    fn gguf_round_trip_gives_identical_logits_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["itera_lite", "transformer"] {
            for scheme in [Scheme::Int8, Scheme::Int4] {
                let mut q = Model::new(&small(name), 5).unwrap();
                let report = q.quantize(&spec(scheme, false)).unwrap();
                let path = dir.path().join(format!("{name}-{scheme:?}.gguf"));
                q.save_gguf(&path).unwrap();
                let mut back = Model::load_gguf(&path).unwrap();
                let x = ids(1, 16, 1);
                let a = q.forward(&x, None).unwrap().logits;
                let b = back.forward(&x, None).unwrap().logits;
                assert_eq!(max_abs(&a, &b), 0.0, "{name} {scheme:?}");
                assert_eq!(back.quant_scheme(), Some(scheme));
                // Same model, same bytes (deterministic file).
                let again = back.to_gguf().unwrap().to_bytes();
                assert_eq!(again, std::fs::read(&path).unwrap());
                let ratio = report.quantized_f32_bytes() as f64 / report.quantized_stored_bytes() as f64;
                let want = if scheme == Scheme::Int8 { 3.5 } else { 6.0 };
                assert!(ratio > want, "{name} {scheme:?}: {ratio}");
            }
        }
    }

    #[test]
    fn bad_quantization_requests_are_errors() {
        let mut q = Model::new(&small("itera_lite"), 5).unwrap();
        let mut s = spec(Scheme::Int4, false);
        s.group_size = 48;
        assert!(q.quantize(&s).unwrap_err().to_string().contains("multiple of 32"));
        let mut s = spec(Scheme::Int8, false);
        s.exclude = vec!["layers.9".into()];
        assert!(q.quantize(&s).unwrap_err().to_string().contains("layers.9"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"not a gguf file at all, just text").unwrap();
        assert!(Model::load_gguf(&p).is_err());
    }
}

/// Moves every variable off its initial value (D = 1 and zero biases would hide terms in a
/// gradient comparison), by up to ±0.3, seeded.
fn perturb(varmap: &candle_nn::VarMap) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for var in varmap.all_vars() {
        let noise: Vec<f32> = (0..var.elem_count()).map(|_| rand::Rng::random_range(&mut rng, -0.3f32..0.3)).collect();
        var.set(&(var.as_tensor() + Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
}

/// The fused SSM block node against the op-by-op block: output and the gradient of every
/// parameter and of the input, with and without dropout between the block and its residual.
#[test]
fn fused_ssm_block_equals_the_op_by_op_block_and_its_gradients() {
    use crate::config::IteraConfig;
    use crate::itera::SsmBlock;
    use candle_core::Var;

    for p_drop in [0.0, 0.2] {
        let mut cfg = IteraConfig::preset("micro", 40).unwrap();
        cfg.dropout = p_drop;
        let (varmap, vb) = crate::nn::fresh_builder();
        let block = SsmBlock::new(&cfg, vb).unwrap();
        crate::nn::init_deterministic(&varmap, 5).unwrap();
        perturb(&varmap);
        let (seq_len, rows) = (12, 36);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, cfg.d_model), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (rows, cfg.d_model), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let mut drop_rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut train = Some(&mut drop_rng);
            let out =
                if fused { block.forward(&x, seq_len, &mut train) } else { block.forward_ops(&x, seq_len, &mut train) }
                    .unwrap();
            let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (out, grads)
        };
        let ((fo, fg), (ro, rg)) = (run(true), run(false));
        let scale = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
        let d = max_abs(&fo, &ro);
        assert!(d <= 1e-4 * scale(&ro), "p_drop {p_drop}: output differs by {d}");
        let mut checked = vec![x.as_tensor().clone()];
        checked.extend(varmap.all_vars().iter().map(|v| v.as_tensor().clone()));
        for t in &checked {
            let (a, b) = (fg.get(t).expect("fused gradient"), rg.get(t).expect("reference gradient"));
            assert_eq!(a.dims(), b.dims());
            let d = max_abs(a, b);
            assert!(
                d <= 2e-4 * scale(b),
                "p_drop {p_drop}: gradient of a {:?} parameter differs by {d} (max {})",
                t.dims(),
                scale(b)
            );
        }
        // Inference (no saved intermediates) gives the same output as training mode.
        let inf = block.forward(&x, seq_len, &mut None).unwrap();
        let reference = block.forward_ops(&x, seq_len, &mut None).unwrap();
        assert!(max_abs(&inf, &reference) <= 1e-4 * scale(&reference));
    }
}

/// The fused feed-forward node against the op-by-op layers — the dense FFN and the MoE layer's
/// training form — with and without dropout: outputs, the balance loss, and every gradient.
#[test]
fn fused_ffn_and_moe_layers_equal_the_op_by_op_layers_and_their_gradients() {
    use crate::config::IteraConfig;
    use crate::itera::{Ffn, Moe};
    use candle_core::Var;

    for p_drop in [0.0, 0.2] {
        let mut cfg = IteraConfig::preset("micro", 40).unwrap();
        cfg.dropout = p_drop;
        let (varmap, vb) = crate::nn::fresh_builder();
        let ffn = Ffn::new(&cfg, vb.pp("ffn")).unwrap();
        let moe = Moe::new(&cfg, vb.pp("moe")).unwrap();
        crate::nn::init_deterministic(&varmap, 5).unwrap();
        perturb(&varmap);
        let rows = 30;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, cfg.d_model), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (rows, cfg.d_model), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let mut drop_rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut train = Some(&mut drop_rng);
            let f = if fused { ffn.forward(&x, &mut train) } else { ffn.forward_ops(&x, &mut train) }.unwrap();
            let m = if fused { moe.forward(&f, &mut train) } else { moe.forward_ops(&f, &mut train) }.unwrap();
            let loss = ((&m.out * &probe).unwrap().sum_all().unwrap() + &m.aux).unwrap();
            (m.out.clone(), m.aux.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
        };
        let ((fo, fa, fg), (ro, ra, rg)) = (run(true), run(false));
        let scale = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
        assert!(max_abs(&fo, &ro) <= 1e-4 * scale(&ro), "p_drop {p_drop}: output differs by {}", max_abs(&fo, &ro));
        assert!((fa - ra).abs() <= 1e-5 * ra.abs().max(1.0));
        let mut checked = vec![x.as_tensor().clone()];
        checked.extend(varmap.all_vars().iter().map(|v| v.as_tensor().clone()));
        for t in &checked {
            let (a, b) = (fg.get(t).expect("fused gradient"), rg.get(t).expect("reference gradient"));
            let d = max_abs(a, b);
            assert!(
                d <= 2e-4 * scale(b),
                "p_drop {p_drop}: gradient of a {:?} parameter differs by {d} (max {})",
                t.dims(),
                scale(b)
            );
        }
    }
}

/// A Transformer block on its fused nodes (attention sub-block, MLP) against the op-by-op block:
/// output and every gradient, with and without dropout, at two head widths.
#[test]
fn fused_transformer_block_equals_the_op_by_op_block_and_its_gradients() {
    use crate::config::TransformerConfig;
    use crate::transformer::Block;
    use candle_core::Var;

    // Sequences of 10 (one causal block) and of 70 (three, the last partial).
    for (p_drop, d, heads, l) in [(0.0, 32, 4, 10), (0.2, 36, 3, 10), (0.0, 32, 4, 70), (0.2, 36, 3, 70)] {
        let cfg = TransformerConfig {
            vocab_size: 40,
            d_model: d,
            n_layers: 1,
            n_heads: heads,
            d_ff: 4 * d,
            max_seq_len: 80,
            dropout: p_drop,
            ln_eps: 1e-5,
        };
        let (varmap, vb) = crate::nn::fresh_builder();
        let block = Block::new(&cfg, vb).unwrap();
        crate::nn::init_deterministic(&varmap, 5).unwrap();
        perturb(&varmap);
        let b = 3;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b * l, d), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (b * l, d), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let mut drop_rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut train = Some(&mut drop_rng);
            let out = if fused {
                block.forward(&x, (b, l), &mut train, None)
            } else {
                block.forward_ops(&x, (b, l), &mut train)
            }
            .unwrap();
            let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (out, grads)
        };
        let ((fo, fg), (ro, rg)) = (run(true), run(false));
        let scale = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
        assert!(max_abs(&fo, &ro) <= 1e-4 * scale(&ro), "p_drop {p_drop}: output differs by {}", max_abs(&fo, &ro));
        // Inference keeps no probabilities (one scratch per sequence): the same outputs.
        let fi = block.forward(&x, (b, l), &mut None, None).unwrap();
        let ri = block.forward_ops(&x, (b, l), &mut None).unwrap();
        assert!(max_abs(&fi, &ri) <= 1e-4 * scale(&ri), "l {l}: inference output differs by {}", max_abs(&fi, &ri));
        let mut checked = vec![x.as_tensor().clone()];
        checked.extend(varmap.all_vars().iter().map(|v| v.as_tensor().clone()));
        for t in &checked {
            let (a, r) = (fg.get(t).expect("fused gradient"), rg.get(t).expect("reference gradient"));
            let diff = max_abs(a, r);
            assert!(
                diff <= 2e-4 * scale(r),
                "p_drop {p_drop}: gradient of a {:?} tensor differs by {diff} (max {})",
                t.dims(),
                scale(r)
            );
        }
    }
}

#[test]
fn hand_written_itera_step_equals_autograd() {
    // Both balance losses, weighted heavily so the router's gradient is not lost in the
    // cross-entropy's; two MoE layers and two dense ones.
    for aux_loss in ["cv2", "switch"] {
        let o = serde_json::json!({"max_seq_len": 32, "n_layers": 4, "aux_loss": aux_loss, "aux_weight": 0.5});
        let cfg = ModelConfig::build("itera_lite", "micro", 40, o.as_object().unwrap()).unwrap();
        let model = Model::new(&cfg, 8).unwrap();
        let crate::model::Net::IteraLite(net) = &model.net else { unreachable!() };
        assert!(crate::itera_step::supported(net));
        let x = ids(3, 24, 5);
        let hand = crate::itera_step::step(net, &x).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (ce, aux) = model.loss(&x, Some(&mut rng)).unwrap();
        let (ce_v, aux_v) = (ce.to_scalar::<f32>().unwrap(), aux.to_scalar::<f32>().unwrap());
        assert!((hand.ce - ce_v).abs() <= 1e-5 * ce_v.abs(), "{aux_loss}: ce {} vs {ce_v}", hand.ce);
        assert!(aux_v > 0.0 && (hand.aux - aux_v).abs() <= 1e-4 * aux_v, "{aux_loss}: aux {} vs {aux_v}", hand.aux);
        let reference = (ce + aux).unwrap().backward().unwrap();
        assert_same_grads(&model, &hand.grads, &reference, aux_loss);
    }
}

/// Every parameter of `model` has a gradient in `hand` within 1e-3 of the largest of its
/// gradient in `reference`.
fn assert_same_grads(
    model: &Model,
    hand: &candle_core::backprop::GradStore,
    reference: &candle_core::backprop::GradStore,
    label: &str,
) {
    let data = model.varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for n in names {
        let t = data[n].as_tensor();
        let (a, b) = (hand.get(t), reference.get(t));
        let (a, b) = (a.unwrap_or_else(|| panic!("{label}: no hand gradient for {n}")), b.unwrap());
        assert_eq!(a.dims(), b.dims(), "{n}");
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-4);
        let d = max_abs(a, b);
        assert!(d <= 1e-3 * scale, "{label}: gradient of {n} differs by {d} (max {scale})");
    }
}

#[test]
fn hand_written_transformer_step_equals_autograd() {
    // Sequences of 40: a partial causal block of queries after a whole one.
    let o = serde_json::json!({"max_seq_len": 48, "n_layers": 2});
    let cfg = ModelConfig::build("transformer", "tiny", 40, o.as_object().unwrap()).unwrap();
    let model = Model::new(&cfg, 8).unwrap();
    let crate::model::Net::Transformer(net) = &model.net else { unreachable!() };
    assert!(crate::transformer_step::supported(net));
    let x = ids(3, 40, 5);
    let hand = crate::transformer_step::step(net, &x).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (ce, aux) = model.loss(&x, Some(&mut rng)).unwrap();
    let ce_v = ce.to_scalar::<f32>().unwrap();
    assert!((hand.ce - ce_v).abs() <= 1e-5 * ce_v.abs(), "ce {} vs {ce_v}", hand.ce);
    assert_eq!(hand.aux, 0.0);
    let reference = (ce + aux).unwrap().backward().unwrap();
    assert_same_grads(&model, &hand.grads, &reference, "transformer");
    // What `fit` calls takes this step (the same gradients, bit for bit).
    let (via_model, ce_m, _) = model.loss_grads(&x, Some(&mut rng)).unwrap();
    assert_eq!(ce_m, hand.ce);
    let w = model.varmap.data().lock().unwrap()["layers.1.attn.qkv.weight"].as_tensor().clone();
    assert_eq!(max_abs(via_model.get(&w).unwrap(), hand.grads.get(&w).unwrap()), 0.0);
    // Dropout is not covered: autograd takes the step.
    let o = serde_json::json!({"max_seq_len": 48, "dropout": 0.1});
    let dropped =
        Model::new(&ModelConfig::build("transformer", "tiny", 40, o.as_object().unwrap()).unwrap(), 8).unwrap();
    let crate::model::Net::Transformer(net) = &dropped.net else { unreachable!() };
    assert!(!crate::transformer_step::supported(net));
    let bad = Tensor::from_vec(vec![1u32, 2, 40, 3], (1, 4), &Device::Cpu).unwrap();
    let err = crate::transformer_step::step(net, &bad).err().expect("id 40 of a 40-token vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn loss_grads_takes_autograd_where_the_hand_written_step_does_not_reach() {
    // Dropout: the hand-written step does not cover it; loss_grads must still give gradients.
    let o = serde_json::json!({"max_seq_len": 32, "dropout": 0.1});
    let cfg = ModelConfig::build("itera_lite", "micro", 40, o.as_object().unwrap()).unwrap();
    let model = Model::new(&cfg, 9).unwrap();
    let crate::model::Net::IteraLite(net) = &model.net else { unreachable!() };
    assert!(!crate::itera_step::supported(net));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (grads, ce, _) = model.loss_grads(&ids(2, 16, 1), Some(&mut rng)).unwrap();
    assert!(ce.is_finite());
    let w = model.varmap.data().lock().unwrap()["layers.0.ssm.in_proj.weight"].as_tensor().clone();
    assert!(grads.get(&w).is_some());
    // Token ids outside the vocabulary are refused by the hand-written step, not read past.
    let plain = Model::new(&small("itera_lite"), 9).unwrap();
    let crate::model::Net::IteraLite(net) = &plain.net else { unreachable!() };
    let bad = Tensor::from_vec(vec![1u32, 2, 40, 3], (1, 4), &Device::Cpu).unwrap();
    let err = crate::itera_step::step(net, &bad).err().expect("id 40 of a 40-token vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

/// Every LayerNorm of both models starts as the identity: gain 1, bias 0 (torch's init, and the
/// original study's). The models' only 1-D `weight`s are LayerNorm gains, so each one is checked
/// whatever its module is called, and their count says none was missed.
#[test]
fn every_layer_norm_starts_as_the_identity() {
    for (model, preset, norms) in [("transformer", "tiny", 4 * 2 + 1), ("itera_lite", "tiny", 4 * 2 + 1)] {
        let cfg = ModelConfig::build(model, preset, 40, &serde_json::Map::new()).unwrap();
        let m = Model::new(&cfg, 11).unwrap();
        let data = m.varmap.data().lock().unwrap();
        let mut gains = 0;
        for (name, var) in data.iter() {
            if var.dims().len() == 1 && name.ends_with(".weight") {
                gains += 1;
                let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(values.iter().all(|&v| v == 1.0), "{model}: {name} does not start at 1");
                let bias = name.replace(".weight", ".bias");
                let b = data[&bias].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(b.iter().all(|&v| v == 0.0), "{model}: {bias} does not start at 0");
            }
        }
        assert_eq!(gains, norms, "{model}: LayerNorms found");
    }
}
