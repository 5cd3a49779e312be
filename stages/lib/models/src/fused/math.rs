// The elementwise math the fused kernels share: e^x, σ, softplus, erf, GELU's terms, dot
// products. Included twice by `fused/mod.rs` (`include!`): into `fused_mad`, whose `fma` is one
// rounding (one instruction where the `simd_dispatch` copies have FMA: these polynomials are
// bound by their multiply-adds), and into `split_mad`, whose `fma` is a multiply then an add (the
// portable copy, where a single-rounding fma is a libm call per element: 2.7× slower steps).
// Each `simd_dispatch` copy imports the one it can run; everything else gets `split_mad`'s.

/// c[0] + x·(c[1] + x·(c[2] + …)), Horner's rule in `fma`s.
#[inline(always)]
pub(crate) fn horner<const N: usize>(x: f32, c: &[f32; N]) -> f32 {
    // A plain loop, not a fold with a closure: a closure not inlined would be compiled without
    // the calling copy's target features.
    let Some((&last, rest)) = c.split_last() else { return 0.0 };
    let mut acc = last;
    for &ci in rest.iter().rev() {
        acc = fma(acc, x, ci);
    }
    acc
}

/// e^x, branch-free so the loops calling it vectorize (libm's expf is a call per element and was
/// ~7 % of a training step). Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7
/// Taylor polynomial (truncation < 1e-8 relative) and 2^n built in the exponent bits; within
/// 2 ulp of the exact value on [−87, 88] (tested), saturating outside.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5·2^23: adding it leaves round(x·log2 e) in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = fma(n, 2.121_944_4e-4, fma(n, -0.693_359_4, x));
    let p = horner(r, &[1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0]);
    let two_n = f32::from_bits(((t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32 + 127) as u32) << 23);
    p * two_n
}

/// ln(1 + y) for y in [0, 1] as 2·atanh(y / (2 + y)) (series to s^13, s ≤ 1/3): accurate for
/// tiny y too, and branch-free.
#[inline(always)]
pub(crate) fn ln_1p_unit(y: f32) -> f32 {
    two_atanh(y / (2.0 + y))
}

/// 2·atanh(s) for 0 ≤ s ≤ 1/3, atanh's series to s^13: ln(1 + y) with s = y/(2 + y).
#[inline(always)]
pub(crate) fn two_atanh(s: f32) -> f32 {
    2.0 * s * horner(s * s, &[1.0, 1.0 / 3.0, 1.0 / 5.0, 1.0 / 7.0, 1.0 / 9.0, 1.0 / 11.0, 1.0 / 13.0])
}

#[inline(always)]
pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

/// silu′(v) = σ(v)·(1 + v·(1 − σ(v))), given s = σ(v) (the callers have it from silu itself).
#[inline(always)]
pub(crate) fn silu_grad(v: f32, s: f32) -> f32 {
    s * (1.0 + v * (1.0 - s))
}

/// erf(x) with no exponential, for GELU's forward alone (the backward wants e^{−x²} anyway and
/// takes [`erf_gauss`]): x·P(x²)/Q(x²), a (5, 5) rational fitted to erf on |x| ≤ 3.92 (beyond,
/// erf is ±1 in f32), within 2e-8 in exact arithmetic; in f32 within 4e-7 absolute and 5e-7
/// relative near 0 (tested). Its multiply-adds replace erf_gauss's exponential: the experts'
/// inference loop's own time fell by about a third.
#[inline(always)]
// The leading coefficient is the fit's, 2 ulp from 2/√π.
#[allow(clippy::approx_constant)]
pub(crate) fn erf_rational(x: f32) -> f32 {
    let z = x.clamp(-3.92, 3.92);
    let t = z * z;
    let p = horner(t, &[1.128_379, 0.192_749_57, 0.053_058_58, 3.867_709_8e-3, 2.874_657_5e-4, 2.034_847_7e-6]);
    let q = horner(t, &[1.0, 0.504_151_5, 0.115_078_64, 0.015_171_06, 1.187_965_9e-3, 3.807_110_3e-5]);
    // Clamped: the fit's error at the ends would put it a rounding above 1.
    (z * p / q).clamp(-1.0, 1.0)
}

/// GELU(x) = 0.5·x·(1 + erf(x/√2)), the forward alone (see [`gelu_terms`] for the pair the
/// backward needs).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_rational(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// 1/√(2π), φ(0).
pub(crate) const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU's (PyTorch's `nn.GELU()`) terms at x: t = 1 + erf(x/√2) = 2·Φ(x) and
/// e = e^{−x²/2} = √(2π)·φ(x), the exponential erf computed anyway. GELU(x) = 0.5·x·t, and
/// GELU′(x) = [`gelu_grad`]`(x, t, e)`.
#[inline(always)]
pub(crate) fn gelu_terms(x: f32) -> (f32, f32) {
    let (erf, e) = erf_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
    (1.0 + erf, e)
}

/// GELU′(x) = Φ(x) + x·φ(x), given [`gelu_terms`]`(x)`.
#[inline(always)]
pub(crate) fn gelu_grad(x: f32, t: f32, e: f32) -> f32 {
    0.5 * t + x * INV_SQRT_2PI * e
}

/// softplus(v) = max(v, 0) + log(1 + e^{−|v|}).
#[inline(always)]
pub(crate) fn softplus(v: f32) -> f32 {
    v.max(0.0) + ln_1p_unit(exp(-v.abs()))
}

/// (softplus(v), σ(v)) from one exponential y = e^{−|v|} and one division: ln(1 + y) wants
/// y/(2 + y) and σ wants 1/(1 + y), both cut from 1/((1 + y)(2 + y)) (two divisions were a
/// fair share of the SSM forward's Δ loop).
#[inline(always)]
pub(crate) fn softplus_sigmoid(v: f32) -> (f32, f32) {
    let y = exp(-v.abs());
    let inv = 1.0 / ((1.0 + y) * (2.0 + y));
    let s = y * (1.0 + y) * inv;
    let r = (2.0 + y) * inv;
    (v.max(0.0) + two_atanh(s), if v >= 0.0 { r } else { y * r })
}

/// erf(x), Abramowitz & Stegun 7.1.26 (≤ 1.5e-7, ≤ 5e-7 after f32 rounding; tested), branch-free on |x| with the sign
/// put back: libm's erff is a call per element, and candle's GELU backward is ~12 tensor ops.
/// Returns (erf(x), e^{−x²}): the second is the exponential the first is made from.
#[inline(always)]
pub(crate) fn erf_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * horner(t, &[0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4]);
    let e = exp(-a * a);
    (fma(-poly, e, 1.0).copysign(x), e)
}

/// Σ a·b over two slices of one length, in 8 interleaved partial sums like `sum_lanes`.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    // Fixed-size chunks: with `chunks_exact` slices the compiler split the eight lanes into
    // 4 + 2 + 2 and loaded them separately (the attention backward's dS rows).
    let ((a8, a_tail), (b8, b_tail)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    for (x, y) in a8.iter().zip(b8) {
        for i in 0..8 {
            acc[i] = fma(x[i], y[i], acc[i]);
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(&x, &y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
