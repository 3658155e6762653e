//! `cogview generate`: a prompt in, a PNG out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use cogview_runtime::Target;
use cogview_runtime::batch::{Item, PromptLine, expand, output_paths, read_prompts};
use cogview_runtime::guard::CheckFinite;
use cogview_runtime::import::ModelFolder;
use cogview_runtime::import::hub::Files;
use cogview_runtime::output::{read_latents, save_png, save_tensors};
use cogview_runtime::pipeline::{Guarding, Output, Progress, Request, generate_batch};
use cogview_runtime::plan::{Plan, WeightsChoice, human, parse_size};
use indicatif::{ProgressBar, ProgressStyle};

use crate::DeviceArgs;
use crate::model::ModelArgs;

/// `H,W` or `TOP,LEFT`.
fn pair(s: &str) -> Result<[usize; 2], String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("`{s}`: expected two numbers as A,B"))?;
    let n = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("`{x}` is not a whole number"));
    Ok([n(a)?, n(b)?])
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long, short, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file of prompts: one per line, or JSON Lines ({"prompt": …} with optional
    /// "negative_prompt", "seed", "steps", "guidance", "width", "height" overriding the flags).
    /// Empty lines and lines starting with # are skipped.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Images per prompt, with seeds SEED, SEED+1, … (SEED: the line's own, else --seed).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// What to steer away from. Without it the unconditional embedding is zeros (as diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps (the model card uses 50).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (the model card uses 7.0); 1 or less turns guidance off
    /// (half the compute).
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
    /// step_latents, image); one image only.
    #[arg(long, value_name = "DIR")]
    save_tensors: Option<PathBuf>,
    /// Where to write the PNG: a name, or a template with {index} (position in the batch, from
    /// 0), {seed}, {line} (prompt line), {image} (the image's number for its prompt, from 0) and
    /// {prompt} (its first words). Default: cogview.png for one image, cogview-{index}-{seed}.png
    /// for several.
    #[arg(long, short)]
    output: Option<String>,
    /// Replace existing files (otherwise an existing output stops the run before any work).
    #[arg(long)]
    overwrite: bool,
    /// Print the plan (adapter, precision and why, weight storage, memory per stage against the
    /// budget, size checks, output names) without loading any weights.
    #[arg(long)]
    dry_run: bool,
    /// Non-finite checks: `stages` (one count after each stage call; the failing call is re-run
    /// to name the first bad module) or `all` (every module of every call).
    #[arg(long, default_value = "stages")]
    check_finite: CheckFinite,
    /// How the transformer and VAE weights are stored: `auto` (bf16 when the checkpoint is
    /// bf16: half the memory of f32, widened layer by layer), `bf16` or `f32`.
    #[arg(long, default_value = "auto")]
    weights: WeightsChoice,
    /// Device-memory budget, e.g. 8GiB or 6G: decides resident or streamed weights per stage
    /// and the VAE tiles. Default: what the adapter reports, else 8 GiB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_memory: Option<u64>,
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
    if args.max_sequence_length == 0 {
        bail!("--max-sequence-length must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 % 1_000_000_007
    });
    let lines = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![PromptLine { prompt: p.clone(), line: 1, ..Default::default() }],
        (None, Some(file)) => read_prompts(file)?,
        (None, None) => bail!("give --prompt or --prompts"),
    };
    let mut defaults = Request::new("");
    defaults.negative_prompt = args.negative_prompt.clone();
    defaults.steps = args.steps;
    defaults.guidance = args.guidance;
    defaults.width = args.width;
    defaults.height = args.height;
    defaults.seed = seed;
    defaults.max_sequence_length = args.max_sequence_length;
    defaults.original_size = args.original_size;
    defaults.crop_coords = args.crop_coords;
    defaults.keep_tensors = args.save_tensors.is_some();
    defaults.weights = args.weights;
    defaults.max_memory = args.max_memory;
    let items = expand(&lines, args.count as usize, &defaults);
    if items.len() > 1 && (args.save_tensors.is_some() || args.latents.is_some()) {
        bail!("--save-tensors and --latents are for one image; this run makes {}", items.len());
    }
    let template = args.output.clone().unwrap_or_else(|| {
        if items.len() == 1 { "cogview.png".into() } else { "cogview-{index}-{seed}.png".into() }
    });
    let paths = output_paths(&template, &items, args.overwrite)?;

    let folder = args.model.open(if args.dry_run { Files::Configs } else { Files::All })?;
    // Size problems are found before anything is loaded (the warnings come with the output).
    for item in &items {
        cogview_runtime::pipeline::check_size(&folder, item.request.width, item.request.height)
            .with_context(|| format!("prompt line {}", item.line))?;
    }
    let mut requests: Vec<Request> = items.iter().map(|i| i.request.clone()).collect();
    if let Some(path) = &args.latents {
        let f = folder.vae.scale_factor();
        let shape = [1, folder.transformer.in_channels, args.height / f, args.width / f];
        requests[0].latents = Some(read_latents(path, shape).map_err(anyhow::Error::msg)?);
    }
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    for w in &target.warnings {
        tracing::warn!("{w}");
    }
    for r in &mut requests {
        r.max_binding_bytes = target.adapter.max_storage_binding_size;
    }
    // The plan is made for the largest image of the batch.
    let largest = requests.iter().max_by_key(|r| r.width * r.height).expect("at least one request");
    let plan = cogview_runtime::pipeline::plan(&folder, &target.device, target.precision.dtype.dtype(), largest)?;
    if args.dry_run {
        print!("{}", describe_plan(&args, &folder, &target, &plan, &items, &paths));
        return Ok(());
    }
    tracing::info!(
        "{} in {} ({}); {} image(s), seed {seed}",
        target.adapter.label(),
        target.precision.dtype,
        target.precision.reason,
        requests.len()
    );
    let mut bars = Bars { bar: None, terminal: std::io::stderr().is_terminal(), stage: "", total: 0 };
    let guard = Guarding { precision: target.precision.clone(), check: args.check_finite };
    let batch = generate_batch(&folder, &target.device, &guard, &requests, &plan, &mut bars)?;
    let mut shown = Vec::new();
    for ((out, request), path) in batch.outputs.iter().zip(&requests).zip(&paths) {
        for w in &out.warnings {
            if !shown.contains(w) {
                tracing::warn!("{w}");
                shown.push(w.clone());
            }
        }
        save(&args, &target, out, request, path)?;
        eprintln!("wrote {} ({}x{}, seed {})", path.display(), out.width, out.height, request.seed);
    }
    let out: &Output = &batch.outputs[0];
    let steps: Vec<f64> = batch.outputs.iter().flat_map(|o| o.step_seconds.iter().copied()).collect();
    let mib = |b: Option<u64>| b.map_or("-".to_string(), human);
    eprintln!(
        "{} image(s); the text encoder ran on {} prompt(s); encode {:.1} s, denoise {:.1} s ({:.2} s/step), decode {:.1} s; \
         peak device memory: encode {}, denoise {}, decode {}",
        batch.outputs.len(),
        batch.encoder_calls,
        out.text.seconds,
        out.denoise.seconds,
        steps.iter().sum::<f64>() / steps.len().max(1) as f64,
        out.decode.seconds,
        mib(out.text.peak.in_use),
        mib(out.denoise.peak.in_use),
        mib(out.decode.peak.in_use)
    );
    Ok(())
}

/// Writes one image (and `--save-tensors`), with the run's settings in PNG text chunks.
fn save(args: &GenerateArgs, target: &Target, out: &Output, request: &Request, path: &std::path::Path) -> Result<()> {
    let mut text = vec![
        ("prompt".to_string(), request.prompt.clone()),
        ("negative_prompt".into(), request.negative_prompt.clone().unwrap_or_default()),
        ("seed".into(), request.seed.to_string()),
        ("steps".into(), request.steps.to_string()),
        ("guidance".into(), request.guidance.to_string()),
        ("size".into(), format!("{}x{}", out.width, out.height)),
        ("model".into(), args.model.model.clone()),
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
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    save_png(path, &out.rgb, out.width, out.height, &text)?;
    Ok(())
}

/// `--dry-run`: what the run would do here, and why.
fn describe_plan(args: &GenerateArgs, folder: &ModelFolder, target: &Target, plan: &Plan, items: &[Item], paths: &[PathBuf]) -> String {
    let mut s = String::new();
    s += &format!("model       {} ({})\n", args.model.model, folder.root.display());
    s += &format!("adapter     {} ({} compiler)\n", target.adapter.label(), target.capabilities.compiler);
    s += &format!("precision   {}: {}\n", target.precision.dtype, target.precision.reason);
    for w in &target.precision.warnings {
        s += &format!("            warning: {w}\n");
    }
    s += &format!("weights     {}: {}\n", plan.storage, plan.storage_reason);
    s += &format!("budget      {} ({})\n", human(plan.budget.bytes), plan.budget.source);
    s += &format!("attention   at most {} of scores per call\n", human(plan.attention_scores_bytes));
    s += &format!("\n{:<10}{:<22}{:>12}{:>14}{:>12}\n", "stage", "mode", "weights", "activations", "peak");
    for (name, st) in [("encode", &plan.text), ("denoise", &plan.denoise), ("decode", &plan.decode)] {
        let over = if st.peak_bytes > plan.budget.bytes { "  over budget" } else { "" };
        s += &format!(
            "{name:<10}{:<22}{:>12}{:>14}{:>12}{over}\n",
            st.mode,
            human(st.weight_bytes),
            human(st.activation_bytes),
            human(st.peak_bytes)
        );
    }
    s += "\n";
    for w in &plan.warnings {
        s += &format!("warning     {w}\n");
    }
    for (item, path) in items.iter().zip(paths) {
        let r = &item.request;
        let size = match cogview_runtime::pipeline::check_size(folder, r.width, r.height) {
            Ok(w) if w.is_empty() => "size ok".to_string(),
            Ok(w) => w.join("; "),
            Err(e) => e.to_string(),
        };
        s += &format!(
            "image {:<4} {} ← line {}, seed {}, {} steps, guidance {}, {}x{} ({size})\n",
            item.index,
            path.display(),
            item.line,
            r.seed,
            r.steps,
            r.guidance,
            r.width,
            r.height
        );
    }
    s
}
