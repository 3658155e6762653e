//! diffusers' `CogVideoXDDIMScheduler`: deterministic DDIM (eta ignored) on a zero-terminal-SNR,
//! SNR-shifted scaled-linear schedule, v-prediction, trailing timesteps.
//!
//! Reference: huggingface/diffusers `src/diffusers/schedulers/scheduling_ddim_cogvideox.py`.
//! Everything schedule-related is f64, as diffusers computes it; only [`DdimScheduler::step`]
//! and [`DdimScheduler::add_noise`] touch tensors.

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::config::config_enum;

config_enum! {
    /// `beta_schedule`: how the betas go from `beta_start` to `beta_end`.
    pub enum BetaSchedule("beta_schedule") {
        /// Linear in sqrt(beta) (CogView3-Plus).
        ScaledLinear = "scaled_linear",
        Linear = "linear",
    }
}

config_enum! {
    /// `prediction_type`: what the denoiser predicts.
    pub enum PredictionType("prediction_type") {
        /// The velocity (CogView3-Plus).
        VPrediction = "v_prediction",
        Epsilon = "epsilon",
        Sample = "sample",
    }
}

config_enum! {
    /// `timestep_spacing`: how the run's timesteps are spread over the training ones.
    pub enum TimestepSpacing("timestep_spacing") {
        /// From the last training timestep down (CogView3-Plus).
        Trailing = "trailing",
        Leading = "leading",
        Linspace = "linspace",
    }
}

/// `scheduler/scheduler_config.json`. The keys that shape the schedule are required; the ones
/// this scheduler ignores (`clip_sample`, `sample_max_value`, ...) are read only to refuse
/// settings that would change the result.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
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
    /// CogView3-Plus-3B's `scheduler/scheduler_config.json`.
    pub fn cogview3_plus_3b() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::VPrediction,
            timestep_spacing: TimestepSpacing::Trailing,
            rescale_betas_zero_snr: true,
            snr_shift_scale: 4.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            clip_sample: false,
            thresholding: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.num_train_timesteps < 2 {
            return Err(format!("num_train_timesteps {} must be at least 2", self.num_train_timesteps));
        }
        if self.clip_sample || self.thresholding {
            return Err("clip_sample and thresholding are not supported".into());
        }
        // Written so that NaN fails too (`<= 0.0` would let it through).
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(self.snr_shift_scale > 0.0) {
            return Err(format!("snr_shift_scale {} must be positive", self.snr_shift_scale));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("{steps} steps: must be between 1 and {max}")]
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
    let betas: Vec<f64> = match c.beta_schedule {
        // torch.linspace(sqrt(start), sqrt(end), n, float64) ** 2
        BetaSchedule::ScaledLinear => linspace(c.beta_start.sqrt(), c.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect(),
        BetaSchedule::Linear => linspace(c.beta_start, c.beta_end, n),
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
    match c.timestep_spacing {
        TimestepSpacing::Trailing => {
            let ratio = n / steps as f64;
            // np.arange(n, 0, -ratio): length ceil((stop - start) / step); values filled as
            // start + i·delta with delta = (start + step) - start, which is not exactly -ratio.
            let len = (n / ratio).ceil() as usize;
            let delta = (n - ratio) - n;
            (0..len).map(|i| round_half_even(n + i as f64 * delta) as i64 - 1).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = c.num_train_timesteps / steps;
            (0..steps).rev().map(|i| (i * ratio + c.steps_offset) as i64).collect()
        }
        TimestepSpacing::Linspace => {
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
        let (x0_sample, x0_model) = match self.config.prediction_type {
            PredictionType::VPrediction => (a_t.sqrt(), b_t.sqrt()),
            // eps: x0 = (x - sqrt(b) eps) / sqrt(a)
            PredictionType::Epsilon => (1.0 / a_t.sqrt(), b_t.sqrt() / a_t.sqrt()),
            // x0 = model_output
            PredictionType::Sample => (0.0, -1.0),
        };
        let a = ((1.0 - a_prev) / b_t).sqrt();
        let b = a_prev.sqrt() - a_t.sqrt() * a;
        StepCoefficients { sample: a, x0: b, x0_sample, x0_model, alpha_t: a_t, alpha_prev: a_prev }
    }

    /// `add_noise(x0, noise, t)`: `sqrt(ᾱ_t) · x0 + sqrt(1 − ᾱ_t) · noise`, the two factors
    /// computed in f32 from ᾱ_t rounded to f32, as diffusers does (it casts `alphas_cumprod`
    /// to the sample's dtype first). `t` indexes as Python does (-1 is the last).
    ///
    /// # Shapes
    /// - x0, noise: `[N, C, h, w]` → `[N, C, h, w]`
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, t: i64) -> Tensor<4> {
        let a = self.alpha(t) as f32;
        let (signal, rest) = (a.sqrt(), (1.0 - a).sqrt());
        x0.mul_scalar(signal) + noise.mul_scalar(rest)
    }

    /// The timesteps img2img runs at `strength`, as diffusers' video-to-video pipelines cut
    /// the schedule: `init = min(int(steps · strength), steps)`, the loop starting at index
    /// `steps − init` (so strength 1 runs them all and strength 0 none).
    pub fn first_step(&self, steps: usize, strength: f64) -> usize {
        let init = ((steps as f64 * strength) as usize).min(steps);
        steps - init
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

    fn real() -> SchedulerConfig {
        SchedulerConfig::cogview3_plus_3b()
    }

    /// Values verified with diffusers' `CogVideoXDDIMScheduler` on the real config.
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
    fn unknown_names_are_errors_naming_the_key() {
        let json = |spacing: &str| format!(
            r#"{{"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "v_prediction", "timestep_spacing": "{spacing}"}}"#
        );
        let ok: SchedulerConfig = serde_json::from_str(&json("leading")).unwrap();
        assert_eq!(ok.timestep_spacing, TimestepSpacing::Leading);
        let err = serde_json::from_str::<SchedulerConfig>(&json("sideways")).unwrap_err().to_string();
        assert!(err.contains("timestep_spacing `sideways` is not supported (supported: trailing, leading, linspace)"), "{err}");
        for p in PredictionType::ALL {
            assert_eq!(p.as_str().parse::<PredictionType>(), Ok(*p));
        }
        assert!("cosine".parse::<BetaSchedule>().unwrap_err().contains("beta_schedule"));
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
    fn strength_cuts_the_schedule_as_python_does() {
        let s = DdimScheduler::new(&real(), 10).unwrap();
        // Python: int(10 * 0.7) = 7 (10 * 0.7 is 7.000000000000001); in f32 0.7 would give 6.
        assert_eq!(s.first_step(10, 0.7), 3);
        assert_eq!(s.first_step(10, 0.3), 7);
        assert_eq!(s.first_step(10, 1.0), 0);
        assert_eq!(s.first_step(10, 0.0), 10);
        assert_eq!(s.first_step(5, 0.6), 2);
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
