#!/usr/bin/env python3
"""Record golden references for image-to-image (img2img) with diffusers' own components.

Usage:
    python tools/img2img_refs.py [--fixtures tests/fixtures] [--variants base wide] [--threads 1]

(run from the repository root, in a virtual environment OUTSIDE the repository with
``pip install torch diffusers==0.42.1 transformers sentencepiece safetensors numpy pillow accelerate
protobuf``; set PYTHONDONTWRITEBYTECODE=1 to leave no __pycache__ behind).  Everything runs on the CPU
in float32 with one torch thread.  Running it twice gives byte-identical files.

It writes

* ``<fixtures>/img2img/``: the init images (``init_64x64.png``, ``init_96x64.png``, ``init_80x48.png``,
  ``init_rgba_64x64.png``, ``init_gray_64x64.png``, ``init_64x64.webp`` (lossless, pixel-identical
  to the PNG, checked), ``init_64x64.jpg`` (quality 95)), all made from seeded numpy;
  ``resize.safetensors`` + ``resize.json`` (PIL Lanczos resizes, see B below);
  ``real_encoder.safetensors`` + ``real_encoder.json`` (see C below).
* ``<fixtures>/<variant>/refs/img2img.safetensors``, ``img2img.json`` and ``img2img.<case>.png`` for
  each tiny pipeline folder ``<fixtures>/<variant>/pipeline`` (CogView3PlusPipeline layout).

diffusers has no CogView3-Plus img2img pipeline; the semantics below are the text-to-image loop of
``CogView3PlusPipeline.__call__`` started from a noised encoding of the init image, the way
``CogVideoXVideoToVideoPipeline`` (the same scheduler family) does it.

A. img2img semantics (one image, batch 1, float32)
--------------------------------------------------
1. ``img = PIL.Image.open(path).convert("RGB")`` (alpha dropped without compositing, gray replicated to
   3 channels), then ``x = pipe.image_processor.preprocess(img, height=H, width=W)`` -> [1,3,H,W].
   For a PIL input VaeImageProcessor (diffusers 0.42.1, image_processor.py) does, in this order:
     - ``height, width = self.get_default_height_width(image[0], height, width)``, which floors both to
       a multiple of vae_scale_factor (8): ``x - x % self.config.vae_scale_factor``;
     - ``image.resize((width, height), resample=PIL_INTERPOLATION["lanczos"], reducing_gap=None)`` --
       ALWAYS called for PIL input (``do_resize`` defaults to True); PIL returns an unchanged copy when
       the size is already (width, height).  So PIL inputs are resized by PIL's Lanczos
       (Image.Resampling.LANCZOS = 1) on the uint8 image, never by torch (torch's
       ``interpolate`` (nearest) is used only for numpy/tensor inputs);
     - no RGB conversion: CogView3PlusPipeline builds ``VaeImageProcessor(vae_scale_factor=...)`` whose
       ``do_convert_rgb`` defaults to False, so without our ``.convert("RGB")`` an "L" image would give a
       1-channel tensor and an RGBA image a 4-channel one (the VAE would refuse both);
     - ``np.array(image).astype(np.float32) / 255.0`` (float32 division), HWC -> CHW,
       ``2.0 * images - 1.0`` (torch float32).  No clipping anywhere (values are in [0,1] already).
2. ``moments = vae.encode(x).latent_dist.parameters`` (the raw encoder output [mean | logvar] along
   channels; use_quant_conv is false), ``init_latents = latent_dist.mode() * vae.config.scaling_factor``
   (mode() returns the mean; the logvar clamp to [-30, 20] does not touch it).
3. ``scheduler.set_timesteps(steps)``; ``init_timestep = min(int(steps * strength), steps)``;
   ``t_start = max(steps - init_timestep, 0)``; the loop runs over ``scheduler.timesteps[t_start:]``
   (``get_timesteps`` of the v2v pipeline; scheduler.order is 1); the scheduler keeps
   num_inference_steps = steps, so ``step()`` still uses ``prev_t = t - 1000 // steps``.
4. ``noise = torch.randn([1,16,H/8,W/8], generator=torch.Generator().manual_seed(seed))`` (recorded);
   ``latents = scheduler.add_noise(init_latents, noise, timesteps[t_start:t_start+1]) *
   scheduler.init_noise_sigma`` (init_noise_sigma is 1.0 for CogVideoXDDIMScheduler).  add_noise
   works in the dtype of the samples: ``alphas_cumprod.to(float32)[t] ** 0.5 * init +
   (1 - alphas_cumprod.to(float32)[t]) ** 0.5 * noise`` (the float64 table is cast to float32 BEFORE
   the square roots).  strength 0 -> no timestep, no add_noise, latents = init_latents, no step.
   strength 1 -> t = 999 and alphas_cumprod[999] == 0 exactly (zero-SNR rescale), so latents == noise
   bit for bit, and the whole run must equal ``pipe(..., latents=noise)``: checked below (self_check).
5. The loop of CogView3PlusPipeline.__call__, copied: encode_prompt (negative_prompt None with
   guidance > 1 -> zeros_like(prompt_embeds)); embeddings cat([negative, positive]); original_size =
   target_size = (H, W), crops (0, 0), float32, doubled with CFG; per timestep t: model input
   cat([latents] * 2) with CFG, ``timestep = t.expand(B)``, transformer, ``.float()``,
   ``uncond + g * (text - uncond)``, ``scheduler.step(noise_pred, t, latents, eta=0.0,
   generator=None, return_dict=False)[0]``.  Then ``vae.decode(latents / scaling_factor)``,
   ``image_processor.postprocess``: 'pt' = ``(x * 0.5 + 0.5).clamp(0, 1)``; the PNG is the 'pil' output:
   ``(np_image * 255).round().astype("uint8")``.

Where diffusers' own img2img-style pipelines differ from A (all quoted from diffusers 0.42.1):
  * the posterior is SAMPLED, not its mode: pipeline_cogvideox_video2video.py
    ``def retrieve_latents(encoder_output, generator=None, sample_mode: str = "sample")`` ->
    ``return encoder_output.latent_dist.sample(generator)`` and prepare_latents calls
    ``retrieve_latents(self.vae.encode(vid.unsqueeze(0)), generator)``; the noise is then drawn from the
    same generator (``noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)``).
    Here: mode() (deterministic) and the noise from its own recorded seed.
  * strength 0 is not a usable setting there: ``timesteps[t_start * self.scheduler.order :]`` is empty,
    ``latent_timestep = timesteps[:1].repeat(...)`` is empty and add_noise on an empty timestep tensor
    broadcasts to an EMPTY batch (checked in this script: shape [0, ...]).  Here: latents = init_latents.
  * ``latents = latents * self.scheduler.init_noise_sigma`` is applied after add_noise there: the same
    here (a no-op, init_noise_sigma = 1.0).

B. PIL Lanczos (resize.safetensors)
-----------------------------------
``Image.resize((w, h), Image.Resampling.LANCZOS)`` on RGB uint8 (reducing_gap None, box None), Pillow
version recorded in resize.json (13.0.0 when written).  Its algorithm (src/libImaging/Resample.c),
re-implemented in numpy below and asserted equal to PIL for every pair:
  * separable, horizontal pass first (only if the width changes), then vertical (only if the height
    changes); the intermediate image is uint8 (rounded and clipped as below);
  * per axis: scale = in/out, filterscale = max(scale, 1), support = 3 * filterscale; for output
    index o: center = (o + 0.5) * scale, xmin = max(int(center - support + 0.5), 0),
    xmax = min(int(center + support + 0.5), in) (C int casts truncate toward zero), taps
    w_j = lanczos((j + xmin - center + 0.5) / filterscale) for j in [0, xmax - xmin), with
    lanczos(x) = sinc(x) * sinc(x / 3) for -3 <= x < 3 else 0, sinc(x) = sin(x*pi)/(x*pi) (1 at 0),
    all in float64; normalised w_j /= sum(w) (if sum != 0);
  * fixed point: k_j = int(w_j * 2^22 + 0.5) (w_j >= 0) or int(w_j * 2^22 - 0.5) (w_j < 0), truncation
    toward zero; acc = 2^21 + sum(pixel * k_j) in int32; out = clamp(acc >> 22, 0, 255) (arithmetic
    shift).

C. Formula-weight encoder at the real width (real_encoder.safetensors)
----------------------------------------------------------------------
diffusers AutoencoderKL with the real CogView3-Plus VAE config (in_channels 3, latent_channels 16,
block_out_channels [128, 512, 1024, 1024], norm_num_groups 32, act silu, DownEncoderBlock2D x 4,
use_quant_conv false, mid_block_add_attention false) but layers_per_block = 1; only its encoder is
used (the module is built on the meta device, the encoder materialised).  Weights by formula (the
Rust test regenerates them; none are stored), all integer arithmetic on u64 wrapping mod 2^64:
  fnv1a64(s): h = 0xcbf29ce484222325; for each UTF-8 byte b: h = (h ^ b) * 0x100000001b3
  splitmix64(x): x += 0x9E3779B97F4A7C15; z = x; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
                 z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31)
  u(key, i) = (splitmix64(fnv1a64(key) ^ i) >> 11) * 2^-53 * 2 - 1   (float64; i = flat row-major
              index as u64; exact in float64)
  for every state_dict key of the encoder (full name, starting with "encoder."):
    key ends with ".bias"                           -> 0.02 * u
    "norm" in key and key ends with ".weight"       -> 1 + 0.1 * u          (GroupNorm weights)
    otherwise (conv kernels [out, in, kh, kw])      -> u * sqrt(3 / (in * kh * kw))
  computed in float64, then cast to float32.  Input image: key "image", shape [1, 3, 256, 256],
  u("image", i) cast to float32.  Recorded: ``moments`` = vae.encode(image).latent_dist.parameters
  [1, 32, 32, 32] (no scaling), ``mean`` = its first 16 channels, ``check.<key>`` = the first 8 values
  of three keys (listed in real_encoder.json) and ``check.image``.
"""

import argparse
import hashlib
import io
import json
import math
import os
import platform
import warnings

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import PIL
import transformers
from diffusers import AutoencoderKL, CogView3PlusPipeline
from PIL import Image

PROMPT = "A photo of a red fox sitting in the snow at sunrise, highly detailed, 4k."
NEGATIVE_TEXT = "blurry, low quality"
MAX_SEQUENCE_LENGTH = 224

# name, init image, width, height, steps, strength, guidance, negative prompt
CASES = [
    ("st08_s10_g7_64x64", "init_64x64.png", 64, 64, 10, 0.8, 7.0, None),
    ("st10_s4_g7_96x64", "init_96x64.png", 96, 64, 4, 1.0, 7.0, None),
    ("st03_s10_g1_64x64", "init_64x64.png", 64, 64, 10, 0.3, 1.0, None),
    ("st05_s4_g7_64x64_neg", "init_64x64.png", 64, 64, 4, 0.5, 7.0, NEGATIVE_TEXT),
    ("st0_s4_g7_64x64", "init_64x64.png", 64, 64, 4, 0.0, 7.0, None),
    ("st06_s5_g7_resize", "init_80x48.png", 64, 64, 5, 0.6, 7.0, None),
    ("st07_s4_g7_rgba", "init_rgba_64x64.png", 64, 64, 4, 0.7, 7.0, None),
    ("st07_s4_g7_gray", "init_gray_64x64.png", 64, 64, 4, 0.7, 7.0, None),
]
NOISE_SEED_BASE = 1000  # case i uses seed NOISE_SEED_BASE + i (same seeds in every variant)

# strength-1.0 self-checks against pipe(..., latents=noise): (label, width, height, steps, guidance, neg, seed)
SELF_CHECKS = [
    ("st10_s4_g7_96x64", 96, 64, 4, 7.0, None, NOISE_SEED_BASE + 1),
    ("st10_s10_g7_64x64_neg", 64, 64, 10, 7.0, NEGATIVE_TEXT, 2000),
]

RESIZE_PAIRS = [
    # name, source, (in w, in h), (out w, out h)
    ("r80x48_to_64x64", "init_80x48.png", (80, 48), (64, 64)),
    ("r64x64_to_96x64", "init_64x64.png", (64, 64), (96, 64)),
    ("r96x64_to_64x32", "init_96x64.png", (96, 64), (64, 32)),
    ("r64x64_to_48x48", "init_64x64.png", (64, 64), (48, 48)),
    ("r37x23_to_64x48", "random seed 37", (37, 23), (64, 48)),
]

REAL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 512, 1024, 1024],
                layers_per_block=1, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=1.0, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=False)
REAL_IMAGE = (1, 3, 256, 256)
CHECK_KEYS = {
    "conv": "encoder.down_blocks.1.resnets.0.conv1.weight",
    "norm": "encoder.down_blocks.2.resnets.0.norm2.weight",
    "bias": "encoder.mid_block.resnets.1.conv2.bias",
}


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stats(t: torch.Tensor) -> dict:
    info = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if t.numel() == 0:
        return info
    x = t.detach().to(torch.float64)
    info.update(sum=float(x.sum()), mean=float(x.mean()), abs_max=float(x.abs().max()),
                min=float(x.min()), max=float(x.max()))
    return info


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def versions(threads):
    import safetensors
    import sentencepiece
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "sentencepiece": sentencepiece.__version__, "safetensors": safetensors.__version__,
            "torch_threads": threads}


# ------------------------------------------------------------------------------------------------
# init images
# ------------------------------------------------------------------------------------------------


def synth_rgb(w, h, seed):
    """A smooth gradient, a disc, a rectangle, a diagonal line and mild Gaussian noise (uint8 [h,w,3])."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / (w - 1), y / (h - 1)
    img = np.stack([40 + 180 * u, 60 + 150 * v, 200 - 60 * (u + v)], -1)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    rad = min(w, h) * rng.uniform(0.15, 0.25)
    img[(x - cx) ** 2 + (y - cy) ** 2 <= rad ** 2] = [230, 90, 30]
    x0, y0 = int(rng.integers(2, w // 4)), int(rng.integers(2, h // 4))
    img[y0:y0 + h // 4, x0:x0 + w // 5] = [25, 35, 120]
    img[np.abs(x - y * w / h - 0.15 * w) < 1.2] = [250, 240, 60]
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_init_images(d):
    os.makedirs(d, exist_ok=True)
    rgb64 = synth_rgb(64, 64, 1)
    Image.fromarray(rgb64, "RGB").save(os.path.join(d, "init_64x64.png"))
    Image.fromarray(synth_rgb(96, 64, 2), "RGB").save(os.path.join(d, "init_96x64.png"))
    Image.fromarray(synth_rgb(80, 48, 3), "RGB").save(os.path.join(d, "init_80x48.png"))
    # RGBA: colours everywhere (also under alpha 0) and a non-trivial alpha: radial ramp, a fully
    # transparent block and a fully opaque block
    rgb = synth_rgb(64, 64, 4)
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    alpha = np.clip(255 * (1.4 - np.hypot(x - 31.5, y - 31.5) / 32), 0, 255)
    alpha[4:16, 44:60] = 0
    alpha[48:60, 4:20] = 255
    rgba = np.concatenate([rgb, np.round(alpha).astype(np.uint8)[..., None]], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "init_rgba_64x64.png"))
    # gray ("L")
    rng = np.random.default_rng(5)
    g = 30 + 160 * (x / 63) * 0.6 + 160 * (y / 63) * 0.4
    g[(x - 40) ** 2 + (y - 24) ** 2 <= 100] = 235
    g[40:56, 8:28] = 20
    g += rng.normal(0.0, 4.0, g.shape)
    Image.fromarray(np.clip(np.round(g), 0, 255).astype(np.uint8), "L").save(os.path.join(d, "init_gray_64x64.png"))
    # the same RGB image as lossless WebP and as JPEG
    src = Image.open(os.path.join(d, "init_64x64.png"))
    src.save(os.path.join(d, "init_64x64.webp"), "WEBP", lossless=True, quality=100, method=6)
    back = np.array(Image.open(os.path.join(d, "init_64x64.webp")).convert("RGB"))
    assert np.array_equal(back, rgb64), "lossless WebP is not pixel-identical"
    src.save(os.path.join(d, "init_64x64.jpg"), "JPEG", quality=95)
    jpg = np.array(Image.open(os.path.join(d, "init_64x64.jpg")).convert("RGB")).astype(np.int32)
    info = {}
    for fn in sorted(os.listdir(d)):
        if fn.startswith("init_"):
            p = os.path.join(d, fn)
            im = Image.open(p)
            info[fn] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p), "format": im.format,
                        "mode": im.mode, "width": im.width, "height": im.height}
    info["init_64x64.webp"]["pixel_identical_to"] = "init_64x64.png"
    from PIL import JpegImagePlugin
    sampling = JpegImagePlugin.get_sampling(Image.open(os.path.join(d, "init_64x64.jpg")))
    info["init_64x64.jpg"].update(quality=95, subsampling={0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(sampling, sampling),
                                  pil_decoded_max_abs_diff_vs_png=int(np.abs(jpg - rgb64).max()),
                                  pil_decoded_mean_abs_diff_vs_png=float(np.abs(jpg - rgb64).mean()))
    return info


# ------------------------------------------------------------------------------------------------
# B. PIL Lanczos
# ------------------------------------------------------------------------------------------------


def _sinc(x):
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x):
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _coeff_matrix(in_size, out_size):
    """Fixed-point (2^22) Lanczos coefficients [out, in] exactly as Pillow's precompute_coeffs +
    normalize_coeffs_8bpc compute them."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    m = np.zeros((out_size, in_size), dtype=np.int64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_lanczos((j + xmin - center + 0.5) * ss) for j in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        if ww != 0.0:
            w = [v / ww for v in w]
        for j, v in enumerate(w):
            m[o, xmin + j] = int(-0.5 + v * (1 << 22)) if v < 0 else int(0.5 + v * (1 << 22))
    return m


def _apply(m, a, axis):
    acc = np.tensordot(m, a.astype(np.int64), axes=([1], [axis]))  # output axis first
    acc = np.moveaxis(acc, 0, axis) + (1 << 21)
    return np.clip(acc >> 22, 0, 255).astype(np.uint8)


def lanczos_numpy(a, w, h):
    """Re-implementation of PIL's uint8 Lanczos resize of an [H, W, C] array to (w, h)."""
    out = a
    if w != a.shape[1]:
        out = _apply(_coeff_matrix(a.shape[1], w), out, 1)
    if h != a.shape[0]:
        out = _apply(_coeff_matrix(a.shape[0], h), out, 0)
    return out.copy()


def record_resize(d, threads):
    tensors, pairs = {}, []
    for name, source, (iw, ih), (ow, oh) in RESIZE_PAIRS:
        if source.startswith("random"):
            arr = np.random.default_rng(37).integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        else:
            arr = np.array(Image.open(os.path.join(d, source)).convert("RGB"))
        assert arr.shape == (ih, iw, 3)
        img = Image.fromarray(arr, "RGB")
        # exactly the call of VaeImageProcessor.resize (resize_mode "default")
        out = np.array(img.resize((ow, oh), resample=Image.Resampling.LANCZOS, reducing_gap=None))
        assert out.shape == (oh, ow, 3)
        ref = lanczos_numpy(arr, ow, oh)
        assert np.array_equal(ref, out), f"numpy Lanczos disagrees with PIL on {name}"
        tensors[f"{name}.input"] = torch.from_numpy(arr.copy())
        tensors[f"{name}.output"] = torch.from_numpy(out.copy())
        pairs.append({"name": name, "source": source, "input_wh": [iw, ih], "output_wh": [ow, oh],
                      "numpy_reimplementation_matches": True})
    save_file(tensors, os.path.join(d, "resize.safetensors"))
    write_json({"what": "PIL Image.resize((w, h), resample=Image.Resampling.LANCZOS, reducing_gap=None) on RGB "
                        "uint8, as VaeImageProcessor.resize calls it for PIL inputs; <name>.input / "
                        "<name>.output are uint8 [H, W, 3]; see tools/img2img_refs.py docstring (B) for the "
                        "algorithm, re-implemented in numpy there and checked equal",
                "resample": "LANCZOS (1)", "pillow": PIL.__version__, "pairs": pairs,
                "versions": versions(threads)}, os.path.join(d, "resize.json"))


# ------------------------------------------------------------------------------------------------
# C. formula-weight encoder at the real width
# ------------------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def splitmix64_py(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def splitmix64_np(x):
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = x
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def formula_u(key, n):
    i = np.arange(n, dtype=np.uint64)
    z = splitmix64_np(np.uint64(fnv1a64(key)) ^ i)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 * 2.0 - 1.0


def formula_u_py(key, i):
    return (splitmix64_py(fnv1a64(key) ^ i) >> 11) * 2.0 ** -53 * 2.0 - 1.0


def formula_tensor(key, shape):
    n = int(np.prod(shape))
    u = formula_u(key, n)
    if key.endswith(".bias"):
        v = 0.02 * u
    elif "norm" in key and key.endswith(".weight"):
        v = 1.0 + 0.1 * u
    else:
        assert len(shape) == 4, f"{key}: expected a conv kernel, got {shape}"
        v = u * math.sqrt(3.0 / (shape[1] * shape[2] * shape[3]))
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def record_real_encoder(d, threads):
    # formula self-check: vectorised == scalar
    for key in ("image", "encoder.conv_in.weight"):
        vec = formula_u(key, 16)
        assert all(vec[i] == formula_u_py(key, i) for i in range(16)), "vectorised formula disagrees"
    with torch.device("meta"):
        vae = AutoencoderKL(**REAL_VAE)
    vae.encoder.to_empty(device="cpu")
    sd = {("encoder." + k): v for k, v in vae.encoder.state_dict().items()}
    weights = {k: formula_tensor(k, list(v.shape)) for k, v in sd.items()}
    vae.encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items()}, strict=True)
    vae.eval()
    image = torch.from_numpy(formula_u("image", int(np.prod(REAL_IMAGE))).astype(np.float32).reshape(REAL_IMAGE))
    with torch.no_grad():
        moments = vae.encode(image).latent_dist.parameters
        direct = vae.encoder(image)
    assert torch.equal(moments, direct)
    assert moments.shape == (1, 32, 32, 32)
    tensors = {"moments": moments.contiguous().clone(), "mean": moments[:, :16].contiguous().clone(),
               "check.image": image.flatten()[:8].clone()}
    for k in CHECK_KEYS.values():
        tensors[f"check.{k}"] = weights[k].flatten()[:8].clone()
    save_file(tensors, os.path.join(d, "real_encoder.safetensors"))
    kinds = {}
    for k in weights:
        kind = "bias" if k.endswith(".bias") else ("norm" if ("norm" in k and k.endswith(".weight")) else "conv")
        kinds[kind] = kinds.get(kind, 0) + 1
    write_json({
        "what": "diffusers AutoencoderKL encoder (real CogView3-Plus VAE widths, layers_per_block=1) with formula "
                "weights on a formula image; moments = vae.encode(image).latent_dist.parameters (raw encoder "
                "output [mean|logvar], no scaling); mean = moments[:, :16]; see tools/img2img_refs.py docstring (C)",
        "config": REAL_VAE,
        "image": {"key": "image", "shape": list(REAL_IMAGE)},
        "formula": {
            "fnv1a64": "h = 0xcbf29ce484222325; for b in utf8(key): h = (h ^ b) * 0x100000001b3 mod 2^64",
            "splitmix64": "x += 0x9E3779B97F4A7C15; z = x; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; "
                          "z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31) (mod 2^64)",
            "u": "(splitmix64(fnv1a64(key) ^ i) >> 11) * 2^-53 * 2 - 1, float64, i = flat row-major index",
            "bias": "key ends with '.bias': 0.02 * u",
            "norm": "'norm' in key and key ends with '.weight': 1 + 0.1 * u",
            "conv": "otherwise ([out, in, kh, kw]): u * sqrt(3 / (in * kh * kw))",
            "cast": "float64 -> float32",
            "image": "u('image', i) -> float32, shape [1,3,256,256]",
        },
        "check_keys": CHECK_KEYS,
        "check_first_values": {k: [float(x) for x in tensors[f"check.{k}"]] for k in CHECK_KEYS.values()},
        "check_image_first_values": [float(x) for x in tensors["check.image"]],
        "fnv1a64": {k: f"0x{fnv1a64(k):016x}" for k in ["image", *CHECK_KEYS.values()]},
        "u_first_values": {"image": [float(formula_u_py("image", i)) for i in range(4)]},
        "n_weight_tensors": len(weights), "kinds": kinds,
        "n_parameters": int(sum(v.numel() for v in weights.values())),
        "state_dict_keys": {k: list(v.shape) for k, v in weights.items()},
        "files": {"real_encoder.safetensors": {k: stats(v) for k, v in tensors.items()}},
        "versions": versions(threads),
    }, os.path.join(d, "real_encoder.json"))


# ------------------------------------------------------------------------------------------------
# A. img2img on a tiny pipeline
# ------------------------------------------------------------------------------------------------


def get_timesteps(scheduler, steps, strength):
    """CogVideoXVideoToVideoPipeline.get_timesteps (scheduler.order == 1)."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return scheduler.timesteps[t_start * scheduler.order:], t_start, init_timestep


def denoise(pipe, latents, timesteps, width, height, guidance, negative_prompt):
    """The denoising loop of CogView3PlusPipeline.__call__ (diffusers 0.42.1), batch 1, over `timesteps`
    (the scheduler must have been set up with set_timesteps(steps) already).  Returns the final
    latents and the latents after each step."""
    device = torch.device("cpu")
    do_cfg = guidance > 1.0
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        PROMPT, negative_prompt, do_cfg, num_images_per_prompt=1, prompt_embeds=None,
        negative_prompt_embeds=None, max_sequence_length=MAX_SEQUENCE_LENGTH, device=device)
    if do_cfg:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(None, 0.0)
    original_size = torch.tensor([(height, width)], dtype=prompt_embeds.dtype)
    target_size = torch.tensor([(height, width)], dtype=prompt_embeds.dtype)
    crops_coords_top_left = torch.tensor([(0, 0)], dtype=prompt_embeds.dtype)
    if do_cfg:
        original_size = torch.cat([original_size, original_size])
        target_size = torch.cat([target_size, target_size])
        crops_coords_top_left = torch.cat([crops_coords_top_left, crops_coords_top_left])
    original_size = original_size.to(device).repeat(1, 1)
    target_size = target_size.to(device).repeat(1, 1)
    crops_coords_top_left = crops_coords_top_left.to(device).repeat(1, 1)
    steps_out = []
    for t in timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = pipe.scheduler.scale_model_input(latent_model_input, t)
        timestep = t.expand(latent_model_input.shape[0])
        noise_pred = pipe.transformer(hidden_states=latent_model_input, encoder_hidden_states=prompt_embeds,
                                      timestep=timestep, original_size=original_size, target_size=target_size,
                                      crop_coords=crops_coords_top_left, return_dict=False)[0]
        noise_pred = noise_pred.float()
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        latents = latents.to(prompt_embeds.dtype)
        steps_out.append(latents.clone())
    return latents, steps_out


def img2img(pipe, init_path, width, height, steps, strength, guidance, negative_prompt, seed):
    img = Image.open(init_path).convert("RGB")
    x = pipe.image_processor.preprocess(img, height=height, width=width)
    assert x.shape == (1, 3, height, width) and x.dtype == torch.float32
    sf = pipe.vae.config.scaling_factor
    posterior = pipe.vae.encode(x).latent_dist
    moments = posterior.parameters
    # .contiguous(): the encoder's output comes back channels-last from torch's CPU conv; the values are
    # unchanged, but the decoder would then pick another conv kernel (last-ulp differences vs pipe())
    init = (posterior.mode() * sf).contiguous()
    f = pipe.vae_scale_factor
    shape = (1, pipe.transformer.config.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    pipe.scheduler.set_timesteps(steps, device="cpu")
    timesteps, t_start, init_timestep = get_timesteps(pipe.scheduler, steps, strength)
    if len(timesteps) > 0:
        latents = pipe.scheduler.add_noise(init, noise, timesteps[:1].repeat(1))
        latents = latents * pipe.scheduler.init_noise_sigma
    else:
        latents = init.clone()
    latents_start = latents.clone()
    latents, step_latents = denoise(pipe, latents, timesteps, width, height, guidance, negative_prompt)
    decoded = pipe.vae.decode(latents / sf, return_dict=False)[0]
    image_pt = pipe.image_processor.postprocess(decoded, output_type="pt")
    pil = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    return dict(image_in=x, moments=moments, init_latents=init, noise=noise, timesteps=timesteps.to(torch.int64),
                latents_start=latents_start, step_latents=step_latents, image_pt=image_pt, pil=pil,
                t_start=t_start, init_timestep=init_timestep)


def run_pipe(pipe, width, height, steps, guidance, negative_prompt, latents):
    step_latents = []

    def cb(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        return {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(prompt=PROMPT, negative_prompt=negative_prompt, height=height, width=width,
                   num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                   output_type="pt", max_sequence_length=MAX_SEQUENCE_LENGTH, callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents"])
    return out.images, step_latents


def self_check(pipe, init_path, label, width, height, steps, guidance, negative_prompt, seed):
    """strength 1.0 through our loop == pipe(..., latents=noise)."""
    r = img2img(pipe, init_path, width, height, steps, 1.0, guidance, negative_prompt, seed)
    assert r["t_start"] == 0 and int(r["timesteps"][0]) == 999
    assert float(pipe.scheduler.alphas_cumprod[999]) == 0.0
    start_diff = float((r["latents_start"] - r["noise"]).abs().max())
    img, steps_ref = run_pipe(pipe, width, height, steps, guidance, negative_prompt, r["noise"])
    img_diff = float((img - r["image_pt"]).abs().max())
    step_diff = max(float((a - b).abs().max()) for a, b in zip(steps_ref, r["step_latents"]))
    assert len(steps_ref) == len(r["step_latents"]) == steps
    assert start_diff == 0.0 and img_diff == 0.0 and step_diff == 0.0, (label, start_diff, img_diff, step_diff)
    return {"label": label, "width": width, "height": height, "steps": steps, "guidance_scale": guidance,
            "negative_prompt": negative_prompt, "noise_seed": seed, "init_image": os.path.basename(init_path),
            "max_abs_diff_latents_start_vs_noise": start_diff, "max_abs_diff_step_latents": step_diff,
            "max_abs_diff_image_pt": img_diff}


def check_strength0_in_v2v(pipe):
    """What diffusers' v2v pipeline would do at strength 0: add_noise with an empty timestep tensor."""
    x = torch.zeros(1, 16, 8, 8)
    pipe.scheduler.set_timesteps(4)
    ts = pipe.scheduler.timesteps[4:][:1]
    return list(pipe.scheduler.add_noise(x, x, ts).shape)


def record_variant(variant, fixtures, img_dir, init_info, threads):
    pipe_dir = os.path.join(fixtures, variant, "pipeline")
    out = os.path.join(fixtures, variant, "refs")
    os.makedirs(out, exist_ok=True)
    pipe = CogView3PlusPipeline.from_pretrained(pipe_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tensors, files_meta, cases = {}, {}, {}

    def add(name, t, note=None):
        t = t.detach().cpu().contiguous()
        tensors[name] = t
        files_meta[name] = stats(t)
        if note:
            files_meta[name]["note"] = note

    first_image_in = {}  # tensor bytes -> key already holding the identical tensor
    with torch.no_grad():
        for idx, (name, init_fn, w, h, steps, strength, g, neg) in enumerate(CASES):
            seed = NOISE_SEED_BASE + idx
            r = img2img(pipe, os.path.join(img_dir, init_fn), w, h, steps, strength, g, neg, seed)
            k = len(r["timesteps"])
            p = f"{name}."
            blob = r["image_in"].numpy().tobytes()
            if blob in first_image_in:
                image_in_key = first_image_in[blob]
            else:
                image_in_key = p + "image_in"
                first_image_in[blob] = image_in_key
                add(image_in_key, r["image_in"], "preprocess(Image.open(init).convert('RGB'), height, width) "
                    "[1,3,H,W] in [-1,1]")
            if idx == 0:
                add(p + "moments", r["moments"], "vae.encode(image_in).latent_dist.parameters: raw encoder output "
                    "[mean | logvar] along channels, before scaling")
            add(p + "init_latents", r["init_latents"], "latent_dist.mode() * vae.config.scaling_factor")
            add(p + "noise", r["noise"], f"torch.randn(shape, generator=torch.Generator().manual_seed({seed}))")
            add(p + "timesteps", r["timesteps"], "int64, the timesteps actually run (scheduler.timesteps[t_start:])")
            add(p + "latents_start", r["latents_start"], "add_noise(init_latents, noise, timesteps[:1]) * "
                "init_noise_sigma; = init_latents when no step runs")
            if k > 0:
                add(p + "step_latents", torch.stack(r["step_latents"], 0),
                    "latents after each executed scheduler step [k,1,C,h,w]")
            add(p + "image_pt", r["image_pt"], "postprocess(vae.decode(latents / scaling_factor), 'pt') [1,3,H,W] "
                "in [0,1]")
            png = f"img2img.{name}.png"
            r["pil"].save(os.path.join(out, png))
            u8 = np.array(r["pil"])
            init_im = Image.open(os.path.join(img_dir, init_fn))
            cases[name] = {
                "init_image": init_fn, "init_image_sha256": init_info[init_fn]["sha256"],
                "init_image_mode": init_im.mode, "init_image_size_wh": [init_im.width, init_im.height],
                "resized": [init_im.width, init_im.height] != [w, h],
                "width": w, "height": h, "num_inference_steps": steps, "strength": strength,
                "guidance_scale": g, "prompt": PROMPT, "negative_prompt": neg,
                "max_sequence_length": MAX_SEQUENCE_LENGTH, "noise_seed": seed,
                "init_timestep": r["init_timestep"], "t_start": r["t_start"], "steps_run": k,
                "timesteps_run": [int(t) for t in r["timesteps"]],
                "original_size": [h, w], "target_size": [h, w], "crops_coords_top_left": [0, 0],
                "image_in_key": image_in_key,
                "step_latents_key": (p + "step_latents") if k > 0 else None,
                "moments_key": (p + "moments") if idx == 0 else None,
                "png": png, "uint8_mean": float(u8.mean()),
            }
        checks = [self_check(pipe, os.path.join(img_dir, CASES[1][1] if lbl.startswith("st10_s4") else CASES[0][1]),
                             lbl, w, h, s, g, neg, seed) for (lbl, w, h, s, g, neg, seed) in SELF_CHECKS]
        v2v_s0_shape = check_strength0_in_v2v(pipe)

    save_file(tensors, os.path.join(out, "img2img.safetensors"))
    manifest = {
        "versions": versions(threads),
        "pipeline": os.path.join("tests", "fixtures", variant, "pipeline"),
        "pipeline_files_sha256": {
            os.path.relpath(os.path.join(root, fn), pipe_dir): sha256_file(os.path.join(root, fn))
            for root, _, fns in sorted(os.walk(pipe_dir)) for fn in sorted(fns)},
        "semantics": "see the docstring of tools/img2img_refs.py (A)",
        "vae_scaling_factor": pipe.vae.config.scaling_factor, "vae_scale_factor": pipe.vae_scale_factor,
        "image_processor_config": {k: v for k, v in pipe.image_processor.config.items() if not k.startswith("_")},
        "init_noise_sigma": pipe.scheduler.init_noise_sigma,
        "layout_notes": {
            "image_in": "stored once per distinct tensor (file size limit): cases whose preprocessed image is "
                        "bit-identical to an earlier case's have no <case>.image_in; read the key named by "
                        "cases[<case>].image_in_key",
            "step_latents": "present with k rows when k = steps_run > 0; the key is OMITTED when k = 0 "
                            "(cases[<case>].step_latents_key is null)",
            "timesteps": "always present, int64 shape [k] (shape [0] when k = 0)",
            "moments": "only for the first case",
        },
        "init_images": init_info,
        "cases": cases,
        "self_check_strength_1": checks,
        "v2v_strength0_add_noise_shape": v2v_s0_shape,
        "files": {"img2img.safetensors": files_meta},
    }
    write_json(manifest, os.path.join(out, "img2img.json"))
    return checks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join("tests", "fixtures"))
    ap.add_argument("--variants", nargs="*", default=["base", "wide"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (results recorded with 1)")
    ap.add_argument("--skip-real-encoder", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    img_dir = os.path.join(args.fixtures, "img2img")
    init_info = make_init_images(img_dir)
    record_resize(img_dir, args.threads)
    if not args.skip_real_encoder:
        record_real_encoder(img_dir, args.threads)
    for v in args.variants:
        checks = record_variant(v, args.fixtures, img_dir, init_info, args.threads)
        print(v, json.dumps(checks))


if __name__ == "__main__":
    main()
