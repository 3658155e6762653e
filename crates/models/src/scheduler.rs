//! diffusers' `CogVideoXDDIMScheduler`: deterministic DDIM (eta ignored) on a zero-terminal-SNR,
//! SNR-shifted scaled-linear schedule, v-prediction, trailing timesteps.
//!
//! Reference: huggingface/diffusers `src/diffusers/schedulers/scheduling_ddim_cogvideox.py`;
//! shared spec `spec/cogview3plus.md` §5. Everything schedule-related is f64, as diffusers
//! computes it; only [`DdimScheduler::step`] touches tensors.

use burn::tensor::Tensor;
use serde::Deserialize;

/// `scheduler/scheduler_config.json`. The keys that shape the schedule are required; the ones
/// this scheduler ignores (`clip_sample`, `sample_max_value`, ...) are read only to refuse
/// settings that would change the result.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: String,
    pub timestep_spacing: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "default_snr_shift")]
    pub snr_shift_scale: f64,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default)]
    pub thresholding: bool,
}

/// The class default (CogVideoX's); CogView3-Plus's config says 4.0.
fn default_snr_shift() -> f64 {
    3.0
}
fn yes() -> bool {
    true
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.num_train_timesteps < 2 {
            return Err(format!("num_train_timesteps {} must be at least 2", self.num_train_timesteps));
        }
        if !["scaled_linear", "linear"].contains(&self.beta_schedule.as_str()) {
            return Err(format!("beta_schedule `{}` is not supported (scaled_linear, linear)", self.beta_schedule));
        }
        if !["v_prediction", "epsilon", "sample"].contains(&self.prediction_type.as_str()) {
            return Err(format!("prediction_type `{}` is not supported", self.prediction_type));
        }
        if !["trailing", "leading", "linspace"].contains(&self.timestep_spacing.as_str()) {
            return Err(format!("timestep_spacing `{}` is not supported", self.timestep_spacing));
        }
        if self.clip_sample || self.thresholding {
            return Err("clip_sample and thresholding are not supported".into());
        }
        if !(self.snr_shift_scale > 0.0) {
            return Err(format!("snr_shift_scale {} must be positive", self.snr_shift_scale));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("--steps {steps}: must be between 1 and {max}")]
    Steps { steps: usize, max: usize },
}

/// The schedule for one run.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    /// `alphas_cumprod` after the SNR shift and the zero-SNR rescale.
    pub alphas_cumprod: Vec<f64>,
    /// `1.0` with `set_alpha_to_one`, else `alphas_cumprod[0]`.
    pub final_alpha_cumprod: f64,
    /// The timesteps of the run, from noisy to clean.
    pub timesteps: Vec<i64>,
    /// `num_train_timesteps // steps`: the stride `step` uses for the previous timestep.
    stride: i64,
}

/// `ac / (s + (1 - s) ac)`, then the zero-terminal-SNR rescale (Lin et al. 2023, Algorithm 1).
pub fn alphas_cumprod(c: &SchedulerConfig) -> Vec<f64> {
    let n = c.num_train_timesteps;
    let betas: Vec<f64> = match c.beta_schedule.as_str() {
        // torch.linspace(sqrt(start), sqrt(end), n, float64) ** 2
        "scaled_linear" => linspace(c.beta_start.sqrt(), c.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect(),
        _ => linspace(c.beta_start, c.beta_end, n),
    };
    let mut ac = Vec::with_capacity(n);
    let mut prod = 1.0f64;
    for b in betas {
        prod *= 1.0 - b;
        ac.push(prod);
    }
    let s = c.snr_shift_scale;
    for a in ac.iter_mut() {
        *a /= s + (1.0 - s) * *a;
    }
    if c.rescale_betas_zero_snr {
        let sqrt: Vec<f64> = ac.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sqrt[0], sqrt[n - 1]);
        for (a, r) in ac.iter_mut().zip(sqrt) {
            let r = (r - last) * first / (first - last);
            *a = r * r;
        }
    }
    ac
}

/// `torch.linspace` in f64: `start + i * (end - start) / (n - 1)`, the second half computed
/// from the end as torch does.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f64 } else { end - step * (n - 1 - i) as f64 }).collect()
}

/// numpy's `np.round` (round half to even).
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

/// The timesteps diffusers' `set_timesteps` gives for `steps`.
///
/// `trailing`: `round(arange(N_train, 0, -N_train/steps)) - 1` with numpy's float arange,
/// whose length is `ceil(N_train / (N_train/steps))` in f64: for some step counts (61, 103,
/// 121, ...) that is `steps + 1`, ending in timestep -1. diffusers then runs `steps + 1`
/// denoiser calls and reads `alphas_cumprod[-1]` (the last, 0) for the extra one; we do the same.
pub fn timesteps(c: &SchedulerConfig, steps: usize) -> Vec<i64> {
    let n = c.num_train_timesteps as f64;
    match c.timestep_spacing.as_str() {
        "trailing" => {
            let ratio = n / steps as f64;
            // np.arange(n, 0, -ratio): length ceil((stop - start) / step); values filled as
            // start + i·delta with delta = (start + step) - start, which is not exactly -ratio.
            let len = (n / ratio).ceil() as usize;
            let delta = (n - ratio) - n;
            (0..len).map(|i| round_half_even(n + i as f64 * delta) as i64 - 1).collect()
        }
        "leading" => {
            let ratio = c.num_train_timesteps / steps;
            (0..steps).rev().map(|i| (i * ratio + c.steps_offset) as i64).collect()
        }
        _ => {
            // linspace(0, N-1, steps).round()[::-1]
            let last = n - 1.0;
            (0..steps)
                .rev()
                .map(|i| if steps == 1 { 0 } else { round_half_even(i as f64 * last / (steps - 1) as f64) as i64 })
                .collect()
        }
    }
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, ScheduleError> {
        let max = config.num_train_timesteps;
        if steps == 0 || steps > max {
            return Err(ScheduleError::Steps { steps, max });
        }
        let alphas_cumprod = alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            config: config.clone(),
            timesteps: timesteps(config, steps),
            stride: (max / steps) as i64,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// `alphas_cumprod[t]`, with Python's negative indexing (t = -1 is the last entry).
    fn alpha(&self, t: i64) -> f64 {
        let n = self.alphas_cumprod.len() as i64;
        self.alphas_cumprod[t.rem_euclid(n) as usize]
    }

    /// The coefficients of one step at `t`: `x_prev = a · x_t + b · x0` with
    /// `x0 = c · x_t - d · model_output` (v-prediction; other kinds map onto the same form).
    pub fn coefficients(&self, t: i64) -> StepCoefficients {
        let prev = t - self.stride;
        let a_t = self.alpha(t);
        let a_prev = if prev >= 0 { self.alpha(prev) } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (x0_sample, x0_model) = match self.config.prediction_type.as_str() {
            "v_prediction" => (a_t.sqrt(), b_t.sqrt()),
            // eps: x0 = (x - sqrt(b) eps) / sqrt(a)
            "epsilon" => (1.0 / a_t.sqrt(), b_t.sqrt() / a_t.sqrt()),
            _ => (0.0, -1.0), // "sample": x0 = model_output
        };
        let a = ((1.0 - a_prev) / b_t).sqrt();
        let b = a_prev.sqrt() - a_t.sqrt() * a;
        StepCoefficients { sample: a, x0: b, x0_sample, x0_model, alpha_t: a_t, alpha_prev: a_prev }
    }

    /// One DDIM step in f32: the previous sample and the predicted clean sample.
    ///
    /// # Shapes
    /// - model_output, sample: `[N, C, h, w]` → both `[N, C, h, w]`
    pub fn step(&self, model_output: Tensor<4>, t: i64, sample: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let k = self.coefficients(t);
        let x0 = sample.clone().mul_scalar(k.x0_sample) - model_output.mul_scalar(k.x0_model);
        let prev = sample.mul_scalar(k.sample) + x0.clone().mul_scalar(k.x0);
        (prev, x0)
    }
}

/// See [`DdimScheduler::coefficients`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    pub sample: f64,
    pub x0: f64,
    pub x0_sample: f64,
    pub x0_model: f64,
    pub alpha_t: f64,
    pub alpha_prev: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn real() -> SchedulerConfig {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "v_prediction".into(),
            timestep_spacing: "trailing".into(),
            rescale_betas_zero_snr: true,
            snr_shift_scale: 4.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            clip_sample: false,
            thresholding: false,
        }
    }

    /// Values the shared spec verified with diffusers (§5.2, §5.3).
    #[test]
    fn spec_values() {
        let ac = alphas_cumprod(&real());
        assert_eq!(ac[999], 0.0);
        for (t, want) in [(979, 2.0200328e-05), (959, 8.8482002e-05), (500, 0.073043424), (99, 0.67160581), (19, 0.93033577), (0, 0.99660865)] {
            assert!((ac[t] - want).abs() < want * 1e-7, "ac[{t}] = {}", ac[t]);
        }
        let t16 = timesteps(&real(), 16);
        assert_eq!(&t16[..5], &[999, 937, 874, 811, 749]);
        assert_eq!(*t16.last().unwrap(), 61);
        let t50 = timesteps(&real(), 50);
        assert_eq!((t50.len(), t50[0], t50[1], t50[49]), (50, 999, 979, 19));
        let t61 = timesteps(&real(), 61);
        assert_eq!((t61.len(), *t61.last().unwrap()), (62, -1));
    }

    #[test]
    fn rounding_is_half_even() {
        assert_eq!(round_half_even(937.5), 938.0);
        assert_eq!(round_half_even(812.5), 812.0);
        assert_eq!(round_half_even(-0.5), -0.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }

    #[test]
    fn bad_step_counts() {
        assert_eq!(DdimScheduler::new(&real(), 0).unwrap_err(), ScheduleError::Steps { steps: 0, max: 1000 });
        assert!(DdimScheduler::new(&real(), 1001).is_err());
        assert!(DdimScheduler::new(&real(), 1).is_ok());
    }

    #[test]
    fn first_and_last_steps() {
        let s = DdimScheduler::new(&real(), 50).unwrap();
        let k = s.coefficients(999); // a_t = 0: x0 = -v
        assert_eq!((k.x0_sample, k.x0_model), (0.0, 1.0));
        let k = s.coefficients(19); // prev -1: a_prev = 1, x_prev = x0
        assert_eq!(k.alpha_prev, 1.0);
        assert!(k.sample.abs() < 1e-12 && (k.x0 - 1.0).abs() < 1e-12);
    }
}
