//! Weight-only integer quantization with integer matmuls.
//!
//! - INT8: symmetric, one f32 scale per output channel (row), values in [-127, 127].
//! - INT4: symmetric blocks of `group` weights along the input dimension (a multiple of 32), one
//!   scale per block, values in [-7, 7]. Scales are rounded to f16 because the on-disk format is
//!   GGUF `Q4_0` (f16 scale + 32 nibbles per block), so memory and file give the same numbers.
//!
//! The matmul quantizes each activation row on the fly to int8 (symmetric, per row) and
//! accumulates int8·int8 products in i32 — with AVX2 when the CPU has it, otherwise a portable
//! loop with identical results — so inference never dequantizes a weight matrix to f32.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
    /// Σ q per (row, group): the VNNI kernel feeds activations offset by +128 and subtracts
    /// 128·Σq afterwards. Derived from `q`.
    wsum: Vec<i32>,
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
        let wsum = q.chunks(group.max(1)).map(|b| b.iter().map(|&v| v as i32).sum()).collect();
        QWeight { scheme, rows, cols, group, q, scales, wsum }
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
        self.matmul_t_with(Kernel::detect(self.group), x, m)
    }

    /// [`QWeight::matmul_t`] with a chosen kernel; `kernel` must be one `Kernel::detect` allows
    /// on this CPU (or `Portable`).
    pub fn matmul_t_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.cols, self.rows);
        let mut xq = vec![0i8; m * k];
        let mut sx = vec![0f32; m];
        for ((xr, qr), s) in x.chunks_exact(k).zip(xq.chunks_exact_mut(k)).zip(sx.iter_mut()) {
            *s = quantize_row(xr, qr);
        }
        let mut out = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let row = |((xr, s), or): ((&[i8], &f32), &mut [f32])| self.rows_times(kernel, xr, *s, 0, or);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni && m >= 4 {
            // Four activation rows per pass: each weight chunk loaded once feeds four rows.
            let quad = |((xr, s), or): ((&[i8], &[f32]), &mut [f32])| {
                if s.len() == 4 {
                    // SAFETY: the CPU features were detected in `Kernel::detect`; xr holds 4·k
                    // bytes, s four scales, or 4·n outputs.
                    let done = unsafe { self.rows4_times_vnni(xr, s, or) };
                    for ((x1, &s1), o1) in xr.chunks_exact(k).zip(s).zip(or.chunks_exact_mut(n)) {
                        self.rows_times(kernel, x1, s1, done, &mut o1[done..]);
                    }
                } else {
                    xr.chunks_exact(k).zip(s).zip(or.chunks_exact_mut(n)).for_each(row);
                }
            };
            if threads == 1 || m * n * k < 1 << 18 {
                xq.chunks(4 * k).zip(sx.chunks(4)).zip(out.chunks_mut(4 * n)).for_each(quad);
            } else {
                xq.par_chunks(4 * k).zip(sx.par_chunks(4)).zip(out.par_chunks_mut(4 * n)).for_each(quad);
            }
            return out;
        }
        if threads == 1 || m * n * k < 1 << 18 {
            xq.chunks_exact(k).zip(&sx).zip(out.chunks_exact_mut(n)).for_each(row);
        } else if m >= 2 * threads {
            xq.par_chunks_exact(k).zip(&sx).zip(out.par_chunks_exact_mut(n)).for_each(row);
        } else {
            // Few rows (generation): split the output channels instead.
            for ((xr, s), or) in xq.chunks_exact(k).zip(&sx).zip(out.chunks_exact_mut(n)) {
                let chunk = n.div_ceil(threads).next_multiple_of(4);
                or.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| self.rows_times(kernel, xr, *s, c * chunk, o));
            }
        }
        out
    }

    /// out[j] = (x · W[first + j]) · sx for j in 0..out.len().
    fn rows_times(&self, kernel: Kernel, xq: &[i8], sx: f32, first: usize, out: &mut [f32]) {
        let done = match kernel {
            // SAFETY (both): the CPU features were detected in `Kernel::detect`; the kernels read
            // rows first..first+4·⌊len/4⌋ of `q` and `cols` bytes of `xq`, which exist.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { self.rows_times_vnni(xq, sx, first, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { self.rows_times_avx2(xq, sx, first, out) },
            Kernel::Portable => 0,
        };
        self.rows_times_portable(xq, sx, first + done, &mut out[done..])
    }

    fn rows_times_portable(&self, xq: &[i8], sx: f32, first: usize, out: &mut [f32]) {
        let k = self.cols;
        let groups = k / self.group;
        for (j, o) in out.iter_mut().enumerate() {
            let r = first + j;
            let w = &self.q[r * k..(r + 1) * k];
            let s = &self.scales[r * groups..(r + 1) * groups];
            let mut acc = 0f32;
            for (g, &sw) in s.iter().enumerate() {
                let span = g * self.group..(g + 1) * self.group;
                acc += sw * dot_i8_portable(&xq[span.clone()], &w[span]) as f32;
            }
            *o = acc * sx;
        }
    }

    /// AVX2: four weight rows per pass so each activation chunk is loaded and made absolute
    /// once. Returns how many leading outputs it filled (a multiple of 4).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_times_avx2(&self, xq: &[i8], sx: f32, first: usize, out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let k = self.cols;
        let groups = k / self.group;
        let per_group = self.group / 32;
        let ones = _mm256_set1_epi16(1);
        let blocks = out.len() / 4;
        assert!(xq.len() >= k && (first + 4 * blocks) * k <= self.q.len());
        let xp = xq.as_ptr();
        for blk in 0..blocks {
            let r = first + 4 * blk;
            let wp = [0, 1, 2, 3].map(|t| self.q[(r + t) * k..].as_ptr());
            let mut facc = [_mm256_setzero_ps(); 4];
            for g in 0..groups {
                let mut iacc = [_mm256_setzero_si256(); 4];
                for c in 0..per_group {
                    let off = (g * per_group + c) * 32;
                    // SAFETY: off + 32 ≤ k, inside the activation row and each weight row.
                    let vx = unsafe { _mm256_loadu_si256(xp.add(off) as *const __m256i) };
                    // maddubs multiplies unsigned by signed bytes: move x's sign onto w. Pairs sum
                    // to at most 2·127·127 < i16::MAX (no -128 anywhere), so nothing saturates.
                    let ax = _mm256_sign_epi8(vx, vx);
                    for t in 0..4 {
                        let vw = unsafe { _mm256_loadu_si256(wp[t].add(off) as *const __m256i) };
                        let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(vw, vx));
                        iacc[t] = _mm256_add_epi32(iacc[t], _mm256_madd_epi16(pairs, ones));
                    }
                }
                for t in 0..4 {
                    let sw = _mm256_set1_ps(self.scales[(r + t) * groups + g]);
                    facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[t]), sw, facc[t]);
                }
            }
            // SAFETY: AVX is implied by AVX2; the store writes four f32 into a 4-element slice.
            unsafe { store4(facc, sx, &mut out[4 * blk..4 * blk + 4]) };
        }
        4 * blocks
    }

    /// AVX-512 VNNI (256-bit): `vpdpbusd` multiplies u8 by i8 and adds four products into each
    /// i32 lane without intermediate saturation, so activations go in offset by +128 and the
    /// offset is taken back out exactly with the precomputed weight sums.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn rows_times_vnni(&self, xq: &[i8], sx: f32, first: usize, out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let k = self.cols;
        let groups = k / self.group;
        let per_group = self.group / 32;
        let blocks = out.len() / 4;
        assert!(
            xq.len() >= k
                && (first + 4 * blocks) * k <= self.q.len()
                && (first + 4 * blocks) * groups <= self.wsum.len()
        );
        let xp = xq.as_ptr();
        let offset = _mm256_set1_epi8(-128);
        for blk in 0..blocks {
            let r = first + 4 * blk;
            let wp = [0, 1, 2, 3].map(|t| self.q[(r + t) * k..].as_ptr());
            let mut facc = [_mm256_setzero_ps(); 4];
            for g in 0..groups {
                let mut iacc = [0, 1, 2, 3]
                    .map(|t| _mm256_setr_epi32(-128 * self.wsum[(r + t) * groups + g], 0, 0, 0, 0, 0, 0, 0));
                for c in 0..per_group {
                    let off = (g * per_group + c) * 32;
                    // SAFETY: off + 32 ≤ k, inside the activation row and each weight row.
                    // x + 128 as u8 is x with its top bit flipped.
                    let vx = _mm256_xor_si256(unsafe { _mm256_loadu_si256(xp.add(off) as *const __m256i) }, offset);
                    for t in 0..4 {
                        let vw = unsafe { _mm256_loadu_si256(wp[t].add(off) as *const __m256i) };
                        iacc[t] = _mm256_dpbusd_epi32(iacc[t], vx, vw);
                    }
                }
                for t in 0..4 {
                    let sw = _mm256_set1_ps(self.scales[(r + t) * groups + g]);
                    facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[t]), sw, facc[t]);
                }
            }
            // SAFETY: as in the AVX2 kernel.
            unsafe { store4(facc, sx, &mut out[4 * blk..4 * blk + 4]) };
        }
        4 * blocks
    }
}

impl QWeight {
    /// [`QWeight::rows_times_vnni`] for four activation rows at once (`xq`: 4 × cols, `sx`: their
    /// scales, `out`: 4 × rows): 16 accumulators, each weight chunk loaded once for all four.
    /// Returns how many leading outputs of each row it filled (a multiple of 4).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn rows4_times_vnni(&self, xq: &[i8], sx: &[f32], out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let (k, n) = (self.cols, self.rows);
        let groups = k / self.group;
        let per_group = self.group / 32;
        let blocks = n / 4;
        assert!(
            xq.len() >= 4 * k
                && sx.len() >= 4
                && out.len() >= 4 * n
                && 4 * blocks * k <= self.q.len()
                && 4 * blocks * groups <= self.wsum.len()
        );
        let xp = [0, 1, 2, 3].map(|a| xq[a * k..].as_ptr());
        let offset = _mm256_set1_epi8(-128);
        for blk in 0..blocks {
            let r = 4 * blk;
            let wp = [0, 1, 2, 3].map(|t| self.q[(r + t) * k..].as_ptr());
            let mut facc = [[_mm256_setzero_ps(); 4]; 4];
            for g in 0..groups {
                let bias = [0, 1, 2, 3]
                    .map(|t| _mm256_setr_epi32(-128 * self.wsum[(r + t) * groups + g], 0, 0, 0, 0, 0, 0, 0));
                let mut iacc = [bias; 4];
                for c in 0..per_group {
                    let off = (g * per_group + c) * 32;
                    // SAFETY: off + 32 ≤ k, inside every activation row and weight row.
                    let vx = [0, 1, 2, 3].map(|a| {
                        _mm256_xor_si256(unsafe { _mm256_loadu_si256(xp[a].add(off) as *const __m256i) }, offset)
                    });
                    for t in 0..4 {
                        let vw = unsafe { _mm256_loadu_si256(wp[t].add(off) as *const __m256i) };
                        for a in 0..4 {
                            iacc[a][t] = _mm256_dpbusd_epi32(iacc[a][t], vx[a], vw);
                        }
                    }
                }
                for t in 0..4 {
                    let sw = _mm256_set1_ps(self.scales[(r + t) * groups + g]);
                    for a in 0..4 {
                        facc[a][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[a][t]), sw, facc[a][t]);
                    }
                }
            }
            for a in 0..4 {
                // SAFETY: AVX is implied by AVX2; four f32 into a 4-element slice.
                unsafe { store4(facc[a], sx[a], &mut out[a * n + r..a * n + r + 4]) };
            }
        }
        4 * blocks
    }
}

/// Horizontal sums of four 8-lane accumulators, times `sx`, into `out[0..4]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn store4(acc: [std::arch::x86_64::__m256; 4], sx: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let s01 = _mm256_hadd_ps(acc[0], acc[1]);
    let s23 = _mm256_hadd_ps(acc[2], acc[3]);
    let s = _mm256_hadd_ps(s01, s23);
    let sum = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), _mm_set1_ps(sx));
    let mut lanes = [0f32; 4];
    // SAFETY: `lanes` holds exactly four f32.
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), sum) };
    out[..4].copy_from_slice(&lanes);
}

/// Which integer dot-product kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Vnni,
    Avx2,
    Portable,
}

impl Kernel {
    pub fn detect(group: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if group.is_multiple_of(32) && std::env::var_os("ITERA_QUANT_KERNEL").is_none_or(|v| v != "portable") {
                let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                let vnni = avx2
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vnni");
                let forced_avx2 = std::env::var_os("ITERA_QUANT_KERNEL").is_some_and(|v| v == "avx2");
                if vnni && !forced_avx2 {
                    return Kernel::Vnni;
                }
                if avx2 {
                    return Kernel::Avx2;
                }
            }
        }
        let _ = group;
        Kernel::Portable
    }
}

/// Symmetric per-row int8 quantization of activations (round half to even); returns the scale.
pub fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if x.len().is_multiple_of(8) && std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the function stays within `x` and `out`.
            return unsafe { quantize_row_avx2(x, out) };
        }
    }
    quantize_row_portable(x, out)
}

pub fn quantize_row_portable(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], out: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(out.len());
    let p = x.as_ptr();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 ≤ n (n is a multiple of 8).
        m = _mm256_max_ps(m, _mm256_and_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, abs_mask));
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
    let scale = amax / 127.0;
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let mut q = [0i32; 8];
    for i in (0..n).step_by(8) {
        // cvtps rounds half to even (the default MXCSR mode), as the portable path does.
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, inv));
        // SAFETY: `q` holds eight i32.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, v) };
        for (o, &v) in out[i..i + 8].iter_mut().zip(&q) {
            *o = v.clamp(-127, 127) as i8;
        }
    }
    scale
}

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

    #[test]
    fn every_kernel_this_cpu_has_agrees_with_the_portable_one() {
        let (m, n, k) = (7, 37, 128);
        let x = random(m * k, 6);
        let w = random(n * k, 7);
        let mut x_extreme = x.clone();
        x_extreme[..k].iter_mut().for_each(|v| *v = if *v > 0.0 { 1.0 } else { -1.0 }); // ±127 after quantization
        let available: Vec<Kernel> = [Kernel::detect(32), Kernel::Avx2]
            .into_iter()
            .filter(|&k| k == Kernel::Avx2 || k == Kernel::Vnni)
            .collect();
        for (scheme, group) in [(Scheme::Int8, 0), (Scheme::Int4, 32), (Scheme::Int4, 64)] {
            let q = QWeight::quantize("w", &w, n, k, scheme, group).unwrap();
            for xs in [&x, &x_extreme] {
                let reference = q.matmul_t_with(Kernel::Portable, xs, m);
                for &kernel in &available {
                    if kernel == Kernel::Avx2 && Kernel::detect(32) == Kernel::Portable {
                        continue;
                    }
                    let got = q.matmul_t_with(kernel, xs, m);
                    for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                            "{kernel:?} {scheme:?} g{group} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        let mut xq = vec![0i8; 64];
        let mut xp = vec![0i8; 64];
        let v = random(64, 8);
        assert_eq!(quantize_row(&v, &mut xq), quantize_row_portable(&v, &mut xp));
        assert_eq!(xq, xp);
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
