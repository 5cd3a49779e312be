//! The SSM block's output gate, gated = (C h + D ⊙ xc) ⊙ silu(z), forward and backward, with
//! y = C h made row by row in registers where it is used, not by a K = n GEMM into memory: in
//! the forward's rows (f32, or quantized for an integer out_proj as they are made) and again in
//! the backward's one pass, so no y is kept between them (2 MB a layer at 16 × 128 rows).

use std::mem::MaybeUninit;

use super::*;
use crate::quant::{quantize_padded_row, Kernel, QuantRows};

/// C (di × n) by state: row s holds C[·, s], so each state's multiply-adds run along a row.
fn by_state(c: &[f32], di: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * di];
    for (j, cr) in c.chunks_exact(n.max(1)).take(di).enumerate() {
        for (s, &v) in cr.iter().enumerate() {
            out[s * di + j] = v;
        }
    }
    out
}

/// y = C h for one row into `y` (di values): the n states' multiply-adds in order, for 64
/// outputs at a time in registers (four independent chains of 16: one chain at a time waited
/// on its multiply-adds' latency, and a pass over y per state on L1's loads and stores; both
/// were slower than the GEMM this replaces). `c_by_state` holds C[·, s] as row s of di;
/// `fma` is the calling copy's.
#[inline(always)]
fn c_times_h(h: &[f32], c_by_state: &[f32], y: &mut [f32], fma: impl Fn(f32, f32, f32) -> f32) {
    let di = y.len();
    let wide = di - di % 64;
    for (b, yb) in y[..wide].chunks_exact_mut(64).enumerate() {
        let mut acc = [0f32; 64];
        for (cs, &hs) in c_by_state.chunks_exact(di).zip(h) {
            for (a, &cv) in acc.iter_mut().zip(&cs[64 * b..64 * (b + 1)]) {
                *a = fma(hs, cv, *a);
            }
        }
        yb.copy_from_slice(&acc);
    }
    for (j, yj) in y.iter_mut().enumerate().skip(wide) {
        *yj = c_by_state.chunks_exact(di).zip(h).fold(0.0, |acc, (cs, &hs)| fma(hs, cs[j], acc));
    }
}

/// One row of the gate into `g` (di values): y = C h ([`c_times_h`]), then
/// (y + D ⊙ xc) ⊙ silu(z). `fma` and `sigmoid` are the calling copy's.
#[inline(always)]
fn gate_row(
    h: &[f32],
    c_by_state: &[f32],
    (xc, z, d_skip): (&[f32], &[f32], &[f32]),
    g: &mut [f32],
    fma: impl Fn(f32, f32, f32) -> f32,
    sigmoid: impl Fn(f32) -> f32,
) {
    c_times_h(h, c_by_state, g, &fma);
    for (((g, &x), &z), &dd) in g.iter_mut().zip(xc).zip(z).zip(d_skip) {
        *g = fma(dd, x, *g) * z * sigmoid(z);
    }
}

simd_dispatch! {
    /// The gate's rows, (C h + D ⊙ xc) ⊙ silu(z), for h (rows × n), C (di × n), xc and z
    /// (rows × di) and D (di): row by row through [`gate_row`], so neither y nor any pass over
    /// it is stored (training's backward makes y again where it needs it).
    pub(super) fn gate(ch: (&[f32], &[f32]), xc: &[f32], z: &[f32], d_skip: &[f32]) -> Vec<f32> {
        let (di, w) = (d_skip.len(), d_skip.len().max(1));
        let (h, c) = ch;
        let n = c.len() / w;
        let c_by_state = by_state(c, di, n);
        let mut gated = slots(xc.len());
        let per = rows_per_task(w);
        for_chunks(&mut gated, per * w, |i, gs| {
            let (mut g, at) = (vec![0f32; di], i * per);
            let inputs = xc[at * di..].chunks_exact(w).zip(z[at * di..].chunks_exact(w)).enumerate();
            for (gr, (r, (xr, zr))) in gs.chunks_exact_mut(w).zip(inputs) {
                gate_row(&h[(at + r) * n..(at + r + 1) * n], &c_by_state, (xr, zr, d_skip), &mut g, fma, sigmoid);
                gr.write_copy_of_slice(&g);
            }
        });
        // SAFETY: gated holds as many values as xc, rows of di cut alike, each row zipped with
        // one of xc's and written whole from g (di values).
        unsafe { written(gated) }
    }
}

simd_dispatch! {
    /// Inference's gate for an integer out_proj, quantized as it is made: each row through
    /// [`gate_row`] into one scratch row (the f32 path's expressions) and from there into int8,
    /// so the gated rows are never stored in f32. `ch`: h (rows × n) and C (di × n).
    pub(super) fn gate_to_int8(ch: (&[f32], &[f32]), xc: &[f32], z: &[f32], d_skip: &[f32], kernel: Kernel) -> QuantRows {
        // Widths of at least 1 for the chunking (a zero-width block has no values to gate).
        let (di, w) = (d_skip.len(), d_skip.len().max(1));
        let (h, c) = ch;
        let (n, rows) = (c.len() / w, xc.len() / w);
        let c_by_state = by_state(c, di, n);
        let mut gated = QuantRows::zeroed(kernel, di, rows);
        let (stride, per) = (gated.stride().max(1), rows_per_task(w));
        let (qs, scales) = gated.parts_mut();
        for_chunks2(qs, per * stride, scales, per, |i, qs, scales| {
            let mut g = vec![0f32; di];
            let at = i * per;
            let inputs = xc[at * di..].chunks_exact(w).zip(z[at * di..].chunks_exact(w)).enumerate();
            for ((qr, s), (r, (xr, zr))) in qs.chunks_exact_mut(stride).zip(scales.iter_mut()).zip(inputs) {
                gate_row(&h[(at + r) * n..(at + r + 1) * n], &c_by_state, (xr, zr, d_skip), &mut g, fma, sigmoid);
                *s = quantize_padded_row(kernel, &g, qr);
            }
        });
        gated
    }
}

/// What the gate's backward gives besides ∂y: ∂z and xc's share of its gradient (rows × di),
/// and D's gradient (di).
pub(super) struct GateGrads {
    pub dz: Vec<f32>,
    pub dxc: Vec<f32>,
    pub dd: Vec<f32>,
}

/// One row of the gate's backward: y again (as [`gate_row`] makes it, so the forward's y bit for
/// bit), then ∂y = ∂gated ⊙ silu(z) over ∂gated in place, ∂z = ∂gated ⊙ y ⊙ silu′(z) and
/// ∂xc = ∂y ⊙ D into the row's outputs, and ∂y ⊙ xc added into D's sums (`pd`). `fma` and
/// `sigmoid` are the calling copy's.
#[inline(always)]
fn gate_backward_row(
    (dg, z, xc): (&mut [f32], &[f32], &[f32]),
    (h, cbs, d_skip): (&[f32], &[f32], &[f32]),
    (dz, dxc): (&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
    (y, pd): (&mut [f32], &mut [f32]),
    fma: impl Fn(f32, f32, f32) -> f32 + Copy,
    sigmoid: impl Fn(f32) -> f32,
) {
    c_times_h(h, cbs, y, fma);
    let ins = z.iter().zip(xc).zip(d_skip).zip(y.iter());
    let outs = dg.iter_mut().zip(dz.iter_mut()).zip(dxc.iter_mut()).zip(pd.iter_mut());
    for ((((g, dz), dxc), pd), (((&z, &x), &dd), &y)) in outs.zip(ins) {
        let y = fma(dd, x, y);
        let sg = sigmoid(z);
        let dg = *g;
        *g = dg * z * sg;
        dz.write(dg * y * silu_grad(z, sg));
        dxc.write(*g * dd);
        *pd = fma(*g, x, *pd);
    }
}

simd_dispatch! {
    /// The gate's backward, given ∂gated in `dg` (rows × di) and h (rows × n), C (di × n), xc
    /// and z (rows × di) and D (di): one pass over the rows that leaves ∂y in `dg` (for ∂h and
    /// ∂C, which are GEMMs) and gives [`GateGrads`]. y is made again row by row, not read: the
    /// forward keeps none. Each block of rows sums its share of ∂D in f32; the blocks' sums are
    /// added in f64.
    pub(super) fn gate_backward(dg: &mut [f32], hc: (&[f32], &[f32]), xc: &[f32], z: &[f32], d_skip: &[f32]) -> GateGrads {
        let (h, c) = hc;
        let (di, w) = (d_skip.len(), d_skip.len().max(1));
        let (n, rows) = (c.len() / w, xc.len() / w);
        let cbs = by_state(c, di, n);
        let (mut dz, mut dxc) = (slots(rows * di), slots(rows * di));
        let per = rows_per_task(w);
        let mut partial = vec![0f32; rows.div_ceil(per) * di];
        for_chunks4((dg, &mut dz, &mut dxc, &mut partial), [per * w, per * w, per * w, w], |t, (dg, dz, dxc, pd)| {
            let mut y = vec![0f32; di];
            let rows_out = dg.chunks_exact_mut(w).zip(dz.chunks_exact_mut(w)).zip(dxc.chunks_exact_mut(w));
            for (r, ((dgr, dzr), dxr)) in rows_out.enumerate() {
                let (i, hr) = ((t * per + r) * di, (t * per + r) * n);
                let ins = (dgr, &z[i..i + di], &xc[i..i + di]);
                gate_backward_row(ins, (&h[hr..hr + n], &cbs, d_skip), (dzr, dxr), (&mut y, &mut *pd), fma, sigmoid);
            }
        });
        // SAFETY: dz and dxc hold as many values as dg, cut into the same rows, and every row
        // of each was zipped whole with a row of dg, z, xc and D and written value by value.
        let (dz, dxc) = unsafe { (written(dz), written(dxc)) };
        GateGrads { dz, dxc, dd: column_sums(&partial, di) }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::linear_op::Product;

    fn gemm(product: Product, a: crate::linear_op::Matrix, b: crate::linear_op::Matrix) -> Vec<f32> {
        product.run(a, b).unwrap().0
    }

    simd_dispatch! {
        /// The gate in f32 given y = C h (the expression, at this process's level).
        fn gate_f32(y: &[f32], xc: &[f32], z: &[f32], d_skip: &[f32]) -> Vec<f32> {
            let rows = y.chunks_exact(d_skip.len()).zip(xc.chunks_exact(d_skip.len())).zip(z.chunks_exact(d_skip.len()));
            rows.flat_map(|((yr, xr), zr)| {
                yr.iter().zip(xr).zip(zr).zip(d_skip).map(|(((&y, &x), &z), &dd)| fma(dd, x, y) * z * sigmoid(z)).collect::<Vec<_>>()
            })
            .collect()
        }
    }

    /// The gate quantized as it is made is the f32 gate quantized afterwards, bit for bit —
    /// y = C h through a K = n GEMM, then the gate — for every kernel's byte layout, on one
    /// thread and on three (chunks of rows), at a width with padding (di not a multiple of 4)
    /// and one without, with the model's 8 states and with 3; and the f32 rows are that gate.
    #[test]
    fn the_gate_rows_and_int8_rows_are_the_gate_after_a_c_h_gemm() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (rows, di, n) in [(300, 128, 8), (70, 38, 3)] {
            let mut draw = |n: usize| (0..n).map(|_| rng.random_range(-3f32..3.0)).collect::<Vec<_>>();
            let (h, c, xc, z, d_skip) = (draw(rows * n), draw(di * n), draw(rows * di), draw(rows * di), draw(di));
            let y = gemm(Product::ABt, (&h, rows, n), (&c, di, n));
            let want = gate_f32(&y, &xc, &z, &d_skip);
            let rows_f32 = gate((&h, &c), &xc, &z, &d_skip);
            let close = rows_f32.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0));
            assert!(close, "f32 gate rows, {rows}×{di}");
            // The integer rows are the f32 rows quantized: the same expressions at this process's
            // level, so equal to the bit (against the GEMM's y they agree only to rounding, and
            // a value on a rounding step's edge lands on either side).
            for kernel in Kernel::supported() {
                let reference = QuantRows::new(kernel, di, &rows_f32);
                assert_eq!(gate_to_int8((&h, &c), &xc, &z, &d_skip, kernel), reference, "{rows}×{di}, {kernel:?}");
                let threaded = pool.install(|| gate_to_int8((&h, &c), &xc, &z, &d_skip, kernel));
                assert_eq!(threaded, reference, "{rows}×{di}, {kernel:?}, 3 threads");
            }
        }
    }

    simd_dispatch! {
        /// The gate's backward as separate passes from a kept y = C h + D ⊙ xc: ∂y and ∂z, then
        /// ∂xc, then ∂D summed in f64.
        fn gate_backward_unfused(dg: &[f32], y: &[f32], xc: &[f32], z: &[f32], d_skip: &[f32]) -> [Vec<f32>; 4] {
            let di = d_skip.len();
            let (mut dy, mut dz) = (dg.to_vec(), vec![0f32; dg.len()]);
            for (((dy, dz), &y), &z) in dy.iter_mut().zip(dz.iter_mut()).zip(y).zip(z) {
                let sg = sigmoid(z);
                let g = *dy;
                *dy = g * z * sg;
                *dz = g * y * silu_grad(z, sg);
            }
            let dxc: Vec<f32> = dy.chunks_exact(di).flat_map(|r| r.iter().zip(d_skip).map(|(&g, &dd)| g * dd).collect::<Vec<_>>()).collect();
            let mut dd = vec![0f64; di];
            for (gr, xr) in dy.chunks_exact(di).zip(xc.chunks_exact(di)) {
                for ((a, &g), &x) in dd.iter_mut().zip(gr).zip(xr) {
                    *a += (g * x) as f64;
                }
            }
            [dy, dz, dxc, dd.into_iter().map(|v| v as f32).collect()]
        }
    }

    /// The one-pass backward, y made again, gives what separate passes from a kept y give: with
    /// 8 states and with 3, a width of whole vectors and widths that leave tails, over several
    /// blocks of rows; the same bits on one thread and on three.
    #[test]
    fn the_one_pass_gate_backward_is_the_separate_passes_from_a_kept_y() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (rows, di, n) in [(256, 256, 8), (700, 40, 8), (90, 38, 3)] {
            let mut draw = |n: usize| (0..n).map(|_| rng.random_range(-2f32..2.0)).collect::<Vec<_>>();
            let (dg, h, c, xc, z, d_skip) =
                (draw(rows * di), draw(rows * n), draw(di * n), draw(rows * di), draw(rows * di), draw(di));
            // y as the forward makes it: C h in the states' order, then + D ⊙ xc.
            let cbs = by_state(&c, di, n);
            let y: Vec<f32> = (0..rows * di)
                .map(|i| {
                    let (r, j) = (i / di, i % di);
                    let ch = (0..n).fold(0f32, |a, s| h[r * n + s].mul_add(cbs[s * di + j], a));
                    d_skip[j].mul_add(xc[i], ch)
                })
                .collect();
            let want = gate_backward_unfused(&dg, &y, &xc, &z, &d_skip);
            let mut dy = dg.clone();
            let got = gate_backward(&mut dy, (&h, &c), &xc, &z, &d_skip);
            let names = ["dy", "dz", "dxc", "dd"];
            for (name, (have, want)) in names.iter().zip([&dy, &got.dz, &got.dxc, &got.dd].into_iter().zip(&want)) {
                assert_eq!(have.len(), want.len(), "{name}, {rows}×{di}×{n}");
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                let worst = have.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 2e-5 * scale, "{name}, {rows}×{di}×{n}: off by {worst} (largest {scale})");
            }
            let mut dy3 = dg.clone();
            let threaded = pool.install(|| gate_backward(&mut dy3, (&h, &c), &xc, &z, &d_skip));
            for (a, b) in [(&dy, &dy3), (&got.dz, &threaded.dz), (&got.dxc, &threaded.dxc), (&got.dd, &threaded.dd)] {
                assert_eq!(a, b, "{rows}×{di}×{n}, 3 threads");
            }
        }
    }
}
