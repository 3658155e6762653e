//! `cogview bench`: stage timings and peak memory on random weights.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use cogview_runtime::bench::{BenchReport, BenchSettings, bench};
use cogview_runtime::import::ModelFolder;
use cogview_runtime::models::dit::DitConfig;
use cogview_runtime::models::t5::T5Config;
use cogview_runtime::models::vae::VaeConfig;

use crate::DeviceArgs;

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// The tiny test model (tests/fixtures/base).
    Tiny,
    /// The real CogView3-Plus-3B configuration.
    Full,
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
    };
    let report = bench(&t5, &dit, &vae, &settings, &target.device, target.precision.dtype.dtype());
    let json = serde_json::json!({
        "device": target.adapter.label(),
        "compiler": target.capabilities.compiler,
        "precision": target.precision.dtype,
        "report": report,
        "full_depth_estimate_bytes": {
            "dit_weights": report.dit_block_weight_bytes * dit.num_layers as u64,
            "t5_block": report.t5_block_weight_bytes,
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", table(&report, &target.adapter.label(), &target.precision.dtype.to_string()));
    }
    Ok(())
}

fn table(r: &BenchReport, device: &str, precision: &str) -> String {
    let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64));
    let mut s = format!(
        "{device}, {precision}: {}x{}, {} steps, T5 {} layers, DiT {} layers\n",
        r.width, r.height, r.steps, r.t5_layers, r.dit_layers
    );
    s += &format!("{:<22}{:>12}{:>14}\n", "stage", "seconds", "peak memory");
    s += &format!("{:<22}{:>12.3}{:>14}\n", "T5 (streamed)", r.t5_seconds, mib(r.t5_peak.in_use));
    s += &format!("{:<22}{:>12.3}{:>14}\n", "DiT first step", r.first_step_seconds, mib(r.dit_peak.in_use));
    s += &format!("{:<22}{:>12.3}\n", "DiT median step", r.median_step_seconds);
    s += &format!("{:<22}{:>12.4}\n", "guard per step", r.guard_seconds_per_step);
    s += &format!("{:<22}{:>12.3}{:>14}\n", "VAE decode", r.vae_seconds, mib(r.vae_peak.in_use));
    s
}
