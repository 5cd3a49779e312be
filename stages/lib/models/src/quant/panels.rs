//! Quantized weights in the layout the SIMD kernels read: 16 output rows side by side, four input
//! columns at a time.
//!
//! On row-major weights a SIMD kernel computes one dot product per output and must sum each
//! vector across its lanes at the end; on these 128–512-wide matrices those sums cost as much as
//! the multiplies. In a panel, 64 consecutive bytes hold columns 4s..4s+4 of 16 rows, so one
//! multiply-accumulate of the panel's bytes with four activation bytes broadcast advances 16
//! outputs and nothing is summed across lanes. A tile keeps `MR` activation rows × `nr` panels of
//! accumulators in registers: each weight vector loaded feeds `MR` rows, each broadcast `nr` panels.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::Kernel;

/// Output rows per panel.
pub(crate) const PANEL: usize = 16;
/// Activation rows per tile.
pub(crate) const MR: usize = 4;

/// Panels per tile. A VNNI tile keeps R × N integer sums and R × N scaled float sums in
/// registers, with N weight vectors and one broadcast activation: of AVX-512's 32, 4 rows fit 3
/// panels (28); 4 × 4 (37) spilled the float sums to the stack at every scale group. Tiles of
/// fewer rows (generation's single row) take 4. AVX2 has 16 registers: 4 rows × one panel
/// (two 8-lane halves).
fn panels_per_tile(kernel: Kernel, rows: usize) -> usize {
    match kernel {
        Kernel::Vnni if rows >= MR => 3,
        Kernel::Vnni => 4,
        _ => 1,
    }
}

/// One step of a panel, on a cache line of its own: a kernel's 64-byte (or two 32-byte) loads of
/// it then never straddle two lines, which malloc's 16-byte alignment left to chance (on a Zen 4,
/// Itera-Lite's INT4 forward on the AVX2 path went from 1.12× to 1.19× f32 with them aligned).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [i8; 64]);

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Panels {
    /// 4-column steps per row: ⌈cols / 4⌉, the last one zero-padded.
    pub(crate) quads: usize,
    /// Steps per scale group, and groups per row.
    pub(crate) group_quads: usize,
    pub(crate) groups: usize,
    /// ⌈rows / 16⌉, the last panel zero-padded.
    pub(crate) count: usize,
    /// count × quads lines of 64: row 16p + r, column 4s + j at byte 64·(p·quads + s) + 4r + j.
    pub(crate) bytes: Vec<Line>,
    /// count × groups × 16: −128 · Σ w over the group, per row (see the VNNI kernel).
    pub(crate) bias: Vec<i32>,
    /// count × groups × 16 scales.
    pub(crate) scales: Vec<f32>,
    /// Every weight lies in −8..=8 (INT4's do), which the AVX2 kernel's narrow tile relies on.
    pub(crate) narrow: bool,
}

/// Quantized activation rows: `q` holds them `stride` bytes apart (zero-padded), `scales` one
/// per row.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub(crate) q: &'a [i8],
    pub(crate) stride: usize,
    pub(crate) scales: &'a [f32],
}

impl<'a> Rows<'a> {
    /// Rows `first..first + count` (fewer at the end).
    fn slice(self, first: usize, count: usize) -> Rows<'a> {
        let end = (first + count).min(self.scales.len());
        Rows { q: &self.q[first * self.stride..], stride: self.stride, scales: &self.scales[first..end] }
    }
}

/// One tile's operands: activation rows of `x`, `stride` bytes apart, with scales `sx` (one per
/// row of the tile); panels from `panel`; output (row a, column col + c) at `out[a·ldo + col + c]`
/// for c < `valid` (the panels' rows past the matrix's last are computed and not written); with
/// a `base` (laid out as `out`) each output is base + product.
pub(crate) struct Tile<'a> {
    pub(crate) x: &'a [i8],
    pub(crate) stride: usize,
    pub(crate) sx: &'a [f32],
    pub(crate) panel: usize,
    pub(crate) out: &'a mut [MaybeUninit<f32>],
    pub(crate) ldo: usize,
    pub(crate) col: usize,
    pub(crate) valid: usize,
    pub(crate) base: Option<&'a [f32]>,
}

impl Panels {
    /// From row-major `q` (rows × cols) and its scales (rows × groups) in blocks of `group`.
    pub(crate) fn pack(q: &[i8], scales: &[f32], rows: usize, cols: usize, group: usize) -> Panels {
        let quads = cols.div_ceil(4);
        let groups = (cols / group.max(1)).max(1);
        let group_quads = if groups == 1 { quads } else { group / 4 };
        let count = rows.div_ceil(PANEL);
        let mut bytes = vec![Line([0; 64]); count * quads];
        let mut bias = vec![0i32; count * groups * PANEL];
        let mut packed_scales = vec![0f32; count * groups * PANEL];
        for (r, row) in q.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let (p, lane) = (r / PANEL, r % PANEL);
            for (c, &v) in row.iter().enumerate() {
                bytes[p * quads + c / 4].0[4 * lane + c % 4] = v;
                bias[(p * groups + (c / 4) / group_quads) * PANEL + lane] -= 128 * v as i32;
            }
            for g in 0..groups {
                packed_scales[(p * groups + g) * PANEL + lane] = scales[r * groups + g];
            }
        }
        let narrow = q.iter().all(|v| (-8..=8).contains(v));
        Panels { quads, group_quads, groups, count, bytes, bias, scales: packed_scales, narrow }
    }

    /// The first `width` slots of each of `out`'s m rows of `ldo` = the m activation rows times
    /// the matrix rows of `panels` (the first `width` of them); with a `base` (laid out as
    /// `out`), base + that product.
    pub(crate) fn matmul(
        &self,
        kernel: Kernel,
        x: Rows,
        (panels, width): (Range<usize>, usize),
        base: Option<&[f32]>,
        (out, ldo): (&mut [MaybeUninit<f32>], usize),
    ) {
        let m = x.scales.len();
        let threads = rayon::current_num_threads();
        if threads == 1 || m * width * x.stride < 1 << 18 {
            self.block(kernel, x, (panels, width), base, out, ldo);
        } else if m >= 2 * MR * threads {
            // Many rows (a forward pass): whole rows per task, in multiples of the tile height.
            let rows = m.div_ceil(2 * threads).next_multiple_of(MR);
            out.par_chunks_mut(rows * ldo).enumerate().for_each(|(i, o)| {
                let b = base.map(|b| &b[(i * rows * ldo).min(b.len())..]);
                self.block(kernel, x.slice(i * rows, rows), (panels.clone(), width), b, o, ldo)
            });
        } else {
            // Few rows (generation): each task takes a run of panels and fills their columns.
            let per = panels.len().div_ceil(threads);
            let starts: Vec<usize> = panels.clone().step_by(per).collect();
            let parts: Vec<(usize, usize, Vec<MaybeUninit<f32>>)> = starts
                .into_par_iter()
                .map(|p0| {
                    let c0 = PANEL * (p0 - panels.start);
                    let w = (PANEL * per).min(width - c0);
                    let mut o = vec![MaybeUninit::new(0f32); m * w];
                    self.block(kernel, x, (p0..(p0 + per).min(panels.end), w), None, &mut o, w);
                    (c0, w, o)
                })
                .collect();
            for (c0, w, o) in parts {
                for (r, (dst, src)) in out.chunks_exact_mut(ldo).zip(o.chunks_exact(w)).enumerate() {
                    let b = base.map(|b| &b[r * ldo + c0..r * ldo + c0 + w]);
                    for (c, (d, s)) in dst[c0..c0 + w].iter_mut().zip(src).enumerate() {
                        // SAFETY: `o` was filled by `block`.
                        let v = unsafe { s.assume_init() };
                        d.write(b.map_or(v, |b| b[c] + v));
                    }
                }
            }
        }
    }

    /// Every activation row times panels `panels`, into `out` (rows × `ldo`), whose column 0 is
    /// the first row of panel `panels.start`; its first `width` columns are real outputs.
    fn block(
        &self,
        kernel: Kernel,
        x: Rows,
        (panels, width): (Range<usize>, usize),
        base: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
        ldo: usize,
    ) {
        let per_tile = panels_per_tile(kernel, x.scales.len());
        // Panels outside, rows inside: a tile's panels (3 or 4 × 64 bytes per step, at most 32 KB for
        // these widths) stay in L1 while every row streams past them.
        let mut p = panels.start;
        while p < panels.end {
            let np = per_tile.min(panels.end - p);
            let col = PANEL * (p - panels.start);
            let valid = width.saturating_sub(col).min(PANEL * np);
            for i in 0..x.scales.len().div_ceil(MR) {
                let (rows, o) = (x.slice(i * MR, MR), &mut out[i * MR * ldo..]);
                let base = base.map(|b| &b[(i * MR * ldo).min(b.len())..]);
                let tile =
                    Tile { x: rows.q, stride: x.stride, sx: rows.scales, panel: p, out: o, ldo, col, valid, base };
                self.tile(kernel, np, tile);
            }
            p += np;
        }
    }

    fn tile(&self, kernel: Kernel, np: usize, tile: Tile) {
        match kernel {
            // SAFETY (both): `matmul_t_with` checked that this CPU has the kernel's features; the
            // kernels check their bounds.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { super::x86::vnni(self, np, tile) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { super::x86::avx2(self, tile) },
            _ => unreachable!("the portable kernel does not use panels"),
        }
    }
}
