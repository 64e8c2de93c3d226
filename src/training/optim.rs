//! AdamW with decoupled weight decay, the learning-rate schedule, and
//! global-norm gradient clipping.
//!
//! The update is PyTorch's `torch.optim.AdamW` (and `candle_nn::AdamW`):
//! `θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)`. It is our own (a few lines)
//! because `candle_nn::AdamW` keeps its moments private, and `--resume`
//! must restore them to continue exactly where a run stopped.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::model::TrainableParam;
use super::{Result, TrainingError};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<TrainableParam>,
    /// First and second moments, one pair per parameter, same order.
    moments: Vec<(Var, Var)>,
    /// Updates taken so far (bias correction).
    step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<TrainableParam>, params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                Ok((Var::zeros(t.shape(), t.dtype(), t.device())?, Var::zeros(t.shape(), t.dtype(), t.device())?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, vars, moments, step: 0 })
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn params(&self) -> &[TrainableParam] {
        &self.vars
    }

    /// One update with gradients `grads[i]` for parameter `i`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(TrainingError::Settings("one gradient per parameter expected".into()));
        }
        self.step += 1;
        let p = self.params;
        let correction1 = 1.0 / (1.0 - p.beta1.powi(self.step as i32));
        let correction2 = 1.0 / (1.0 - p.beta2.powi(self.step as i32));
        for ((param, (m, v)), g) in self.vars.iter().zip(&self.moments).zip(grads) {
            let g = g.detach();
            let next_m = ((m.as_tensor() * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let next_v = ((v.as_tensor() * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&next_m * correction1)? / ((&next_v * correction2)?.sqrt()? + p.eps)?)?;
            let theta = param.var.as_tensor().detach();
            let decay = if param.decay { 1.0 - lr * p.weight_decay } else { 1.0 };
            let next = ((theta * decay)? - (update * lr)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            param.var.set(&next)?;
        }
        Ok(())
    }

    /// The moments by parameter name (`m.NAME`, `v.NAME`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (param, (m, v)) in self.vars.iter().zip(&self.moments) {
            out.insert(format!("m.{}", param.name), m.as_tensor().detach().copy()?);
            out.insert(format!("v.{}", param.name), v.as_tensor().detach().copy()?);
        }
        Ok(out)
    }

    /// Restores moments written by [`AdamW::state_tensors`] and the step
    /// count.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (param, (m, v)) in self.vars.iter().zip(&self.moments) {
            for (key, var) in [(format!("m.{}", param.name), m), (format!("v.{}", param.name), v)] {
                let t = tensors.get(&key).ok_or_else(|| TrainingError::Settings(format!("optimizer state lacks `{key}`")))?;
                if t.dims() != var.dims() {
                    return Err(TrainingError::Settings(format!("optimizer state `{key}` has shape {:?}, expected {:?}", t.dims(), var.dims())));
                }
                var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay
/// to 0 at `total` (transformers' `get_linear_schedule_with_warmup`).
/// `step` counts from 0.
pub fn learning_rate(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    peak * (remaining / span).clamp(0.0, 1.0)
}

/// Scales gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((learning_rate(0, 4, 10, 1.0) - 0.25).abs() < 1e-12);
        assert!((learning_rate(3, 4, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(4, 4, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(7, 4, 10, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(10, 4, 10, 1.0), 0.0);
        assert!((learning_rate(0, 0, 10, 2.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![Tensor::new(&[3f32, 0.0], &dev).unwrap(), Tensor::new(&[4f32], &dev).unwrap()];
        let norm = clip_global_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let after = clip_global_norm(&mut grads.clone(), 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // First step: m̂ = g, v̂ = g², so θ ← θ(1 − lr·λ) − lr·g/(|g| + ε).
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &dev).unwrap()).unwrap();
        let param = TrainableParam { name: "w".into(), var: var.clone(), decay: true };
        let mut opt = AdamW::new(vec![param], AdamWParams { weight_decay: 0.1, ..Default::default() }).unwrap();
        opt.step(&[Tensor::new(&[[0.5f32, -3.0]], &dev).unwrap()], 0.01).unwrap();
        let got = var.as_tensor().to_vec2::<f32>().unwrap()[0].clone();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{got:?}");
    }
}
