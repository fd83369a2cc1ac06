"""Streamed training step vs the plain step: time (best of N) and peak anonymous memory, one process per case.

Preliminary figures for docs/streaming.md (a shared 2-core machine: run it single-threaded, small sizes):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_streamed_step.py --sizes 1024 2048 --k 4 8 --repeats 3

Each case runs in a fresh subprocess: ResNet34 (stride-3 conv1, BatchNorm folded, RFR on), float32, random
weights, one noise image; ``plain`` is :func:`local_training_step`, ``streamed`` :func:`streaming_local_step`
(x_i in the disk store, as on CPU by default) with ``--tile`` image px per window. Peak memory: ``RssAnon``
during the steps minus before them (the model and the image already allocated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(mode: str, side: int, k: int, tile: int, repeats: int) -> dict:
    import torch

    from wsilocal.bench.memory import AnonPeak
    from wsilocal.models.local_net import LocalNet
    from wsilocal.runtime import process_memory_bytes, tune_cpu_allocator
    from wsilocal.stream.sources import TensorSource
    from wsilocal.train.local_step import local_training_step
    from wsilocal.train.streaming import streaming_local_step

    tune_cpu_allocator()
    torch.manual_seed(0)
    net = LocalNet(2, k).train()
    image = torch.randn(1, 3, side, side)
    times = []
    before = process_memory_bytes("RssAnon")
    with AnonPeak() as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            if mode == "plain":
                local_training_step(net, image, 1, generator=torch.Generator().manual_seed(0))
            else:
                streaming_local_step(net, TensorSource(image), 1, tile=tile, store="disk",
                                     generator=torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - start)
            net.zero_grad(set_to_none=True)
    return {"mode": mode, "side": side, "k": k, "tile": tile if mode == "streamed" else None,
            "seconds": times, "best_s": min(times), "peak_anon_mib": (peak.peak - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tiles", type=int, nargs="+", default=[4096, 1024], help="streamed tiles, image px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the records to this JSON file")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, side, k, tile, repeats = args.child
        print(json.dumps(child(mode, int(side), int(k), int(tile), int(repeats))))
        return
    records = []
    for side in args.sizes:
        for k in args.k:
            for mode, tile in [("plain", 0)] + [("streamed", t) for t in args.tiles]:
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(side), str(k), str(tile),
                                      str(args.repeats)], check=True, capture_output=True, text=True).stdout
                record = json.loads(out.strip().splitlines()[-1])
                plain = next((r for r in records if r["mode"] == "plain" and r["side"] == side and r["k"] == k),
                             None)
                record["ratio_time"] = record["best_s"] / plain["best_s"] if plain else 1.0
                records.append(record)
                print(f"{side}² K={k} {mode:8s} tile={record['tile']}: best {record['best_s']:.2f} s "
                      f"({record['ratio_time']:.2f}x plain), peak +{record['peak_anon_mib']:.0f} MiB", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
