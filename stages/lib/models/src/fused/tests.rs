use super::*;
use candle_core::{Device, Tensor, Var};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Forward values and every input's gradient (against a random probe) of `fused` vs `ops`.
fn agree(
    inputs: &[Var],
    fused: impl Fn(&[&Tensor]) -> Tensor,
    ops: impl Fn(&[&Tensor]) -> Tensor,
    tol: f32,
    what: &str,
) {
    let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
    let (a, b) = (fused(&ts), ops(&ts));
    assert!(max_diff(&a, &b) < tol, "{what} forward: {}", max_diff(&a, &b));
    let probe = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
    let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (ga.get(v).expect("fused gradient"), gb.get(v).expect("reference gradient"));
        assert_eq!(x.dims(), y.dims(), "{what} input {i}");
        let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        assert!(max_diff(x, y) / scale < tol, "{what} gradient of input {i}: {}", max_diff(x, y));
    }
}

fn var(shape: &[usize], mean: f32, std: f32) -> Var {
    Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
}

/// The elementwise math's errors against f64 over [−87, 88]: (exp, σ, softplus, and
/// softplus_sigmoid's pair), the largest relative error of each.
macro_rules! math_errors {
    ($m:path) => {{
        use $m as m;
        let mut worst = [0f64; 5];
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let rel = |got: f32, want: f64| ((got as f64) - want).abs() / want.abs().max(1e-30);
            let e = (x as f64).exp();
            let sig = 1.0 / (1.0 + (-(x as f64)).exp());
            let sp = (x as f64).max(0.0) + (-(x as f64).abs()).exp().ln_1p();
            let (p_sp, p_sig) = m::softplus_sigmoid(x);
            let errs =
                [rel(m::exp(x), e), rel(m::sigmoid(x), sig), rel(m::softplus(x), sp), rel(p_sp, sp), rel(p_sig, sig)];
            for (w, e) in worst.iter_mut().zip(errs) {
                *w = w.max(e);
            }
        }
        assert_eq!(m::exp(-1000.0), m::exp(-87.0));
        assert!(m::exp(1000.0).is_finite() && m::sigmoid(-1000.0) >= 0.0 && m::sigmoid(1000.0) == 1.0);
        worst
    }};
}

#[test]
fn fast_exp_sigmoid_and_softplus_are_within_a_few_ulp() {
    // Both builds of the math: fma rounding once (the AVX2 and AVX-512 copies) and twice.
    for (name, w) in [("fused_mad", math_errors!(super::fused_mad)), ("split_mad", math_errors!(super::split_mad))] {
        let ok = w[0] < 2.5e-7 && w[1] < 5e-7 && w[2] < 5e-7 && w[3] < 5e-7 && w[4] < 5e-7;
        assert!(ok, "{name}: relative errors exp/σ/softplus/softplus_sigmoid: {w:?}");
    }
}

#[test]
fn conv_silu_matches_the_op_by_op_form_and_its_gradients() {
    // 40 and 33 channels: more than one vector of lanes at every SIMD level, and lanes left over.
    for (b, l, c, k) in [(3, 17, 12, 4), (2, 3, 5, 4), (1, 9, 8, 2), (2, 11, 40, 4), (1, 6, 33, 3)] {
        let vars = [var(&[b, l, c], 0.0, 1.0), var(&[c, k], 0.0, 0.5), var(&[c], 0.0, 0.3)];
        agree(
            &vars,
            |t| causal_conv_silu(t[0], l, t[1], t[2]).unwrap(),
            |t| causal_conv_silu_ops(t[0], t[1], t[2]).unwrap(),
            1e-5,
            "conv+silu",
        );
        // The same rows flattened to 2-D.
        let flat = |t: &[&Tensor]| {
            causal_conv_silu(&t[0].reshape((b * l, c)).unwrap(), l, t[1], t[2]).unwrap().reshape((b, l, c)).unwrap()
        };
        agree(&vars, flat, |t| causal_conv_silu_ops(t[0], t[1], t[2]).unwrap(), 1e-5, "conv+silu (2-D)");
    }
}

#[test]
fn conv_silu_accepts_a_strided_view() {
    // The block feeds a narrow of in_proj's output.
    let xz = Tensor::randn(0f32, 1.0, (2, 7, 10), &Device::Cpu).unwrap();
    let x = xz.narrow(2, 0, 5).unwrap();
    let (w, bias) = (
        Tensor::randn(0f32, 0.5, (5, 4), &Device::Cpu).unwrap(),
        Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        max_diff(&causal_conv_silu(&x, 7, &w, &bias).unwrap(), &causal_conv_silu_ops(&x, &w, &bias).unwrap()) < 1e-6
    );
    assert!(causal_conv_silu(&x, 3, &w, &bias).unwrap_err().to_string().contains("not whole sequences"));
}

#[test]
fn softplus_mean_matches_the_op_by_op_form_and_its_gradients() {
    let vars = [var(&[3, 11, 20], 0.0, 4.0), var(&[20], 0.0, 1.0)];
    let ops = |t: &[&Tensor]| {
        let x = t[0].broadcast_add(t[1]).unwrap();
        (x.relu().unwrap() + (x.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap())
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
    };
    agree(&vars, |t| softplus_mean(t[0], t[1]).unwrap(), ops, 1e-5, "softplus-mean");
}

#[test]
fn next_token_loss_matches_candle_cross_entropy_and_its_gradient() {
    let logits = var(&[3, 7, 11], 0.0, 3.0);
    let ids = Tensor::from_vec((0..21u32).map(|i| (i * 5 + 3) % 11).collect::<Vec<_>>(), (3, 7), &Device::Cpu).unwrap();
    let ops = |t: &[&Tensor]| {
        let pred = t[0].narrow(1, 0, 6).unwrap().reshape((18, 11)).unwrap();
        candle_nn::loss::cross_entropy(&pred, &ids.narrow(1, 1, 6).unwrap().reshape(18).unwrap()).unwrap()
    };
    agree(&[logits], |t| next_token_cross_entropy(t[0], &ids).unwrap(), ops, 1e-5, "next-token loss");
    let bad = Tensor::from_vec(vec![0u32, 11], (1, 2), &Device::Cpu).unwrap();
    let e = next_token_cross_entropy(&Tensor::zeros((1, 2, 11), candle_core::DType::F32, &Device::Cpu).unwrap(), &bad)
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

#[test]
fn causal_softmax_matches_masked_softmax_and_its_gradient() {
    for (l, keys, offset) in [(6, 6, 0), (1, 5, 4), (3, 7, 4)] {
        let scores = var(&[2, 3, l, keys], 0.0, 2.0);
        let scale = 0.35f32;
        let ops = |t: &[&Tensor]| {
            let mask: Vec<f32> = (0..l)
                .flat_map(|i| (0..keys).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (l, keys), &Device::Cpu).unwrap();
            candle_nn::ops::softmax(&(t[0] * scale as f64).unwrap().broadcast_add(&mask).unwrap(), 3).unwrap()
        };
        agree(&[scores], |t| causal_softmax(t[0], scale, offset).unwrap(), ops, 1e-5, "causal softmax");
    }
}

#[test]
fn gelu_matches_candle_gelu_erf_and_its_gradient() {
    let vars = [var(&[5, 301], 0.0, 3.0)];
    agree(&vars, |t| gelu_erf(t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), 1e-5, "gelu");
    let (mut worst_erf, mut worst_gauss) = (0f64, 0f64);
    for x in (0..=40_000).map(|i| -10.0 + 20.0 * i as f32 / 40_000.0) {
        let (erf, gauss) = erf_gauss(x);
        worst_erf = worst_erf.max((erf as f64 - libm_erf(x as f64)).abs());
        // Relative error while e^{−x²} is a normal f32 (|x| ≤ 9; subnormal from ≈ 9.35).
        if x.abs() <= 9.0 {
            let want = (-(x as f64) * (x as f64)).exp();
            worst_gauss = worst_gauss.max((gauss as f64 - want).abs() / want);
        }
    }
    assert!(worst_erf < 6e-7, "erf: {worst_erf}");
    assert!(worst_gauss < 1e-5, "e^-x²: {worst_gauss}");
}

#[test]
fn the_forward_only_erf_is_within_a_few_ulp_in_both_math_builds() {
    type Erf = fn(f32) -> f32;
    let builds: [(&str, Erf); 2] =
        [("fused_mad", super::fused_mad::erf_rational), ("split_mad", super::split_mad::erf_rational)];
    for (name, erf) in builds {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        for x in (0..=400_000).map(|i| -10.0 + 20.0 * i as f32 / 400_000.0).chain([1e-30, -1e-20, 1e-6, 3e-3]) {
            let (got, want) = (erf(x) as f64, libm_erf(x as f64));
            worst_abs = worst_abs.max((got - want).abs());
            // Near 0 erf(x) ≈ 1.13·x: the error relative to it, where an absolute bound says little.
            if x.abs() < 0.5 {
                worst_rel = worst_rel.max((got - want).abs() / want.abs().max(1e-38));
            }
        }
        assert!(worst_abs < 4e-7 && worst_rel < 5e-7, "{name}: erf off by {worst_abs} (relative {worst_rel} near 0)");
        assert_eq!((erf(9.0), erf(-f32::MAX)), (1.0, -1.0), "{name}: erf saturates");
    }
}

fn libm_erf(x: f64) -> f64 {
    candle_core::cpu::erf::erf_f64(x)
}

#[test]
fn silu_gate_matches_the_op_by_op_form_and_its_gradients() {
    let vars = [var(&[2, 9, 33], 0.0, 1.0), var(&[2, 9, 33], 0.0, 3.0)];
    agree(&vars, |t| silu_gate(t[0], t[1]).unwrap(), |t| (t[0] * t[1].silu().unwrap()).unwrap(), 1e-5, "silu-gate");
}

#[test]
fn conv_kernels_refuse_buffers_that_are_not_whole_sequences() {
    // c = 2 channels, k = 3 taps, sequences of l = 3 rows: 6 values each. The kernels write
    // their outputs without zero-filling them first, so a partial sequence must be refused.
    let (w, bias) = ([0.5f32; 6], [0.0f32; 2]);
    assert!(ssm::conv_transpose(&[1.0; 10], &w, 3, 2, 3).is_err());
    assert_eq!(ssm::conv_transpose(&[1.0; 12], &w, 3, 2, 3).unwrap().len(), 12);
    let mut g = [1.0f32; 12];
    assert!(ssm::silu_conv_transpose(&mut g, &[1.0; 6], &w, 3, 2, 3).is_err());
    let mut xc = vec![std::mem::MaybeUninit::uninit(); 12];
    let err = ssm::conv_silu(&[1.0; 10], &w, &bias, (3, 2, 3), &mut xc).unwrap_err();
    assert!(err.to_string().contains("not whole sequences"), "{err}");
    // An output of another length than the input's is refused too.
    let err = ssm::conv_silu(&[1.0; 12], &w, &bias, (3, 2, 3), &mut xc[..6]).unwrap_err();
    assert!(err.to_string().contains("not whole sequences"), "{err}");
    assert!(ssm::conv_silu_grad(&[1.0; 10], &w, &bias, 3, 2, 3).is_err());
}

#[test]
fn conv_backward_is_the_two_pass_kernels_bit_for_bit() {
    // 16-channel blocks and the channel-by-channel rest (c = 35), sequences shorter than the
    // taps, as long and longer, several per batch; 3 taps take the two-pass path itself. The
    // fused walk recomputes silu′ from x; the two-pass kernels take it from `conv_silu_grad`.
    let val = |i: usize, s: usize, m: usize| ((i * s + 5) % m) as f32 * 0.037 - 0.9;
    for (k, c) in [(4, 35), (4, 16), (3, 35)] {
        for l in [1, 2, 3, 4, 5, 9] {
            let n = 3 * l * c;
            let (g, x): (Vec<f32>, Vec<f32>) =
                ((0..n).map(|i| val(i, 7, 101)).collect(), (0..n).map(|i| val(i, 13, 97)).collect());
            let w: Vec<f32> = (0..c * k).map(|i| val(i, 11, 23)).collect();
            let bias: Vec<f32> = (0..c).map(|i| val(i, 5, 31)).collect();
            let (dx, taps) = ssm::conv_backward(&g, &x, &w, &bias, l, c, k).unwrap();
            let ds = ssm::conv_silu_grad(&x, &w, &bias, l, c, k).unwrap();
            let mut g2 = g.clone();
            let dx2 = ssm::silu_conv_transpose(&mut g2, &ds, &w, l, c, k).unwrap();
            let taps2 = ssm::conv_param_grad(&x, &g2, l, c, k);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dx), bits(&dx2), "∂x, k {k}, c {c}, l {l}");
            assert_eq!(bits(&taps), bits(&taps2), "taps and bias, k {k}, c {c}, l {l}");
        }
    }
    let err = ssm::conv_backward(&[1.0; 12], &[1.0; 10], &[0.5; 8], &[0.0; 2], 3, 2, 4).unwrap_err();
    assert!(err.to_string().contains("not whole sequences"), "{err}");
    let err = ssm::conv_backward(&[1.0; 12], &[1.0; 12], &[0.5; 8], &[0.0; 3], 3, 2, 4).unwrap_err();
    assert!(err.to_string().contains("biases"), "{err}");
}
