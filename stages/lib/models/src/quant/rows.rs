//! Activations quantized for the integer kernels: one row at a time, into rows padded to the
//! panel layout's 4-byte steps ([`QuantRows`]).

use super::panels::Rows;
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::Kernel;

/// Activation rows quantized for the integer kernels: int8, one scale per row (symmetric, round
/// half to even), each row padded with zeros to whole 4-byte steps of the panel layout (`stride`
/// bytes apart). For the VNNI kernel, which takes its activations as unsigned bytes x + 128, the
/// top bit is flipped, the padding becoming 128, which meets zero weights. One quantization
/// serves every weight of as many columns: a LayerNorm's output is quantized as it is made, and
/// the experts of a layer gather their routed rows from one quantization of all rows.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantRows {
    pub(super) kernel: Kernel,
    pub(super) cols: usize,
    stride: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantRows {
    /// No rows yet, room for `rows` of `cols`.
    pub fn with_capacity(kernel: Kernel, cols: usize, rows: usize) -> QuantRows {
        let stride = cols.next_multiple_of(4);
        QuantRows { kernel, cols, stride, q: Vec::with_capacity(rows * stride), scales: Vec::with_capacity(rows) }
    }

    /// `x`'s rows of `cols` (a partial last row is left out).
    pub fn new(kernel: Kernel, cols: usize, x: &[f32]) -> QuantRows {
        let mut rows = QuantRows::with_capacity(kernel, cols, x.len() / cols.max(1));
        for r in x.chunks_exact(cols.max(1)) {
            rows.push(r);
        }
        rows
    }

    /// Quantizes `row` (its first `cols` values) after the rows already here. Each padded row is
    /// zeroed just before it is written, while in cache.
    ///
    /// # Panics
    /// If `row` holds fewer than `cols` values.
    pub fn push(&mut self, row: &[f32]) {
        let start = self.q.len();
        self.q.resize(start + self.stride, 0i8);
        self.scales.push(quantize_padded_row(self.kernel, &row[..self.cols], &mut self.q[start..]));
    }

    /// `rows` rows of zeros (each scale 0), for workers to quantize rows into in place
    /// ([`QuantRows::parts_mut`], [`quantize_padded_row`]).
    pub fn zeroed(kernel: Kernel, cols: usize, rows: usize) -> QuantRows {
        let stride = cols.next_multiple_of(4);
        QuantRows { kernel, cols, stride, q: vec![0; rows * stride], scales: vec![0.0; rows] }
    }

    /// Bytes per row: `cols` rounded up to whole 4-byte steps.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The rows' bytes (`stride` apart) and their scales, to quantize rows into.
    pub fn parts_mut(&mut self) -> (&mut [i8], &mut [f32]) {
        (&mut self.q, &mut self.scales)
    }

    /// Rows `rows` (indices into these), in that order.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn gather(&self, rows: &[usize]) -> QuantRows {
        let mut out = QuantRows::with_capacity(self.kernel, self.cols, rows.len());
        for &r in rows {
            out.q.extend_from_slice(&self.q[r * self.stride..(r + 1) * self.stride]);
            out.scales.push(self.scales[r]);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.scales.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    pub(super) fn view(&self) -> Rows<'_> {
        Rows { q: &self.q, stride: self.stride, scales: &self.scales }
    }
}

/// `row` quantized into the zeroed padded row `q` (`row.len()` values, then zeros to the row's
/// stride) as `kernel` takes it: for VNNI with the top bit of every byte, padding included,
/// flipped. Returns the row's scale.
///
/// # Panics
/// If `q` is shorter than `row`.
pub fn quantize_padded_row(kernel: Kernel, row: &[f32], q: &mut [i8]) -> f32 {
    let scale = quantize_row(row, &mut q[..row.len()]);
    if kernel == Kernel::Vnni {
        q.iter_mut().for_each(|v| *v ^= i8::MIN);
    }
    scale
}

/// Symmetric per-row int8 quantization of activations (round half to even); returns the scale.
pub fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let n = x.len();
        if out.len() >= n && n.is_multiple_of(16) && crate::simd::active() >= Kernel::Vnni {
            // SAFETY: the CPU has AVX-512 F/BW/VL (part of the VNNI level); the lengths are
            // checked just above.
            return unsafe { x86::quantize_row_avx512(x, out) };
        }
        if out.len() >= n && n.is_multiple_of(8) && crate::simd::avx2() {
            // SAFETY: the CPU has AVX2; the lengths are checked just above.
            return unsafe { x86::quantize_row_avx2(x, out) };
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
