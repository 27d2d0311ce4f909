"""Side-by-side benchmarks; every figure is a ratio measured in the same run.

    python benchmarks/bench.py                 # everything: table, JSON and PNG
    python benchmarks/bench.py update small    # some parts only
    mpirun -n 2 python benchmarks/bench.py aggregate   # (what `all` runs itself)

Parts:
  update     one SGD step over ResNet-50's 161 float32 tensors (25,557,032 parameters)
             vs the memory floor (5 array passes at the measured in-place streaming
             bandwidth, all cores), a straightforward numpy loop, and torch's fused SGD
             when torch is installed
  aggregate  under mpirun: distsgd's aggregate(+update) vs one whole-buffer Allreduce
             (+ the numpy loop), one Allreduce per tensor, and raw chunked Allreduce;
             the rounds of three launches pooled, and each launch's figures
  small      2,000 tensors of 64 floats vs one tensor of the same total size, and the
             passes over new arrays that no checked step can skip (a lower bound)
  memory     peak resident memory of steps over params + slots + gradients, 1 and 2
             ranks (Linux /proc), against a flat copy + Allreduce + numpy loop
  scaling    the 3M-parameter training job's samples/s: 1 rank x 1 thread, 1 x all cores,
             one rank per core
  transport  bfloat16 against exact gradient transport at 2 ranks: on one host, and
             (as root) between two emulated hosts over TCP, also with the link capped
             by tc at 4 and 1 Gbit/s
  invariant  world-size invariance at 2 ranks: the aggregation of ResNet-50's gradients in
             4 micro-batches, exact against the canonical tree and a fixed-point
             prototype, with each one's error; the training job's samples/s with the
             mode on and off at 1 and 2 ranks (benchmarks/invariance.py)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import operator
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distsgd  # noqa: E402
from distsgd import kernels  # noqa: E402
from distsgd.optimizers import SGD  # noqa: E402


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 trainable tensors of torchvision's ResNet-50 (25,557,032 parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def resnet50_gradients(seed: int) -> list[np.ndarray]:
    """Random float32 gradients of ResNet-50's shapes (small, as gradients are)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in resnet50_shapes()]


def zero_variables(shapes: list[tuple[int, ...]]) -> list[distsgd.Variable]:
    """float32 zeros named v0, v1, ... (made in the caller's strategy scope)."""
    return [distsgd.Variable(np.zeros(s, np.float32), name=f"v{i}")
            for i, s in enumerate(shapes)]


class Timings:
    """Seconds per call, one sample per round and candidate (candidates interleaved).

    ``ms`` reports medians; :meth:`ratio` is the median over rounds of the two
    candidates' ratio within each round, so a slow spell of the machine (this VM has
    minutes-long ones) weighs on both sides of the ratio alike.
    """

    def __init__(self, samples: dict[str, np.ndarray]) -> None:
        self.samples = samples

    def median(self, name: str) -> float:
        return float(np.median(self.samples[name]))

    @property
    def ms(self) -> dict[str, float]:
        return {name: self.median(name) * 1e3 for name in self.samples}

    def ratio(self, name: str | tuple[str, ...], baseline: str, scale: float = 1.0) -> float:
        """Median over rounds of ``name / (scale * baseline)``; a tuple ``name`` is the
        sum of those candidates' samples within each round (a cost made of parts)."""
        names = (name,) if isinstance(name, str) else name
        total = np.sum([self.samples[n] for n in names], axis=0)
        return float(np.median(total / (scale * self.samples[baseline])))

    def slowest_rank(self, comm) -> Timings:
        """Per round, the slowest rank's sample (every rank gets the same result)."""
        from mpi4py import MPI

        merged = {}
        for name, values in self.samples.items():
            values = np.ascontiguousarray(values, dtype=np.float64)
            comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)
            merged[name] = values
        return Timings(merged)


def timed(candidates: dict, rounds: int = 7, warmup: int = 2,
          sync=lambda: None, number: int = 1) -> Timings:
    """Time candidates interleaved round by round, in a new random order each round (the
    same on every rank), so no candidate always inherits the caches another one left.

    A candidate is a function, or ``(setup, function)`` with an untimed ``setup()``
    before each sample; ``sync()`` runs untimed before every sample (a barrier: no
    rank's lag leaks into the next candidate's time). A sample is ``number`` calls in a
    row (steady state for sub-millisecond steps, as in a training loop).
    """
    pairs = {name: c if isinstance(c, tuple) else (lambda: None, c)
             for name, c in candidates.items()}
    for setup, function in pairs.values():
        for _ in range(warmup):
            setup()
            function()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    entries = list(pairs.items())
    order = np.random.default_rng(0)  # the same order on every rank (collectives match)
    for _ in range(rounds):
        for index in order.permutation(len(entries)):
            name, (setup, function) = entries[index]
            setup()
            sync()
            start = time.perf_counter()
            for _ in range(number):
                function()
            samples[name].append((time.perf_counter() - start) / number)
    return Timings({name: np.array(values) for name, values in samples.items()})


def streaming_add(total: int, threads: int):
    """An in-place ``a += b`` over ``total`` float32, split evenly over ``threads`` threads.

    It moves 3 arrays (read a, read b, write a); the SGD step must move 5 (read g, v,
    w; write v, w), so the floor is 5/3 of its time, measured alongside the step.
    """
    a = np.ones(total, np.float32)
    b = np.ones(total, np.float32)
    bounds = np.linspace(0, total, threads + 1).astype(int)
    parts = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    pool = ThreadPoolExecutor(threads)

    def stream() -> None:
        list(pool.map(lambda part: np.add(a[part], b[part], out=a[part]), parts))

    return stream


def bench_update() -> dict:
    shapes = resnet50_shapes()
    total = sum(int(np.prod(s)) for s in shapes)
    grads = resnet50_gradients(0)
    threads = kernels.default_num_threads()
    kernels._numba()  # the compiled kernels exist before timing (the first steps otherwise
    # run on the numpy kernels while numba compiles in the background)

    def make(**kwargs):
        variables = zero_variables(shapes)
        opt = SGD(0.01, **kwargs)
        pairs = list(zip(grads, variables, strict=True))
        return lambda: opt.apply_gradients(pairs)

    loop_w = [np.zeros(s, np.float32) for s in shapes]
    loop_v = [np.zeros(s, np.float32) for s in shapes]
    lr, m = np.float32(0.01), np.float32(0.9)

    def numpy_loop() -> None:
        for w, v, g in zip(loop_w, loop_v, grads, strict=True):
            v *= m
            v -= lr * g
            w += v

    def with_numpy_kernels(step):
        """``step`` on the blocked numpy kernels (``DISTSGD_KERNELS`` is read per step)."""
        def run() -> None:
            previous = os.environ.get("DISTSGD_KERNELS")
            os.environ["DISTSGD_KERNELS"] = "numpy"
            try:
                step()
            finally:
                if previous is None:
                    del os.environ["DISTSGD_KERNELS"]
                else:
                    os.environ["DISTSGD_KERNELS"] = previous
        return run

    candidates = {"streaming a += b": streaming_add(total, threads),
                  "distsgd momentum": make(momentum=0.9),
                  "distsgd nesterov": make(momentum=0.9, nesterov=True),
                  "distsgd plain": make(),
                  "distsgd momentum, numpy kernels": with_numpy_kernels(make(momentum=0.9)),
                  "numpy loop": numpy_loop}
    try:
        import torch

        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.from_numpy(g)
        torch_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)
        candidates["torch fused"] = torch_opt.step
    except ImportError:  # torch is optional
        pass
    times = timed(candidates, rounds=31)
    stream = "streaming a += b"
    floor = times.median(stream) * 5 / 3
    bandwidth = 5 * total * 4 / floor
    names = [name for name in candidates if name != stream]
    return {"parameters": total, "tensors": len(shapes), "threads": threads,
            "kernels": "numba" if kernels._numba() else "numpy",
            "bandwidth_gb_s": bandwidth / 1e9, "floor_ms": floor * 1e3,
            "ms": {k: times.median(k) * 1e3 for k in names},
            "ratio_to_floor": {k: times.ratio(k, stream, 5 / 3) for k in names},
            # torch's step is momentum 0.9 without Nesterov
            "ratio_to_torch": {k: times.ratio(k, "torch fused") for k in
                               ("distsgd momentum", "distsgd nesterov")
                               if "torch fused" in candidates}}


def bench_small() -> dict:
    """2,000 tensors of 64 floats against one of 128,000, momentum steps.

    "new arrays": every step passes gradient arrays it has not seen (as autograd
    returns them), so each is checked and packed; "GradientBuffer": the gradients are
    written into a :class:`distsgd.GradientBuffer` (checked once, read in place).
    """
    rng = np.random.default_rng(1)
    count, size = 2000, 64
    def make(shapes, buffer=False):
        variables = zero_variables(shapes)
        opt = SGD(0.01, momentum=0.9)
        if buffer:
            grads = distsgd.GradientBuffer(variables)
            for g in grads.grads:
                g[...] = rng.standard_normal(g.shape)
            return lambda: opt.apply_gradients(grads)
        steps = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(8)]
        turn = itertools.cycle(steps)
        return lambda: opt.apply_gradients(zip(next(turn), variables, strict=True))

    def passes_over_new_arrays():
        """What no step can skip for arrays it has not seen: a C-level pass each for type,
        dtype and shape (the Keras errors), and one that packs them (``bytes.join``)."""
        steps = [[rng.standard_normal(size).astype(np.float32) for _ in range(count)]
                 for _ in range(8)]
        turn = itertools.cycle(steps)
        dtypes, shapes = (np.dtype(np.float32),) * count, ((size,),) * count
        _dtype, _shape = operator.attrgetter("dtype"), operator.attrgetter("shape")
        packed = np.empty(count * size, np.float32)

        def run() -> None:
            grads = next(turn)
            if operator.countOf(map(type, grads), np.ndarray) != count or \
                    tuple(map(_dtype, grads)) != dtypes or \
                    not all(map(operator.eq, map(_shape, grads), shapes)):
                raise RuntimeError("the benchmark's gradients changed")
            np.copyto(packed, np.frombuffer(b"".join(grads), np.float32))
        return run

    many, one = [(size,)] * count, [(count * size,)]
    passes = "2000 x 64: 4 passes alone"
    times = timed({"2000 x 64, new arrays": make(many), "1 x 128000, new array": make(one),
                   "2000 x 64, GradientBuffer": make(many, True),
                   "1 x 128000, GradientBuffer": make(one, True),
                   passes: passes_over_new_arrays()}, rounds=31, number=16)
    return {"ms": times.ms,
            "overhead_ratio": times.ratio("2000 x 64, new arrays", "1 x 128000, new array"),
            "overhead_ratio_buffer": times.ratio("2000 x 64, GradientBuffer",
                                                 "1 x 128000, GradientBuffer"),
            # a lower bound for new arrays: the fused step plus the passes it cannot skip
            "new_arrays_bound_ratio": times.ratio(("1 x 128000, new array", passes),
                                                  "1 x 128000, new array")}


#: Separate mpirun launches of the aggregation part, pooled. Which raw chunk size wins
#: is a property of the launch: within one launch the ratio of raw 16 MiB to 4 MiB
#: chunks holds steady from quarter to quarter of the rounds, while between launches it
#: moved from 0.97 to 1.21 on the CI machine (see the README for what seems to decide).
AGGREGATE_LAUNCHES = 3


def bench_aggregate() -> dict | None:
    """One MPIStrategy (the default configuration) against raw MPI on the very
    communicator it uses, so both see the same MPI state. Returns rank 0's per-round
    samples (the slowest rank's); :func:`summarize_aggregate` computes the ratios."""
    from mpi4py import MPI

    from distsgd.distribute import MPIStrategy

    strategy = MPIStrategy()
    comm = strategy.communicator._comm
    rank, size = comm.Get_rank(), comm.Get_size()
    shapes = resnet50_shapes()
    grads = resnet50_gradients(rank)
    flat = np.concatenate([g.reshape(-1) for g in grads])
    work = flat.copy()
    with strategy.scope():
        variables = zero_variables(shapes)
        opt = SGD(0.01, momentum=0.9)
        buffered = zero_variables(shapes)
        buffered_opt = SGD(0.01, momentum=0.9)
    buffer = distsgd.GradientBuffer(buffered)
    pairs = list(zip(grads, variables, strict=True))
    loop_w = [np.zeros(s, np.float32) for s in shapes]
    loop_v = [np.zeros(s, np.float32) for s in shapes]
    lr, m = np.float32(0.01), np.float32(0.9)

    def numpy_update(gs) -> None:
        for w, v, g in zip(loop_w, loop_v, gs, strict=True):
            v *= m
            v -= lr * g
            w += v

    def whole() -> None:
        work[:] = flat
        comm.Allreduce(MPI.IN_PLACE, work)

    offsets = np.cumsum([0] + [g.size for g in grads])
    views = [work[offsets[i]:offsets[i + 1]].reshape(g.shape) for i, g in enumerate(grads)]

    def whole_plus_loop() -> None:
        whole()
        numpy_update(views)

    def per_tensor() -> None:
        for g in grads:
            comm.Allreduce(MPI.IN_PLACE, g.copy())

    def chunked(elements: int):
        def run() -> None:
            work[:] = flat
            for start in range(0, work.size, elements):
                comm.Allreduce(MPI.IN_PLACE, work[start:start + elements])
        return run

    def aggregate_only() -> None:  # the aggregation alone, results kept
        strategy.aggregator.reduce(grads, variables, step=0, all_dense=True)

    def full_step() -> None:
        opt.apply_gradients(pairs)

    def backward_into_buffer() -> None:  # untimed: the backward pass writes the gradients
        buffer.flat[np.dtype(np.float32)][:] = flat

    def buffer_step() -> None:
        buffered_opt.apply_gradients(buffer)

    candidates = {"whole-buffer Allreduce": whole,
                  "whole-buffer Allreduce + numpy loop": whole_plus_loop,
                  "per-tensor Allreduce": per_tensor,
                  **{f"raw chunks of {n >> 10} Ki": chunked(n) for n in (1 << 18, 1 << 20,
                                                                        1 << 22)},
                  "distsgd aggregate": aggregate_only,
                  "distsgd aggregate + update": full_step,
                  "distsgd aggregate + update, GradientBuffer": (backward_into_buffer,
                                                                  buffer_step)}
    times = timed(candidates, rounds=21, sync=comm.Barrier).slowest_rank(comm)
    chunk_bytes = strategy.allreduce_chunk_bytes
    if rank != 0:
        return None
    return {"ranks": size, "same_chunks": f"raw chunks of {chunk_bytes // 4 >> 10} Ki",
            "samples": {name: values.tolist() for name, values in times.samples.items()}}


def aggregate_ratios(times: Timings, same_chunks: str) -> dict:
    """The aggregation figures of one set of rounds: the best raw chunk size is the one
    with the lowest median time."""
    best = min((k for k in times.samples if k.startswith("raw chunks")), key=times.median)
    baseline = "whole-buffer Allreduce + numpy loop"
    return {"best_raw_chunks": best,
            "full_step_vs_whole_plus_loop": times.ratio("distsgd aggregate + update", baseline),
            "buffer_step_vs_whole_plus_loop":
                times.ratio("distsgd aggregate + update, GradientBuffer", baseline),
            "aggregate_vs_best_raw_chunks": times.ratio("distsgd aggregate", best),
            "aggregate_vs_raw_same_chunks": times.ratio("distsgd aggregate", same_chunks)}


#: Each launch's raw chunks of the size distsgd's aggregation used there.
SAME_CHUNKS = "raw Allreduce of distsgd's chunk size"


def summarize_aggregate(launches: list[dict]) -> dict:
    """Pool the rounds of separate launches (each round's ratio stays within its launch)
    and keep each launch's own figures too."""
    samples = [{**launch["samples"], SAME_CHUNKS: launch["samples"][launch["same_chunks"]]}
               for launch in launches]
    pooled = Timings({name: np.concatenate([s[name] for s in samples]) for name in samples[0]})
    per_launch = [aggregate_ratios(Timings({k: np.array(v) for k, v in s.items()}), SAME_CHUNKS)
                  for s in samples]
    return {"ranks": launches[0]["ranks"], "launches": len(launches),
            "rounds": len(pooled.samples[SAME_CHUNKS]),
            "ms": {k: v for k, v in pooled.ms.items() if k != SAME_CHUNKS},
            **aggregate_ratios(pooled, SAME_CHUNKS),
            "per_launch": {"distsgd_chunks": [launch["same_chunks"] for launch in launches],
                           **{key: [row[key] for row in per_launch] for key in per_launch[0]}}}


def bench_transport() -> dict | None:
    """Exact float32 against bfloat16 transport (two strategies on the same ranks):
    aggregation alone and the momentum step, ResNet-50's gradients."""
    from distsgd.distribute import MPIStrategy

    strategies = {"exact": MPIStrategy(), "bfloat16": MPIStrategy(compression="bfloat16")}
    comm = strategies["exact"].communicator._comm
    grads = resnet50_gradients(comm.Get_rank())
    candidates = {}
    for name, strategy in strategies.items():
        with strategy.scope():
            variables = zero_variables(resnet50_shapes())
            opt = SGD(0.01, momentum=0.9)
        pairs = list(zip(grads, variables, strict=True))
        candidates[f"{name} aggregate"] = functools.partial(
            strategy.aggregator.reduce, grads, variables, step=0, all_dense=True)
        candidates[f"{name} step"] = functools.partial(opt.apply_gradients, pairs)
    times = timed(candidates, rounds=5, sync=comm.Barrier).slowest_rank(comm)
    from mpi4py import MPI

    hosts = len(set(comm.allgather(MPI.Get_processor_name())))  # every rank takes part
    if comm.Get_rank() != 0:
        return None
    return {"ranks": comm.Get_size(), "hosts": hosts, "ms": times.ms,
            "aggregate_bfloat16_vs_exact": times.ratio("bfloat16 aggregate", "exact aggregate"),
            "step_bfloat16_vs_exact": times.ratio("bfloat16 step", "exact step")}


def transport_runs() -> list[dict]:
    """bench_transport at 2 ranks on this host, then, where emulated hosts can be made
    (root: network namespaces, tests/netns.py), 1 rank on each of 2 hosts over TCP: the
    veth link as it is, and capped by tc at 4 and 1 Gbit/s."""
    from tests import netns

    runs = [{"link": "shared memory (one host)", **run_under_mpirun(2, "transport")}]
    reason = netns.available()
    if reason is not None:
        print(f"transport across hosts skipped: {reason}", file=sys.stderr)
        return runs
    rates = (None, "4gbit", "1gbit")
    if shutil.which("tc") is None:
        print("transport over capped links skipped: iproute2's tc not found", file=sys.stderr)
        rates = (None,)
    for rate in rates:
        hosts = netns.Hosts()
        try:
            if rate is not None:
                hosts.limit_rate(rate)
            link = "TCP between 2 hosts, veth" + ("" if rate is None else f" capped at {rate}")
            runs.append({"link": link, **_json_result(
                hosts.mpiexec(1, __file__, "transport", "--json-stdout"),
                "transport across hosts", cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})})
        finally:
            hosts.remove()
    return runs


def _rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_memory(form: str) -> dict | None:
    """Peak resident memory of steps (ResNet-50 shapes, momentum) over the memory the
    model needs: params + slots + gradients. ``form``: ``arrays`` (separate gradient
    arrays), ``buffer`` (a GradientBuffer) or ``whole`` (the baseline: one flat copy of
    the gradients, one Allreduce, a numpy loop). Linux only (/proc)."""
    from mpi4py import MPI

    from distsgd.distribute import MPIStrategy

    strategy = MPIStrategy()
    comm = strategy.communicator._comm
    shapes = resnet50_shapes()
    total = sum(int(np.prod(s)) for s in shapes)
    with strategy.scope():  # MPI's buffers and the compiled kernels exist before the baseline
        warm = distsgd.Variable(np.zeros(1 << 20, np.float32))
        SGD(0.01, momentum=0.9).apply_gradients([(np.ones(1 << 20, np.float32), warm)])
        del warm
    baseline = _rss_kib("VmRSS")
    rng = np.random.default_rng(comm.Get_rank())
    with strategy.scope():
        variables = zero_variables(shapes)
        opt = SGD(0.01, momentum=0.9)
    if form == "buffer":
        buffer = distsgd.GradientBuffer(variables)
        for g in buffer.grads:
            g[...] = rng.standard_normal(g.shape)
        pairs = buffer
    else:
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        pairs = list(zip(grads, variables, strict=True))
    if form == "whole":
        flat = np.empty(total, np.float32)
        slots = [np.zeros(s, np.float32) for s in shapes]
        offsets = np.cumsum([0] + [g.size for g in grads])
        views = [flat[offsets[i]:offsets[i + 1]].reshape(g.shape) for i, g in enumerate(grads)]
        lr, m = np.float32(0.01), np.float32(0.9)

        def step() -> None:
            np.concatenate([g.reshape(-1) for g in grads], out=flat)
            comm.Allreduce(MPI.IN_PLACE, flat)
            for var, slot, g in zip(variables, slots, views, strict=True):
                slot *= m
                slot -= lr * g
                var._array += slot
    else:
        def step() -> None:
            opt.apply_gradients(pairs)

    step()  # slots, plans and buffers are made by the first step
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    for _ in range(3):
        step()
    peak = comm.allreduce(_rss_kib("VmHWM") - baseline, op=MPI.MAX)
    if comm.Get_rank() != 0:
        return None
    needed = 3 * total * 4 / 1024  # params + slots + gradients, KiB
    return {"form": form, "ranks": comm.Get_size(), "needed_mib": needed / 1024,
            "peak_mib": peak / 1024, "peak_over_needed": peak / needed}


def run_under_mpirun(ranks: int, part: str, *extra: str) -> dict:
    return _json_result(["mpirun", "-n", str(ranks), sys.executable, __file__, part, *extra,
                         "--json-stdout"], f"mpirun -n {ranks} {part}",
                        env={**os.environ, "DISTSGD_NUM_THREADS": "1"})


def _json_result(command: list[str], what: str, **kwargs) -> dict:
    """Run a benchmark child (``--json-stdout``) and return the JSON line it printed last."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def threads_env(threads: int) -> dict[str, str]:
    """This environment with ``threads`` BLAS, OpenMP and distsgd update threads per rank.
    OPENBLAS_CORETYPE/_L2_SIZE (set on some machines for old OpenBLAS builds) slow a
    current numpy: unset here only."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "DISTSGD_NUM_THREADS"):
        env[name] = str(threads)
    return env


def train_metrics(ranks: int, *args: str, threads: int = 1) -> list[dict]:
    """``mpirun -n ranks python -m distsgd.train *args --quiet``: its metrics, an epoch
    a row."""
    metrics = Path(f"/tmp/distsgd-bench-train-{os.getpid()}.jsonl")
    metrics.unlink(missing_ok=True)
    command = ["mpirun", "-n", str(ranks), sys.executable, "-m", "distsgd.train", *args,
               "--quiet", "--metrics", str(metrics)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env=threads_env(threads))
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def bench_scaling() -> dict:
    """The issue's job, ``python -m distsgd.train --synthetic-params 3000000``, at 1 rank
    with one BLAS thread, 1 rank with every core, and one rank per core with one thread
    each (samples/s of the last epoch; the first is mostly warm-up). Scaling is the
    P-rank rate over the 1-rank, 1-thread rate: the same cores per rank."""
    cores = os.cpu_count() or 1
    rows = {}
    for ranks, threads in ((1, 1), (1, cores), (cores, 1)):
        epochs = train_metrics(ranks, "--synthetic-params", "3000000", "--epochs", "4",
                               threads=threads)
        rows[f"{ranks} rank(s) x {threads} thread(s)"] = epochs[-1]["samples_per_second"]
    base = rows["1 rank(s) x 1 thread(s)"]
    return {"samples_per_second": rows, "over_one_core": {k: v / base for k, v in rows.items()}}


def machine() -> str:
    model = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, results[name]["ms"]) for name in ("update", "aggregate_2", "small")
              if name in results]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    axes = np.atleast_1d(axes)
    titles = {"update": "SGD step, ResNet-50 shapes (1 process)",
              "aggregate_2": "aggregate + update, 2 ranks", "small": "2,000 small tensors"}
    for ax, (name, ms) in zip(axes, panels, strict=True):
        labels = list(ms)
        ax.barh(labels, [ms[k] for k in labels],
                color=["tab:blue" if ("distsgd" in k or name == "small")
                       and "passes alone" not in k else "tab:gray" for k in labels])
        if name == "update":
            ax.axvline(results["update"]["floor_ms"], color="tab:red", linestyle="--",
                       label="memory floor")
            ax.legend()
        ax.set_xlabel("milliseconds (median)")
        ax.set_title(titles[name])
    figure.suptitle(machine(), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help="all (default), update, aggregate, small, "
                                                 "scaling")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_stdout:  # a child under mpirun
        if args.parts[0] == "memory":
            result = bench_memory(args.parts[1])
        else:
            from benchmarks.invariance import bench_invariant

            result = {"aggregate": bench_aggregate, "update": bench_update,
                      "transport": bench_transport,
                      "invariant": bench_invariant}[args.parts[0]]()
        if result is not None:
            print(json.dumps(result))
        return 0
    chosen = args.parts or ["all"]
    unknown = set(chosen) - {"all", "update", "aggregate", "small", "memory", "scaling",
                             "transport", "invariant"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    parts = ["update", "small", "aggregate", "memory", "scaling", "transport", "invariant"] \
        if "all" in chosen \
        else chosen
    results: dict = {"machine": machine()}
    if "update" in parts:
        results["update"] = bench_update()
    if "small" in parts:
        results["small"] = bench_small()
    if "aggregate" in parts:
        for ranks in (2, 4):
            results[f"aggregate_{ranks}"] = summarize_aggregate(
                [run_under_mpirun(ranks, "aggregate") for _ in range(AGGREGATE_LAUNCHES)])
    if "memory" in parts:
        results["memory"] = [run_under_mpirun(ranks, "memory", form) for ranks in (1, 2)
                             for form in ("arrays", "buffer", "whole")]
    if "scaling" in parts:
        results["scaling"] = bench_scaling()
    if "transport" in parts:
        results["transport"] = transport_runs()
    if "invariant" in parts:
        from benchmarks.invariance import bench_invariant_job

        results["invariant"] = {"aggregate": run_under_mpirun(2, "invariant"),
                                "job": bench_invariant_job()}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    if any(k in results for k in ("update", "aggregate_2", "small")):
        plot(results, args.output / "results.png")
    print(f"\nwrote {args.output / 'results.json'} and results.png")
    return 0


def report(results: dict) -> None:
    print(f"machine: {results['machine']}")
    print("times: medians over rounds; ratios: medians of the ratio within each round")
    if "update" in results:
        u = results["update"]
        print(f"\nSGD step, {u['parameters']:,} float32 parameters in {u['tensors']} tensors "
              f"({u['kernels']} kernels, {u['threads']} threads); memory floor "
              f"{u['floor_ms']:.1f} ms at {u['bandwidth_gb_s']:.1f} GB/s")
        for name, ms in u["ms"].items():
            torch = u.get("ratio_to_torch", {}).get(name)
            print(f"  {name:<32} {ms:8.1f} ms   {u['ratio_to_floor'][name]:5.2f} x floor" +
                  ("" if torch is None else f"   {torch:5.2f} x torch fused"))
    if "small" in results:
        s = results["small"]
        print("\nmany small tensors (momentum step)")
        for name, ms in s["ms"].items():
            print(f"  {name:<28} {ms:8.2f} ms")
        print(f"  2000 x 64 / 1 x 128000: {s['overhead_ratio']:.1f} x with new arrays "
              f"(bound: {s['new_arrays_bound_ratio']:.1f} x = the fused step + the 4 passes), "
              f"{s['overhead_ratio_buffer']:.1f} x with a GradientBuffer")
    for key in ("aggregate_2", "aggregate_4"):
        if key in results:
            a = results[key]
            print(f"\naggregation at {a['ranks']} ranks (slowest rank, median of "
                  f"{a['rounds']} rounds from {a['launches']} launches)")
            for name, ms in a["ms"].items():
                print(f"  {name:<36} {ms:8.1f} ms")
            print(f"  distsgd aggregate+update / (whole Allreduce + numpy loop) = "
                  f"{a['full_step_vs_whole_plus_loop']:.2f} "
                  f"({a['buffer_step_vs_whole_plus_loop']:.2f} with a GradientBuffer)")
            print(f"  distsgd aggregate / best raw chunked Allreduce ({a['best_raw_chunks']}) = "
                  f"{a['aggregate_vs_best_raw_chunks']:.2f} "
                  f"({a['aggregate_vs_raw_same_chunks']:.2f} against raw chunks of its size)")
            each = a["per_launch"]
            print("  launch by launch: aggregate / best raw = " + ", ".join(
                f"{r:.2f} ({best.removeprefix('raw chunks of ')}; distsgd "
                f"{mine.removeprefix('raw chunks of ')})" for r, best, mine in
                zip(each["aggregate_vs_best_raw_chunks"], each["best_raw_chunks"],
                    each["distsgd_chunks"], strict=True))
                + "; full step / (whole + loop) = " + ", ".join(
                f"{r:.2f}" for r in each["full_step_vs_whole_plus_loop"]))
    if "memory" in results:
        print("\npeak resident memory of a step over params + slots + gradients "
              "(ResNet-50 shapes)")
        names = {"arrays": "distsgd, gradient arrays", "buffer": "distsgd, GradientBuffer",
                 "whole": "flat copy + Allreduce + numpy loop"}
        for row in results["memory"]:
            print(f"  {row['ranks']} rank(s), {names[row['form']]:<36} "
                  f"{row['peak_mib']:7.0f} MiB of {row['needed_mib']:4.0f} MiB   "
                  f"{row['peak_over_needed']:.2f} x")
    if "scaling" in results:
        sc = results["scaling"]
        print("\ntraining job scaling (--synthetic-params 3000000)")
        for row, rate in sc["samples_per_second"].items():
            print(f"  {row:<28} {rate:10,.0f} samples/s   {sc['over_one_core'][row]:.2f} x "
                  "1 rank on 1 core")
    if "invariant" in results:
        inv = results["invariant"]
        agg = inv["aggregate"]
        print(f"\nworld-size invariance: aggregation of ResNet-50's gradients in "
              f"{agg['micro_batches']} micro-batches at {agg['ranks']} ranks")
        for name, ms in agg["ms"].items():
            print(f"  {name:<40} {ms:8.1f} ms")
        print(f"  tree / exact = {agg['tree_vs_exact']:.2f}; fixed point / exact = "
              f"{agg['fixed_point_vs_exact']:.2f}")
        for name, error in agg["errors"].items():
            print(f"  error of {name:<12} relative median {error['median']:.2e}, max "
                  f"{error['max']:.2e}; at most {error['max_over_float32_epsilon']:.2f} float32 "
                  "epsilons of the terms' magnitude")
        job = inv["job"]
        for ranks in (1, 2):
            off, on = (job["samples_per_second"][f"{ranks}-{m}"] for m in ("off", "on"))
            print(f"  training job at {ranks} rank(s): {off:,.0f} samples/s off, {on:,.0f} on "
                  f"({job['slowdown'][ranks]:.2f} x slower)")
    if "transport" in results:
        print("\nbfloat16 transport against exact float32 (ResNet-50 gradients, 2 ranks)")
        for run in results["transport"]:
            ms = run["ms"]
            print(f"  {run['link']:<44} aggregate {ms['exact aggregate']:7.1f} -> "
                  f"{ms['bfloat16 aggregate']:7.1f} ms ({run['aggregate_bfloat16_vs_exact']:.2f} x)"
                  f"   step {ms['exact step']:7.1f} -> {ms['bfloat16 step']:7.1f} ms "
                  f"({run['step_bfloat16_vs_exact']:.2f} x)")


if __name__ == "__main__":
    raise SystemExit(main())
