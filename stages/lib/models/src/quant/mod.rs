//! Weight-only integer quantization with integer matmuls.
//!
//! - INT8: symmetric, one f32 scale per output channel (row), values in [-127, 127].
//! - INT4: symmetric blocks of `group` weights along the input dimension (a multiple of 32), one
//!   scale per block, values in [-7, 7]. Scales are rounded to f16 because the on-disk format is
//!   GGUF `Q4_0` (f16 scale + 32 nibbles per block), so memory and file give the same numbers.
//!
//! The matmul quantizes each activation row on the fly to int8 (symmetric, per row) and
//! accumulates int8·int8 products in i32, so inference never dequantizes a weight matrix to f32:
//! AVX-512 VNNI or AVX2 kernels on the weights re-laid out in 16-row panels ([`panels`]), or a
//! portable loop on the row-major weights whose results they are tested against.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

mod panels;
mod rows;
#[cfg(target_arch = "x86_64")]
mod x86;

use panels::{Panels, Rows, PANEL};
pub use rows::{quantize_padded_row, quantize_row, quantize_row_portable, QuantRows};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Int8,
    Int4,
}

impl Scheme {
    pub fn max_level(self) -> i32 {
        match self {
            Scheme::Int8 => 127,
            Scheme::Int4 => 7,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Int8 => "int8",
            Scheme::Int4 => "int4",
        }
    }
}

/// A quantized (rows × cols) weight matrix, row-major, used as `x @ Wᵀ`.
#[derive(Clone, Debug, PartialEq)]
pub struct QWeight {
    pub scheme: Scheme,
    pub rows: usize,
    pub cols: usize,
    /// Weights per scale along a row: `cols` for INT8 (per channel), the block size for INT4.
    pub group: usize,
    /// One value per weight, in [-max_level, max_level].
    pub q: Vec<i8>,
    /// rows × (cols / group) scales.
    pub scales: Vec<f32>,
    /// `q` and `scales` re-laid out for the SIMD kernels (see [`panels`]). Derived from them.
    panels: Panels,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("INT4 group size must be a positive multiple of 32 (the GGUF Q4_0 block), got {0}")]
    BadGroup(usize),
    #[error("tensor `{name}` has {cols} input columns, not a multiple of the INT4 group size {group}")]
    Indivisible { name: String, cols: usize, group: usize },
}

impl QWeight {
    /// Quantize a row-major (rows × cols) f32 matrix.
    pub fn quantize(
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        scheme: Scheme,
        group_size: usize,
    ) -> std::result::Result<QWeight, QuantError> {
        let group = match scheme {
            Scheme::Int8 => cols,
            Scheme::Int4 => {
                if group_size == 0 || !group_size.is_multiple_of(32) {
                    return Err(QuantError::BadGroup(group_size));
                }
                if !cols.is_multiple_of(group_size) {
                    return Err(QuantError::Indivisible { name: name.to_string(), cols, group: group_size });
                }
                group_size
            }
        };
        let max = scheme.max_level() as f32;
        let mut q = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(rows * cols / group);
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (g, block) in row.chunks_exact(group).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut scale = amax / max;
                if scheme == Scheme::Int4 {
                    scale = half::f16::from_f32(scale).to_f32();
                }
                scales.push(scale);
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (i, v) in block.iter().enumerate() {
                    q[r * cols + g * group + i] = (v * inv).round().clamp(-max, max) as i8;
                }
            }
        }
        Ok(QWeight::new(scheme, rows, cols, group, q, scales))
    }

    /// From stored parts (`q.len() == rows·cols`, one scale per row and group).
    pub fn new(scheme: Scheme, rows: usize, cols: usize, group: usize, q: Vec<i8>, scales: Vec<f32>) -> QWeight {
        let panels = Panels::pack(&q, &scales, rows, cols, group);
        QWeight { scheme, rows, cols, group, q, scales, panels }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let groups = self.cols / self.group;
        self.q
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * self.scales[(i / self.cols) * groups + (i % self.cols) / self.group])
            .collect()
    }

    /// Bytes this matrix takes on disk: INT8 = 1 byte per weight + an f32 scale per row;
    /// INT4 = GGUF Q4_0, 18 bytes per 32 weights.
    pub fn stored_bytes(&self) -> usize {
        match self.scheme {
            Scheme::Int8 => self.q.len() + 4 * self.rows,
            Scheme::Int4 => self.q.len() / 32 * 18,
        }
    }

    /// `x @ Wᵀ` for `m` rows of `x` (m × cols, row-major) → m × rows.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_t_with(crate::simd::active(), x, m)
    }

    /// [`QWeight::matmul_t`] with a chosen kernel.
    ///
    /// # Panics
    /// If this CPU cannot run `kernel` (see [`Kernel::supported`]) or `x` holds fewer than
    /// `m` rows.
    pub fn matmul_t_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_t_rows(&self.quantize_rows(kernel, x, m))
    }

    /// The first `m` rows of `x` quantized for this matrix's products on `kernel`.
    ///
    /// # Panics
    /// If `x` holds fewer than `m` rows of `cols`.
    pub fn quantize_rows(&self, kernel: Kernel, x: &[f32], m: usize) -> QuantRows {
        assert!(x.len() >= m * self.cols, "qmatmul: {} activations for {m} rows of {}", x.len(), self.cols);
        QuantRows::new(kernel, self.cols, &x[..m * self.cols])
    }

    /// `x @ Wᵀ` for rows already quantized (for this matrix or any other of as many columns).
    ///
    /// # Panics
    /// If the rows are not `cols` wide or were quantized for a kernel this CPU lacks.
    pub fn matmul_t_rows(&self, x: &QuantRows) -> Vec<f32> {
        self.product(x, &[0, self.rows]).pop().unwrap_or_default()
    }

    /// [`QWeight::matmul_t`] with its outputs in two matrices, columns `..at` and `at..` (what
    /// a projection to two concatenated halves needs), written in place, not copied apart.
    pub fn matmul_t_split(&self, x: &[f32], m: usize, at: usize) -> (Vec<f32>, Vec<f32>) {
        self.matmul_t_split_rows(&self.quantize_rows(crate::simd::active(), x, m), at)
    }

    /// [`QWeight::matmul_t_split`] for rows already quantized.
    pub fn matmul_t_split_rows(&self, x: &QuantRows, at: usize) -> (Vec<f32>, Vec<f32>) {
        let at = at.min(self.rows);
        let mut parts = if at.is_multiple_of(PANEL) {
            self.product(x, &[0, at, self.rows])
        } else {
            // The panel kernels write whole panels: split a full product instead.
            let full = self.matmul_t_rows(x);
            let n = self.rows.max(1);
            let half =
                |r: std::ops::Range<usize>| full.chunks_exact(n).flat_map(|row| &row[r.clone()]).copied().collect();
            vec![half(0..at), half(at..self.rows)]
        };
        let second = parts.pop().unwrap_or_default();
        (parts.pop().unwrap_or_default(), second)
    }

    /// Rows `x` fit this matrix, on a kernel this CPU has.
    fn check_rows(&self, x: &QuantRows) {
        let kernel = x.kernel;
        assert!(kernel <= crate::simd::cpu(), "the {} kernel needs a CPU that has it", kernel.name());
        assert_eq!(x.cols, self.cols, "qmatmul: activation rows of {} for a weight of {} columns", x.cols, self.cols);
    }

    /// The product's columns in parts: part i is m × (cuts[i+1] − cuts[i]). For the panel
    /// kernels every cut but the last is a multiple of 16.
    fn product(&self, x: &QuantRows, cuts: &[usize]) -> Vec<Vec<f32>> {
        self.check_rows(x);
        let m = x.len();
        cuts.windows(2)
            .map(|w| {
                let width = w[1] - w[0];
                // Every one of the m·width outputs is written exactly once by either path (the
                // tiles cover all rows and all the panels' real columns): no zeroing first.
                let mut out: Vec<f32> = Vec::with_capacity(m * width);
                let spare = &mut out.spare_capacity_mut()[..m * width];
                self.product_into(x, w[0]..w[1], None, (spare, width));
                // SAFETY: all m·width values were initialized just above (tested against the
                // portable loop on partial tiles, split outputs and both threaded splits).
                unsafe { out.set_len(m * width) };
                out
            })
            .collect()
    }

    /// `base + x @ Wᵀ` (base: m × rows) into a fresh matrix: a residual projection, whose
    /// kernels add the base as they store, with no copy of it to add into.
    ///
    /// # Panics
    /// If `base` or `x` hold fewer than `m` rows.
    pub fn matmul_t_plus(&self, x: &[f32], m: usize, base: &[f32]) -> Vec<f32> {
        self.matmul_t_plus_rows(&self.quantize_rows(crate::simd::active(), x, m), base)
    }

    /// [`QWeight::matmul_t_plus`] for rows already quantized.
    ///
    /// # Panics
    /// As [`QWeight::matmul_t_rows`], or if `base` holds fewer values than the product.
    pub fn matmul_t_plus_rows(&self, x: &QuantRows, base: &[f32]) -> Vec<f32> {
        let n = x.len() * self.rows;
        assert!(base.len() >= n, "qmatmul: a base of {} values for {} rows of {}", base.len(), x.len(), self.rows);
        let mut out = Vec::with_capacity(n);
        self.product_rows(x, Some(&base[..n]), (&mut out.spare_capacity_mut()[..n], self.rows));
        // SAFETY: product_rows wrote every one of the m × rows outputs (tested against the
        // portable loop on partial tiles and both threaded splits).
        unsafe { out.set_len(n) };
        out
    }

    /// `x @ Wᵀ` for `m` rows of `x` into the first `rows` slots of each of m rows of `out`,
    /// `ldo` slots apart; the slots after them are left as they are. Where the product is one
    /// part of a wider row (Δ's projection beside B·x in the SSM block), this spares a copy.
    ///
    /// # Panics
    /// If `ldo` is below the product's width, or `x` or `out` hold fewer than `m` rows.
    pub fn matmul_t_into(&self, x: &[f32], m: usize, out: &mut [MaybeUninit<f32>], ldo: usize) {
        self.product_rows(&self.quantize_rows(crate::simd::active(), x, m), None, (out, ldo))
    }

    /// The whole product (plus `base`, laid out as `out`) into the first `rows` slots of m rows
    /// of `ldo`.
    fn product_rows(&self, x: &QuantRows, base: Option<&[f32]>, (out, ldo): (&mut [MaybeUninit<f32>], usize)) {
        self.check_rows(x);
        let m = x.len();
        assert!(ldo >= self.rows && out.len() >= m * ldo, "qmatmul: {} slots for {m} rows of {ldo}", out.len());
        assert!(
            base.is_none_or(|b| b.len() >= (m.max(1) - 1) * ldo + self.rows),
            "qmatmul: a base shorter than the output"
        );
        self.product_into(x, 0..self.rows, base, (&mut out[..m * ldo], ldo));
    }

    /// Columns `cols` of the product of the quantized activation rows `x` into `out`, m rows of
    /// `ldo` slots whose first cols.len() take the product (plus `base`, laid out as `out`).
    fn product_into(
        &self,
        x: &QuantRows,
        cols: std::ops::Range<usize>,
        base: Option<&[f32]>,
        (out, ldo): (&mut [MaybeUninit<f32>], usize),
    ) {
        if x.kernel == Kernel::Portable {
            self.matmul_portable(x.view(), (cols.start, cols.len()), base, (out, ldo));
        } else {
            let panels = cols.start / PANEL..cols.end.div_ceil(PANEL);
            self.panels.matmul(x.kernel, x.view(), (panels, cols.len()), base, (out, ldo));
        }
    }

    /// Columns `first..first + width` of the product (plus `base`, laid out as `out`) into the
    /// first `width` slots of each of `out`'s rows of `ldo`.
    fn matmul_portable(
        &self,
        x: Rows,
        (first, width): (usize, usize),
        base: Option<&[f32]>,
        (out, ldo): (&mut [MaybeUninit<f32>], usize),
    ) {
        let Rows { q: xq, stride, scales: sx } = x;
        let k = self.cols;
        assert!(ldo >= width, "qmatmul: rows of {ldo} slots for {width} columns");
        if width == 0 {
            return;
        }
        let row = |(i, ((xr, s), or)): RowJob| {
            let b = base.map(|b| &b[i * ldo..i * ldo + width]);
            self.rows_times_portable(&xr[..k], *s, first, b, &mut or[..width])
        };
        if rayon::current_num_threads() == 1 || sx.len() * width * k < 1 << 18 {
            xq.chunks_exact(stride).zip(sx).zip(out.chunks_mut(ldo)).enumerate().for_each(row);
        } else {
            xq.par_chunks_exact(stride).zip(sx).zip(out.par_chunks_mut(ldo)).enumerate().for_each(row);
        }
    }

    /// out[j] = (x · W[first + j]) · sx (with a `base`: base[j] + …), one scale group at a time,
    /// in the same order of float operations as the SIMD kernels, which it therefore matches.
    fn rows_times_portable(
        &self,
        xq: &[i8],
        sx: f32,
        first: usize,
        base: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let k = self.cols;
        let groups = k / self.group;
        for (j, (r, o)) in (first..).zip(out.iter_mut()).enumerate() {
            let w = &self.q[r * k..(r + 1) * k];
            let s = &self.scales[r * groups..(r + 1) * groups];
            let mut acc = 0f32;
            for (g, &sw) in s.iter().enumerate() {
                let span = g * self.group..(g + 1) * self.group;
                acc = (dot_i8_portable(&xq[span.clone()], &w[span]) as f32).mul_add(sw, acc);
            }
            o.write(base.map_or(acc * sx, |b| b[j] + acc * sx));
        }
    }
}

/// The portable loop's unit of work: row i's quantized activations and scale, and its outputs.
type RowJob<'a> = (usize, ((&'a [i8], &'a f32), &'a mut [MaybeUninit<f32>]));

/// Which integer kernel runs: the SIMD level (see [`crate::simd`]).
pub use crate::simd::Level as Kernel;

/// Σ a·b over int8 vectors in i32.
pub fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// candle op: `x @ Wᵀ` with a quantized W (inference only, no gradient).
pub struct QMatMul<'a>(pub &'a QWeight);

impl candle_core::CustomOp1 for QMatMul<'_> {
    fn name(&self) -> &'static str {
        "qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("qmatmul: expected f32 activations") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("qmatmul: activations must be contiguous")
        };
        let dims = layout.dims();
        let k = dims[dims.len() - 1];
        if k != self.0.cols {
            candle_core::bail!("qmatmul: activations have {k} features, the weight expects {}", self.0.cols);
        }
        let m = (end - start) / k;
        let out = self.0.matmul_t(&data[start..end], m);
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(self.0.rows);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

pub fn qmatmul_t(x: &Tensor, w: &QWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QMatMul(w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_per_block() {
        let (rows, cols) = (24, 128);
        let w = random(rows * cols, 1);
        for (scheme, group) in [(Scheme::Int8, 0), (Scheme::Int4, 32), (Scheme::Int4, 64)] {
            let q = QWeight::quantize("w", &w, rows, cols, scheme, group).unwrap();
            let back = q.dequantize();
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let s = q.scales[(i / cols) * (cols / q.group) + (i % cols) / q.group];
                // Half a quantization step, plus f16 rounding of the INT4 scale (≤ 2^-11 relative
                // on each level, at most 7 levels).
                let bound = 0.5 * s * 1.0001 + if scheme == Scheme::Int4 { 7.0 * s / 2048.0 } else { 0.0 };
                assert!((a - b).abs() <= bound, "{scheme:?} g{group} at {i}: {a} vs {b} (bound {bound})");
            }
            assert!(q.q.iter().all(|&v| (v as i32).abs() <= scheme.max_level()));
        }
    }

    #[test]
    fn int4_group_must_divide_and_be_a_multiple_of_32() {
        let w = random(4 * 96, 2);
        assert!(matches!(QWeight::quantize("w", &w, 4, 96, Scheme::Int4, 16), Err(QuantError::BadGroup(16))));
        assert!(matches!(QWeight::quantize("w", &w, 4, 96, Scheme::Int4, 64), Err(QuantError::Indivisible { .. })));
    }

    /// Every kernel this CPU supports gives the portable loop's results bit for bit: the integer
    /// sums are exact and the scales are applied in the same order. The shapes cover partial
    /// tiles (rows not a multiple of 4, outputs not of 16), columns not a multiple of 4 (INT8),
    /// several scale groups (INT4), extreme activations (±127 everywhere), and the threaded
    /// splits by rows (forward) and by panels (generation).
    #[test]
    fn every_kernel_this_cpu_has_agrees_with_the_portable_one() {
        let simd: Vec<Kernel> = Kernel::supported().into_iter().filter(|&k| k != Kernel::Portable).collect();
        eprintln!("kernels compared with the portable one on this CPU: {simd:?}");
        let shapes = [(7, 37, 128), (1, 300, 96), (13, 64, 130), (64, 160, 512), (2, 512, 256)];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            let x = random(m * k, 6 + case as u64);
            let w = random(n * k, 20 + case as u64);
            let mut x_extreme = x.clone();
            x_extreme[..k].iter_mut().for_each(|v| *v = if *v > 0.0 { 1.0 } else { -1.0 });
            for (scheme, group) in [(Scheme::Int8, 0), (Scheme::Int4, 32), (Scheme::Int4, 64)] {
                let Ok(q) = QWeight::quantize("w", &w, n, k, scheme, group) else { continue };
                for xs in [&x, &x_extreme] {
                    let reference = q.matmul_t_with(Kernel::Portable, xs, m);
                    // Split outputs (two parts written in place) are the same columns.
                    let cut = (n / 2) / PANEL * PANEL;
                    for kernel in std::iter::once(Kernel::Portable).chain(simd.iter().copied()) {
                        let parts = q.product(&q.quantize_rows(kernel, xs, m), &[0, cut, n]);
                        let joined: Vec<f32> = parts[0]
                            .chunks(cut.max(1))
                            .zip(parts[1].chunks(n - cut))
                            .flat_map(|(a, b)| a.iter().chain(b))
                            .copied()
                            .collect();
                        assert_eq!(joined, reference, "{kernel:?} {scheme:?} {m}x{n}x{k} split at {cut}");
                    }
                    // Plus a base (a residual): the same values plus the base's.
                    let base = random(m * n, 99);
                    let want: Vec<f32> = base.iter().zip(&reference).map(|(a, b)| a + b).collect();
                    for kernel in std::iter::once(Kernel::Portable).chain(simd.iter().copied()) {
                        let got = q.matmul_t_plus_rows(&q.quantize_rows(kernel, xs, m), &base);
                        assert_eq!(got, want, "{kernel:?} {scheme:?} {m}x{n}x{k} plus a base");
                        let got = pool.install(|| q.matmul_t_plus_rows(&q.quantize_rows(kernel, xs, m), &base));
                        assert_eq!(got, want, "{kernel:?} {scheme:?} {m}x{n}x{k} plus a base, 3 threads");
                    }
                    // Into rows wider than the product: its columns first (alone, or plus a base
                    // laid out alike), the rest untouched.
                    let ldo = n + 3;
                    let wide_base = random(m * ldo, 98);
                    for kernel in std::iter::once(Kernel::Portable).chain(simd.iter().copied()) {
                        for (threads, with_base) in [(1, false), (3, false), (1, true), (3, true)] {
                            let mut out = vec![MaybeUninit::new(-7f32); m * ldo];
                            let rows = q.quantize_rows(kernel, xs, m);
                            let base = with_base.then_some(&wide_base[..]);
                            if threads == 1 {
                                q.product_rows(&rows, base, (&mut out, ldo))
                            } else {
                                pool.install(|| q.product_rows(&rows, base, (&mut out, ldo)))
                            }
                            // SAFETY: every slot was initialized to −7 and only values are written.
                            let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                            let rows_of =
                                got.chunks_exact(ldo).zip(reference.chunks_exact(n)).zip(wide_base.chunks_exact(ldo));
                            for ((row, want), b) in rows_of {
                                let want: Vec<f32> =
                                    want.iter().zip(b).map(|(v, b)| if with_base { b + v } else { *v }).collect();
                                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(&row[..n]),
                                    bits(&want),
                                    "{kernel:?} {scheme:?} {m}x{n}x{k} into rows of {ldo}, {threads} threads, base: {with_base}"
                                );
                                assert_eq!(&row[n..], &[-7.0; 3], "{kernel:?} {scheme:?} past the product's columns");
                            }
                        }
                    }
                    let (a, b) = q.matmul_t_split(xs, m, 20);
                    assert_eq!((a.len(), b.len()), (20 * m, (n - 20) * m), "an unaligned split");
                    for &kernel in &simd {
                        let one = q.matmul_t_with(kernel, xs, m);
                        let three = pool.install(|| q.matmul_t_with(kernel, xs, m));
                        for (got, threads) in [(one, 1), (three, 3)] {
                            let first = reference.iter().zip(&got).position(|(a, b)| a.to_bits() != b.to_bits());
                            assert!(
                                first.is_none(),
                                "{kernel:?} {scheme:?} g{group} {m}x{n}x{k} {threads} threads: at {first:?} {:?} vs {:?}",
                                first.map(|i| reference[i]),
                                first.map(|i| got[i])
                            );
                        }
                    }
                }
            }
        }
        for len in [8, 40, 48, 64, 520, 528] {
            let (mut xq, mut xp) = (vec![0i8; len], vec![0i8; len]);
            let mut v = random(len, 8 + len as u64);
            v[len / 2] = -2.0; // the row's extreme: exactly −127
            v[1] = 2.0 * 126.5 / 127.0; // a tie that rounds to even (126)
            assert_eq!(quantize_row(&v, &mut xq), quantize_row_portable(&v, &mut xp), "length {len}");
            assert_eq!(xq, xp, "length {len}");
        }
    }

    /// The largest integer sums the kernels meet: every weight and activation at its extreme,
    /// one sign or mixed, over groups of 32 and 64 (INT4) and whole rows (INT8) — where a kernel
    /// summing in 16-bit lanes for too many steps would overflow — on every kernel this CPU has.
    #[test]
    fn extreme_weights_and_activations_agree_on_every_kernel() {
        let (m, n, k) = (5, 32, 256);
        let signs = |i: usize, mode: usize| match mode {
            0 => 1.0,
            1 => -1.0,
            _ => {
                if (i / 3).is_multiple_of(2) {
                    1.0
                } else {
                    -1.0
                }
            }
        };
        for (scheme, group) in [(Scheme::Int8, 0), (Scheme::Int4, 32), (Scheme::Int4, 64)] {
            for wm in 0..3 {
                let w: Vec<f32> = (0..n * k).map(|i| signs(i % k, wm)).collect();
                let q = QWeight::quantize("w", &w, n, k, scheme, group).unwrap();
                for xm in 0..3 {
                    let x: Vec<f32> = (0..m * k).map(|i| signs(i % k, xm)).collect();
                    let reference = q.matmul_t_with(Kernel::Portable, &x, m);
                    // The exact sums: ±max_level · 127 · (k / group) per group, times the scales.
                    if wm == xm && wm < 2 {
                        assert!(reference.iter().all(|&v| (v - k as f32).abs() <= 1e-3 * k as f32), "{scheme:?}");
                    }
                    for kernel in Kernel::supported() {
                        let got = q.matmul_t_with(kernel, &x, m);
                        assert_eq!(got, reference, "{kernel:?} {scheme:?} weights {wm} activations {xm}");
                    }
                }
            }
        }
    }

    /// Rows quantized once and gathered (what each expert takes) give the product of the
    /// gathered f32 rows bit for bit, whole or split, on every kernel this CPU has.
    #[test]
    fn gathered_quantized_rows_are_the_gathered_rows_quantized() {
        let (m, n, k) = (23, 48, 100);
        let x = random(m * k, 31);
        let w = random(n * k, 32);
        let pick = [22usize, 0, 5, 5, 17, 3, 9];
        let gathered: Vec<f32> = pick.iter().flat_map(|&r| x[r * k..(r + 1) * k].to_vec()).collect();
        for scheme in [Scheme::Int8, Scheme::Int4] {
            let Ok(q) = QWeight::quantize("w", &w, n, k, scheme, 32) else { continue };
            for kernel in Kernel::supported() {
                let all = q.quantize_rows(kernel, &x, m);
                assert_eq!((all.len(), all.kernel()), (m, kernel));
                let some = all.gather(&pick);
                assert_eq!(some, QuantRows::new(kernel, k, &gathered), "{kernel:?}: the rows themselves");
                let want = q.matmul_t_with(kernel, &gathered, pick.len());
                assert_eq!(q.matmul_t_rows(&some), want, "{kernel:?} {scheme:?}");
                let (a, b) = q.matmul_t_split_rows(&some, 16);
                let joined: Vec<f32> =
                    a.chunks(16).zip(b.chunks(n - 16)).flat_map(|(a, b)| a.iter().chain(b)).copied().collect();
                assert_eq!(joined, want, "{kernel:?} {scheme:?} split");
            }
            let narrow = QuantRows::new(Kernel::Portable, k - 4, &x[..(k - 4) * 3]);
            let refused = std::panic::catch_unwind(|| q.matmul_t_rows(&narrow));
            assert!(refused.is_err(), "rows of another width are refused");
        }
    }

    #[test]
    fn quantized_matmul_is_close_to_f32() {
        let (m, n, k) = (33, 40, 256);
        let x = random(m * k, 4);
        let w = random(n * k, 5);
        let exact: Vec<f32> = (0..m)
            .flat_map(|i| (0..n).map(|j| (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f32>()).collect::<Vec<_>>())
            .collect();
        // Expected relative RMS error: INT8 ≈ 0.5 %, INT4 (steps of amax/7) ≈ 7 %.
        for (scheme, tol) in [(Scheme::Int8, 0.01), (Scheme::Int4, 0.1)] {
            let q = QWeight::quantize("w", &w, n, k, scheme, 32).unwrap();
            let got = q.matmul_t(&x, m);
            let rms = |v: &mut dyn Iterator<Item = f32>| {
                let (s, n) = v.fold((0f32, 0usize), |(s, n), x| (s + x * x, n + 1));
                (s / n as f32).sqrt()
            };
            let scale = rms(&mut exact.iter().copied());
            let err = rms(&mut exact.iter().zip(&got).map(|(a, b)| a - b));
            assert!(err / scale < tol, "{scheme:?}: rms error {err}, rms {scale}");
            // The same as multiplying the dequantized weight by the quantized activations.
            let deq = q.dequantize();
            for i in 0..m {
                let mut xq = vec![0i8; k];
                let sx = quantize_row(&x[i * k..(i + 1) * k], &mut xq);
                for j in 0..n {
                    let r: f32 = (0..k).map(|t| xq[t] as f32 * sx * deq[j * k + t]).sum();
                    assert!(
                        (r - got[i * n + j]).abs() <= 1e-3 * (1.0 + r.abs()),
                        "{scheme:?} ({i},{j}): {r} vs {}",
                        got[i * n + j]
                    );
                }
            }
        }
    }
}
