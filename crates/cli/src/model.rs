//! `--model`: a diffusers folder, or a hub id fetched into the Hugging Face cache on first use.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Args;
use cogview_runtime::import::hub::{self, FetchProgress, Files, Hub};
use cogview_runtime::import::{ModelFolder, location};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A diffusers model folder, or a hub id: downloaded into the Hugging Face cache (HF_HOME)
    /// on first use from HF_ENDPOINT (default huggingface.co) with HF_TOKEN, resuming an
    /// interrupted download.
    #[arg(long, default_value = "THUDM/CogView3-Plus-3B", env = "COGVIEW_MODEL")]
    pub model: String,
    /// Never touch the network: use the cached copy of a hub id.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = clap::builder::FalseyValueParser::new())]
    pub offline: bool,
}

impl ModelArgs {
    /// Opens the model, fetching `which` files of a hub id first unless `--offline`.
    pub fn open(&self, which: Files) -> Result<ModelFolder> {
        if !location::is_hub_id(&self.model) {
            return Ok(ModelFolder::open(&self.model)?);
        }
        if self.offline {
            return ModelFolder::open(&self.model).with_context(|| format!("--offline: {} must already be in the cache", self.model));
        }
        let hub = Hub::from_env();
        let mut bars = Downloads { multi: MultiProgress::new(), terminal: std::io::stderr().is_terminal() };
        let snapshot = hub::fetch(&hub, &self.model, which, &mut bars)?;
        Ok(ModelFolder::open(snapshot.to_str().context("the cache path is not UTF-8")?)?)
    }
}

/// One bar per downloaded file on a terminal, a log line otherwise.
struct Downloads {
    multi: MultiProgress,
    terminal: bool,
}

impl FetchProgress for Downloads {
    type Bar = Bar;
    fn file(&mut self, name: &str, size: u64) -> Bar {
        if !self.terminal {
            tracing::info!("downloading {name} ({})", HumanBytes(size));
            return Bar(None);
        }
        let style = ProgressStyle::with_template("{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(size).with_style(style).with_message(name.to_string()));
        Bar(Some(bar))
    }
}

struct Bar(Option<ProgressBar>);

impl hub::Progress for Bar {
    fn init(&mut self, size: usize, _filename: &str) {
        // Called again on a resumed transfer, which then reports the bytes it already has.
        if let Some(b) = &self.0 {
            b.set_length(size as u64);
            b.set_position(0);
        }
    }
    fn update(&mut self, size: usize) {
        if let Some(b) = &self.0 {
            b.inc(size as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}
