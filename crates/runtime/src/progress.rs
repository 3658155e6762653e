//! The stages of a run, and how a caller follows them (a progress bar, a server's event
//! stream) and stops them (a cancel button).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// A stage of the pipeline, in the order a run goes through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Prompts to T5 embeddings.
    Text,
    /// Init images to latents (img2img).
    ImageEncoder,
    /// The DiT steps.
    Transformer,
    /// Latents to pixels.
    Decoder,
}

impl Stage {
    /// The short name a progress bar shows.
    pub fn short(self) -> &'static str {
        match self {
            Stage::Text => "encode",
            Stage::ImageEncoder => "image",
            Stage::Transformer => "denoise",
            Stage::Decoder => "decode",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Text => "text encoder",
            Stage::ImageEncoder => "VAE encoder",
            Stage::Transformer => "transformer",
            Stage::Decoder => "VAE decoder",
        })
    }
}

/// Progress events, for a progress bar or an event stream, and the way to cancel a run:
/// [`cancelled`](Self::cancelled) is asked before every step, and a run that sees `true`
/// stops there with [`crate::RuntimeError::Cancelled`], writing nothing.
pub trait Progress {
    /// A stage starts; it has `steps` units of work (prompts, denoising steps, images).
    fn stage(&mut self, _stage: Stage, _steps: usize) {}
    /// `done` units of the current stage are done, `elapsed` after its start.
    fn step(&mut self, _done: usize, _elapsed: Duration) {}
    /// The run is over.
    fn finish(&mut self) {}
    /// Whether the run should stop before its next step.
    fn cancelled(&self) -> bool {
        false
    }
}

/// No progress reporting, never cancelled.
pub struct Quiet;
impl Progress for Quiet {}
