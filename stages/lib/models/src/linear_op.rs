//! `x · wᵀ` for 2-D f32 activations as one autograd node, on the `gemm` crate candle itself uses.
//!
//! Through candle the same product is `x.matmul(w.t())`: a transpose node on the weight, an
//! output buffer zeroed before the GEMM overwrites it (~7 % of an inference forward), and a
//! backward that builds the weight gradient transposed and copies it back. Here the forward and
//! both backward products (dx = g·w, dw = gᵀ·x) are single GEMMs written straight into fresh
//! buffers. Tested equal to candle's matmul and its gradients.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};

/// Which product of two row-major matrices a and b.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Product {
    /// a (m, k) · b (n, k)ᵀ → (m, n)
    ABt,
    /// a (m, n) · b (n, k) → (m, k)
    AB,
    /// a (m, n)ᵀ · b (m, k) → (n, k)
    AtB,
}

/// A row-major matrix: its values and (rows, columns).
pub(crate) type Matrix<'a> = (&'a [f32], usize, usize);

fn matrix<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Matrix<'a>> {
    let (r, c) = l.shape().dims2()?;
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok((&v[a..b], r, c)),
        _ => candle_core::bail!("linear: contiguous f32 matrices expected"),
    }
}

fn parallelism(flops: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    // Below ~1 MFLOP the hand-off costs more than it saves.
    if threads > 1 && flops >= 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// (m, n, k) of a GEMM dst (m×n) = lhs (m×k) · rhs (k×n), and each operand's (column stride,
/// row stride) as the GEMM sees it.
type Plan = (usize, usize, usize, (usize, usize), (usize, usize));

impl Product {
    fn plan(self, (_, ar, ac): Matrix, (_, br, bc): Matrix) -> Result<Plan> {
        Ok(match self {
            Product::ABt if ac == bc => (ar, br, ac, (1, ac), (bc, 1)),
            Product::AB if ac == br => (ar, bc, ac, (1, ac), (1, bc)),
            Product::AtB if ar == br => (ac, bc, ar, (ac, 1), (1, bc)),
            _ => candle_core::bail!("linear: shapes ({ar}, {ac}) and ({br}, {bc}) do not fit {self:?}"),
        })
    }

    /// The product into a fresh buffer, with its shape.
    pub(crate) fn run(self, a: Matrix, b: Matrix) -> Result<(Vec<f32>, Shape)> {
        let (m, n, ..) = self.plan(a, b)?;
        let mut dst: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: `write` without accumulation writes every element of the m×n destination (or
        // zero-fills it when k = 0) before anything reads it; the capacity is m·n.
        unsafe {
            self.write(a, b, dst.as_mut_ptr(), false)?;
            dst.set_len(m * n);
        }
        Ok((dst, Shape::from((m, n))))
    }

    /// `dst = a ∘ b` or, with `accumulate`, `dst += a ∘ b`; dst is row-major with the product's shape.
    pub(crate) fn write_into(self, a: Matrix, b: Matrix, dst: &mut [f32], accumulate: bool) -> Result<()> {
        let (m, n, ..) = self.plan(a, b)?;
        if dst.len() != m * n {
            candle_core::bail!("linear: destination of {} for a {m}×{n} product", dst.len());
        }
        // SAFETY: dst is an initialised m×n slice.
        unsafe { self.write(a, b, dst.as_mut_ptr(), accumulate) }
    }

    /// # Safety
    /// `dst` must be valid for m·n writes (and reads when `accumulate`).
    unsafe fn write(self, a: Matrix, b: Matrix, dst: *mut f32, accumulate: bool) -> Result<()> {
        let (m, n, k, lhs_s, rhs_s) = self.plan(a, b)?;
        if k == 0 {
            if !accumulate {
                // SAFETY: the caller guarantees m·n writable elements.
                unsafe { std::ptr::write_bytes(dst, 0, m * n) };
            }
            return Ok(());
        }
        // SAFETY: lhs and rhs are in-bounds slices whose extents match the strides given (checked
        // shapes above); with read_dst = false the GEMM writes every element of dst and reads none.
        unsafe {
            gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                accumulate,
                a.0.as_ptr(),
                lhs_s.0 as isize,
                lhs_s.1 as isize,
                b.0.as_ptr(),
                rhs_s.0 as isize,
                rhs_s.1 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(2 * m * n * k),
            )
        };
        Ok(())
    }
}

/// A matrix inside a slice: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    pub(crate) fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// Whether views a (m×k) and b (k×n) and a destination of `dst_len` values with row stride
/// `dst_rs` hold an m×n product.
pub(crate) fn check_views(m: usize, n: usize, k: usize, dst_len: usize, dst_rs: usize, a: View, b: View) -> Result<()> {
    if !a.fits(m, k) || !b.fits(k, n) || n > dst_rs || (m > 0 && n > 0 && (m - 1) * dst_rs + n > dst_len) {
        candle_core::bail!("strided product: a {m}×{k} · {k}×{n} product does not fit its views");
    }
    Ok(())
}

/// `dst (m×n, row stride dst_rs) = a (m×k) · b (k×n)` for views of any strides (attention heads
/// inside a (rows, 3·d) projection); single-threaded, as the callers run many of these side by
/// side.
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
) -> Result<()> {
    check_views(m, n, k, dst.len(), dst_rs, a, b)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n].fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: every index the GEMM touches was checked to lie inside its slice above, and the
    // destination rows (n ≤ dst_rs) do not overlap.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    };
    Ok(())
}

struct NoGrad(Product);

impl CustomOp2 for NoGrad {
    fn name(&self) -> &'static str {
        "linear-gemm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, shape) = self.0.run(matrix(s1, l1)?, matrix(s2, l2)?)?;
        Ok((CpuStorage::F32(v), shape))
    }
}

/// The product's rows, optionally given another shape of the same values (a reshape node after
/// it would cost its backward a zeroed full-size gradient buffer and an add).
struct Linear(Option<Shape>);

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, shape) = NoGrad(Product::ABt).cpu_fwd(s1, l1, s2, l2)?;
        match &self.0 {
            Some(s) if s.elem_count() != shape.elem_count() => {
                candle_core::bail!("linear: a {shape:?} product cannot be shaped {s:?}")
            }
            Some(s) => Ok((v, s.clone())),
            None => Ok((v, shape)),
        }
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let g = if g.rank() == 2 { g } else { g.reshape((x.dim(0)?, w.dim(0)?))? };
        let dx = g.apply_op2_no_bwd(w, &NoGrad(Product::AB))?;
        let dw = g.apply_op2_no_bwd(x, &NoGrad(Product::AtB))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// x (rows, in) · w (out, in)ᵀ → (rows, out); f32, differentiable in both.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear(None))
}

/// [`linear`] with its (rows, out) values given `shape` (e.g. (batch, seq, out)).
pub fn linear_shaped(x: &Tensor, w: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear(Some(shape.into())))
}

/// A linear layer's three training products for x (m×k), its weight w (n×k) and its output's
/// gradient g (m×n) — y = x·wᵀ, dx = g·w, dw = gᵀ·x — each one GEMM into a fresh buffer that is
/// not zeroed first, as the hand-written training steps run them: what the throughput bench's
/// GEMM floor times (candle's `matmul` zero-fills its output before the GEMM overwrites it).
pub fn training_products(x: &[f32], w: &[f32], g: &[f32], (m, k, n): (usize, usize, usize)) -> Result<[Vec<f32>; 3]> {
    if x.len() != m * k || w.len() != n * k || g.len() != m * n {
        candle_core::bail!(
            "training products: {}, {} and {} values are not ({m}, {k}), ({n}, {k}) and ({m}, {n}) matrices",
            x.len(),
            w.len(),
            g.len()
        );
    }
    let (x, w, g) = ((x, m, k), (w, n, k), (g, m, n));
    Ok([Product::ABt.run(x, w)?.0, Product::AB.run(g, w)?.0, Product::AtB.run(g, x)?.0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_matmul_and_its_gradients() {
        for (m, k, n) in [(37, 19, 23), (64, 128, 512), (1, 8, 3), (5, 1, 2)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap()).unwrap();
            let ours = linear(&x, &w).unwrap();
            let theirs = x.matmul(&w.t().unwrap()).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "forward ({m},{k},{n})");
            let probe = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-4, "gradient ({m},{k},{n}): {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn training_products_are_the_layer_and_its_gradients() {
        let (m, k, n) = (9, 7, 5);
        let t = |r, c| Tensor::randn(0f32, 1.0, (r, c), &Device::Cpu).unwrap();
        let (x, w, g) = (t(m, k), t(n, k), t(m, n));
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let [y, dx, dw] = training_products(&v(&x), &v(&w), &v(&g), (m, k, n)).unwrap();
        let expect = [x.matmul(&w.t().unwrap()).unwrap(), g.matmul(&w).unwrap(), g.t().unwrap().matmul(&x).unwrap()];
        for (ours, theirs) in [y, dx, dw].into_iter().zip(expect) {
            let diff = v(&theirs).iter().zip(&ours).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert_eq!(ours.len(), theirs.elem_count());
            assert!(diff < 1e-4, "{diff}");
        }
        // A slice shorter than its stated shape is refused, not read past its end.
        let err = training_products(&v(&x)[1..], &v(&w), &v(&g), (m, k, n)).unwrap_err();
        assert!(err.to_string().contains("are not (9, 7)"), "{err}");
    }

    #[test]
    fn a_weight_slice_works_and_bad_shapes_are_errors() {
        let w = Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu).unwrap();
        let half = w.narrow(0, 3, 3).unwrap();
        assert!(max_diff(&linear(&x, &half).unwrap(), &x.matmul(&half.t().unwrap()).unwrap()) < 1e-5);
        assert!(linear(&x, &Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
        assert!(linear_shaped(&x, &w, (2, 5)).is_err());
    }

    #[test]
    fn a_shaped_product_has_the_gradients_of_a_reshaped_one() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &Device::Cpu).unwrap()).unwrap();
        let ours = linear_shaped(&x, &w, (2, 3, 7)).unwrap();
        let theirs = linear(&x, &w).unwrap().reshape((2, 3, 7)).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 7]);
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 7), &Device::Cpu).unwrap();
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-6);
        }
    }
}
