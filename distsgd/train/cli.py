"""The training program: ``python -m distsgd.train`` (or ``mpirun -n P python -m distsgd.train``).

Rank 0 shows progress and per-epoch summaries; every rank trains on its share of each
global batch. The last line is machine-readable::

    final: test_accuracy=<x> steps=<n> replicas=<P> digest=<sha256>

where the digest covers every weight and the optimizer state, and is checked to be
identical on every rank first (a mismatch exits with status 2).

Ctrl-C or SIGTERM (on any rank, or on ``mpirun``) stops every rank at the next step: a
checkpoint is written if ``--checkpoint-dir`` is set, one line says where, and the
program exits with 128 + the signal number (130, 143); ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

import distsgd
from distsgd.checkpoint import CheckpointError, prepare_checkpoint_directory, save_checkpoint
from distsgd.distribute import MPIStrategy, ShardedBatches, interrupts, replica_share
from distsgd.distribute import comm as comm_lib
from distsgd.distribute.interrupts import StopRequested
from distsgd.distribute.transport import COMPRESSIONS
from distsgd.optimizers import SGD
from distsgd.timeline import timeline
from distsgd.train import resume as resume_lib
from distsgd.train.data import Dataset, digits, synthetic
from distsgd.train.model import MLP
from distsgd.train.reporting import Reporter, launched_rank, oversubscription

__all__ = ["main", "parse_args"]

#: Options whose value a checkpoint also holds: taken from it on ``--resume`` unless
#: given on the command line (then the command line wins, with a note).
DEFAULTS = {"learning_rate": 0.1, "momentum": 0.9, "nesterov": False, "seed": 0,
            "batch_size": 64}
#: --micro-batches with --world-size-invariant unless given (the most ranks it allows).
DEFAULT_MICRO_BATCHES = 4
#: Steps at the start of a run left out of its throughput (compilation, first touches).
WARMUP_STEPS = 3


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


class _Parser(argparse.ArgumentParser):
    """Reports a bad option once (rank 0), not once per rank."""

    def error(self, message: str) -> NoReturn:
        if launched_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m distsgd.train",
        description="Data-parallel SGD training of an MLP on scikit-learn's bundled digits "
                    "(or synthetic data). Run under mpirun -n P for P replicas. Paths are "
                    "relative to the current directory.")
    parser.add_argument("--epochs", type=_positive_int, default=20)
    parser.add_argument("--batch-size", type=_positive_int,
                        help="global batch size, split across the replicas (default 64)")
    parser.add_argument("--learning-rate", type=_non_negative_float, help="default 0.1")
    parser.add_argument("--momentum", type=_non_negative_float, help="default 0.9")
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                        help="Nesterov momentum (default off)")
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=[128],
                        help="hidden layer widths (default 128)")
    parser.add_argument("--seed", type=int, help="seed of the weights and data order "
                                                 "(default 0)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="write checkpoints here: at the end of the run, on Ctrl-C or "
                             "SIGTERM, and every --checkpoint-every steps")
    parser.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                        help="also save a checkpoint every N steps")
    parser.add_argument("--resume", nargs="?", const=True, type=Path, metavar="PATH",
                        help="continue from the newest usable checkpoint in "
                             "--checkpoint-dir, or from PATH (a checkpoint, or a "
                             "directory of them); an error if there is none")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="like --resume, but start from scratch if there is none")
    parser.add_argument("--max-steps", type=_positive_int,
                        help="stop after this many global steps")
    parser.add_argument("--metrics", type=Path, help="append per-epoch metrics (JSON lines)")
    parser.add_argument("--timeline", type=Path,
                        help="write a Chrome trace-event JSON of every rank's step phases")
    parser.add_argument("--synthetic-params", type=_positive_int, metavar="N",
                        help="train on synthetic data with a model of about N parameters")
    parser.add_argument("--fusion-threshold-bytes", type=int, default=None)
    parser.add_argument("--compression", choices=[c for c in COMPRESSIONS if c], default=None,
                        help="send summed float32 gradients as bfloat16 (half the bytes, "
                             "lossy; pays on slow links)")
    parser.add_argument("--world-size-invariant", action="store_true",
                        help="the same weights and digest, to the bit, at any number of "
                             "ranks (and without mpirun): each global batch is cut into "
                             "--micro-batches M micro-batches, combined in a fixed tree")
    parser.add_argument("--micro-batches", type=_positive_int, metavar="M",
                        help="cut each global batch into M micro-batches and accumulate "
                             "their gradients before the step (with --world-size-invariant "
                             f"the default is {DEFAULT_MICRO_BATCHES}: up to that many ranks)")
    parser.add_argument("--overlap", action="store_true",
                        help="reduce each chunk of gradients while the backward pass goes on "
                             "(DDP's design; on one core per rank it does not pay)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="a progress bar (default: when rank 0 writes to a terminal)")
    parser.add_argument("--quiet", action="store_true", help="only the final line (and "
                                                             "notes that matter)")
    args = parser.parse_args(argv)
    resuming = args.resume is not None or args.resume_if_exists
    if args.resume is not None and args.resume_if_exists:
        parser.error("--resume and --resume-if-exists: give one of them")
    if resuming and args.checkpoint_dir is None and not isinstance(args.resume, Path):
        parser.error("--resume needs --checkpoint-dir (or a PATH: --resume PATH)")
    if args.checkpoint_every and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir")
    if args.momentum is not None and args.momentum > 1:
        parser.error(f"--momentum {args.momentum}: expected a number in [0, 1]")
    if args.world_size_invariant and args.compression is not None:
        parser.error("--world-size-invariant and --compression: the invariant sums travel "
                     "exactly; choose one")
    if args.world_size_invariant and args.micro_batches is None:
        args.micro_batches = DEFAULT_MICRO_BATCHES
    args.explicit = {name for name in DEFAULTS if getattr(args, name) is not None}
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _dataset(args: argparse.Namespace) -> tuple[Dataset, list[int]]:
    if args.synthetic_params is None:
        data = digits(args.seed)
        return data, [data.x_train.shape[1], *args.hidden, data.num_classes]
    features, classes = 256, 10
    hidden = max(1, (args.synthetic_params - classes) // (features + 1 + classes))
    data = synthetic(8192, features, classes, args.seed)
    return data, [features, hidden, classes]


def _steps(batches: ShardedBatches, epoch: int, start_step: int,
           micro_batches: int | None) -> Any:
    """Per step, this rank's ``[(micro-batch index, (x, y))]`` (one part without
    micro-batches)."""
    if micro_batches is None:
        for step, (x, y) in batches.epoch(epoch, start_step):
            yield step, [(None, (x, y))]
    else:
        for step, parts in batches.micro_batches(epoch, start_step, micro_batches):
            yield step, [(index, (x, y)) for index, (x, y) in parts]


def _test_accuracy(model: MLP, data: Dataset, strategy: Any) -> float:
    share = replica_share(len(data.y_test), strategy.rank, strategy.num_replicas_in_sync)
    correct = model.correct(data.x_test[share], data.y_test[share])
    return float(strategy.reduce("SUM", np.array([correct]))[0]) / len(data.y_test)


def _write_timeline(path: Path, strategy: Any) -> None:
    comm_lib.agree(strategy.communicator, "gathering the timeline")
    events = strategy.communicator.allgather_object(timeline.trace_events(strategy.rank))
    if strategy.rank != 0:
        return
    import json

    trace = [{"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
              "args": {"name": f"rank {rank}"}} for rank in range(len(events))]
    for rank_events in events:
        trace.extend(rank_events)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))


def main(argv: list[str] | None = None) -> int:
    interrupts.install()  # Ctrl-C stops at a step boundary, in one process too
    args = parse_args(argv)
    options = {} if args.fusion_threshold_bytes is None else \
        {"fusion_threshold_bytes": args.fusion_threshold_bytes}
    strategy = MPIStrategy(compression=args.compression,
                           world_size_invariant=args.world_size_invariant,
                           micro_batches=args.micro_batches, **options)
    if args.micro_batches and strategy.num_replicas_in_sync > args.micro_batches:
        if strategy.rank == 0:
            print(f"error: --micro-batches {args.micro_batches} with "
                  f"{strategy.num_replicas_in_sync} ranks: every rank needs at least one "
                  "micro-batch (give more micro-batches, or start fewer ranks)",
                  file=sys.stderr, flush=True)
        return 2
    try:
        return _train(args, strategy)
    except CheckpointError as error:  # raised alike on every rank: one line, from rank 0
        if strategy.rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


def _train(args: argparse.Namespace, strategy: Any) -> int:
    rank, replicas = strategy.rank, strategy.num_replicas_in_sync
    resuming = args.resume is not None or args.resume_if_exists
    report = Reporter(args, rank, resuming)
    warning = oversubscription()
    if warning:
        report.note(warning)
    if args.checkpoint_dir is not None:
        prepare_checkpoint_directory(args.checkpoint_dir, strategy=strategy)
        if not args.checkpoint_every:
            report.note(f"checkpoints go to {args.checkpoint_dir} at the end of the run and "
                        "on Ctrl-C/SIGTERM (--checkpoint-every N adds periodic ones)")
    found = resume_lib.find(args, strategy, report) if resuming else None
    data, layer_sizes = _dataset(args)
    with strategy.scope():
        model = MLP(layer_sizes, seed=args.seed)
        optimizer = SGD(args.learning_rate, momentum=args.momentum, nesterov=args.nesterov)
    variables = model.variables
    # the backward pass writes the gradients straight into one flat buffer per dtype:
    # apply_gradients checks nothing per tensor and reduces them where they lie
    grads = distsgd.GradientBuffer(variables)
    accumulator = distsgd.GradientAccumulator(variables) if args.micro_batches else None
    if accumulator is None and args.overlap:
        optimizer.overlap(grads)  # chunks cross ranks while the backward pass goes on
    # where the backward pass writes, and what a step applies
    written, applied = (grads, grads) if accumulator is None else \
        (accumulator.buffer, accumulator)
    batches = ShardedBatches([data.x_train, data.y_train], args.batch_size, strategy,
                             seed=args.seed)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch == 0:
        raise CheckpointError(f"--batch-size {args.batch_size} is larger than the "
                              f"{len(data.y_train)} training examples")
    report.say(f"distsgd: {data.name}, {len(data.y_train)} train / {len(data.y_test)} test "
               f"examples, MLP {layer_sizes} ({model.num_parameters:,} parameters), "
               f"{replicas} replica{'s' if replicas > 1 else ''}, global batch "
               f"{args.batch_size}, {steps_per_epoch} steps/epoch")
    global_step = 0
    if found is not None:
        global_step = resume_lib.load(found, args, variables, optimizer, strategy, report)
    if args.timeline is not None:
        timeline.start_recording()

    def checkpoint() -> Path | None:
        if args.checkpoint_dir is None:
            return None
        return save_checkpoint(args.checkpoint_dir, step=global_step, variables=variables,
                               optimizer=optimizer,
                               state={"global_step": global_step, "seed": args.seed,
                                      "batch_size": args.batch_size,
                                      "micro_batches": args.micro_batches,
                                      "world_size_invariant": args.world_size_invariant})

    test_accuracy = float("nan")
    saved_at = None
    start = global_step
    try:
        for epoch in range(global_step // steps_per_epoch, args.epochs):
            if args.max_steps and global_step >= args.max_steps:
                break
            start_step = global_step - epoch * steps_per_epoch
            loss_sum, examples, counted = 0.0, 0, 0
            started = time.perf_counter()
            timeline.reset_totals()
            bar = report.progress(steps_per_epoch, start_step, epoch, args.epochs)
            for _, parts in _steps(batches, epoch, start_step, args.micro_batches):
                value = 0.0
                with timeline.span("compute"):
                    for index, (x, y) in parts:
                        # the loss is scaled by the global batch: P ranks' summed gradients
                        # are one process's on the whole batch
                        value += model.loss_and_gradients(x, y, 1 / args.batch_size, written,
                                                          ready=written.ready)
                        if accumulator is not None:  # one micro-batch at a time
                            accumulator.add(index=index)
                        examples += len(y)
                # the variables' strategy aggregates
                optimizer.apply_gradients(applied)
                global_step += 1
                loss_sum += value * args.batch_size
                if global_step - start == 1 and os.environ.get("DISTSGD_FIRST_STEP_MARK"):
                    report.note("first step done")  # (start-up benchmarks wait for it)
                if global_step - start == WARMUP_STEPS:  # the throughput starts here
                    started, counted = time.perf_counter(), examples
                bar.update(1)
                if global_step % 10 == 0 and not bar.disable:
                    rate = (examples - counted) * replicas / max(
                        1e-9, time.perf_counter() - started)
                    bar.set_postfix(loss=f"{loss_sum / max(1, examples):.4f}",
                                    samples_per_s=f"{rate:,.0f}", refresh=False)
                if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                    with timeline.span("checkpoint"):
                        checkpoint()
                    saved_at = global_step
                if args.max_steps and global_step >= args.max_steps:
                    break
            bar.close()
            seconds = time.perf_counter() - started
            totals = timeline.reset_totals()
            loss_mean = float(strategy.reduce("SUM", np.array([loss_sum]))[0]) / max(
                1, float(strategy.reduce("SUM", np.array([examples]))[0]))
            test_accuracy = _test_accuracy(model, data, strategy)
            phases = {name: totals.get(name, 0.0) for name in ("compute", "aggregate", "update")}
            busy = sum(phases.values()) or 1.0
            throughput = (examples - counted) * replicas / seconds if seconds > 0 else 0.0
            warm = " (after warm-up)" if counted else ""
            report.say(f"epoch {epoch + 1:>3}/{args.epochs}  loss {loss_mean:.4f}  test "
                       f"accuracy {test_accuracy:.4f}  {throughput:,.0f} samples/s{warm}  "
                       + "  ".join(f"{name} {100 * t / busy:.0f}%" for name, t in
                                   phases.items()))
            report.record({"epoch": epoch + 1, "step": global_step, "loss": loss_mean,
                           "test_accuracy": test_accuracy, "samples_per_second": throughput,
                           "replicas": replicas, "seconds": seconds,
                           **{f"{name}_seconds": t for name, t in phases.items()}})
    except StopRequested as stop:
        path = checkpoint() if saved_at != global_step else None
        where = f"; checkpoint {path} (continue with --resume)" if path is not None else \
            "" if args.checkpoint_dir is not None else "; no --checkpoint-dir, nothing saved"
        report.note(f"stopped by {stop.signal_name} at step {global_step}{where}")
        report.close()
        return 128 + (2 if stop.signal_name == "SIGINT" else 15)
    report.close()
    if args.max_steps and global_step >= args.max_steps:
        report.say(f"stopped at step {global_step} (--max-steps)")
    if saved_at != global_step:
        checkpoint()
    if args.timeline is not None:
        _write_timeline(args.timeline, strategy)
    return _final(strategy, variables, optimizer, test_accuracy, global_step)


def _final(strategy: Any, variables: list[Any], optimizer: Any, test_accuracy: float,
           global_step: int) -> int:
    digest = distsgd.distribute.state_digest(variables + optimizer.weights)
    comm_lib.agree(strategy.communicator, "comparing the final digests")
    digests = strategy.communicator.allgather_object(digest)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        print(f"error: replicas diverged: ranks {differing} hold different weights than "
              f"rank 0", file=sys.stderr, flush=True)
        return 2
    if strategy.rank == 0:
        print(f"final: test_accuracy={test_accuracy:.4f} steps={global_step} "
              f"replicas={strategy.num_replicas_in_sync} digest={digest}", flush=True)
    return 0
