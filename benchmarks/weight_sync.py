"""WeightBroadcast vs a raw broadcast of one pre-flattened tensor of the same bytes, same run.

    python benchmarks/weight_sync.py [--sizes-mb 4 32 128] [--bucket-mb 1 16 64]
                                     [--receivers N] [--repeats 7] [--out FILE]

For each parameter-set size (fp32, spread over many tensors shaped like transformer layers) and
each bucket size, one sender and N receiver processes (spawned) form a WeightBroadcast group and
time `send` / `receive` against `broadcast` of one flat tensor on a plain side-channel gloo group
(the upper bound: no metadata, no packing, one collective). Each repetition runs both, raw first,
each between two barriers, timed on the sender; the table shows medians after warm-up, GB/s and
ratio = WeightBroadcast GB/s / raw GB/s. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from asyncrl.sync.broadcast import WeightBroadcast

HOST = "127.0.0.1"
MB = 1 << 20


def layer_shapes(total_bytes: int, hidden: int) -> list[tuple[int, ...]]:
    """fp32 shapes of a llama-like stack (attention q/k/v/o, gated MLP, two norms) cut to size."""
    layer = [(hidden,), (hidden, hidden), (hidden // 2, hidden), (hidden // 2, hidden),
             (hidden, hidden), (hidden,), (3 * hidden, hidden), (3 * hidden, hidden),
             (hidden, 3 * hidden)]
    shapes, left = [], total_bytes // 4
    while left > 0:
        for shape in layer:
            numel = 1
            for d in shape:
                numel *= d
            if numel > left:
                shapes.append((left,))
                return shapes
            shapes.append(shape)
            left -= numel
    return shapes


def model(shapes: list[tuple[int, ...]], layout: str) -> list[tuple[str, torch.Tensor]]:
    """Named fp32 tensors: each its own allocation ("separate", as nn.Module parameters are), or
    views laid end to end in one flat buffer ("flat", a trainer keeping flat parameters)."""
    if layout == "separate":
        return [(f"layers.{j}", torch.randn(shape)) for j, shape in enumerate(shapes)]
    sizes = [torch.Size(shape).numel() for shape in shapes]
    views = torch.randn(sum(sizes)).split(sizes)
    return [(f"layers.{j}", v.view(shape)) for j, (v, shape) in enumerate(zip(views, shapes,
                                                                             strict=True))]


def configs(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    return [(lay, s, b) for lay in args.layouts for s in args.sizes_mb for b in args.bucket_mb]


def timed(barrier: Callable[[], None], op: Callable[[], object]) -> float:
    barrier()
    start = time.perf_counter()
    op()
    barrier()
    return time.perf_counter() - start


def member(rank: int, world: int, ports: list[int], args: argparse.Namespace,
           results: mp.Queue | None) -> None:
    torch.set_num_threads(1)  # 2 cores for 2+ processes plus gloo's I/O threads
    timeout = timedelta(seconds=120)
    store = dist.TCPStore(HOST, ports[0], world, is_master=rank == 0, timeout=timeout)
    raw = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, world, timeout)

    def barrier() -> None:
        raw.barrier().wait(timeout)

    rows = []
    for i, ((layout, size_mb, bucket_mb), port) in enumerate(
            zip(configs(args), ports[1:], strict=True)):
        torch.manual_seed(i)  # the same tensors on every rank: receivers check what they got
        named = model(layer_shapes(int(size_mb * MB), args.hidden), layout)
        nbytes = sum(t.numel() * 4 for _, t in named)
        flat = torch.randn(nbytes // 4) if rank == 0 else torch.empty(nbytes // 4)
        bc = WeightBroadcast(rank=rank, world_size=world, host=HOST, port=port,
                             bucket_bytes=int(bucket_mb * MB), group_name=f"bench-{i}")

        def raw_op() -> None:
            raw.broadcast(flat, 0).wait(timeout)

        received: list = []

        def candidate(version: int) -> None:
            if rank == 0:
                bc.send(named, version)
            else:
                received[:] = bc.receive()[0]

        raw_s, ws_s = [], []
        for rep in range(args.warmup + args.repeats):
            r = timed(barrier, raw_op)
            w = timed(barrier, lambda rep=rep: candidate(rep))
            if rep >= args.warmup:
                raw_s.append(r)
                ws_s.append(w)
        if rank > 0 and not all(torch.equal(a, b) for (_, a), (_, b)
                                in zip(received, named, strict=True)):
            raise SystemExit(f"rank {rank}: received weights differ from the sender's")
        buckets = len(bc._plan)
        bc.close()
        raw_med, ws_med = statistics.median(raw_s), statistics.median(ws_s)
        rows.append({"layout": layout, "size_mb": size_mb, "bucket_mb": bucket_mb, "tensors": len(named),
                     "bytes": nbytes, "buckets": buckets, "raw_s": raw_med, "ws_s": ws_med,
                     "raw_gbps": nbytes / raw_med / 1e9, "ws_gbps": nbytes / ws_med / 1e9,
                     "ratio": raw_med / ws_med})
    raw.shutdown()
    if results is not None:
        results.put(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 32, 128])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1, 16, 64])
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=["separate", "flat"],
                        choices=["separate", "flat"], help="how the sender's tensors are stored")
    parser.add_argument("--hidden", type=int, default=256, help="layer width of the shapes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
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
    try:
        member(0, world, ports, args, results)
        rows = results.get(timeout=10)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
    print(f"{'layout':>8} {'size MB':>8} {'bucket MB':>9} {'tensors':>7} {'buckets':>7} {'raw ms':>8} "
          f"{'raw GB/s':>8} {'WB ms':>8} {'WB GB/s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['layout']:>8} {r['size_mb']:>8g} {r['bucket_mb']:>9g} {r['tensors']:>7} {r['buckets']:>7} "
              f"{1e3 * r['raw_s']:>8.2f} {r['raw_gbps']:>8.2f} {1e3 * r['ws_s']:>8.2f} "
              f"{r['ws_gbps']:>8.2f} {r['ratio']:>6.2f}")
    report = {"machine": {"cpus": mp.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "receivers": args.receivers, "warmup": args.warmup, "repeats": args.repeats,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
