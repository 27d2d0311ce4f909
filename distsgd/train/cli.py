"""The training program: ``python -m distsgd.train`` (or ``mpirun -n P python -m distsgd.train``).

Rank 0 shows progress and per-epoch summaries; every rank trains on its share of each
global batch. The last line is machine-readable::

    final: test_accuracy=<x> steps=<n> replicas=<P> digest=<sha256>

where the digest covers every weight and the optimizer state, and is checked to be
identical on every rank first (a mismatch exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import distsgd
from distsgd.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from distsgd.distribute import MPIStrategy, ShardedBatches, replica_share
from distsgd.distribute.transport import COMPRESSIONS
from distsgd.optimizers import SGD
from distsgd.timeline import timeline
from distsgd.train.data import Dataset, digits, synthetic
from distsgd.train.model import MLP

__all__ = ["main", "parse_args"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distsgd.train",
        description="Data-parallel SGD training of an MLP on scikit-learn's bundled digits "
                    "(or synthetic data). Run under mpirun -n P for P replicas.")
    parser.add_argument("--epochs", type=_positive_int, default=20)
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="global batch size, split across the replicas (default 64)")
    parser.add_argument("--learning-rate", type=_non_negative_float, default=0.1)
    parser.add_argument("--momentum", type=_non_negative_float, default=0.9)
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=[128],
                        help="hidden layer widths (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--checkpoint-every", type=_positive_int,
                        help="save a checkpoint every N steps (needs --checkpoint-dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --checkpoint-dir")
    parser.add_argument("--max-steps", type=_positive_int,
                        help="stop after this many global steps (saving a checkpoint)")
    parser.add_argument("--metrics", type=Path, help="append per-epoch metrics (JSON lines)")
    parser.add_argument("--timeline", type=Path,
                        help="write a Chrome trace-event JSON of every rank's step phases")
    parser.add_argument("--synthetic-params", type=_positive_int, metavar="N",
                        help="train on synthetic data with a model of about N parameters")
    parser.add_argument("--fusion-threshold-bytes", type=int, default=None)
    parser.add_argument("--compression", choices=[c for c in COMPRESSIONS if c], default=None,
                        help="send summed float32 gradients as bfloat16 (half the bytes, "
                             "lossy; pays on slow links)")
    parser.add_argument("--quiet", action="store_true", help="only the final line")
    args = parser.parse_args(argv)
    if (args.checkpoint_every or args.resume) and args.checkpoint_dir is None:
        parser.error("--checkpoint-every and --resume need --checkpoint-dir")
    if args.momentum > 1:
        parser.error(f"--momentum {args.momentum}: expected a number in [0, 1]")
    return args


def _dataset(args: argparse.Namespace) -> tuple[Dataset, list[int]]:
    if args.synthetic_params is None:
        data = digits(args.seed)
        return data, [data.x_train.shape[1], *args.hidden, data.num_classes]
    features, classes = 256, 10
    hidden = max(1, (args.synthetic_params - classes) // (features + 1 + classes))
    data = synthetic(8192, features, classes, args.seed)
    return data, [features, hidden, classes]


class _Reporter:
    """Rank 0's progress bar, epoch summaries and metrics file; silent elsewhere."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.active = rank == 0 and not args.quiet
        self.metrics = None
        if rank == 0 and args.metrics is not None:
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(args.metrics, "a" if args.resume else "w")

    def say(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def progress(self, total: int, initial: int, epoch: int, epochs: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not self.active or None, leave=False, unit="step",
                    file=sys.stderr)

    def record(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _test_accuracy(model: MLP, data: Dataset, strategy: Any) -> float:
    share = replica_share(len(data.y_test), strategy.rank, strategy.num_replicas_in_sync)
    correct = model.correct(data.x_test[share], data.y_test[share])
    return float(strategy.reduce("SUM", np.array([correct]))[0]) / len(data.y_test)


def _write_timeline(path: Path, strategy: Any) -> None:
    events = strategy.communicator.allgather_object(timeline.trace_events(strategy.rank))
    if strategy.rank != 0:
        return
    trace = [{"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
              "args": {"name": f"rank {rank}"}} for rank in range(len(events))]
    for rank_events in events:
        trace.extend(rank_events)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {} if args.fusion_threshold_bytes is None else \
        {"fusion_threshold_bytes": args.fusion_threshold_bytes}
    strategy = MPIStrategy(compression=args.compression, **options)
    rank, replicas = strategy.rank, strategy.num_replicas_in_sync
    report = _Reporter(args, rank)
    data, layer_sizes = _dataset(args)
    with strategy.scope():
        model = MLP(layer_sizes, seed=args.seed)
        optimizer = SGD(args.learning_rate, momentum=args.momentum, nesterov=args.nesterov)
    variables = model.variables
    # autograd writes the gradients straight into one flat buffer per dtype: apply_gradients
    # checks nothing per tensor and reduces them where they lie, with no packing copy
    grads = distsgd.GradientBuffer(variables)
    batches = ShardedBatches([data.x_train, data.y_train], args.batch_size, strategy,
                             seed=args.seed)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(data.y_train)} training examples")
    report.say(f"distsgd: {data.name}, {len(data.y_train)} train / {len(data.y_test)} test "
               f"examples, MLP {layer_sizes} ({model.num_parameters:,} parameters), "
               f"{replicas} replica{'s' if replicas > 1 else ''}, global batch "
               f"{args.batch_size}, {steps_per_epoch} steps/epoch")

    global_step = 0
    if args.resume:
        if latest_checkpoint(args.checkpoint_dir) is None and rank == 0:
            report.say(f"no checkpoint in {args.checkpoint_dir}; starting from scratch")
        if strategy.communicator.allgather_object(
                latest_checkpoint(args.checkpoint_dir) is not None)[0]:
            state = load_checkpoint(args.checkpoint_dir, variables=variables,
                                    optimizer=optimizer)
            if state.get("seed") != args.seed or state.get("batch_size") != args.batch_size:
                raise CheckpointError(
                    f"checkpoint was made with seed {state.get('seed')} and batch size "
                    f"{state.get('batch_size')}; this run has {args.seed} and "
                    f"{args.batch_size}")
            global_step = int(state["global_step"])
            report.say(f"resumed from step {global_step}")
    if args.timeline is not None:
        timeline.start_recording()

    def checkpoint() -> None:
        save_checkpoint(args.checkpoint_dir, step=global_step, variables=variables,
                        optimizer=optimizer,
                        state={"global_step": global_step, "seed": args.seed,
                               "batch_size": args.batch_size})

    test_accuracy = float("nan")
    stopped = False
    for epoch in range(global_step // steps_per_epoch, args.epochs):
        start_step = global_step - epoch * steps_per_epoch
        loss_sum, examples, started = 0.0, 0, time.perf_counter()
        timeline.reset_totals()
        bar = report.progress(steps_per_epoch, start_step, epoch, args.epochs)
        for _, (x, y) in batches.epoch(epoch, start_step):
            with timeline.span("compute"):
                value, _ = distsgd.value_and_gradients(
                    lambda x=x, y=y: model.summed_loss(x, y) / args.batch_size, variables,
                    out=grads)
            optimizer.apply_gradients(grads)  # the variables' strategy aggregates
            global_step += 1
            loss_sum += float(value) * args.batch_size
            examples += len(y)
            bar.update(1)
            if global_step % 10 == 0 and not bar.disable:
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum / max(1, examples):.4f}",
                                samples_per_s=f"{examples * replicas / elapsed:,.0f}",
                                refresh=False)
            if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                with timeline.span("checkpoint"):
                    checkpoint()
            if args.max_steps and global_step >= args.max_steps:
                stopped = True
                break
        bar.close()
        seconds = time.perf_counter() - started
        totals = timeline.reset_totals()
        loss_mean = float(strategy.reduce("SUM", np.array([loss_sum]))[0]) / max(
            1, float(strategy.reduce("SUM", np.array([examples]))[0]))
        test_accuracy = _test_accuracy(model, data, strategy)
        phases = {name: totals.get(name, 0.0) for name in ("compute", "aggregate", "update")}
        busy = sum(phases.values()) or 1.0
        throughput = examples * replicas / seconds if seconds > 0 else 0.0
        report.say(f"epoch {epoch + 1:>3}/{args.epochs}  loss {loss_mean:.4f}  test accuracy "
                   f"{test_accuracy:.4f}  {throughput:,.0f} samples/s  " + "  ".join(
                       f"{name} {100 * t / busy:.0f}%" for name, t in phases.items()))
        report.record({"epoch": epoch + 1, "step": global_step, "loss": loss_mean,
                       "test_accuracy": test_accuracy, "samples_per_second": throughput,
                       "replicas": replicas, "seconds": seconds,
                       **{f"{name}_seconds": t for name, t in phases.items()}})
        if stopped:
            if args.checkpoint_dir is not None and not (
                    args.checkpoint_every and global_step % args.checkpoint_every == 0):
                checkpoint()
            report.say(f"stopped at step {global_step} (--max-steps)")
            break
    report.close()
    if args.timeline is not None:
        _write_timeline(args.timeline, strategy)

    digest = state_digest(variables + optimizer.weights)
    digests = strategy.communicator.allgather_object(digest)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        print(f"error: replicas diverged: ranks {differing} hold different weights than "
              f"rank 0", file=sys.stderr, flush=True)
        return 2
    if rank == 0:
        print(f"final: test_accuracy={test_accuracy:.4f} steps={global_step} "
              f"replicas={replicas} digest={digest}", flush=True)
    return 0
