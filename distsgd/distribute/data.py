"""Sharding a dataset across replicas so that every replica takes the same number of steps.

Each global batch of ``global_batch_size`` examples (a slice of one permutation that
every rank computes from the same seed and epoch) is split across ranks, rank ``r``
taking its contiguous part; scale the per-replica loss by the global batch size and
the summed gradients equal one process training on the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distsgd._validation import check_number

__all__ = ["ShardedBatches", "replica_share"]


def replica_share(global_batch_size: int, rank: int, num_replicas: int) -> slice:
    """Rank ``rank``'s part of a global batch: sizes differ by at most one example."""
    base, extra = divmod(global_batch_size, num_replicas)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class ShardedBatches:
    """Per-replica batches of arrays that every rank holds in full (same order and length).

    Args:
        arrays: equal-length arrays (features, labels, ...), identical on every rank.
        global_batch_size: examples per step over all replicas together.
        strategy: the distribution strategy (its rank and replica count).
        shuffle: permute the examples each epoch, seeded by ``(seed, epoch)``.
        seed: the shuffling seed, the same on every rank.
        drop_remainder: drop the last partial global batch (keeps every step's
            global batch size, and so the loss scale, fixed).

    Iterating an epoch yields ``(step, batch_arrays)``; ``steps_per_epoch`` is the
    same on every rank, agreed collectively. Each batch handed out becomes the strategy's
    ``data_position``, which the next ``apply_gradients`` checks across ranks.
    """

    def __init__(self, arrays: Sequence[Any], global_batch_size: int, strategy: Any, *,
                 shuffle: bool = True, seed: int = 0, drop_remainder: bool = True) -> None:
        if not arrays:
            raise ValueError("arrays is empty; expected at least one array")
        lengths = {len(a) for a in arrays}
        if len(lengths) != 1:
            raise ValueError(f"arrays have lengths {sorted(lengths)}; expected one length")
        check_number("global_batch_size", global_batch_size, low=1)
        self.arrays = [np.asarray(a) for a in arrays]
        self.num_examples = lengths.pop()
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size < strategy.num_replicas_in_sync:
            raise ValueError(f"global_batch_size={global_batch_size} is smaller than the "
                             f"{strategy.num_replicas_in_sync} replicas")
        self.strategy = strategy
        self.shuffle, self.seed, self.drop_remainder = shuffle, int(seed), drop_remainder
        local = (self.num_examples // self.global_batch_size if drop_remainder
                 else -(-self.num_examples // self.global_batch_size))
        self.steps_per_epoch = strategy.agree_steps(local)

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
        """``(step, [array[indices] for each array])`` from ``start_step`` to the end."""
        order = self.order(epoch)
        share = self.strategy.rank, self.strategy.num_replicas_in_sync
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            indices = batch[replica_share(len(batch), *share)]
            # the next step's operation check compares it: ranks that skipped different
            # batches (a retry loop) are named instead of pairing the wrong gradients
            self.strategy.data_position = f"epoch {epoch}, batch {step}"
            yield step, [a[indices] for a in self.arrays]

    def micro_batches(self, epoch: int, start_step: int = 0, micro_batches: int | None = None
                      ) -> Iterator[tuple[int, list[tuple[int, list[np.ndarray]]]]]:
        """``(step, [(index, [array[indices] ...]) ...])``: this rank's micro-batches of each
        global batch, numbered across the whole batch.

        The global batch is cut into ``micro_batches`` parts (default: the strategy's M)
        as :func:`replica_share` cuts it, whatever the number of ranks, and rank ``r``
        takes the contiguous run ``replica_share(M, r, P)`` of them: so a micro-batch
        holds the same examples at every world size (for a
        :class:`~distsgd.GradientAccumulator`).
        """
        count = micro_batches or getattr(self.strategy, "micro_batches", None)
        if count is None:
            raise ValueError("micro_batches=None and the strategy has no micro_batches")
        check_number("micro_batches", count, low=self.strategy.num_replicas_in_sync,
                     what=f"an integer >= the {self.strategy.num_replicas_in_sync} ranks")
        if count > self.global_batch_size:
            raise ValueError(f"micro_batches={count} is more than the global batch of "
                             f"{self.global_batch_size} examples")
        order = self.order(epoch)
        mine = replica_share(count, self.strategy.rank, self.strategy.num_replicas_in_sync)
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            self.strategy.data_position = f"epoch {epoch}, batch {step}"
            parts = []
            for index in range(mine.start, mine.stop):
                indices = batch[replica_share(len(batch), index, count)]
                parts.append((index, [a[indices] for a in self.arrays]))
            yield step, parts
