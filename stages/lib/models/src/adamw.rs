//! AdamW as one pass over each parameter's values, giving candle's `AdamW` bit for bit.
//!
//! candle's optimizer runs eleven tensor ops per parameter, each allocating and filling a
//! full-size buffer (2–3 % of a tiny model's training step). Here the moments live in plain
//! vectors and each value is updated in one loop with the same f32 operations in the same order
//! — the f64 hyper-parameters rounded to f32 as candle's `affine` rounds them — so the weights
//! it produces are identical (tested), and the new values are written into the variable's own storage.

use candle_core::backprop::GradStore;
use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Var};
use candle_nn::{Optimizer, ParamsAdamW};

use crate::fused::f32s;

/// One parameter with its first and second moments.
struct Slot {
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
}

pub struct FusedAdamW {
    slots: Vec<Slot>,
    params: ParamsAdamW,
    step_t: i32,
}

/// The step's constants, as f32 the way candle's `tensor * f64` (an affine map) rounds them.
#[derive(Clone, Copy)]
struct Coefficients {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

crate::fused::simd_dispatch! {
    /// theta, m and v updated in place from the gradient g (all of one length).
    fn update(c: Coefficients, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> () {
        // `+ 0.0` where candle's affine adds its zero offset: it turns −0 into +0, so keep it.
        for (((t, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let next_m = (*m * c.beta1 + 0.0) + (g * c.one_minus_beta1 + 0.0);
            let next_v = (*v * c.beta2 + 0.0) + ((g * g) * c.one_minus_beta2 + 0.0);
            let m_hat = next_m * c.scale_m + 0.0;
            let v_hat = next_v * c.scale_v + 0.0;
            let decayed = *t * c.decay + 0.0;
            let adjusted = m_hat / (v_hat.sqrt() * 1.0 + c.eps);
            *t = decayed - (adjusted * c.lr + 0.0);
            *m = next_m;
            *v = next_v;
        }
    }
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                if var.dtype() != candle_core::DType::F32 {
                    candle_core::bail!("adamw: parameters must be f32, one is {:?}", var.dtype());
                }
                let n = var.elem_count();
                Ok(Slot { var, m: vec![0.0; n], v: vec![0.0; n] })
            })
            .collect::<Result<_>>()?;
        Ok(FusedAdamW { slots, params, step_t: 0 })
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let c = Coefficients {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
            lr: p.lr as f32,
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            let Slot { var, m, v } = slot;
            let op = InPlace { c, m: RefCell::new(m), v: RefCell::new(v) };
            var.as_tensor().inplace_op2(g, &op)?;
        }
        Ok(())
    }
}

/// One parameter's update written straight into the variable's storage: no copy of the
/// parameter out and back (≈ 0.3 % of an Itera-Lite step). `inplace_op2` hands out the storage
/// through `&self`, hence the cells.
struct InPlace<'a> {
    c: Coefficients,
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
}

impl InplaceOp2 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = f32s(s2, l2, "adamw")?;
        let theta = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::F32(t), Some((a, b))) => &mut t[a..b],
            _ => candle_core::bail!("adamw: parameters must be contiguous f32 on the CPU"),
        };
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if g.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("adamw: a gradient of {} values for a parameter of {}", g.len(), theta.len());
        }
        update(self.c, theta, &mut m[..], &mut v[..], g);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use candle_nn::AdamW;
    use rand::{Rng, SeedableRng};

    /// The same parameters, gradients and hyper-parameters through candle's AdamW and this one
    /// for several steps (weight decay on, a learning rate changed midway, one parameter without
    /// a gradient): every value identical, bit for bit.
    #[test]
    fn fused_adamw_gives_candles_adamw_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let shapes: [&[usize]; 4] = [&[37, 19], &[300], &[4, 8, 16], &[5]];
        let init: Vec<Vec<f32>> =
            shapes.iter().map(|s| (0..s.iter().product()).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
        let make = || -> Vec<Var> {
            shapes.iter().zip(&init).map(|(s, v)| Var::from_vec(v.clone(), *s, &Device::Cpu).unwrap()).collect()
        };
        let params = ParamsAdamW { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let (theirs, ours) = (make(), make());
        let mut reference = AdamW::new(theirs.clone(), params.clone()).unwrap();
        let mut fused = FusedAdamW::new(ours.clone(), params).unwrap();
        // A loss whose gradient varies with the values and the step: Σ w·x² + sin(x), the last
        // parameter left out (no gradient).
        let loss = |vars: &[Var], step: usize| -> Tensor {
            let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (i, v) in vars.iter().take(3).enumerate() {
                let t = v.as_tensor();
                let term = ((t.sqr().unwrap() * (1.0 + i as f64 + step as f64)).unwrap() + t.sin().unwrap()).unwrap();
                total = (total + term.sum_all().unwrap()).unwrap();
            }
            total
        };
        for step in 0..6 {
            if step == 3 {
                reference.set_learning_rate(1e-3);
                fused.set_learning_rate(1e-3);
            }
            reference.step(&loss(&theirs, step).backward().unwrap()).unwrap();
            fused.step(&loss(&ours, step).backward().unwrap()).unwrap();
            for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
                let a: Vec<u32> =
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> =
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "parameter {i} after step {}", step + 1);
            }
        }
        assert_ne!(ours[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(), init[0], "the parameters moved");
        assert_eq!(ours[3].flatten_all().unwrap().to_vec1::<f32>().unwrap(), init[3], "no gradient, no step");
    }
}
