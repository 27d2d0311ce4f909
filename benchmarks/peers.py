"""distsgd against PyTorch on this machine, side by side; writes benchmarks/RESULTS.md's
peer section. The update, allreduce and mlp parts need torch (the ``peers`` extra:
``pip install -e '.[peers]' --extra-index-url https://download.pytorch.org/whl/cpu``,
the CPU build; 2.13.0 here); without it they are skipped with a message. Each
run keeps its parts' figures in benchmarks/peers.json, and the section shows the latest
figures of every part, so parts can be re-run alone.

    python benchmarks/peers.py [update] [allreduce] [mlp] [startup]

- update: one momentum step over ResNet-50's 161 float32 tensors, distsgd against
  ``torch.optim.SGD(fused=True)`` and the memory floor (``bench.py update``);
- allreduce: at 2 ranks, the aggregation plus update of the same gradients: distsgd
  against ``torch.distributed`` (gloo) all-reducing 25 MB buckets, then fused SGD;
- mlp: end to end, the MLP 784-1024-1024-10 at global batch 256: distsgd (its explicit
  backward pass, aggregation overlapped or not) against torch (1 rank) and torch DDP
  (gloo, 2 ranks), with each phase's time; one BLAS/torch thread per rank;
- startup: ``./launch/run``'s time from launch to the end of its first step, once with an
  empty numba cache (cold: numba compiles in the background) and then warm.

Each figure is the median over rounds within a launch; the mlp and allreduce parts run
three launches and give each launch's ratio.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAUNCHES = 3
SIZES = [784, 1024, 1024, 10]
GLOBAL_BATCH = 256
BUCKET_BYTES = 25 << 20


def _env(threads: int) -> dict[str, str]:
    from benchmarks.bench import threads_env

    return {**threads_env(threads), "PYTHONPATH": str(ROOT)}


def _child(ranks: int, part: str, *args: str, threads: int = 1) -> dict:
    command = ["mpirun", "-n", str(ranks), sys.executable, __file__, "--child", part, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                            env=_env(threads), cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _torch_distributed(rank: int, size: int):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=size)
    return dist


# --- the children (under mpirun) ----------------------------------------------------------
def child_allreduce() -> dict | None:
    import torch

    from benchmarks.bench import resnet50_gradients, resnet50_shapes, timed, zero_variables
    from distsgd.distribute import MPIStrategy
    from distsgd.optimizers import SGD

    torch.set_num_threads(1)
    strategy = MPIStrategy()
    comm = strategy.communicator._comm
    rank, size = comm.Get_rank(), comm.Get_size()
    dist = _torch_distributed(rank, size)
    shapes = resnet50_shapes()
    grads = resnet50_gradients(rank)
    with strategy.scope():
        variables = zero_variables(shapes)
        opt = SGD(0.01, momentum=0.9)
    pairs = list(zip(grads, variables, strict=True))
    params = [torch.zeros(s) for s in shapes]
    torch_grads = [torch.from_numpy(g.copy()) for g in grads]
    for p, g in zip(params, torch_grads, strict=True):
        p.grad = g
    torch_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)
    buckets, current, used = [], [], 0  # DDP's: 25 MB, in reverse order
    for g in reversed(torch_grads):
        if current and used + g.numel() * 4 > BUCKET_BYTES:
            buckets.append(current)
            current, used = [], 0
        current.append(g)
        used += g.numel() * 4
    buckets.append(current)
    flats = [torch.empty(sum(g.numel() for g in b)) for b in buckets]
    sources = [g.clone() for g in torch_grads]

    def torch_step() -> None:
        for flat, bucket in zip(flats, buckets, strict=True):
            torch.cat([g.reshape(-1) for g in bucket], out=flat)
            dist.all_reduce(flat)
            at = 0
            for g in bucket:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
        torch_opt.step()

    def restore() -> None:
        for g, s in zip(torch_grads, sources, strict=True):
            g.copy_(s)

    times = timed({"distsgd aggregate + update": lambda: opt.apply_gradients(pairs),
                   "torch gloo 25 MB buckets + fused SGD": (restore, torch_step)},
                  rounds=9, sync=comm.Barrier).slowest_rank(comm)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"ms": times.ms, "distsgd_over_torch": times.ratio(
        "distsgd aggregate + update", "torch gloo 25 MB buckets + fused SGD")}


def child_mlp(system: str) -> dict | None:
    """Steps of the MLP at this world size: ``distsgd``, ``distsgd-overlap`` or ``torch``."""
    from distsgd.distribute import MPIStrategy

    strategy = MPIStrategy()
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    local = GLOBAL_BATCH // size
    rng = np.random.default_rng([rank, 3])
    x = rng.standard_normal((local, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], local)
    phases: dict[str, list[float]] = {"compute": [], "aggregate": [], "update": []}
    if system.startswith("distsgd"):
        import distsgd
        from distsgd.optimizers import SGD
        from distsgd.timeline import timeline
        from distsgd.train.model import MLP

        with strategy.scope():
            model = MLP(SIZES)
            opt = SGD(0.01, momentum=0.9)
        buffer = distsgd.GradientBuffer(model.variables)
        if system == "distsgd-overlap":
            opt.overlap(buffer)

        def step() -> None:
            with timeline.span("compute"):
                model.loss_and_gradients(x, y, 1 / GLOBAL_BATCH, buffer, ready=buffer.ready)
            opt.apply_gradients(buffer)

        def record() -> None:
            totals = timeline.reset_totals()
            for name in phases:
                phases[name].append(totals.get(name, 0.0))
    else:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        model = torch.nn.Sequential(*[layer for i in range(len(SIZES) - 1) for layer in (
            torch.nn.Linear(SIZES[i], SIZES[i + 1]),
            *([torch.nn.ReLU()] if i < len(SIZES) - 2 else []))])
        if size > 1:
            _torch_distributed(rank, size)
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        marks: dict[str, float] = {}

        def step() -> None:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            (loss_fn(model(tx), ty) / GLOBAL_BATCH).backward()  # DDP reduces inside
            middle = time.perf_counter()
            opt.step()
            marks["compute"] = middle - start
            marks["update"] = time.perf_counter() - middle

        def record() -> None:
            phases["compute"].append(marks["compute"])
            phases["update"].append(marks["update"])
            phases["aggregate"].append(0.0)  # inside backward (overlapped)
    comm = strategy.communicator
    for _ in range(5):
        step()
    record()
    for name in phases:
        phases[name].clear()
    samples = []
    for _ in range(30):
        if size > 1:
            comm.barrier()
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
        record()
    if size > 1:
        everyone = comm.allgather_object(samples)
        samples = list(np.max(np.array(everyone), axis=0))  # the slowest rank per step
    if rank != 0:
        return None
    return {"system": system, "ranks": size, "step_ms": float(np.median(samples)) * 1e3,
            "samples_per_second": GLOBAL_BATCH / float(np.median(samples)),
            "phases_ms": {k: float(np.median(v)) * 1e3 for k, v in phases.items()}}


# --- the parts ----------------------------------------------------------------------------
def part_update() -> dict:
    from benchmarks.bench import bench_update

    result = bench_update()
    return {"floor_ms": result["floor_ms"], "ms": result["ms"],
            "ratio_to_floor": result["ratio_to_floor"],
            "ratio_to_torch": result["ratio_to_torch"], "kernels": result["kernels"]}


def part_allreduce() -> dict:
    launches = [_child(2, "allreduce") for _ in range(LAUNCHES)]
    return {"launches": launches,
            "distsgd_over_torch": [r["distsgd_over_torch"] for r in launches]}


def part_mlp() -> dict:
    rows: list[dict] = []
    for _ in range(LAUNCHES):  # alternated, so a slow spell weighs on all
        for ranks, systems in ((1, ("distsgd", "torch")),
                               (2, ("distsgd", "distsgd-overlap", "torch"))):
            for system in systems:
                rows.append(_child(ranks, "mlp", system))
    summary = {}
    for ranks, systems in ((1, ("distsgd", "torch")),
                           (2, ("distsgd", "distsgd-overlap", "torch"))):
        for system in systems:
            mine = [r for r in rows if r["ranks"] == ranks and r["system"] == system]
            summary[f"{system} at {ranks}"] = {
                "samples_per_second": [r["samples_per_second"] for r in mine],
                "phases_ms": mine[len(mine) // 2]["phases_ms"]}
    ratios = {}
    for ranks in (1, 2):
        torch_rates = summary[f"torch at {ranks}"]["samples_per_second"]
        for system in ("distsgd", "distsgd-overlap"):
            key = f"{system} at {ranks}"
            if key in summary:
                ratios[key] = [a / b for a, b in zip(summary[key]["samples_per_second"],
                                                     torch_rates, strict=True)]
    return {"summary": summary, "over_torch": ratios}


def part_startup() -> dict:
    """From ``./launch/run`` to the end of its first step (rank 0's first progress): the
    first launch with an empty numba cache, then warm ones."""
    import tempfile

    seconds = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(1 + LAUNCHES):
            start = time.monotonic()
            job = subprocess.Popen([str(ROOT / "launch" / "run"), "--epochs", "1",
                                    "--metrics", "/tmp/distsgd-startup.jsonl"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**_env(1), "DISTSGD_FIRST_STEP_MARK": "1",
                                        "NUMBA_CACHE_DIR": cache}, cwd="/tmp")
            first = None
            for line in job.stderr:
                if "first step done" in line and first is None:
                    first = time.monotonic() - start
            job.wait()
            seconds.append(first)
    return {"cold_seconds_to_first_step": seconds[0], "seconds_to_first_step": seconds[1:]}


PARTS = {"update": part_update, "allreduce": part_allreduce, "mlp": part_mlp,
         "startup": part_startup}
NEEDS_TORCH = ("update", "allreduce", "mlp")


def write_results(results: dict) -> None:
    """The peer section of benchmarks/RESULTS.md (between its markers)."""
    lines = ["<!-- peers: written by benchmarks/peers.py -->",
             "## Against PyTorch (`python benchmarks/peers.py`)", "",
             f"torch {results.get('torch', '?')} (CPU build), one thread per rank unless "
             "said; 3 launches where ranges are given.", ""]
    if "update" in results:
        u = results["update"]
        lines += ["| one momentum step, ResNet-50's 161 tensors, 1 process (2 threads) | ms "
                  "| x floor | x torch fused |", "|---|---|---|---|",
                  f"| memory floor | {u['floor_ms']:.1f} | 1.00 | |"]
        for name, ms in u["ms"].items():
            torch_ratio = u["ratio_to_torch"].get(name)
            kind = f" ({u['kernels']} kernels)" if name.startswith("distsgd") and \
                "kernels" not in name else ""
            lines.append(f"| {name}{kind} | {ms:.1f} | "
                         f"{u['ratio_to_floor'][name]:.2f} | "
                         f"{'' if torch_ratio is None else f'{torch_ratio:.2f}'} |")
        lines.append("")
    if "allreduce" in results:
        r = results["allreduce"]
        ms = r["launches"][0]["ms"]
        ratios = ", ".join(f"{x:.2f}" for x in r["distsgd_over_torch"])
        lines += ["| aggregate + update, ResNet-50's gradients, 2 ranks | ms (launch 1) |",
                  "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in ms.items()] + [
                  "", f"distsgd / torch gloo, launch by launch: {ratios}", ""]
    if "mlp" in results:
        m = results["mlp"]
        lines += ["| MLP 784-1024-1024-10, global batch 256 | samples/s (3 launches) | "
                  "x torch | compute / aggregate / update ms |", "|---|---|---|---|"]
        for key, row in m["summary"].items():
            rates = ", ".join(f"{x:,.0f}" for x in row["samples_per_second"])
            over = m["over_torch"].get(key)
            over_text = "" if over is None else ", ".join(f"{x:.2f}" for x in over)
            p = row["phases_ms"]
            lines.append(f"| {key} rank(s) | {rates} | {over_text} | {p['compute']:.1f} / "
                         f"{p['aggregate']:.1f} / {p['update']:.1f} |")
        lines += ["", "(torch's aggregation happens inside its backward pass, overlapped; "
                  "its compute figure includes it.)", ""]
    if "startup" in results:
        s = results["startup"]
        warm = ", ".join(f"{x:.2f}" for x in s["seconds_to_first_step"] if x is not None)
        cold = s.get("cold_seconds_to_first_step")
        lines += [f"`./launch/run` from launch to the end of its first step: {warm} s with "
                  "numba's cache warm" + ("" if cold is None else f", {cold:.2f} s with an "
                                           "empty cache"), ""]
    lines.append("<!-- /peers -->")
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if "<!-- peers:" in text:
        text = re.sub(r"<!-- peers:.*?<!-- /peers -->", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        part, *args = sys.argv[2:]
        result = {"allreduce": child_allreduce, "mlp": child_mlp}[part](*args)
        if result is not None:
            print(json.dumps(result))
        return 0
    chosen = sys.argv[1:] or list(PARTS)
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; expected {list(PARTS)}")
    try:
        import torch
    except ImportError:
        skipped = [part for part in chosen if part in NEEDS_TORCH]
        if skipped:
            print(f"parts {skipped} need torch (the peers extra, see this file's docstring): "
                  "skipped")
        chosen = [part for part in chosen if part not in NEEDS_TORCH]
        torch = None
    if not chosen:
        return 0
    store = ROOT / "benchmarks" / "peers.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if torch is not None:
        results["torch"] = torch.__version__
    for part in chosen:
        print(f"== {part}", flush=True)
        results[part] = PARTS[part]()
        print(json.dumps(results[part], indent=1), flush=True)
    store.write_text(json.dumps(results, indent=1) + "\n")
    write_results(results)
    print(f"wrote {store} and {ROOT / 'benchmarks' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
