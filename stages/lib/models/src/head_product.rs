//! An attention head's small products whose right operand's rows are contiguous — P·V, dS·K,
//! Pᵀ·dO and dSᵀ·Q: (≤ 32 query rows) × (head width) over k ≤ the sequence length — as register
//! tiles with AVX-512 or AVX2 + FMA.
//!
//! The gemm crate packs both operands into its own layout on every call; at these sizes (32 × 32
//! × ≤ 128 at the tiny presets) that and its dispatch cost about as much as the arithmetic: a
//! Transformer training step's per-head products ran at 35–50 GFLOP/s beside its weight GEMMs'
//! 90. Here a tile of up to six rows × 32 columns (AVX-512; 16 with AVX2) stays in registers for
//! the whole k loop, each step broadcasting one value of `a` per row (any strides) against one
//! row of `b` read in place. The portable level, and any `b` whose rows are not contiguous, run
//! [`strided_product`].

use candle_core::Result;

use crate::linear_op::{check_views, strided_product, View};

/// `dst (m×n, row stride dst_rs) = a (m×k) · b (k×n)`, as [`strided_product`]; tiled when
/// `b`'s rows are contiguous (`b.cs == 1`) and the CPU (and `ITERA_SIMD`) allows AVX2 or
/// AVX-512. Sums run over k in order, one fused multiply-add per term, so a level's results are
/// the same on every run. A tile skips the terms that `zeros` says are zero in `a`; the caller
/// guarantees they are (the portable level adds them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    zeros: Zeros,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if b.cs == 1 && k > 0 && m > 0 && n > 0 {
        check_views(m, n, k, dst.len(), dst_rs, a, b)?;
        let dims = Dims { m, n, k, dst_rs, zeros };
        match crate::simd::active() {
            crate::simd::Level::Vnni => {
                // SAFETY: the level says the CPU has AVX-512 F; the bounds were checked above.
                unsafe { x86::avx512(dims, dst, a, b) };
                return Ok(());
            }
            // SAFETY: the level says the CPU has AVX2 and FMA; the bounds were checked above.
            crate::simd::Level::Avx2 => return unsafe { x86::avx2(dims, dst, a, b) },
            crate::simd::Level::Portable => {}
        }
    }
    // The plain product adds the zero terms too (and off x86-64 it is the only path).
    let _ = zeros;
    strided_product(m, n, k, dst, dst_rs, a, b)
}

/// Which terms of a product are known zero because `a` is (block of) a causal matrix: the
/// attention probabilities P and their gradient dS are zero above the diagonal.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the x86-64 tiles read it
pub(crate) enum Zeros {
    /// None known.
    None,
    /// Row r of `a` is zero beyond column `diag + r`: P or dS for queries from `diag` on.
    After(usize),
    /// Row r of `a` is zero before column r: Pᵀ or dSᵀ from a diagonal element on.
    Before,
}

impl Zeros {
    /// The range of k a tile of rows r0..r1 sums over: every term outside it is zero.
    #[cfg(target_arch = "x86_64")]
    fn terms(self, k: usize, (r0, r1): (usize, usize)) -> (usize, usize) {
        match self {
            Zeros::None => (0, k),
            Zeros::After(diag) => (0, k.min(diag + r1)),
            Zeros::Before => (r0.min(k), k),
        }
    }
}

/// `dst (cols × rows, row-major) = srcᵀ` for `src` (rows × cols, row stride `rs`): a head's K
/// or V turned so that its rows (one per head dimension) are contiguous, for [`head_product`]'s
/// Q·Kᵀ and dO·Vᵀ. In 8 × 8 blocks, with AVX2 shuffles where the CPU has them (element by
/// element it cost a fifth of the products' time).
pub(crate) fn transpose(src: &[f32], rs: usize, rows: usize, cols: usize, dst: &mut [f32]) -> Result<()> {
    if !(View { data: src, rs, cs: 1 }).fits(rows, cols) || dst.len() < rows * cols {
        candle_core::bail!("transpose: a {rows}×{cols} matrix does not fit its slices");
    }
    let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        for r0 in (0..full_r).step_by(8) {
            for c0 in (0..full_c).step_by(8) {
                // SAFETY: the CPU has AVX2; the block's rows r0..r0+8 and columns c0..c0+8 lie
                // inside `src` (checked above) and its transpose inside `dst`.
                unsafe {
                    x86::transpose8(src.as_ptr().add(r0 * rs + c0), rs, dst.as_mut_ptr().add(c0 * rows + r0), rows)
                };
            }
        }
    } else {
        transpose_scalar(src, rs, (0, full_r), (0, full_c), rows, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    transpose_scalar(src, rs, (0, full_r), (0, full_c), rows, dst);
    // The edges outside whole blocks.
    transpose_scalar(src, rs, (full_r, rows), (0, cols), rows, dst);
    transpose_scalar(src, rs, (0, full_r), (full_c, cols), rows, dst);
    Ok(())
}

/// Rows r0..r1 × columns c0..c1 of [`transpose`], one element at a time.
fn transpose_scalar(
    src: &[f32],
    rs: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    rows: usize,
    dst: &mut [f32],
) {
    for r in r0..r1 {
        for c in c0..c1 {
            dst[c * rows + r] = src[r * rs + c];
        }
    }
}

/// A product's sizes, its destination's row stride and `a`'s known zeros (the tiles'
/// arguments, so x86-64 only).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    dst_rs: usize,
    zeros: Zeros,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use candle_core::Result;

    use super::Dims;
    use crate::linear_op::{strided_product, View};

    /// Rows per tile: 6 rows × 2 vectors = 12 accumulators, enough independent sums to hide the
    /// FMA latency on either core, with room left for `b`'s two vectors and the broadcast.
    const MR: usize = 6;

    /// Where one tile starts: `a`'s first row, `dst`'s first row, and `b`'s column; and the
    /// range of k its sums run over.
    struct At {
        a: *const f32,
        b: *const f32,
        dst: *mut f32,
        terms: std::ops::Range<usize>,
    }

    impl At {
        /// The tile at row r0, column c0 (pointers only; the kernels check nothing).
        fn new(d: &Dims, dst: &mut [f32], a: View, b: View, (r0, c0): (usize, usize)) -> At {
            let (lo, hi) = d.zeros.terms(d.k, (r0, (r0 + MR).min(d.m)));
            At {
                a: a.data.as_ptr().wrapping_add(r0 * a.rs),
                b: b.data.as_ptr().wrapping_add(c0),
                dst: dst.as_mut_ptr().wrapping_add(r0 * d.dst_rs + c0),
                terms: lo..hi,
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, and the views and `dst` hold the product (checked by the caller).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(d: Dims, dst: &mut [f32], a: View, b: View) {
        for c0 in (0..d.n).step_by(32) {
            let w = (d.n - c0).min(32);
            // Lanes of the strip's two vectors that hold columns (all but the last strip: all).
            let masks = [lanes(w.min(16)), lanes(w.saturating_sub(16))];
            for r0 in (0..d.m).step_by(MR) {
                let at = At::new(&d, dst, a, b, (r0, c0));
                // SAFETY: the tile's rows r0..r0+rows and columns c0..c0+w lie inside the checked
                // product; masked lanes are neither read nor written.
                unsafe {
                    match (d.m - r0).min(MR) {
                        6 => tile512::<6>(d, &at, a, b.rs, masks),
                        5 => tile512::<5>(d, &at, a, b.rs, masks),
                        4 => tile512::<4>(d, &at, a, b.rs, masks),
                        3 => tile512::<3>(d, &at, a, b.rs, masks),
                        2 => tile512::<2>(d, &at, a, b.rs, masks),
                        _ => tile512::<1>(d, &at, a, b.rs, masks),
                    }
                }
            }
        }
    }

    /// An 8 × 8 block at `src` (row stride `rs`) transposed into `dst` (row stride `ds`).
    ///
    /// # Safety
    /// The CPU has AVX2; eight rows of eight values at `src` and at `dst` are in bounds.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose8(src: *const f32, rs: usize, dst: *mut f32, ds: usize) {
        // SAFETY: the caller's bounds.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * rs)));
            // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped.
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = std::array::from_fn(|i| {
                let (g, j) = (i / 4 * 4, i % 4);
                let (a, b) = (t[g + j / 2], t[g + j / 2 + 2]);
                if j % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            for i in 0..8 {
                let (a, b) = (u[i % 4], u[i % 4 + 4]);
                let row =
                    if i < 4 { _mm256_permute2f128_ps::<0x20>(a, b) } else { _mm256_permute2f128_ps::<0x31>(a, b) };
                _mm256_storeu_ps(dst.add(i * ds), row);
            }
        }
    }

    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// # Safety
    /// As [`avx512`], for the R rows and the masks' columns at `at`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile512<const R: usize>(d: Dims, at: &At, a: View, b_rs: usize, [m0, m1]: [__mmask16; 2]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY (whole body): pointers stay inside the caller's checked extents; masked-off
        // lanes (beyond the product's columns) are not accessed.
        unsafe {
            for p in at.terms.clone() {
                let bp = at.b.wrapping_add(p * b_rs);
                let b0 = _mm512_maskz_loadu_ps(m0, bp);
                let b1 = _mm512_maskz_loadu_ps(m1, bp.wrapping_add(16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*at.a.add(r * a.rs + p * a.cs));
                    acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let out = at.dst.wrapping_add(r * d.dst_rs);
                _mm512_mask_storeu_ps(out, m0, acc[0]);
                _mm512_mask_storeu_ps(out.wrapping_add(16), m1, acc[1]);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA, and the views and `dst` hold the product (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(d: Dims, dst: &mut [f32], a: View, b: View) -> Result<()> {
        // Whole 8-column vectors only: AVX2's masked loads are microcoded on AMD. The columns
        // past the last multiple of 8 go to the gemm crate.
        let full = d.n / 8 * 8;
        for c0 in (0..full).step_by(16) {
            let two = full - c0 >= 16;
            for r0 in (0..d.m).step_by(MR) {
                let at = At::new(&d, dst, a, b, (r0, c0));
                // SAFETY: the tile's rows and its 8 or 16 columns lie inside the checked product.
                unsafe {
                    match ((d.m - r0).min(MR), two) {
                        (6, true) => tile256::<6, 2>(d, &at, a, b.rs),
                        (5, true) => tile256::<5, 2>(d, &at, a, b.rs),
                        (4, true) => tile256::<4, 2>(d, &at, a, b.rs),
                        (3, true) => tile256::<3, 2>(d, &at, a, b.rs),
                        (2, true) => tile256::<2, 2>(d, &at, a, b.rs),
                        (_, true) => tile256::<1, 2>(d, &at, a, b.rs),
                        (6, false) => tile256::<6, 1>(d, &at, a, b.rs),
                        (5, false) => tile256::<5, 1>(d, &at, a, b.rs),
                        (4, false) => tile256::<4, 1>(d, &at, a, b.rs),
                        (3, false) => tile256::<3, 1>(d, &at, a, b.rs),
                        (2, false) => tile256::<2, 1>(d, &at, a, b.rs),
                        (_, false) => tile256::<1, 1>(d, &at, a, b.rs),
                    }
                }
            }
        }
        if full == d.n {
            return Ok(());
        }
        let b_tail = View { data: &b.data[full..], ..b };
        strided_product(d.m, d.n - full, d.k, &mut dst[full..], d.dst_rs, a, b_tail)
    }

    /// # Safety
    /// As [`avx2`], for the R rows and V·8 columns at `at`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile256<const R: usize, const V: usize>(d: Dims, at: &At, a: View, b_rs: usize) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        // SAFETY (whole body): pointers stay inside the caller's checked extents.
        unsafe {
            for p in at.terms.clone() {
                let bp = at.b.add(p * b_rs);
                let mut bv = [_mm256_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm256_loadu_ps(bp.add(8 * v));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*at.a.add(r * a.rs + p * a.cs));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm256_fmadd_ps(x, bv, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let out = at.dst.add(r * d.dst_rs);
                for (v, &c) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add(8 * v), c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    /// Every tile size and column tail, `a` row-major and transposed, with and without known
    /// zeros, against the plain strided product (at whatever level this process runs; the
    /// models' per-level test covers the others through the attention block). With zeros, `a`
    /// has exactly the zeros declared: a tile that skipped one more term would differ.
    #[test]
    fn tiles_compute_what_the_gemm_computes() {
        for (m, n, k) in [(1, 1, 1), (32, 32, 128), (13, 40, 7), (7, 17, 33), (6, 64, 5), (5, 3, 9), (32, 96, 32)] {
            let cases = [Zeros::None, Zeros::After(0), Zeros::After(3), Zeros::Before];
            for (a_t, zeros) in [false, true].into_iter().flat_map(|t| cases.map(|z| (t, z))) {
                let mut a_data = values(m * k + 3, 1);
                let (rs, cs) = if a_t { (1, m) } else { (k, 1) };
                for (r, p) in (0..m).flat_map(|r| (0..k).map(move |p| (r, p))) {
                    let zero = match zeros {
                        Zeros::None => false,
                        Zeros::After(diag) => p > diag + r,
                        Zeros::Before => p < r,
                    };
                    if zero {
                        a_data[r * rs + p * cs] = 0.0;
                    }
                }
                let a = View { data: &a_data, rs, cs };
                let b_data = values(k * (n + 2), 2);
                let b = View { data: &b_data, rs: n + 2, cs: 1 };
                let dst_rs = n + 5;
                let start = values(m * dst_rs, 3);
                let (mut ours, mut want) = (start.clone(), start.clone());
                head_product(m, n, k, &mut ours, dst_rs, a, b, zeros).unwrap();
                strided_product(m, n, k, &mut want, dst_rs, a, b).unwrap();
                for (i, (x, y)) in ours.iter().zip(&want).enumerate() {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{m}×{n}×{k} {zeros:?} at {i}: {x} vs {y}");
                }
                // Columns beyond n in each destination row are left alone.
                for r in 0..m {
                    assert_eq!(ours[r * dst_rs + n..(r + 1) * dst_rs], start[r * dst_rs + n..(r + 1) * dst_rs]);
                }
            }
        }
    }

    #[test]
    fn transpose_turns_a_strided_matrix() {
        // Whole 8 × 8 blocks and both edges.
        let src = values(19 * 20, 4);
        for (rows, cols) in [(19, 13), (16, 8), (3, 5)] {
            let mut dst = vec![0f32; rows * cols];
            transpose(&src, 20, rows, cols, &mut dst).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * 20 + c], "{rows}×{cols} at ({r}, {c})");
                }
            }
        }
        assert!(transpose(&src, 20, 20, 13, &mut vec![0f32; 20 * 13]).is_err());
    }

    #[test]
    fn views_too_small_are_refused() {
        let (a, b) = (vec![0f32; 16], vec![0f32; 16]);
        let mut dst = vec![0f32; 16];
        let view = |d| View { data: d, rs: 4, cs: 1 };
        assert!(head_product(4, 4, 5, &mut dst, 4, view(&a), view(&b), Zeros::None).is_err());
        assert!(head_product(4, 4, 4, &mut dst[..15], 4, view(&a), view(&b), Zeros::None).is_err());
        assert!(head_product(4, 4, 4, &mut dst, 4, view(&a), view(&b), Zeros::None).is_ok());
    }
}
