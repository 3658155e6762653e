#!/usr/bin/env python3
"""`cogview bench`, mirrored on diffusers/transformers: the reference side of a speed ratio.

Runs the stages of `cogview bench` (crates/runtime/src/bench.rs) with the reference
implementations on random weights and prints the same JSON, so that both can be run on one
machine and divided:

- T5: transformers `T5EncoderModel(T5Config(**text_encoder/config.json))`, one forward of
  `--text-len` token ids (id i = i * 7919 % vocab_size, batch 1, no attention mask, as the
  Rust bench);
- DiT: diffusers `CogView3PlusTransformer2DModel.from_config(transformer/config.json)`, `--steps`
  calls with batch 2 (classifier-free guidance; batch 1 with --no-cfg) at latent size
  height/8 x width/8 (the VAE's scale factor), timestep t_i = 999 - i * 1000 / steps,
  original_size = target_size = (height, width), crop_coords = (0, 0); the first call is
  reported apart from the median of the later ones (the median of all of them when --steps 1);
  after each call the output is checked with `torch.isfinite(v).all()` (read back to the
  host), whose median time is `guard_seconds_per_step` (included in the step time, as in Rust);
- VAE: diffusers `AutoencoderKL.from_config(vae/config.json).decode` of one random latent.

Weights are drawn like the Rust `RandomWeights`: N(0, 1/fan_in) for matrices and convolution
kernels (fan_in = product of all dims but the first), 1 for norm weights, N(0, 0.02^2) for every
other vector. Every model is built in f32 and cast to the compute dtype, as diffusers'
`from_pretrained(torch_dtype=...)` does. Forward passes run under `torch.inference_mode()`;
CUDA is synchronized before every clock read.

Usage (from the repository root, with the project's Python environment):

    python tools/bench_diffusers.py --preset tiny --steps 3 --json
    python tools/bench_diffusers.py --preset full --layers 1 \\
        --width 256 --height 256 --steps 2 --json
    python tools/bench_diffusers.py --preset full --device cuda --dtype bf16
    python tools/bench_diffusers.py --config /path/to/CogView3-Plus-3B --layers 4

Flags as in `cogview bench`: --preset tiny|full (tests/fixtures/base/pipeline and
tests/fixtures/real), --config DIR (a diffusers model folder; only text_encoder/config.json,
transformer/config.json and vae/config.json are read), --layers N (T5 and DiT shortened to N
blocks), --width, --height, --steps, --text-len (default 224), --no-cfg, --stages (text, denoise, decode; without text
the transformer gets random embeddings), --json. Instead of
`cogview`'s --device/--precision: --device cpu|cuda (default cuda when available) and
--dtype auto|f32|bf16 (auto: bf16 on a CUDA device that supports it, else f32).

Output: the object `cogview bench --json` prints ("device", "compiler", "precision", "report"
with the `BenchReport` fields, "full_depth_estimate_bytes") plus one key, "runtime":
"diffusers <version> torch <version> <device> <dtype>". Seconds are seconds, bytes are bytes.
"compiler" is "torch-eager" (the Rust side names its shader compiler there).

Peak memory ("t5_peak", "dit_peak", "vae_peak", each {"in_use", "reserved"} in bytes): on CUDA,
`torch.cuda.max_memory_allocated` and `max_memory_reserved` after
`torch.cuda.reset_peak_memory_stats()` at the start of the stage, once that stage's weights are
resident, so the weights count (as they do in Rust, which samples after loading). On CPU both are
null, as the Rust CPU backend (burn-flex, no allocator report) gives them.

Differences from the Rust bench that cannot be mirrored exactly:
- Rust streams the T5 block by block (each block's random weights are generated and uploaded
  inside the timed region, the embedding lives on the CPU) and its VAE time includes generating
  the decoder's weights; here the T5 and the VAE decoder are resident and only the forward
  passes are timed. The T5 peak here holds the whole encoder, the Rust one about one block.
- The VAE encoder is built (AutoencoderKL has both halves) and then dropped before the stage,
  so only the decoder counts.
- The random numbers differ (torch's generator, seed 0), only their distributions match.
- diffusers' DiT refuses a patch grid larger than `pos_embed_max_size` (e.g. the tiny preset at
  the default 1024x1024); the Rust DiT computes the sin-cos window for any size. Here the
  config's pos_embed_max_size is raised to fit (a note goes to stderr): the table's entries
  depend only on row and column, so the values are the ones Rust uses.
- The timestep is passed as a float tensor (the pipeline passes the scheduler's integer
  timesteps); the model embeds it the same way either way.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "tiny": ROOT / "tests/fixtures/base/pipeline",
    "full": ROOT / "tests/fixtures/real",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="cogview bench on diffusers/transformers (random weights, same JSON)."
    )
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="tiny: tests/fixtures/base/pipeline; full: tests/fixtures/real")
    p.add_argument("--config", metavar="DIR",
                   help="a model folder whose config files to use instead of a preset")
    p.add_argument("--layers", type=int, help="shorten the DiT and the T5 encoder to this many blocks")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--text-len", type=int, default=224,
                   help="text tokens (the pipeline's max_sequence_length)")
    p.add_argument("--no-cfg", action="store_true",
                   help="run without classifier-free guidance (batch 1 instead of 2)")
    p.add_argument("--dtype", choices=["auto", "f32", "bf16"], default="auto",
                   help="compute dtype (auto: bf16 on CUDA where supported, else f32)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--stages", default="text,denoise,decode",
                   help="stages to run, comma-separated: text, denoise, decode (as `cogview bench "
                        "--stages`; without text the transformer gets random embeddings)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in ("text", "denoise", "decode")]
    if unknown:
        p.error(f"--stages: unknown stage(s) {', '.join(unknown)} (text, denoise, decode)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be at least 1")
    return args


def load_configs(args):
    folder = Path(args.config) if args.config else PRESETS[args.preset]
    return tuple(
        json.loads((folder / part / "config.json").read_text())
        for part in ("text_encoder", "transformer", "vae")
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def start_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device):
    """`PeakMemory`: bytes on CUDA, nulls on CPU (like the Rust CPU backend)."""
    if device.type != "cuda":
        return {"in_use": None, "reserved": None}
    torch.cuda.synchronize(device)
    return {
        "in_use": int(torch.cuda.max_memory_allocated(device)),
        "reserved": int(torch.cuda.max_memory_reserved(device)),
    }


@torch.no_grad()
def random_weights(module: torch.nn.Module, generator: torch.Generator):
    """Redraws every parameter as the Rust `RandomWeights` does."""
    for name, p in module.named_parameters():
        prefix, _, key = name.rpartition(".")
        norm = key == "weight" and ("norm" in prefix or prefix.endswith("layer_norm"))
        if p.dim() == 1 and norm:
            p.fill_(1.0)
            continue
        fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 2500
        # Draw in f32 on the CPU generator's device, then copy (bf16 normal_ is fine too, but
        # this keeps the draw independent of the compute dtype).
        t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        p.copy_(t)
        del t


def param_bytes(params, dtype) -> int:
    return sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()


def generator_for(device):
    g = torch.Generator(device=device)
    g.manual_seed(0)
    return g


def bench(t5_cfg, dit_cfg, vae_cfg, args, device, dtype):
    t5_cfg = dict(t5_cfg)
    dit_cfg = dict(dit_cfg)
    if args.layers is not None:
        t5_cfg["num_layers"] = min(args.layers, t5_cfg["num_layers"])
        dit_cfg["num_layers"] = min(args.layers, dit_cfg["num_layers"])
    gen = generator_for(device)
    report = {
        "t5_layers": t5_cfg["num_layers"],
        "dit_layers": dit_cfg["num_layers"],
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
    }
    notes = {}
    # A stage left out reports 0 s and no peak, as the Rust bench does.
    report["t5_seconds"] = 0.0
    report["first_step_seconds"] = report["median_step_seconds"] = report["guard_seconds_per_step"] = 0.0
    report["vae_seconds"] = 0.0
    report["t5_peak"] = report["dit_peak"] = report["vae_peak"] = read_peak(torch.device("cpu"))
    # The block sizes are reported whichever stages run (they come from the configs).
    t5_block_bytes = t5_block_param_bytes(t5_cfg, dtype)
    dit_block_bytes = dit_block_param_bytes(dit_cfg, dtype)
    if "text" in args.stages:
        text = run_t5(t5_cfg, args, device, dtype, gen, report, notes)
    else:
        # The Rust bench's stand-in: random embeddings of the encoder's width.
        text = torch.randn((1, args.text_len, t5_cfg["d_model"]), generator=gen, device=device)
    if "denoise" in args.stages:
        run_dit(dit_cfg, vae_cfg, text, args, device, dtype, gen, report, notes)
    del text
    free(device)
    if "decode" in args.stages:
        run_vae(vae_cfg, args, device, dtype, gen, report)

    report["dit_block_weight_bytes"] = dit_block_bytes
    report["t5_block_weight_bytes"] = t5_block_bytes
    # The Rust field order (serde serializes in declaration order).
    order = [
        "t5_layers", "dit_layers", "width", "height", "steps", "t5_seconds", "first_step_seconds",
        "median_step_seconds", "guard_seconds_per_step", "vae_seconds", "t5_peak", "dit_peak",
        "vae_peak", "dit_block_weight_bytes", "t5_block_weight_bytes",
    ]
    return {k: report[k] for k in order}, notes


def t5_block_param_bytes(t5_cfg, dtype):
    """One block's weights as the Rust T5Block holds them: the relative position bias table of
    block 0 belongs to the Rust embedding, not to a block. Built on the meta device: no memory."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Block

    with torch.device("meta"):
        block = T5Block(T5Config(**t5_cfg), has_relative_attention_bias=False)
    return param_bytes(list(block.parameters()), dtype)


def dit_block_param_bytes(dit_cfg, dtype):
    from diffusers import CogView3PlusTransformer2DModel

    cfg = dict(dit_cfg, num_layers=1)
    with torch.device("meta"):
        dit = CogView3PlusTransformer2DModel.from_config(cfg)
    return param_bytes(list(dit.transformer_blocks[0].parameters()), dtype)


def run_t5(t5_cfg, args, device, dtype, gen, report, notes):
    """T5: resident, one forward; returns the embeddings."""
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        t5 = T5EncoderModel(T5Config(**t5_cfg))
    t5 = t5.to(dtype).eval()
    random_weights(t5, gen)
    notes["t5_attention"] = getattr(t5.config, "_attn_implementation", None)
    vocab = t5_cfg["vocab_size"]
    ids = torch.tensor([[(i * 7919) % vocab for i in range(args.text_len)]], dtype=torch.long, device=device)
    start_peak(device)
    with torch.inference_mode():
        sync(device)
        s = time.perf_counter()
        text = t5(input_ids=ids).last_hidden_state
        sync(device)
        report["t5_seconds"] = time.perf_counter() - s
    report["t5_peak"] = read_peak(device)
    del t5
    free(device)
    return text


def latent_size(vae_cfg, args):
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return args.height // f, args.width // f


def run_dit(dit_cfg, vae_cfg, text, args, device, dtype, gen, report, notes):
    """DiT: resident, `steps` calls with the pipeline's batch."""
    from diffusers import CogView3PlusTransformer2DModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # the real config carries an unused pooled_projection_dim
    batch = 1 if args.no_cfg else 2
    lh, lw = latent_size(vae_cfg, args)
    # diffusers crops a fixed pos_embed_max_size² sin-cos table and fails on larger latents; the
    # Rust DiT computes the window for any size. The table's entries depend only on the row and
    # column (base_size = grid size), so a larger table gives the same values as Rust's window.
    patch = dit_cfg.get("patch_size", 2)
    need = max(lh // patch, lw // patch)
    if need > dit_cfg.get("pos_embed_max_size", 128):
        notes["pos_embed_max_size"] = f"{dit_cfg.get('pos_embed_max_size', 128)} -> {need}"
        print(f"note: pos_embed_max_size raised to {need} for a {lh // patch}x{lw // patch} patch grid "
              "(diffusers would refuse it; the Rust DiT extends the table)", file=sys.stderr)
        dit_cfg["pos_embed_max_size"] = need
    with torch.device(device):
        dit = CogView3PlusTransformer2DModel.from_config(dit_cfg)
    dit = dit.to(dtype).eval()
    random_weights(dit, gen)
    with torch.inference_mode():
        text_b = text.expand(batch, args.text_len, text.shape[-1]).to(dtype)
        latents = torch.randn(
            (batch, dit_cfg.get("in_channels", 16), lh, lw), generator=gen, device=device, dtype=torch.float32
        ).to(dtype)
        size = torch.tensor([[args.height, args.width]] * batch, dtype=dtype, device=device)
        crop = torch.zeros((batch, 2), dtype=dtype, device=device)
    start_peak(device)
    steps, guard = [], []
    with torch.inference_mode():
        for i in range(args.steps):
            t = 999.0 - i * 1000.0 / args.steps
            timestep = torch.full((batch,), t, dtype=torch.float32, device=device)
            sync(device)
            s = time.perf_counter()
            v = dit(
                hidden_states=latents,
                encoder_hidden_states=text_b,
                timestep=timestep,
                original_size=size,
                target_size=size,
                crop_coords=crop,
                return_dict=False,
            )[0]
            sync(device)
            g = time.perf_counter()
            _finite = bool(torch.isfinite(v).all().item())
            sync(device)
            e = time.perf_counter()
            guard.append(e - g)
            steps.append(e - s)
            del v
    report["first_step_seconds"] = steps[0]
    report["median_step_seconds"] = median(steps[1:]) if len(steps) > 1 else steps[0]
    report["guard_seconds_per_step"] = median(guard)
    report["dit_peak"] = read_peak(device)
    del dit, latents, text_b, size, crop
    free(device)


def run_vae(vae_cfg, args, device, dtype, gen, report):
    """VAE decode of one random latent."""
    from diffusers import AutoencoderKL

    lh, lw = latent_size(vae_cfg, args)
    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_cfg)
    vae.encoder = None  # decode never touches it; only the decoder's memory should count
    free(device)
    vae = vae.to(dtype).eval()
    random_weights(vae, gen)
    with torch.inference_mode():
        z = torch.randn(
            (1, vae_cfg["latent_channels"], lh, lw), generator=gen, device=device, dtype=torch.float32
        ).to(dtype)
    start_peak(device)
    with torch.inference_mode():
        sync(device)
        s = time.perf_counter()
        image = vae.decode(z, return_dict=False)[0]
        sync(device)
        report["vae_seconds"] = time.perf_counter() - s
    report["vae_peak"] = read_peak(device)
    del image, vae, z
    free(device)


def median(v):
    """The Rust `median`: the upper middle element after sorting (not the mean of two)."""
    if not v:
        return 0.0
    return sorted(v)[len(v) // 2]


def device_label(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda, torch)"
    import platform
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU ({torch.get_num_threads()} threads, torch)"


def table(r, device, precision, runtime, notes) -> str:
    def mib(b):
        return "-" if b is None else f"{b / (1 << 20):.0f} MiB"

    s = f"{device}, {precision}: {r['width']}x{r['height']}, {r['steps']} steps, " \
        f"T5 {r['t5_layers']} layers, DiT {r['dit_layers']} layers\n"
    s += f"{runtime}; T5 attention: {notes.get('t5_attention')}\n"
    s += f"{'stage':<22}{'seconds':>12}{'peak memory':>14}\n"
    s += f"{'T5 (resident)':<22}{r['t5_seconds']:>12.3f}{mib(r['t5_peak']['in_use']):>14}\n"
    s += f"{'DiT first step':<22}{r['first_step_seconds']:>12.3f}{mib(r['dit_peak']['in_use']):>14}\n"
    s += f"{'DiT median step':<22}{r['median_step_seconds']:>12.3f}\n"
    s += f"{'guard per step':<22}{r['guard_seconds_per_step']:>12.4f}\n"
    s += f"{'VAE decode':<22}{r['vae_seconds']:>12.3f}{mib(r['vae_peak']['in_use']):>14}\n"
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "f32"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        t5_cfg, dit_cfg, vae_cfg = load_configs(args)
    except (OSError, ValueError) as e:
        print(f"error: reading configs: {e}", file=sys.stderr)
        return 1

    import diffusers

    torch.manual_seed(0)
    report, notes = bench(t5_cfg, dit_cfg, vae_cfg, args, device, dtype)
    runtime = f"diffusers {diffusers.__version__} torch {torch.__version__} {args.device} {args.dtype}"
    label = device_label(device)
    out = {
        "device": label,
        "compiler": "torch-eager",
        "precision": args.dtype,
        "report": report,
        "full_depth_estimate_bytes": {
            "dit_weights": report["dit_block_weight_bytes"] * dit_cfg["num_layers"],
            "t5_block": report["t5_block_weight_bytes"],
        },
        "runtime": runtime,
    }
    if not args.json:
        print(table(report, label, args.dtype, runtime, notes), end="")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
