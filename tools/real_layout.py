#!/usr/bin/env python3
"""Write the real CogView3-Plus-3B layout without its weights: each component's config file and
the full list of checkpoint keys with shapes, as diffusers/transformers name them.

The modules are built on torch's meta device from the real configs (those of the
THUDM/CogView3-Plus-3B repository), so nothing is downloaded or allocated.

Usage: python tools/real_layout.py --out tests/fixtures/real
"""
import argparse
import json
import os

import torch
from diffusers import AutoencoderKL, CogVideoXDDIMScheduler, CogView3PlusTransformer2DModel
from transformers import T5Config, T5EncoderModel

T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 512, 1024, 1024],
           layers_per_block=3, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
           scaling_factor=1.0, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
           mid_block_add_attention=False)
SCHEDULER = dict(snr_shift_scale=4.0, beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, set_alpha_to_one=True, timestep_spacing="trailing")


def keys(module, path, skip=()):
    with open(path, "w") as f:
        for k, v in module.state_dict().items():
            if k in skip:
                continue
            f.write(f"{k} {list(v.shape)}\n".replace(" ", " ", 1).replace(", ", ","))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    for d in ["text_encoder", "transformer", "vae", "scheduler"]:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        dit = CogView3PlusTransformer2DModel()
        vae = AutoencoderKL(**VAE)
    t5.config.to_json_file(os.path.join(out, "text_encoder", "config.json"))
    dit.save_config(os.path.join(out, "transformer"))
    # The hub file also carries a stale key the class no longer takes.
    cfg_path = os.path.join(out, "transformer", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["pooled_projection_dim"] = 1536
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    vae.save_config(os.path.join(out, "vae"))
    CogVideoXDDIMScheduler(**SCHEDULER).save_config(os.path.join(out, "scheduler"))
    json.dump({"_class_name": "CogView3PlusPipeline", "_diffusers_version": "0.31.0.dev0",
               "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
               "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
               "transformer": ["diffusers", "CogView3PlusTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
              open(os.path.join(out, "model_index.json"), "w"), indent=2)
    # transformers saves the tied embedding once, as shared.weight.
    keys(t5, os.path.join(out, "text_encoder.keys.txt"), skip={"encoder.embed_tokens.weight"})
    keys(dit, os.path.join(out, "transformer.keys.txt"))
    keys(vae, os.path.join(out, "vae.keys.txt"))


if __name__ == "__main__":
    main()
