//! `cogview generate`: a prompt in, a PNG out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use cogview_runtime::import::ModelFolder;
use cogview_runtime::output::{read_latents, save_png, save_tensors};
use cogview_runtime::guard::CheckFinite;
use cogview_runtime::pipeline::{Guarding, Output, Progress, Request, generate};
use indicatif::{ProgressBar, ProgressStyle};

use crate::DeviceArgs;

/// `H,W` or `TOP,LEFT`.
fn pair(s: &str) -> Result<[usize; 2], String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("`{s}`: expected two numbers as A,B"))?;
    let n = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("`{x}` is not a whole number"));
    Ok([n(a)?, n(b)?])
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A diffusers model folder, or a hub id in the Hugging Face cache.
    #[arg(long, default_value = "THUDM/CogView3-Plus-3B", env = "COGVIEW_MODEL")]
    model: String,
    /// What to draw.
    #[arg(long, short)]
    prompt: String,
    /// What to steer away from. Without it the unconditional embedding is zeros (as diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps (the model card uses 50).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (half the compute).
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Image width in pixels: a multiple of 16 up to 2048; the model card recommends 512–2048,
    /// multiples of 32, width × height ≤ 2^21.
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Image height in pixels (as --width).
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Seed of the initial noise (ChaCha8 + standard normal on the CPU: the same image on every
    /// device). Random, and printed, when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Prompt tokens given to the text encoder (longer prompts are truncated, with a warning).
    #[arg(long, default_value_t = 224)]
    max_sequence_length: usize,
    /// Size conditioning `H,W` (default: the output size).
    #[arg(long, value_parser = pair)]
    original_size: Option<[usize; 2]>,
    /// Crop conditioning `TOP,LEFT`.
    #[arg(long, value_parser = pair, default_value = "0,0")]
    crop_coords: [usize; 2],
    /// Initial latents: a safetensors file with one tensor `latents` [1,16,H/8,W/8], any float
    /// dtype, instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Also write DIR/tensors.safetensors (f32 prompt_embeds, negative_prompt_embeds,
    /// step_latents, image).
    #[arg(long, value_name = "DIR")]
    save_tensors: Option<PathBuf>,
    /// Where to write the PNG.
    #[arg(long, short, default_value = "cogview.png")]
    output: PathBuf,
    /// Non-finite checks: `stages` (one count after each stage call; the failing call is re-run
    /// to name the first bad module) or `all` (every module of every call).
    #[arg(long, default_value = "stages")]
    check_finite: CheckFinite,
    #[command(flatten)]
    device: DeviceArgs,
}

/// One bar per stage on a terminal; log lines otherwise.
struct Bars {
    bar: Option<ProgressBar>,
    terminal: bool,
    stage: &'static str,
    total: usize,
}

impl Progress for Bars {
    fn stage(&mut self, name: &'static str, steps: usize) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        self.stage = name;
        self.total = steps;
        if self.terminal {
            let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {elapsed}")
                .expect("valid template")
                .progress_chars("=> ");
            let bar = ProgressBar::new(steps as u64).with_style(style).with_prefix(name);
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        } else {
            tracing::info!("{name}: {steps} step(s)");
        }
    }

    fn step(&mut self, done: usize, elapsed: Duration) {
        match &self.bar {
            Some(b) => b.set_position(done as u64),
            None if self.total > 1 => {
                let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
                let eta = (self.total - done) as f64 / rate.max(1e-9);
                tracing::info!("{} {done}/{}: {rate:.2} it/s, eta {eta:.0} s", self.stage, self.total);
            }
            None => tracing::info!("{} done in {:.1} s", self.stage, elapsed.as_secs_f64()),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let folder = ModelFolder::open(&args.model)?;
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 % 1_000_000_007
    });
    let mut request = Request::new(&args.prompt);
    request.negative_prompt = args.negative_prompt.clone();
    request.steps = args.steps;
    request.guidance = args.guidance;
    request.width = args.width;
    request.height = args.height;
    request.seed = seed;
    request.max_sequence_length = args.max_sequence_length;
    request.original_size = args.original_size;
    request.crop_coords = args.crop_coords;
    request.keep_tensors = args.save_tensors.is_some();
    if args.max_sequence_length == 0 {
        bail!("--max-sequence-length must be at least 1");
    }
    // Size problems are found before anything is loaded (the warnings come with the output).
    cogview_runtime::pipeline::check_size(&folder, args.width, args.height)?;
    if let Some(path) = &args.latents {
        let f = folder.vae.scale_factor();
        let shape = [1, folder.transformer.in_channels, args.height / f, args.width / f];
        request.latents = Some(read_latents(path, shape).map_err(anyhow::Error::msg)?);
    }
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    for w in &target.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        "{} in {} ({}); seed {seed}",
        target.adapter.label(),
        target.precision.dtype,
        target.precision.reason
    );
    request.max_binding_bytes = target.adapter.max_storage_binding_size;
    let mut bars = Bars { bar: None, terminal: std::io::stderr().is_terminal(), stage: "", total: 0 };
    let guard = Guarding { precision: target.precision.clone(), check: args.check_finite };
    let plan = cogview_runtime::pipeline::plan(&folder, &target.device, target.precision.dtype.dtype(), &request)?;
    let out: Output = generate(&folder, &target.device, &guard, &request, &plan, &mut bars)?;
    for w in &out.warnings {
        tracing::warn!("{w}");
    }
    let mut text = vec![
        ("prompt".to_string(), request.prompt.clone()),
        ("negative_prompt".into(), request.negative_prompt.clone().unwrap_or_default()),
        ("seed".into(), seed.to_string()),
        ("steps".into(), request.steps.to_string()),
        ("guidance".into(), request.guidance.to_string()),
        ("size".into(), format!("{}x{}", out.width, out.height)),
        ("model".into(), args.model.clone()),
        ("precision".into(), target.precision.dtype.to_string()),
        ("precision_reason".into(), target.precision.reason.clone()),
        ("adapter".into(), format!("{} ({})", target.adapter.label(), target.capabilities.compiler)),
        ("software".into(), format!("cogview {}", env!("CARGO_PKG_VERSION"))),
    ];
    for f in &out.fallbacks {
        text.push(("fallback".into(), f.clone()));
    }
    if let Some(dir) = &args.save_tensors {
        let t = out.tensors.as_ref().context("tensors were kept")?;
        let path = save_tensors(dir, t)?;
        tracing::info!("tensors written to {}", path.display());
    }
    save_png(&args.output, &out.rgb, out.width, out.height, &text)?;
    let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64));
    eprintln!(
        "wrote {} ({}x{}, seed {seed}); encode {:.1} s, denoise {:.1} s ({:.2} s/step), decode {:.1} s; peak device memory: encode {}, denoise {}, decode {}",
        args.output.display(),
        out.width,
        out.height,
        out.text.seconds,
        out.denoise.seconds,
        out.step_seconds.iter().sum::<f64>() / out.step_seconds.len().max(1) as f64,
        out.decode.seconds,
        mib(out.text.peak.in_use),
        mib(out.denoise.peak.in_use),
        mib(out.decode.peak.in_use)
    );
    Ok(())
}
