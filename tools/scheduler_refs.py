#!/usr/bin/env python3
"""Record diffusers' CogVideoXDDIMScheduler timesteps for step counts 1..250 (and 397, 500, 999, 1000) and a few
step results, with CogView3-Plus's scheduler config, into tests/fixtures/scheduler/timesteps.json.

Usage: python tools/scheduler_refs.py --config tests/fixtures/real/scheduler/scheduler_config.json \
           --out tests/fixtures/scheduler/timesteps.json
"""
import argparse
import json

import torch
from diffusers import CogVideoXDDIMScheduler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    s = CogVideoXDDIMScheduler.from_config(json.load(open(a.config)))
    out = {"timesteps": {}, "steps": []}
    for n in list(range(1, 251)) + [397, 500, 999, 1000]:
        s.set_timesteps(n)
        out["timesteps"][str(n)] = s.timesteps.tolist()
    # Whole runs of the step function on a fixed sample and model output, for step counts
    # whose timestep list has N+1 entries too.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float32)
    v = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float32)
    for n in [1, 3, 7, 61]:
        s.set_timesteps(n)
        sample = x.clone()
        for t in s.timesteps:
            sample = s.step(v, t, sample, return_dict=False)[0]
        out["steps"].append({"n": n, "sample": x.flatten().tolist(), "model_output": v.flatten().tolist(),
                             "final": sample.flatten().tolist()})
    json.dump(out, open(a.out, "w"))


if __name__ == "__main__":
    main()
