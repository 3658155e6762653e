//! `cogview inspect`: what a model folder holds, and what cogview would do with it here.

use anyhow::Result;
use clap::Args;
use cogview_runtime::import::hub::Files;
use cogview_runtime::import::inspect::inspect;
use cogview_runtime::plan::human as size;

use crate::DeviceArgs;
use crate::model::ModelArgs;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.3} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

pub fn run(args: InspectArgs) -> Result<()> {
    let folder = args.model.open(Files::All)?;
    println!("model      {}", folder.root.display());
    println!("pipeline   {}", folder.index.class_name);
    let components = inspect(&folder)?;
    for c in &components {
        println!("\n{} ({} {})", c.name, c.library, c.class);
        println!("  parameters {} in {} tensors", count(c.parameters), c.tensors);
        let dtypes: Vec<String> = c.dtypes.iter().map(|(d, n)| format!("{d} {}", count(*n))).collect();
        println!("  stored     {}", dtypes.join(", "));
        if let Some(index) = &c.index {
            println!("  index      {}", index.file_name().unwrap_or_default().to_string_lossy());
        }
        for (path, bytes) in &c.files {
            println!("  file       {} ({})", path.file_name().unwrap_or_default().to_string_lossy(), size(*bytes));
        }
        for (key, reason) in &c.ignored {
            println!("  ignored    {key}: {reason}");
        }
    }
    let c = &folder.configs;
    let (t, d, v, s) = (&c.text_encoder, &c.transformer, &c.vae, &c.scheduler);
    println!("\nconfig");
    println!("  text_encoder  d_model {}, d_ff {}, {} layers, {} heads × {}, vocab {}, {}", t.d_model, t.d_ff, t.num_layers, t.num_heads, t.d_kv, t.vocab_size, t.feed_forward_proj);
    println!(
        "  transformer   {} layers, {} heads × {} = {}, patch {}, text {}, time {}, condition {}, positions {}², sample {}",
        d.num_layers, d.num_attention_heads, d.attention_head_dim, d.inner_dim(), d.patch_size, d.text_embed_dim,
        d.time_embed_dim, d.condition_dim, d.pos_embed_max_size, d.sample_size
    );
    println!(
        "  vae           channels {:?}, {} resnets/level, {} groups, latent {}, scaling_factor {}, shift_factor {:?}, mid attention {}",
        v.block_out_channels, v.layers_per_block, v.norm_num_groups, v.latent_channels, v.scaling_factor, v.shift_factor, v.mid_block_add_attention
    );
    println!(
        "  scheduler     {} {}, betas {}..{} {}, snr shift {}, zero-SNR {}",
        s.prediction_type, s.timestep_spacing, s.beta_start, s.beta_end, s.beta_schedule, s.snr_shift_scale, s.rescale_betas_zero_snr
    );
    let target = cogview_runtime::target(args.device.device, args.device.backend, args.device.precision)?;
    println!("\non this machine");
    println!("  device        {} ({})", target.adapter.label(), target.capabilities.compiler);
    println!("  precision     {} — {}", target.precision.summary(), target.precision.reason);
    println!("  weights       stored on the device in {}", target.precision.dtype);
    for w in &target.warnings {
        println!("  warning       {w}");
    }
    Ok(())
}
