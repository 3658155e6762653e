//! `cogview generate`: a prompt in, a PNG out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use cogview_runtime::batch::{Item, PromptLine, expand, output_paths, read_prompts};
use cogview_runtime::guard::CheckFinite;
use cogview_runtime::import::ModelFolder;
use cogview_runtime::import::hub::Files;
use cogview_runtime::init_image::InitImage;
use cogview_runtime::kernel_activity::{self, Kernels};
use cogview_runtime::metadata::Settings;
use cogview_runtime::output::{read_latents, save_png, save_tensors};
use cogview_runtime::pipeline::plan_folder;
use cogview_runtime::plan::{Plan, WeightsChoice, human, parse_size};
use cogview_runtime::{ComputeDtype, Field, Options, Output, Pipeline, Precision, Progress, Request, Stage, Target};
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
    #[arg(long, short, required_unless_present_any = ["prompts", "from"], conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Make an image again: the seed, steps, guidance, size, prompts, precision and model
    /// written in a cogview PNG (`cogview info` shows them). Flags given as well override them.
    #[arg(long, value_name = "IMAGE.png", conflicts_with = "prompts")]
    from: Option<PathBuf>,
    /// A file of prompts: one per line, or JSON Lines ({"prompt": …} with optional
    /// "negative_prompt", "seed", "steps", "guidance", "width", "height", "init_image" (relative
    /// to the file's folder) and "strength" overriding the flags). Empty lines and lines
    /// starting with # are skipped.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Images per prompt, with seeds SEED, SEED+1, … (SEED: the line's own, else --seed).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// What to steer away from. Without it the unconditional embedding is zeros (as diffusers).
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,
    /// Denoising steps (the model card uses 50).
    #[arg(long, default_value_t = 50, visible_alias = "num-inference-steps")]
    steps: usize,
    /// Classifier-free guidance scale (the model card uses 7.0); 1 or less turns guidance off
    /// (half the compute).
    #[arg(long, default_value_t = 5.0, visible_aliases = ["cfg-scale", "guidance-scale"])]
    guidance: f32,
    /// Image width in pixels: a multiple of 16 up to 2048; the model card recommends 512–2048,
    /// multiples of 32, width × height ≤ 2^21.
    #[arg(long, short = 'W', default_value_t = 1024)]
    width: usize,
    /// Image height in pixels (as --width).
    #[arg(long, short = 'H', default_value_t = 1024)]
    height: usize,
    /// Seed of the initial noise (ChaCha8 + standard normal on the CPU: the same image on every
    /// device). Random, and printed, when not given.
    #[arg(long, short = 's')]
    seed: Option<u64>,
    /// Prompt tokens given to the text encoder, 1 to 224 (longer prompts are truncated, with a
    /// warning).
    #[arg(long, default_value_t = 224)]
    max_sequence_length: usize,
    /// Size conditioning `H,W` (default: the output size).
    #[arg(long, value_parser = pair)]
    original_size: Option<[usize; 2]>,
    /// Crop conditioning `TOP,LEFT`.
    #[arg(long, value_parser = pair, default_value = "0,0")]
    crop_coords: [usize; 2],
    /// Initial latents: a safetensors file with one tensor `latents` [1,16,H/8,W/8], any float
    /// dtype, instead of seeded noise (with --init-image: the noise added to the picture).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// img2img: start from this picture (PNG, JPEG or WebP; RGB, RGBA or gray, alpha
    /// dropped). The image is made at the picture's size unless --width/--height say otherwise
    /// (it is then resized with Lanczos, as PIL does).
    #[arg(long, short = 'i', visible_alias = "init-img", value_name = "FILE")]
    init_image: Option<PathBuf>,
    /// img2img: how much of the schedule runs, 0 to 1: 1 starts from noise (the picture is
    /// only a hint of its size), 0 runs no step and returns the picture through the VAE.
    #[arg(long, default_value_t = cogview_runtime::request::DEFAULT_STRENGTH)]
    strength: f64,
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

/// One bar per stage on a terminal; log lines otherwise; nothing with `-q`.
pub(crate) struct Bars {
    bar: Option<ProgressBar>,
    terminal: bool,
    quiet: bool,
    stage: &'static str,
    total: usize,
    /// Kernels compiled and tuned when the bar last moved (the bar says "compiling" while the
    /// count grows past it; the log says what each step compiled).
    at_step: Arc<Mutex<Kernels>>,
}

/// A rate as people read it: `2.5 it/s`, or `4.0 s/it` below one step a second.
fn rate(per_second: f64) -> String {
    if per_second >= 1.0 || per_second <= 0.0 {
        format!("{per_second:.2} it/s")
    } else {
        format!("{:.1} s/it", 1.0 / per_second)
    }
}

impl Bars {
    pub(crate) fn new(quiet: bool) -> Self {
        Bars { bar: None, terminal: std::io::stderr().is_terminal(), quiet, stage: "", total: 0, at_step: Default::default() }
    }

    /// Marks the kernels counted so far; returns what was compiled and tuned since the last mark.
    fn mark(&self) -> Kernels {
        let now = Kernels::now();
        let mut at = self.at_step.lock().unwrap_or_else(|e| e.into_inner());
        now.since(std::mem::replace(&mut *at, now))
    }
}

/// The end of the bar: the step rate and the time left, or, while a step compiles GPU kernels
/// (where a first run on an adapter spends most of its time, with no rate to show), how many so
/// far and, when the last one finished a while ago, which and when (a compilation that takes
/// long, or does not end).
fn status(s: &indicatif::ProgressState, at_step: &Mutex<Kernels>) -> String {
    let at = *at_step.lock().unwrap_or_else(|e| e.into_inner());
    compile_status(Kernels::now(), at, kernel_activity::last_compiled())
        .unwrap_or_else(|| format!("{} eta {:#}", rate(s.per_sec()), indicatif::HumanDuration(s.eta())))
}

/// What the bar says while kernels compiled since the step began (`now` past `at`): the counts
/// so far, and the last kernel compiled when it finished 5 s ago or more. `None` otherwise.
fn compile_status(now: Kernels, at: Kernels, last: Option<(String, Duration)>) -> Option<String> {
    let (name, ago) = last.filter(|_| now.compiled > at.compiled)?;
    // `cubek_matmul::…::MatmulEntry` → `MatmulEntry`.
    let short = name.rsplit("::").next().unwrap_or(&name);
    let wait = if ago.as_secs() >= 5 { format!(", last ({short}) {} s ago", ago.as_secs()) } else { String::new() };
    Some(format!("compiling kernels {}, tuned {}{wait}", now.compiled, now.tuned))
}

impl Progress for Bars {
    fn stage(&mut self, stage: Stage, steps: usize) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        let name = stage.short();
        self.stage = name;
        self.total = steps;
        if self.quiet {
            return;
        }
        self.mark();
        if self.terminal {
            let at_step = self.at_step.clone();
            let style = ProgressStyle::with_template("{prefix:>8} [{bar:24}] {pos}/{len} {elapsed} {status}")
                .expect("valid template")
                .with_key("status", move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&status(s, &at_step));
                })
                .progress_chars("=> ");
            let bar = ProgressBar::new(steps as u64).with_style(style).with_prefix(name);
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        } else {
            tracing::info!("{name}: {steps} step(s)");
        }
    }

    fn step(&mut self, done: usize, elapsed: Duration) {
        if self.quiet {
            return;
        }
        let kernels = self.mark();
        let compiled = if kernels.is_empty() { String::new() } else { format!(" ({kernels})") };
        match &self.bar {
            Some(b) => b.set_position(done as u64),
            None if self.total > 1 => {
                let per_second = done as f64 / elapsed.as_secs_f64().max(1e-9);
                let eta = (self.total - done) as f64 / per_second.max(1e-9);
                tracing::info!("{} {done}/{}: {}, eta {eta:.0} s{compiled}", self.stage, self.total, rate(per_second));
            }
            None => tracing::info!("{} done in {:.1} s{compiled}", self.stage, elapsed.as_secs_f64()),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// Whether the run compiles GPU kernels (any adapter but burn's CPU backend).
fn pipeline_needs_kernels(target: &Target) -> bool {
    target.adapter.api != cogview_runtime::Api::Cpu
}

/// `--from IMAGE.png`: the settings of the image fill in every flag not given (`explicit`
/// says which were, on the command line or in the environment).
/// Returns how the image was computed, when `--precision` was not given.
fn apply_from(args: &mut GenerateArgs, explicit: &dyn Fn(&str) -> bool) -> Result<Option<FromPrecision>> {
    let Some(path) = args.from.clone() else { return Ok(None) };
    let s = Settings::read_png(&path)?;
    if s.latents.is_some() && args.latents.is_none() {
        bail!("{} was made from --latents {}: pass --latents FILE to make it again", path.display(), s.latents.unwrap_or_default());
    }
    if let Some(init) = &s.init_image {
        if args.init_image.is_none() {
            bail!("{} was made from the init image {}: pass --init-image FILE to make it again", path.display(), init.name);
        }
        if !explicit("strength") {
            args.strength = init.strength;
        }
    }
    args.prompt.get_or_insert(s.prompt);
    macro_rules! fill {
        ($($field:ident = $value:expr),+ $(,)?) => {$(
            if !explicit(stringify!($field)) {
                args.$field = $value;
            }
        )+};
    }
    fill! {
        negative_prompt = s.negative_prompt,
        seed = Some(s.seed),
        steps = s.steps,
        guidance = s.guidance,
        width = s.width,
        height = s.height,
        max_sequence_length = s.max_sequence_length,
        original_size = s.original_size,
        crop_coords = s.crop_coords,
    }
    if !explicit("model") {
        args.model.model = s.model;
    }
    if !explicit("precision") {
        // What was asked for, so the metadata comes out the same; `run` narrows it to the
        // dtype the image was computed in if this machine decides otherwise.
        args.device.precision = s.precision_requested;
        return Ok(Some(FromPrecision {
            dtype: s.precision,
            matmul: s.matrix_products.unwrap_or(s.precision),
            f16_tiles: s.f16_tile_attention,
        }));
    }
    Ok(None)
}

/// How a `--from` image was computed: its dtype, the dtype its matrix products read, and
/// whether its attention ran on f16 tiles.
struct FromPrecision {
    dtype: ComputeDtype,
    matmul: ComputeDtype,
    f16_tiles: bool,
}

pub fn run(mut args: GenerateArgs, quiet: bool, explicit: &dyn Fn(&str) -> bool) -> Result<()> {
    let from = apply_from(&mut args, explicit)?;
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 % 1_000_000_007
    });
    let from_file = args.prompts.is_some();
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
    defaults.strength = args.strength;
    let mut items = expand(&lines, args.count as usize, &defaults);
    if items.len() > 1 && (args.save_tensors.is_some() || args.latents.is_some()) {
        bail!("--save-tensors and --latents are for one image; this run makes {}", items.len());
    }
    let template = args.output.clone().unwrap_or_else(|| {
        if items.len() == 1 { "cogview.png".into() } else { "cogview-{index}-{seed}.png".into() }
    });
    let paths = output_paths(&template, &items, args.overwrite)?;

    // `--from` gives the size the image was made at.
    let sized = |flag| explicit(flag) || args.from.is_some();
    attach_init_images(&mut items, args.init_image.as_deref(), [sized("width"), sized("height")])?;
    let folder = args.model.open(if args.dry_run { Files::Configs } else { Files::All })?;
    let mut requests: Vec<Request> = items.iter().map(|i| i.request.clone()).collect();
    if let Some(path) = &args.latents {
        let [c, h, w] = requests[0].latent_shape(&folder.configs);
        requests[0].latents = Some(read_latents(path, [1, c, h, w]).map_err(anyhow::Error::msg)?);
    }
    // Every request is checked before anything is loaded (the warnings come with the output).
    for (item, request) in items.iter().zip(&requests) {
        let checked = request.validate(&folder.configs).map_err(|e| match (&request.init_image, e.field) {
            (Some(image), Field::Width | Field::Height) => anyhow::anyhow!(
                "{e} (the init image {} is {}x{}: pass --width and --height to resize it)",
                image.name,
                image.width,
                image.height
            ),
            _ => e.into(),
        });
        if from_file {
            checked.with_context(|| format!("prompt line {}", item.line))?;
        } else {
            checked?;
        }
    }
    let mut target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    if let Some(from) = &from {
        if (from.dtype, from.matmul) != (target.precision.dtype, target.precision.matmul) {
            // bf16 products in an f32 run are what `--precision bf16` gives where the adapter
            // has them but no bf16 arithmetic.
            let (request, what) = match (from.dtype, from.matmul) {
                (ComputeDtype::F32, ComputeDtype::Bf16) => (Precision::Bf16, "f32, bf16 matrix products".to_string()),
                (dtype, _) => (dtype.into(), dtype.to_string()),
            };
            tracing::info!("--from: computing in {what} as the image was, not {}", target.precision.summary());
            target = cogview_runtime::target(args.device.device, args.device.backend, request)?;
        }
        if let Some(warning) = target.precision.match_attention(from.f16_tiles, &target.adapter.label()) {
            tracing::warn!("--from: {warning}");
        }
    }
    let options = Options { weights: args.weights, max_memory: args.max_memory, check: args.check_finite, ..Options::default() };
    if args.dry_run {
        let plan = plan_folder(&folder, &target, &options, &requests)?;
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
    match cogview_runtime::kernel_cache::active() {
        Some(c) if c.fresh => tracing::info!(
            "first run on this adapter and driver: every GPU kernel is compiled and tuned as the run meets it (minutes at 1024²); \
             kept in {} for the next runs (`cogview warmup` does it ahead of time)",
            c.entries.display()
        ),
        None if pipeline_needs_kernels(&target) => {
            tracing::info!("the kernel cache is off: every GPU kernel is compiled and tuned again in this run")
        }
        _ => {}
    }
    let mut bars = Bars::new(quiet);
    let mut pipeline = Pipeline::load(folder, target, options)?;
    let batch = pipeline.generate_batch(&requests, &mut bars)?;
    let mut shown = Vec::new();
    for ((out, request), path) in batch.outputs.iter().zip(&requests).zip(&paths) {
        for w in &out.warnings {
            if !shown.contains(w) {
                tracing::warn!("{w}");
                shown.push(w.clone());
            }
        }
        save(&args, pipeline.target(), out, request, path)?;
        if quiet {
            println!("{}", path.display());
        } else {
            eprintln!("wrote {} ({}x{}, seed {})", path.display(), out.width, out.height, request.seed);
        }
    }
    if quiet {
        return Ok(());
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
    if pipeline_needs_kernels(pipeline.target()) {
        // What the run spent compiling and tuning: all of a first run's slowness, none of a
        // warm one's (where the kernel cache holds compiled kernels: SPIR-V and MSL, not WGSL).
        let stages = [("encode", Some(&out.text)), ("image", out.encode_image.as_ref()), ("denoise", Some(&out.denoise)), ("decode", Some(&out.decode))];
        let each: Vec<String> = stages
            .iter()
            .filter_map(|(name, s)| s.map(|s| format!("{name} {}/{}", s.kernels.compiled, s.kernels.tuned)))
            .collect();
        eprintln!("GPU kernels compiled/tuned: {}", each.join(", "));
    }
    Ok(())
}

/// img2img: each item's init image (its line's, else `--init-image`; each file read once), and
/// its size where neither its line nor the flags (`given`: width, height) set it.
fn attach_init_images(items: &mut [Item], default: Option<&std::path::Path>, given: [bool; 2]) -> Result<()> {
    let mut read: Vec<(PathBuf, InitImage)> = Vec::new();
    for item in items {
        let Some(path) = item.init_image.clone().or_else(|| default.map(PathBuf::from)) else { continue };
        let image = match read.iter().find(|(p, _)| *p == path) {
            Some((_, image)) => image.clone(),
            None => {
                let image = InitImage::open(&path)?;
                read.push((path, image.clone()));
                image
            }
        };
        let r = &mut item.request;
        if !(item.sized[0] || given[0]) {
            r.width = image.width;
        }
        if !(item.sized[1] || given[1]) {
            r.height = image.height;
        }
        r.init_image = Some(image);
    }
    Ok(())
}

/// Writes one image (and `--save-tensors`), with the run's settings in PNG text chunks.
fn save(args: &GenerateArgs, target: &Target, out: &Output, request: &Request, path: &std::path::Path) -> Result<()> {
    let mut settings = Settings::new(request, out, &args.model.model, target);
    settings.latents = args.latents.as_ref().map(|p| p.display().to_string());
    let text = settings.png_text();
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
    s += &format!("precision   {}: {}\n", target.precision.summary(), target.precision.reason);
    for w in &target.precision.warnings {
        s += &format!("            warning: {w}\n");
    }
    s += &plan.report();
    s += "\n";
    for (item, path) in items.iter().zip(paths) {
        let r = &item.request;
        let size = match cogview_runtime::request::check_size(&folder.configs, r.width, r.height) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_steps_read_as_seconds_per_step() {
        assert_eq!(rate(0.25), "4.0 s/it");
        assert_eq!(rate(2.5), "2.50 it/s");
        assert_eq!(rate(1.0), "1.00 it/s");
    }

    /// The bar speaks of compiling only while the step compiles, and names the last kernel when
    /// it finished long ago.
    #[test]
    fn the_bar_says_when_a_step_compiles() {
        let k = |compiled, tuned| Kernels { compiled, tuned };
        let last = |secs| Some(("cubek_matmul::multi_level::MatmulEntry".to_string(), Duration::from_secs(secs)));
        assert_eq!(compile_status(k(10, 2), k(10, 2), last(1)), None, "nothing compiled in this step");
        assert_eq!(compile_status(k(0, 0), k(0, 0), None), None);
        assert_eq!(compile_status(k(12, 3), k(10, 2), last(1)).as_deref(), Some("compiling kernels 12, tuned 3"));
        assert_eq!(compile_status(k(12, 3), k(10, 2), last(42)).as_deref(), Some("compiling kernels 12, tuned 3, last (MatmulEntry) 42 s ago"));
    }
}
