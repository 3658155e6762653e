//! `cogview info IMAGE.png`: the settings an image was made with.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use cogview_runtime::metadata::{MetadataError, Settings};
use cogview_runtime::output::read_png_text;

#[derive(Args)]
pub struct InfoArgs {
    /// A PNG written by `cogview generate`.
    image: PathBuf,
    /// Print the settings as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let settings = match Settings::read_png(&args.image) {
        Ok(s) => s,
        // Another tool's image: show what it wrote, as it wrote it.
        Err(MetadataError::NotCogview { a1111: true, .. }) if !args.json => {
            let chunks = read_png_text(&args.image)?;
            let parameters = chunks.into_iter().find(|(k, _)| k == "parameters").map(|(_, v)| v).unwrap_or_default();
            println!("{parameters}");
            return Ok(());
        }
        Err(e) => bail!(e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    let s = &settings;
    let mut rows = vec![
        ("prompt", s.prompt.clone()),
        ("negative prompt", s.negative_prompt.clone().unwrap_or_else(|| "(none: zeros)".into())),
        ("seed", s.seed.to_string()),
        ("steps", s.steps.to_string()),
        ("guidance", s.guidance.to_string()),
        ("size", format!("{}x{}", s.width, s.height)),
        ("max seq. length", s.max_sequence_length.to_string()),
        ("model", s.model.clone()),
        ("precision", format!("{} (asked: {}): {}", s.precision_summary(), s.precision_requested, s.precision_reason)),
        ("adapter", s.adapter.clone()),
        ("software", s.software.clone()),
    ];
    if let Some([h, w]) = s.original_size {
        rows.push(("original size", format!("{w}x{h}")));
    }
    if s.crop_coords != [0, 0] {
        rows.push(("crop top,left", format!("{},{}", s.crop_coords[0], s.crop_coords[1])));
    }
    if let Some(l) = &s.latents {
        rows.push(("latents", l.clone()));
    }
    for f in &s.fallbacks {
        rows.push(("fallback", f.clone()));
    }
    for (k, v) in rows {
        println!("{k:<16} {v}");
    }
    Ok(())
}
