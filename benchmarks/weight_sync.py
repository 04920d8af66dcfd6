"""WeightBroadcast vs a raw broadcast of one pre-flattened tensor of the same bytes, same run.

    python benchmarks/weight_sync.py [--sizes-mb 4 32 128] [--bucket-mb 1 16 64]
                                     [--layouts separate flat] [--receivers N]
                                     [--repeats 15] [--out FILE]

For each sender layout, parameter-set size (fp32, over many tensors shaped like transformer
layers) and bucket size, one sender and N receiver processes (spawned) form a WeightBroadcast
group and time `send` / `receive` against `broadcast` of one flat tensor on a plain side-channel
gloo group (the upper bound: no metadata, no packing, one collective). Layouts: "separate" (each
tensor its own allocation, as nn.Module parameters are: the sender packs buckets) and "flat" (the
tensors are views laid end to end in one buffer: buckets go out in place, no packing).

Each repetition runs raw then WeightBroadcast, each between two barriers, timed on the sender.
Shown: medians after warm-up, GB/s, and ratio = WeightBroadcast GB/s / raw GB/s, taken as the
median of the per-repetition ratios (a raw run and its WeightBroadcast run are adjacent in time,
so the pair shares the machine's load). Receivers check the last weights bit for bit.
Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from asyncrl.sync.broadcast import WeightBroadcast

HOST = "127.0.0.1"
MB = 1 << 20
TIMEOUT = timedelta(seconds=120)


def layer_shapes(total_bytes: int, hidden: int) -> list[tuple[int, ...]]:
    """fp32 shapes of a llama-like stack (norm, q/k/v/o, norm, gate/up/down) cut to size."""
    layer = [(hidden,), (hidden, hidden), (hidden // 2, hidden), (hidden // 2, hidden),
             (hidden, hidden), (hidden,), (3 * hidden, hidden), (3 * hidden, hidden),
             (hidden, 3 * hidden)]
    shapes, left = [], total_bytes // 4
    while left > 0:
        for shape in layer:
            numel = torch.Size(shape).numel()
            if numel > left:
                shapes.append((left,))
                return shapes
            shapes.append(shape)
            left -= numel
    return shapes


def model(shapes: list[tuple[int, ...]], layout: str) -> list[tuple[str, torch.Tensor]]:
    """Named fp32 tensors: each its own allocation ("separate") or views end to end in one
    flat buffer ("flat", a trainer keeping flat parameters)."""
    if layout == "separate":
        return [(f"layers.{j}", torch.randn(shape)) for j, shape in enumerate(shapes)]
    sizes = [torch.Size(shape).numel() for shape in shapes]
    views = torch.randn(sum(sizes)).split(sizes)
    return [(f"layers.{j}", v.view(shape))
            for j, (v, shape) in enumerate(zip(views, shapes, strict=True))]


def configs(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    return [(lay, s, b) for lay in args.layouts for s in args.sizes_mb for b in args.bucket_mb]


def measure(raw: dist.ProcessGroup, bc: WeightBroadcast, named: list, flat: torch.Tensor,
            args: argparse.Namespace) -> tuple[list[float], list[float], list]:
    """Raw and WeightBroadcast seconds per repetition (after warm-up), and the last receive."""
    received: list = []

    def timed(op, *op_args) -> float:
        raw.barrier().wait(TIMEOUT)
        start = time.perf_counter()
        op(*op_args)
        raw.barrier().wait(TIMEOUT)
        return time.perf_counter() - start

    def raw_op() -> None:
        raw.broadcast(flat, 0).wait(TIMEOUT)

    def candidate(version: int) -> None:
        if bc.rank == 0:
            bc.send(named, version)
        else:
            received[:] = bc.receive()[0]

    raw_s, ws_s = [], []
    for rep in range(args.warmup + args.repeats):
        r, w = timed(raw_op), timed(candidate, rep)
        if rep >= args.warmup:
            raw_s.append(r)
            ws_s.append(w)
    return raw_s, ws_s, received


def member(rank: int, world: int, ports: list[int], args: argparse.Namespace,
           results: mp.Queue | None) -> None:
    torch.set_num_threads(1)  # 2 cores for 2+ processes plus gloo's I/O threads
    store = dist.TCPStore(HOST, ports[0], world, is_master=rank == 0, timeout=TIMEOUT)
    raw = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, world, TIMEOUT)
    rows, corrupt = [], []
    for i, ((layout, size_mb, bucket_mb), port) in enumerate(
            zip(configs(args), ports[1:], strict=True)):
        torch.manual_seed(i)  # the same tensors on every rank: receivers check what they got
        named = model(layer_shapes(int(size_mb * MB), args.hidden), layout)
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        flat = torch.randn(nbytes // 4) if rank == 0 else torch.empty(nbytes // 4)
        bc = WeightBroadcast(rank=rank, world_size=world, host=HOST, port=port,
                             bucket_bytes=int(bucket_mb * MB), group_name=f"bench-{i}")
        raw_s, ws_s, received = measure(raw, bc, named, flat, args)
        buckets = len(bc._plan)
        bc.close()
        if rank > 0 and not all(torch.equal(a, b) for (_, a), (_, b)
                                in zip(received, named, strict=True)):
            corrupt.append((layout, size_mb, bucket_mb))  # go on: the sender waits for us
        raw_med, ws_med = statistics.median(raw_s), statistics.median(ws_s)
        rows.append({
            "layout": layout, "size_mb": size_mb, "bucket_mb": bucket_mb,
            "tensors": len(named), "bytes": nbytes, "buckets": buckets,
            "raw_s": raw_med, "ws_s": ws_med, "raw_min_s": min(raw_s), "ws_min_s": min(ws_s),
            "raw_gbps": nbytes / raw_med / 1e9, "ws_gbps": nbytes / ws_med / 1e9,
            "ratio": statistics.median(r / w for r, w in zip(raw_s, ws_s, strict=True)),
        })
    raw.shutdown()
    if results is not None:
        results.put(rows)
    if corrupt:
        raise SystemExit(f"rank {rank}: received weights differ from the sender's in {corrupt}")


def print_table(rows: list[dict]) -> None:
    head = ("layout", "size MB", "bucket MB", "tensors", "buckets", "raw ms", "raw GB/s",
            "WB ms", "WB GB/s", "ratio")
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = (r["layout"], f"{r['size_mb']:g}", f"{r['bucket_mb']:g}", r["tensors"],
                 r["buckets"], f"{1e3 * r['raw_s']:.2f}", f"{r['raw_gbps']:.2f}",
                 f"{1e3 * r['ws_s']:.2f}", f"{r['ws_gbps']:.2f}", f"{r['ratio']:.2f}")
        print(" ".join(f"{c:>9}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 32, 128])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1, 16, 64])
    parser.add_argument("--layouts", nargs="+", default=["separate", "flat"],
                        choices=["separate", "flat"], help="how the sender's tensors are stored")
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256, help="layer width of the shapes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/weight_sync.json")
    args = parser.parse_args()
    world = args.receivers + 1
    ports = [WeightBroadcast.free_port(HOST) for _ in range(1 + len(configs(args)))]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=member, args=(rank, world, ports, args, None))
             for rank in range(1, world)]
    for p in procs:
        p.start()
    start = time.perf_counter()
    try:
        member(0, world, ports, args, results)
        rows = results.get(timeout=10)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    print_table(rows)
    report = {"machine": {"cpus": mp.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "receivers": args.receivers, "warmup": args.warmup, "repeats": args.repeats,
              "hidden": args.hidden, "seconds": round(time.perf_counter() - start, 1),
              "receivers_ok": not failed, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    if failed:
        raise SystemExit(f"a receiver failed (exit codes {failed}): see its output above")


if __name__ == "__main__":
    main()
