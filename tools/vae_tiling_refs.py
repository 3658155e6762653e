#!/usr/bin/env python3
"""diffusers' tiled VAE decode on a fixture's VAE, for the tiled-decode test.

The fixture VAE's `sample_size` (64) makes diffusers' tiles 8 latents (64 pixels) with a
quarter overlap, so a 16x24 latent decodes as 3 x 4 tiles with blended seams. Saves the
latents, the untiled decode and the tiled decode (AutoencoderKL.enable_tiling()).

Usage: python tools/vae_tiling_refs.py --fixture tests/fixtures/base --seed 31
"""
import argparse
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--seed", type=int, default=31)
    a = ap.parse_args()
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(os.path.join(a.fixture, "pipeline", "vae"), torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(a.seed)
    latents = torch.randn(1, vae.config.latent_channels, 16, 24, generator=g)
    z = latents / vae.config.scaling_factor
    with torch.no_grad():
        untiled = vae.decode(z).sample
        vae.enable_tiling()
        assert vae.tile_latent_min_size == 8, vae.tile_latent_min_size
        tiled = vae.decode(z).sample
    save_file({"latents": latents, "untiled": untiled.contiguous(), "tiled": tiled.contiguous()},
              os.path.join(a.fixture, "refs", "vae_tiled.safetensors"))
    print("max |tiled - untiled| =", (tiled - untiled).abs().max().item(), "max |untiled| =", untiled.abs().max().item())


if __name__ == "__main__":
    main()
