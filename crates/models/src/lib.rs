//! Pure burn modules of CogView3-Plus-3B: the T5 text encoder, the CogView3-Plus DiT, the
//! AutoencoderKL and the CogVideoX DDIM scheduler. No files, no printing: weights come through
//! [`weights::WeightSource`], which `cogview-import` implements.

mod config;
pub mod dit;
pub mod nn;
pub mod probe;
pub mod scheduler;
pub mod storage;
pub mod t5;
pub mod vae;
pub mod weights;

pub use probe::{NoProbe, Probe};
pub use storage::{Weight, WeightStorage};
pub use weights::WeightSource;

/// The four configs of a CogView3-Plus pipeline, as its folder's config files give them.
#[derive(Clone, Debug, PartialEq)]
pub struct Configs {
    pub text_encoder: t5::T5Config,
    pub transformer: dit::DitConfig,
    pub vae: vae::VaeConfig,
    pub scheduler: scheduler::SchedulerConfig,
}

impl Configs {
    /// CogView3-Plus-3B's own configs.
    pub fn cogview3_plus_3b() -> Self {
        Self {
            text_encoder: t5::T5Config::t5_v1_1_xxl(),
            transformer: dit::DitConfig::cogview3_plus_3b(),
            vae: vae::VaeConfig::cogview3_plus_3b(),
            scheduler: scheduler::SchedulerConfig::cogview3_plus_3b(),
        }
    }

    /// A tiny model of the same architecture: the shape of the tests' `base` fixture.
    pub fn tiny() -> Self {
        Self {
            text_encoder: t5::T5Config::tiny(),
            transformer: dit::DitConfig::tiny(),
            vae: vae::VaeConfig::tiny(),
            scheduler: scheduler::SchedulerConfig::cogview3_plus_3b(),
        }
    }

    /// The same model with its text encoder and transformer cut to `layers` blocks each (for
    /// measurements that extrapolate to the full depth).
    pub fn with_layers(mut self, layers: usize) -> Self {
        self.text_encoder.num_layers = self.text_encoder.num_layers.min(layers);
        self.transformer.num_layers = self.transformer.num_layers.min(layers);
        self
    }

    /// The pixels per side of one transformer token: VAE factor × patch size.
    pub fn pixels_per_token(&self) -> usize {
        self.vae.scale_factor() * self.transformer.patch_size
    }

    /// The transformer's joint sequence for an image of `height × width` pixels: `text_len`
    /// text tokens (the padded prompt) and the image's patches.
    pub fn dit_tokens(&self, text_len: usize, height: usize, width: usize) -> usize {
        let pixels = self.pixels_per_token();
        text_len + (height / pixels) * (width / pixels)
    }

    /// What the components must agree on; the error is about the transformer's config.
    pub fn check_across(&self) -> Result<(), String> {
        if self.text_encoder.d_model != self.transformer.text_embed_dim {
            return Err(format!(
                "text_embed_dim {} differs from the text encoder's d_model {}",
                self.transformer.text_embed_dim, self.text_encoder.d_model
            ));
        }
        let latent = self.vae.latent_channels;
        if latent != self.transformer.in_channels || latent != self.transformer.out_channels {
            return Err(format!(
                "in_channels {} / out_channels {} differ from the VAE's latent_channels {latent}",
                self.transformer.in_channels, self.transformer.out_channels
            ));
        }
        Ok(())
    }
}
