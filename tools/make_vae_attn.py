#!/usr/bin/env python3
"""A tiny AutoencoderKL with what CogView3-Plus's VAE leaves out: mid-block attention and the
quant / post-quant convs. Saves it (diffusers layout) and diffusers' decode and encode outputs.

Usage: python tools/make_vae_attn.py --out tests/fixtures/vae_attn --seed 99
"""
import argparse
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=99)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        act_fn="silu", latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5,
                        use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True).eval()
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for name, p in sorted(vae.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    vae.save_pretrained(os.path.join(a.out, "vae"))
    torch.set_num_threads(1)
    latents = torch.randn(1, 4, 6, 10, generator=g)
    image = torch.rand(1, 3, 12, 20, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        mean = vae.encode(image).latent_dist.mean
    save_file({"latents": latents, "decoded": decoded, "image": image, "encoded_mean": mean},
              os.path.join(a.out, "refs.safetensors"))


if __name__ == "__main__":
    main()
