//! `cogview devices`: every adapter, what it can do, and what cogview would choose.

use anyhow::{Result, bail};
use clap::Args;
use cogview_runtime::{Survey, survey};

use crate::DeviceArgs;

#[derive(Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also list GL adapters (not probed otherwise: starting EGL prints driver messages on
    /// machines without a display session, and cogview never prefers GL).
    #[arg(long)]
    all: bool,
}

pub fn run(args: DevicesArgs) -> Result<()> {
    let d = &args.device;
    let survey = survey(d.device, d.backend, d.precision, args.all);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&survey)?);
    } else {
        print!("{}", table(&survey));
    }
    if let Some(e) = &survey.selection_error {
        bail!("{e}");
    }
    let selected = survey.rows.iter().find(|r| r.selected).expect("a selection marks one row");
    if let Some(e) = &selected.error {
        bail!("{e}");
    }
    Ok(())
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{} MiB", b >> 20),
    }
}

fn table(s: &Survey) -> String {
    let header = ["", "#", "adapter", "vendor", "type", "api", "compiler", "f32", "f16", "bf16", "bf16 products", "f16 tiles", "max buffer", "max binding", "driver"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in &s.rows {
        let caps = r.capabilities.as_ref();
        let dt = |f: &dyn Fn(&cogview_runtime::Capabilities) -> String| caps.map_or("?".to_string(), f);
        rows.push(vec![
            if r.selected { "*".into() } else { String::new() },
            r.adapter.index.map_or("cpu".into(), |i| i.to_string()),
            r.adapter.name.clone(),
            r.adapter.vendor.clone(),
            r.adapter.adapter_type.to_string(),
            r.adapter.api.to_string(),
            dt(&|c| c.compiler.to_string()),
            dt(&|c| c.f32.to_string()),
            dt(&|c| c.f16.to_string()),
            dt(&|c| c.bf16.to_string()),
            dt(&|c| if c.bf16_products { "yes".into() } else { "no".into() }),
            dt(&|c| if c.flash_tiles.is_some() { "yes".into() } else { "no".into() }),
            bytes(r.adapter.max_buffer_size),
            bytes(r.adapter.max_storage_binding_size),
            r.adapter.driver.clone(),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("\nprecision {} on each adapter:\n", s.requested));
    for r in &s.rows {
        let id = r.adapter.index.map_or("cpu".into(), |i| i.to_string());
        let verdict = match (&r.precision, &r.error) {
            (Some(p), _) => format!("{} — {}", p.summary(), p.reason),
            (None, Some(e)) => format!("unusable — {e}"),
            (None, None) => "?".into(),
        };
        out.push_str(&format!("  {id:>3}  {verdict}\n"));
        if let Some(p) = &r.precision {
            if let Some(t) = &p.self_test {
                out.push_str(&format!(
                    "       self-test of {}: error {:.2e}, tolerance {:.0e}: {}\n",
                    t.what,
                    t.error,
                    t.tolerance,
                    if t.passed { "passed" } else { "FAILED" }
                ));
            }
            for w in &p.warnings {
                out.push_str(&format!("       warning: {w}\n"));
            }
        }
    }
    match (s.rows.iter().find(|r| r.selected), &s.selection_error) {
        (Some(r), _) => {
            out.push_str(&format!("\ncogview would use {}", r.adapter.label()));
            if let Some(p) = &r.precision {
                out.push_str(&format!(" in {}", p.summary()));
            }
            out.push('\n');
            if let Some(w) = &s.selection_warning {
                out.push_str(&format!("warning: {w}\n"));
            }
        }
        (None, Some(e)) => out.push_str(&format!("\nno adapter selected: {e}\n")),
        (None, None) => {}
    }
    out
}
