"""The small-map depthwise backward (finetune/model/depthwise.py) against PyTorch's, one training step at a time.

    python scripts/bench_depthwise.py --out bench/depthwise-avx2.json

For each training side, batch size and memory layout (`fit` trains channels_last on a CPU): `tf_efficientnet_lite0`
in training mode, fp32, one step = forward, cross-entropy, backward and an AdamW step. The two variants
alternate step by step in one process (same weights, same batch), so both see the same machine; the figure is
the median over the timed steps after two warm-up steps each. No pretrained weights are needed: the cost does
not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from bench_train import _machine

from finetune.model.depthwise import small_map_backward


def measure(side: int, batch: int, steps: int, channels_last: bool) -> dict:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10, drop_path_rate=0.1)
    model = model.to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))
    seconds: dict[str, list[float]] = {"pytorch": [], "small_map": []}
    for step in range(steps + 2):
        for name in seconds:
            with small_map_backward(model) if name == "small_map" else nullcontext():
                started = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step >= 2:
                    seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"side": side, "batch": batch, "channels_last": channels_last, "steps": steps,
            "images_per_s": {name: batch / value for name, value in median.items()},
            "speedup": median["pytorch"] / median["small_map"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="64,96,224")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for side in (int(s) for s in args.sides.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for layout in args.layouts.split(","):
                steps = args.steps if side < 224 or batch <= 32 else max(3, args.steps // 2)
                rows.append(measure(side, batch, steps, layout == "channels_last"))
                r = rows[-1]
                print(f"{side} px, batch {batch}, {layout}: {r['images_per_s']['pytorch']:.1f} -> "
                      f"{r['images_per_s']['small_map']:.1f} img/s ({r['speedup']:.2f}x)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
