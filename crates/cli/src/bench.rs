//! `cogview bench`: stage timings and peak memory on random weights.

use anyhow::Result;
use clap::{Args, ValueEnum};
use cogview_runtime::bench::{BenchReport, BenchSettings, bench};
use cogview_runtime::import::ModelFolder;
use cogview_runtime::models::Configs;
use cogview_runtime::kernel_activity::Kernels;
use cogview_runtime::plan::{WeightsChoice, human, parse_size};
use cogview_runtime::{Quiet, Request, kernel_cache, matmul_kernel};

use crate::DeviceArgs;
use crate::generate::Bars;

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// A tiny model of the same architecture (the shape of the tests' base fixture).
    Tiny,
    /// The real CogView3-Plus-3B configuration.
    Full,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Text,
    /// img2img's VAE encoder, on a random picture of the bench's size.
    Encode,
    Denoise,
    Decode,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model configuration to instantiate with random weights.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// A model folder whose config files to use instead of a preset (weights are not read).
    #[arg(long)]
    config: Option<String>,
    /// Shorten the DiT and the T5 encoder to this many blocks.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    width: usize,
    #[arg(long, default_value_t = 1024)]
    height: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Text tokens (the pipeline's max_sequence_length).
    #[arg(long, default_value_t = 224)]
    text_len: usize,
    /// Run without classifier-free guidance (batch 1 instead of 2).
    #[arg(long)]
    no_cfg: bool,
    /// How DiT and VAE matrices are stored: auto (bf16, as the real checkpoint), bf16 or f32.
    #[arg(long, default_value = "auto")]
    weights: WeightsChoice,
    /// Device-memory budget the plan keeps to, e.g. 8GiB (default: what the adapter reports,
    /// else 8 GiB).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Stages to run, comma-separated: text, encode (img2img's VAE encoder), denoise, decode
    /// (default: a text-to-image run's). Without text the transformer gets random embeddings,
    /// without denoise the decoder random latents.
    #[arg(long, value_delimiter = ',', default_value = "text,denoise,decode")]
    stages: Vec<Stage>,
    /// Attention: auto (flash: on f16 tiles with bf16 products, else exact f32), or grouped
    /// (burn's attention in head groups, the path before flash), to compare the two.
    #[arg(long, value_enum, default_value = "auto")]
    attention: AttentionChoice,
    /// Sample device memory only between steps, as `generate` does, not at every module output:
    /// coarser peaks, but the steps run as a `generate`'s (a sample waits for the device and
    /// ends fused kernels there).
    #[arg(long)]
    no_memory_samples: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AttentionChoice {
    Auto,
    Grouped,
}

fn configs(config: &Option<String>, preset: Preset) -> Result<Configs> {
    Ok(match config {
        Some(dir) => ModelFolder::open(dir)?.configs,
        None => match preset {
            Preset::Tiny => Configs::tiny(),
            Preset::Full => Configs::cogview3_plus_3b(),
        },
    })
}

pub fn run(args: BenchArgs) -> Result<()> {
    let configs = configs(&args.config, args.preset)?;
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    let settings = BenchSettings {
        width: args.width,
        height: args.height,
        steps: args.steps,
        layers: args.layers,
        text_len: args.text_len,
        cfg: !args.no_cfg,
        weights: args.weights,
        max_memory: args.max_memory,
        stages: [Stage::Text, Stage::Encode, Stage::Denoise, Stage::Decode].map(|s| args.stages.contains(&s)),
        grouped_attention: args.attention == AttentionChoice::Grouped,
        sample_memory: !args.no_memory_samples,
    };
    let report = bench(&configs, &settings, &target, &mut Quiet)?;
    let json = serde_json::json!({
        "device": target.adapter.label(),
        "compiler": target.capabilities.compiler,
        "precision": target.precision.dtype,
        "matmul": target.precision.matmul,
        "attention": match (args.attention, target.precision.flash) {
            (AttentionChoice::Grouped, _) => "grouped",
            (_, Some(_)) => "f16 tiles",
            (_, None) => "f32",
        },
        "kernel_cache": kernel_cache::active(),
        // Whether the peaks come from every module's output (and the steps wait there) or
        // from between steps only, as a `generate` runs.
        "memory_samples": !args.no_memory_samples,
        "matmul_kernel": matmul_kernel::chosen().map_or("autotune".to_string(), |i| matmul_kernel::candidates()[i].to_string()),
        "image_seconds": report.image_seconds(Request::new("").steps),
        "report": report,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", table(&report, &target.adapter.label(), &target.precision.summary()));
    }
    Ok(())
}

fn table(r: &BenchReport, device: &str, precision: &str) -> String {
    let mib = |b: Option<u64>| b.map_or("-".to_string(), human);
    let p = &r.plan;
    let mut s = format!(
        "{device}, {precision}: {}x{}, {} steps, T5 {} layers, DiT {} layers; weights {}; budget {} ({})\n",
        r.width, r.height, r.steps, r.t5_layers, r.dit_layers, p.storage, human(p.budget.bytes), p.budget.source
    );
    s += &format!(
        "{:<18}{:>10}{:>10}{:>14}{:>14}{:>16}{:>14}{:>20}  {}\n",
        "stage", "seconds", "load s", "peak in use", "reserved", "full depth", "plan", "kernels comp/tuned", "mode"
    );
    let rows = [
        ("T5", r.t5_seconds, r.t5_load_seconds, &r.t5_peak, r.t5_peak_full_depth, p.text.peak_bytes, r.t5_kernels, p.text.mode.to_string()),
        ("VAE encode", r.encode_seconds, r.encode_load_seconds, &r.encode_peak, r.encode_peak.in_use, p.encode_image.map_or(0, |e| e.peak_bytes), r.encode_kernels, p.encode_image.map_or("-".into(), |e| e.mode.to_string())),
        ("DiT first step", r.first_step_seconds, r.dit_load_seconds, &r.dit_peak, r.dit_peak_full_depth, p.denoise.peak_bytes, r.dit_kernels, p.denoise.mode.to_string()),
        ("VAE decode", r.vae_seconds, r.vae_load_seconds, &r.vae_peak, r.vae_peak_full_depth, p.decode.peak_bytes, r.vae_kernels, p.decode.mode.to_string()),
    ];
    for (name, secs, load, peak, full, plan, kernels, mode) in rows {
        s += &format!(
            "{name:<18}{secs:>10.3}{load:>10.3}{:>14}{:>14}{:>16}{:>14}{:>20}  {mode}\n",
            mib(peak.in_use),
            mib(peak.reserved),
            mib(full),
            human(plan),
            format!("{}/{}", kernels.compiled, kernels.tuned)
        );
    }
    s += &format!("{:<18}{:>10.3}\n", "DiT median step", r.median_step_seconds);
    s += &format!("{:<18}{:>10.4}\n", "guard per step", r.guard_seconds_per_step);
    let steps = Request::new("").steps;
    s += &format!(
        "{:<18}{:>10.3}  (T5, loads, first step, {} median steps, VAE decode; at this run's depth)\n",
        format!("image, {steps} steps"),
        r.image_seconds(steps),
        steps - 1
    );
    s
}

#[derive(Args)]
pub struct WarmupArgs {
    /// Model configuration: the real CogView3-Plus-3B, or the tests' tiny one.
    #[arg(long, value_enum, default_value = "full")]
    preset: Preset,
    /// A model folder whose config files to use instead of a preset (weights are not read).
    #[arg(long)]
    config: Option<String>,
    #[arg(short = 'W', long, default_value_t = 1024)]
    width: usize,
    #[arg(short = 'H', long, default_value_t = 1024)]
    height: usize,
    /// Text tokens (the pipeline's max_sequence_length).
    #[arg(long, default_value_t = 224)]
    max_sequence_length: usize,
    /// Warm up for images without classifier-free guidance (batch 1 instead of 2).
    #[arg(long)]
    no_cfg: bool,
    /// As `generate --weights`: the storage changes which kernels run.
    #[arg(long, default_value = "auto")]
    weights: WeightsChoice,
    /// As `generate --max-memory`: the plan (streaming, VAE tiles) changes which kernels run.
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `cogview warmup`: two blocks of the text encoder and of the transformer and the whole VAE
/// decoder, on random weights, at the size and plan a `generate` with the same flags gets: every
/// kernel that run needs is compiled and tuned, and the kernel cache keeps them.
pub fn warmup(args: WarmupArgs, quiet: bool) -> Result<()> {
    let configs = configs(&args.config, args.preset)?;
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    if target.adapter.api == cogview_runtime::Api::Cpu {
        if !quiet {
            println!("{}: the CPU backend compiles no kernels; nothing to warm up", target.adapter.label());
        }
        return Ok(());
    }
    let cache = kernel_cache::active();
    let settings = BenchSettings {
        width: args.width,
        height: args.height,
        steps: 1,
        // T5's first block alone computes the relative position bias and the others reuse it,
        // so their attention fuses into other kernels: with one block, a `generate` under bf16
        // products (rehearsed on lavapipe) still tuned one of those. Two cover every block.
        layers: Some(2),
        text_len: args.max_sequence_length,
        cfg: !args.no_cfg,
        weights: args.weights,
        max_memory: args.max_memory,
        stages: [true, false, true, true],
        grouped_attention: false,
        // The kernels a `generate` launches: no memory samples, which would end fused kernels
        // where a `generate` does not.
        sample_memory: false,
    };
    let (start, before) = (std::time::Instant::now(), Kernels::now());
    let mut bars = Bars::new(quiet);
    bench(&configs, &settings, &target, &mut bars)?;
    cogview_runtime::Progress::finish(&mut bars);
    if quiet {
        return Ok(());
    }
    let seconds = start.elapsed().as_secs_f64();
    let kernels = Kernels::now().since(before);
    match cache {
        Some(c) => {
            let (entries, bytes) = kernel_cache::size_of(&c.entries);
            println!(
                "{} in {}: {}x{} warmed up in {seconds:.1} s ({kernels}); the kernel cache {} holds {entries} entries ({})",
                target.adapter.label(),
                target.precision.summary(),
                args.width,
                args.height,
                c.entries.display(),
                human(bytes)
            );
        }
        None => println!("{}: ran in {seconds:.1} s, but the kernel cache is off: nothing was kept", target.adapter.label()),
    }
    Ok(())
}
