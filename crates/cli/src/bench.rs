//! `cogview bench`: stage timings and peak memory on random weights.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use cogview_runtime::bench::{BenchReport, BenchSettings, bench};
use cogview_runtime::import::ModelFolder;
use cogview_runtime::models::dit::DitConfig;
use cogview_runtime::models::t5::T5Config;
use cogview_runtime::models::vae::VaeConfig;
use cogview_runtime::plan::{WeightsChoice, human, parse_size};

use crate::DeviceArgs;

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// The tiny test model (tests/fixtures/base).
    Tiny,
    /// The real CogView3-Plus-3B configuration.
    Full,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Text,
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
    /// Stages to run, comma-separated: text, denoise, decode (default all). Without text the
    /// transformer gets random embeddings.
    #[arg(long, value_delimiter = ',', default_value = "text,denoise,decode")]
    stages: Vec<Stage>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

const TINY: [&str; 3] = [
    include_str!("../../../tests/fixtures/base/pipeline/text_encoder/config.json"),
    include_str!("../../../tests/fixtures/base/pipeline/transformer/config.json"),
    include_str!("../../../tests/fixtures/base/pipeline/vae/config.json"),
];
const FULL: [&str; 3] = [
    include_str!("../../../tests/fixtures/real/text_encoder/config.json"),
    include_str!("../../../tests/fixtures/real/transformer/config.json"),
    include_str!("../../../tests/fixtures/real/vae/config.json"),
];

pub fn run(args: BenchArgs) -> Result<()> {
    let (t5, dit, vae): (T5Config, DitConfig, VaeConfig) = match &args.config {
        Some(dir) => {
            let f = ModelFolder::open(dir)?;
            (f.text_encoder, f.transformer, f.vae)
        }
        None => {
            let c = match args.preset {
                Preset::Tiny => TINY,
                Preset::Full => FULL,
            };
            (serde_json::from_str(c[0])?, serde_json::from_str(c[1])?, serde_json::from_str(c[2])?)
        }
    };
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
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
        max_binding: target.adapter.max_storage_binding_size,
        stages: [Stage::Text, Stage::Denoise, Stage::Decode].map(|s| args.stages.contains(&s)),
    };
    let report = bench(&t5, &dit, &vae, &settings, &target.device, target.precision.dtype.dtype());
    let json = serde_json::json!({
        "device": target.adapter.label(),
        "compiler": target.capabilities.compiler,
        "precision": target.precision.dtype,
        "report": report,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", table(&report, &target.adapter.label(), &target.precision.dtype.to_string()));
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
    s += &format!("{:<18}{:>10}{:>14}{:>14}{:>16}{:>14}  {}\n", "stage", "seconds", "peak in use", "reserved", "full depth", "plan", "mode");
    let rows = [
        ("T5", r.t5_seconds, &r.t5_peak, r.t5_peak_full_depth, &p.text),
        ("DiT first step", r.first_step_seconds, &r.dit_peak, r.dit_peak_full_depth, &p.denoise),
        ("VAE decode", r.vae_seconds, &r.vae_peak, r.vae_peak_full_depth, &p.decode),
    ];
    for (name, secs, peak, full, plan) in rows {
        s += &format!(
            "{name:<18}{secs:>10.3}{:>14}{:>14}{:>16}{:>14}  {}\n",
            mib(peak.in_use),
            mib(peak.reserved),
            mib(full),
            human(plan.peak_bytes),
            plan.mode
        );
    }
    s += &format!("{:<18}{:>10.3}\n", "DiT median step", r.median_step_seconds);
    s += &format!("{:<18}{:>10.4}\n", "guard per step", r.guard_seconds_per_step);
    s
}
