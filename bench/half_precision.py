#!/usr/bin/env python
"""Step time per dtype on this CPU: eager autograd and the compiled `mebp` step, side by side.

    python bench/half_precision.py --model smollm2-135m --seq-len 64 --repeats 3

One process, one thread; the dtypes' steps alternate in each repeat so machine load hits
them alike, and the median is printed (seconds; not a test: nothing depends on it).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import mebp_compiler
from mebp_compiler.app import models

DTYPES = ("float32", "bfloat16", "float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    setups = {}
    for name in DTYPES:
        model = models.add_lora(models.load(args.model, dtype=getattr(torch, name)))
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids.clone()}
        setups[name] = (model, batch, mebp_compiler.compile(model, batch, "mebp"))
    seconds = {name: {"eager": [], "mebp": []} for name in DTYPES}
    for _ in range(args.repeats):
        for name, (model, batch, plan) in setups.items():
            lora = [p for p in model.parameters() if p.requires_grad]
            start = time.perf_counter()
            torch.autograd.grad(model(**batch).loss, lora)
            seconds[name]["eager"].append(time.perf_counter() - start)
            start = time.perf_counter()
            plan.step(batch)
            seconds[name]["mebp"].append(time.perf_counter() - start)
    for name, times in seconds.items():
        peak = setups[name][2].predicted_peak_bytes / 2**20
        print(f"{name:<9} eager {statistics.median(times['eager']):.2f} s  mebp {statistics.median(times['mebp']):.2f} s"
              f"  predicted peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
