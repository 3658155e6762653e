#!/usr/bin/env python3
"""Record diffusers' CogView3-Plus transformer run in bfloat16, for cogview's bf16 tests.

Usage:
    python bf16_refs.py --pipeline DIR --refs REFDIR [--threads 1]

Replays the inputs of REFDIR/transformer.safetensors (written by make_references.py) through the
transformer of DIR loaded with torch_dtype=torch.bfloat16 (weights, activations and every op in
bf16, as a CUDA user runs it), on the CPU, and writes REFDIR/transformer_bf16.safetensors: for each
case, `<case>.output` as float32. The float32 outputs stay in transformer.safetensors, so a test
can place cogview's bf16 paths between the two.
"""

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file

from diffusers import CogView3PlusTransformer2DModel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", required=True, help="a diffusers CogView3-Plus folder")
    ap.add_argument("--refs", required=True, help="the folder holding transformer.safetensors")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    inputs = load_file(os.path.join(args.refs, "transformer.safetensors"))
    model = CogView3PlusTransformer2DModel.from_pretrained(
        os.path.join(args.pipeline, "transformer"), torch_dtype=torch.bfloat16
    ).eval()
    cases = sorted({k.split(".")[0] for k in inputs if k.endswith(".output")})
    out, meta = {}, {}
    for case in cases:
        get = lambda name: inputs[f"{case}.{name}"]
        bf16 = lambda name: get(name).to(torch.bfloat16)
        with torch.no_grad():
            y = model(
                hidden_states=bf16("hidden_states"),
                encoder_hidden_states=bf16("encoder_hidden_states"),
                timestep=get("timestep"),
                original_size=get("original_size"),
                target_size=get("target_size"),
                crop_coords=get("crop_coords"),
                return_dict=False,
            )[0]
        out[f"{case}.output"] = y.float().contiguous()
        f32 = get("output")
        meta[case] = {
            "max_abs": float(f32.abs().max()),
            "max_diff_to_f32": float((y.float() - f32).abs().max()),
        }
    import diffusers

    save_file(out, os.path.join(args.refs, "transformer_bf16.safetensors"),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "cases": json.dumps(meta)})
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
