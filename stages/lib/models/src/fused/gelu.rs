//! The exact (erf) GELU of the experts and the Transformer's FFN.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::*;

// ---------------------------------------------------------------- exact (erf) GELU

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(gelu_values(f32s(s, l, self.name())?)), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// g · (Φ(x) + x·φ(x)) with Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^{−x²/2}/√(2π).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        Ok((CpuStorage::F32(gelu_grad_values(x, g)), l1.shape().clone()))
    }
}

simd_dispatch! {
    /// x · Φ(x) elementwise.
    fn gelu_values(x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        for_chunks(&mut y, 16_384, |i, y| {
            for (y, &v) in y.iter_mut().zip(&x[i * 16_384..]) {
                *y = gelu(v);
            }
        });
        y
    }
}

simd_dispatch! {
    /// g · (Φ(x) + x · φ(x)) elementwise.
    fn gelu_grad_values(x: &[f32], g: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f32; x.len()];
        for_chunks(&mut dx, 16_384, |i, d| {
            for ((d, &v), &g) in d.iter_mut().zip(&x[i * 16_384..]).zip(&g[i * 16_384..]) {
                let (t, e) = gelu_terms(v);
                *d = g * gelu_grad(v, t, e);
            }
        });
        dx
    }
}

simd_dispatch! {
    /// GELU in place: the batch-1 decoders' hidden vectors (their loops sit outside any
    /// dispatched body, so a loop there ran scalar).
    pub(crate) fn gelu_in_place(v: &mut [f32]) -> () {
        for x in v.iter_mut() {
            *x = gelu(*x);
        }
    }
}

/// x · Φ(x), the exact GELU (PyTorch's `nn.GELU()`), one node.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}
