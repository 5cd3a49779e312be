//! The selective-SSM recurrence as one candle op: a diagonal linear scan over time.
//!
//! `h_t = a_t ⊙ h_{t-1} + u_t` (h_{-1} = 0) for tensors of shape (batch, time, state).
//! Forward is a CPU loop (batches in parallel); backward is the adjoint, a reverse scan
//! `λ_t = g_t + a_{t+1} ⊙ λ_{t+1}`, giving `∂u_t = λ_t` and `∂a_t = λ_t ⊙ h_{t-1}`.

use crate::fused::for_chunks;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    l.shape().dims3()
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("diag-scan: `{what}` must be contiguous"),
    }
}

pub(crate) fn scan_fwd<T: WithDType + Send + Sync>(a: &[T], u: &[T], (b, l, n): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::zero(); b * l * n];
    for_chunks(&mut out, l * n, |bi, o| {
        let base = bi * l * n;
        let mut h = vec![T::zero(); n];
        for t in 0..l {
            let off = base + t * n;
            for i in 0..n {
                h[i] = a[off + i] * h[i] + u[off + i];
                o[t * n + i] = h[i];
            }
        }
    });
    out
}

/// λ_t = g_t + a_{t+1} ⊙ λ_{t+1}, from the last step backwards.
pub(crate) fn scan_rev<T: WithDType + Send + Sync>(a: &[T], g: &[T], (b, l, n): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::zero(); b * l * n];
    for_chunks(&mut out, l * n, |bi, o| {
        let base = bi * l * n;
        let mut lam = vec![T::zero(); n];
        for t in (0..l).rev() {
            let off = base + t * n;
            for i in 0..n {
                let carry = if t + 1 < l { a[off + n + i] * lam[i] } else { T::zero() };
                lam[i] = g[off + i] + carry;
                o[t * n + i] = lam[i];
            }
        }
    });
    out
}

/// A two-input kernel over slices with their (batch, length, channels) dims.
type Kernel2<T> = fn(&[T], &[T], (usize, usize, usize)) -> Vec<T>;

fn run2(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32k: Kernel2<f32>,
    f64k: Kernel2<f64>,
) -> Result<(CpuStorage, Shape)> {
    let d = dims(l1)?;
    if dims(l2)? != d {
        candle_core::bail!("diag-scan: shapes differ: {:?} vs {:?}", l1.shape(), l2.shape());
    }
    let out = match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(f32k(contiguous(a, l1, "a")?, contiguous(b, l2, "b")?, d))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(f64k(contiguous(a, l1, "a")?, contiguous(b, l2, "b")?, d))
        }
        _ => candle_core::bail!("diag-scan: f32 or f64 tensors of the same dtype expected"),
    };
    Ok((out, l1.shape().clone()))
}

struct Scan;
struct ReverseScan;

impl CustomOp2 for ReverseScan {
    fn name(&self) -> &'static str {
        "diag-scan-reverse"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        run2(s1, l1, s2, l2, scan_rev::<f32>, scan_rev::<f64>)
    }
}

impl CustomOp2 for Scan {
    fn name(&self) -> &'static str {
        "diag-scan"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        run2(s1, l1, s2, l2, scan_fwd::<f32>, scan_fwd::<f64>)
    }
    fn bwd(&self, a: &Tensor, _u: &Tensor, h: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lam = a.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ReverseScan)?;
        let l = h.dim(1)?;
        let h_prev = h.pad_with_zeros(1, 1, 0)?.narrow(1, 0, l)?;
        let da = (&lam * h_prev)?;
        Ok((Some(da), Some(lam)))
    }
}

/// `h_t = a_t ⊙ h_{t-1} + u_t` over dim 1 of (batch, time, state) tensors, differentiable.
pub fn diag_scan(a: &Tensor, u: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&u.contiguous()?, Scan)
}

/// The same recurrence as a per-step loop of tensor ops: the reference for tests.
pub fn diag_scan_reference(a: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (b, l, n) = a.dims3()?;
    let mut h = Tensor::zeros((b, n), a.dtype(), a.device())?;
    let mut out = Vec::with_capacity(l);
    for t in 0..l {
        h = ((a.narrow(1, t, 1)?.squeeze(1)? * &h)? + u.narrow(1, t, 1)?.squeeze(1)?)?;
        out.push(h.unsqueeze(1)?);
    }
    Tensor::cat(&out, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: (usize, usize, usize), lo: f64, hi: f64, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n).map(|_| r.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_the_per_step_reference() {
        let a = rand((3, 17, 5), 0.1, 0.99, 1).to_dtype(DType::F32).unwrap();
        let u = rand((3, 17, 5), -1.0, 1.0, 2).to_dtype(DType::F32).unwrap();
        let h = diag_scan(&a, &u).unwrap();
        let r = diag_scan_reference(&a, &u).unwrap();
        let diff = (h - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn gradients_match_autograd_of_the_reference() {
        let a = Var::from_tensor(&rand((2, 9, 4), 0.1, 0.99, 3)).unwrap();
        let u = Var::from_tensor(&rand((2, 9, 4), -1.0, 1.0, 4)).unwrap();
        let w = rand((2, 9, 4), -1.0, 1.0, 5);
        let loss_op = (diag_scan(&a, &u).unwrap() * &w).unwrap().sum_all().unwrap();
        let loss_ref = (diag_scan_reference(&a, &u).unwrap() * &w).unwrap().sum_all().unwrap();
        let g1 = loss_op.backward().unwrap();
        let g2 = loss_ref.backward().unwrap();
        for v in [&a, &u] {
            let d = (g1.get(v).unwrap() - g2.get(v).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "{d}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let a0 = rand((1, 6, 3), 0.2, 0.95, 6);
        let u0 = rand((1, 6, 3), -1.0, 1.0, 7);
        let w = rand((1, 6, 3), -1.0, 1.0, 8);
        let f = |a: &Tensor, u: &Tensor| -> f64 {
            (diag_scan(a, u).unwrap() * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let a = Var::from_tensor(&a0).unwrap();
        let u = Var::from_tensor(&u0).unwrap();
        let grads = (diag_scan(&a, &u).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gu) = (
            grads.get(&a).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            grads.get(&u).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        let eps = 1e-6;
        for (which, g) in [(0, &ga), (1, &gu)] {
            for i in 0..18 {
                let base = if which == 0 { &a0 } else { &u0 };
                let mut v = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[i] += eps;
                let plus = Tensor::from_vec(v.clone(), (1, 6, 3), &Device::Cpu).unwrap();
                v[i] -= 2.0 * eps;
                let minus = Tensor::from_vec(v, (1, 6, 3), &Device::Cpu).unwrap();
                let (fp, fm) =
                    if which == 0 { (f(&plus, &u0), f(&minus, &u0)) } else { (f(&a0, &plus), f(&a0, &minus)) };
                let numeric = (fp - fm) / (2.0 * eps);
                let rel = (numeric - g[i]).abs() / numeric.abs().max(1e-3);
                assert!(rel < 1e-6, "input {which} index {i}: numeric {numeric} vs analytic {}", g[i]);
            }
        }
    }
}
