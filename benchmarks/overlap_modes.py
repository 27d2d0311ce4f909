"""Which overlap wins on this machine: a communication thread (distsgd's) or non-blocking
calls progressed from the backward pass (a prototype here), against no overlap.

    mpirun -n 2 python benchmarks/overlap_modes.py    (the MLP 784-1024-1024-10, batch 256)

Rounds alternate the three; each figure is the median step time of the slowest rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distsgd
from benchmarks.bench import timed
from distsgd.distribute import MPIStrategy
from distsgd.distribute.comm import agree, raise_if_stopping
from distsgd.distribute.layout import bucket_source
from distsgd.distribute.plans import describe
from distsgd.optimizers import SGD
from distsgd.train.model import MLP


class Polled:
    """The prototype: each complete chunk starts an ``Iallreduce`` from ``ready``, and every
    ``ready`` call tests the outstanding ones (MPI progresses only inside MPI calls)."""

    def __init__(self, aggregator, buffer, step):
        from mpi4py import MPI

        self.MPI, self.aggregator, self.buffer, self.step = MPI, aggregator, buffer, step
        self.comm = aggregator.communicator
        plan = aggregator.dense_plan(buffer.variables)
        self.signature = aggregator._signature(buffer.variables)
        sources = [bucket_source(b, buffer.grads) for b in plan.buckets]
        self.order = list(reversed(plan.chunks))
        self.views = [sources[c.bucket.index][c.start:c.stop] for c in self.order]
        self.active = False

    def ready(self, position):
        if not self.active:
            self.active, self.launched, self.requests, self.done = True, 0, [], set()
            label = f"overlapped gradient aggregation at step {self.step()}"
            raise_if_stopping(agree(self.comm, label, self.signature.digest, 0,
                                    self.signature.items, describe), label)
        self.done.add(position)
        while self.launched < len(self.order) and all(
                p.position in self.done for p in self.order[self.launched].pieces):
            self.requests.append(self.comm._comm.Iallreduce(
                self.MPI.IN_PLACE, self.views[self.launched]))
            self.launched += 1
        self.MPI.Request.Testall(self.requests)

    def finish(self):
        for position in range(len(self.buffer.variables)):
            self.ready(position)
        self.MPI.Request.Waitall(self.requests)
        self.active = False
        return frozenset()


def main() -> None:
    strategy = MPIStrategy()
    comm = strategy.communicator
    rank = comm.rank
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((256 // comm.size, 784)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    candidates = {}
    for mode in ("none", "thread", "polled"):
        with strategy.scope():
            model = MLP([784, 1024, 1024, 10])
            opt = SGD(0.01, momentum=0.9)
        buffer = distsgd.GradientBuffer(model.variables)
        if mode == "thread":
            opt.overlap(buffer)
        elif mode == "polled":
            polled = Polled(strategy.aggregator, buffer, opt._step_count)
            strategy.aggregator._overlaps[buffer] = polled
            buffer.on_ready = polled.ready

        def step(model=model, opt=opt, buffer=buffer):
            model.loss_and_gradients(x, y, 1 / 256, buffer, ready=buffer.ready)
            opt.apply_gradients(buffer)

        candidates[mode] = step
    times = timed(candidates, rounds=41, sync=comm._comm.Barrier, warmup=5)
    times = times.slowest_rank(comm._comm)
    if rank == 0:
        print({k: round(v, 2) for k, v in times.ms.items()},
              "thread/none", round(times.ratio("thread", "none"), 3),
              "polled/none", round(times.ratio("polled", "none"), 3))


if __name__ == "__main__":
    main()
