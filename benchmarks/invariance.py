"""The cost of world-size invariance, measured side by side (a part of bench.py).

``invariant``: at 2 ranks, one step's aggregation of ResNet-50's gradients in 4
micro-batches (the training program's default M), accumulation included, three ways:

- exact: the micro-batches summed in order, then ``Allreduce`` (not invariant);
- tree: distsgd's world-size-invariant mode (the canonical tree, ``TreeTransport``);
- fixed point (a prototype, not in distsgd): every value scaled to int64 at an exponent
  agreed per chunk (one ``Allreduce`` MAX), summed exactly as integers (order cannot
  matter), scaled back: invariant too, at twice the bytes;

and each one's error against the exact float64 sum. ``invariant-job``: the training
program's samples/s with the mode on and off, at 1 and 2 ranks, launches alternated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MICRO_BATCHES = 4


def micro_batch_gradients(shapes, index):
    rng = np.random.default_rng([7, index])
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 0, s)).astype(np.float32)
            for s in shapes]


def _fixed_point(comm, flats, out, chunk):
    """The prototype: ``out`` = the sum over ranks and micro-batches, through int64."""
    from mpi4py import MPI

    total = np.empty(chunk, np.int64)
    scaled = np.empty(chunk, np.int64)
    work = np.empty(chunk, np.float64)
    exponent = np.empty(1, np.int64)
    terms = MICRO_BATCHES
    for start in range(0, out.size, chunk):
        stop = min(start + chunk, out.size)
        n = stop - start
        peak = max(float(np.max(np.abs(f[start:stop]))) for f in flats)
        exponent[0] = np.frexp(peak)[1] if peak > 0 else -1000
        comm.Allreduce(MPI.IN_PLACE, exponent, op=MPI.MAX)
        scale = np.ldexp(1.0, int(62 - exponent[0] - int(np.ceil(np.log2(terms)))))
        total[:n] = 0
        for flat in flats:
            np.multiply(flat[start:stop], scale, out=work[:n], dtype=np.float64)
            np.rint(work[:n], out=work[:n])
            np.copyto(scaled[:n], work[:n], casting="unsafe")
            np.add(total[:n], scaled[:n], out=total[:n])
        comm.Allreduce(MPI.IN_PLACE, total[:n], op=MPI.SUM)
        np.copyto(work[:n], total[:n], casting="unsafe")
        np.divide(work[:n], scale, out=work[:n])
        np.copyto(out[start:stop], work[:n], casting="same_kind")


def bench_invariant() -> dict | None:
    """Under ``mpirun -n 2``: the three aggregations, timed and checked."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench import resnet50_shapes, timed, zero_variables
    from distsgd import GradientAccumulator
    from distsgd.distribute import MPIStrategy
    from distsgd.distribute.data import replica_share

    exact = MPIStrategy(micro_batches=MICRO_BATCHES)
    tree = MPIStrategy(world_size_invariant=True, micro_batches=MICRO_BATCHES)
    comm = exact.communicator._comm
    rank, size = comm.Get_rank(), comm.Get_size()
    shapes = resnet50_shapes()
    share = replica_share(MICRO_BATCHES, rank, size)
    mine = {m: micro_batch_gradients(shapes, m) for m in range(share.start, share.stop)}
    accumulators = {}
    for name, strategy in (("exact", exact), ("tree", tree)):
        with strategy.scope():
            variables = zero_variables(shapes)
        accumulators[name] = GradientAccumulator(variables)
    flats = {m: np.concatenate([g.reshape(-1) for g in grads]) for m, grads in mine.items()}
    fixed_out = np.empty(next(iter(flats.values())).size, np.float32)

    def accumulate(name):
        accumulator = accumulators[name]
        strategy = exact if name == "exact" else tree
        for m, grads in mine.items():
            accumulator.add(gradients=grads, index=m)
        return strategy.aggregator.reduce((), accumulator.variables, step=0,
                                          accumulator=accumulator)

    def fixed_point():
        _fixed_point(comm, list(flats.values()), fixed_out, 1 << 20)

    times = timed({"exact: sum + Allreduce": lambda: accumulate("exact"),
                   "invariant: canonical tree": lambda: accumulate("tree"),
                   "invariant: fixed point (prototype)": fixed_point},
                  rounds=9, sync=comm.Barrier).slowest_rank(comm)
    errors = {}
    if rank == 0:  # the exact float64 sum of all micro-batches, and the sum of magnitudes
        everything = [np.concatenate([g.reshape(-1) for g in micro_batch_gradients(
            shapes, m)]).astype(np.float64) for m in range(MICRO_BATCHES)]
        reference = (sum(everything), sum(np.abs(e) for e in everything))
        del everything
    for name in ("exact", "tree"):
        result = accumulate(name)
        got = np.concatenate([g.reshape(-1) for g in result.dense])
        if rank == 0:
            errors[name] = _relative_error(got, reference)
    fixed_point()
    if rank == 0:
        errors["fixed point"] = _relative_error(fixed_out, reference)
        return {"ranks": size, "micro_batches": MICRO_BATCHES, "ms": times.ms,
                "tree_vs_exact": times.ratio("invariant: canonical tree",
                                             "exact: sum + Allreduce"),
                "fixed_point_vs_exact": times.ratio("invariant: fixed point (prototype)",
                                                    "exact: sum + Allreduce"),
                "errors": errors}
    return None


def _relative_error(got, reference):
    """|got - exact| over the elements, relative to the exact sum (median, largest) and
    to the sum of the terms' magnitudes (the scale of summation error; in float32
    epsilons: a correctly rounded sum is at most 0.5)."""
    exact, magnitude = reference
    error = np.abs(got.astype(np.float64) - exact)
    relative = error / np.maximum(np.abs(exact), 1e-30)
    scaled = error / np.maximum(magnitude, 1e-30) / np.finfo(np.float32).eps
    return {"median": float(np.median(relative)), "max": float(np.max(relative)),
            "max_over_float32_epsilon": float(np.max(scaled))}


def bench_invariant_job() -> dict:
    """samples/s of the training program with the mode off and on, at 1 and 2 ranks."""
    from benchmarks.bench import train_metrics

    rates: dict[str, list[float]] = {}
    for _ in range(3):
        for ranks in (1, 2):
            for mode in ("off", "on"):
                extra = ["--world-size-invariant"] if mode == "on" else []
                rows = train_metrics(ranks, "--epochs", "4", *extra)
                rates.setdefault(f"{ranks}-{mode}", []).append(
                    float(np.median([r["samples_per_second"] for r in rows[1:]])))
    medians = {key: float(np.median(values)) for key, values in rates.items()}
    return {"samples_per_second": medians, "launches": rates,
            "slowdown": {ranks: medians[f"{ranks}-off"] / medians[f"{ranks}-on"]
                         for ranks in (1, 2)}}
