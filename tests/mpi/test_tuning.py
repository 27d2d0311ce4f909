"""``allreduce_chunk_bytes="auto"`` across ranks: kept aggregations time their chunk sizes
at two ranks, every rank makes the same choice, and no bit of any result changes."""

import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.distribute import MPIStrategy
from distsgd.distribute.aggregation import AUTO_CHUNK_CANDIDATES_BYTES, AUTO_TRIAL_CALLS
from distsgd.distribute.tuning import ChunkSizeTuner
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi

# buckets the two candidate sizes cut differently (above 4 MiB), every route, two dtypes
LAYOUT = [((1_500_000,), np.float32, Sync.AUTO, Agg.SUM), ((1000,), np.float32, Sync.NONE, Agg.SUM),
          ((1_200_000,), np.float32, Sync.AUTO, Agg.MEAN),
          ((300_000,), np.float32, Sync.AUTO, Agg.ONLY_FIRST_REPLICA),
          ((700_000,), np.float64, Sync.AUTO, Agg.SUM)]
CALLS = AUTO_TRIAL_CALLS + 3


def _variables():
    return [distsgd.Variable(np.zeros(s, d), name=f"v{i}", synchronization=sync, aggregation=agg)
            for i, (s, d, sync, agg) in enumerate(LAYOUT)]


def _gradients(rng, call, rank):
    grads = [rng.standard_normal(s).astype(d) for s, d, _, _ in LAYOUT]
    if call % 3 == 1 and rank == 0:
        grads[2] = None  # zeros here: another plan on this rank, the same messages
    return grads


def _aggregations(chunk_bytes):
    """Every call's kept results (random floats: any change of summation order shows)
    and the collectives each call issued."""
    strategy = MPIStrategy(allreduce_chunk_bytes=chunk_bytes)
    rng = np.random.default_rng(strategy.rank)
    with strategy.scope():
        variables = _variables()
    results, collectives = [], []
    for call in range(CALLS):
        grads = _gradients(rng, call, strategy.rank)
        before = getattr(strategy.communicator, "collectives", 0)
        out = strategy._aggregate_gradients(list(zip(grads, variables, strict=True)))
        collectives.append(getattr(strategy.communicator, "collectives", 0) - before)
        results.append([None if g is None else np.array(g) for g in out])
    return strategy, results, collectives


@pytest.fixture(scope="module")
def runs():
    return {size: _aggregations(size) for size in ("auto", *AUTO_CHUNK_CANDIDATES_BYTES)}


def test_auto_gives_bitwise_the_results_of_fixed_chunks(runs):
    _, auto, _ = runs["auto"]
    _, fixed, _ = runs[AUTO_CHUNK_CANDIDATES_BYTES[0]]
    for call, (got, want) in enumerate(zip(auto, fixed, strict=True)):
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or (a.dtype == b.dtype
                                                 and a.tobytes() == b.tobytes()), f"call {call}"
    assert_replicas_identical(runs["auto"][0], *[a for i, a in enumerate(auto[-1])
                                                 if i != 1 and a is not None])


def test_two_ranks_try_both_sizes_then_keep_one_choice_on_every_rank(runs):
    strategy, _, auto = runs["auto"]
    chosen = strategy._gradient_aggregator().chosen_chunk_bytes()
    per_size = {size: runs[size][2] for size in AUTO_CHUNK_CANDIDATES_BYTES}
    if strategy.num_replicas_in_sync != 2:  # elsewhere the bits could change: 4 MiB
        assert chosen == []
        assert auto == per_size[AUTO_CHUNK_CANDIDATES_BYTES[0]]
        return
    assert len(chosen) == 1 and chosen[0] in AUTO_CHUNK_CANDIDATES_BYTES
    assert len(set(strategy.communicator.allgather_object(chosen[0]))) == 1
    # the trials used each candidate's chunks (the sizes differ in message count) ...
    tried = {size for size, counts in per_size.items()
             for call in range(AUTO_TRIAL_CALLS) if auto[call] == counts[call]}
    assert tried == set(AUTO_CHUNK_CANDIDATES_BYTES)
    # ... the next call agreed on the choice (one more collective), then it stands
    assert auto[AUTO_TRIAL_CALLS] == per_size[chosen[0]][AUTO_TRIAL_CALLS] + 1
    assert auto[AUTO_TRIAL_CALLS + 1:] == per_size[chosen[0]][AUTO_TRIAL_CALLS + 1:]


def test_every_rank_makes_the_slowest_ranks_choice():
    strategy = MPIStrategy()
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    tuner = ChunkSizeTuner((1, 2, 3), timed_rounds=2)
    # the last rank finds candidate 3 slow; every other rank finds it the fastest
    seconds = {1: 3.0, 2: 2.0, 3: 6.0 if rank == size - 1 else 1.0}
    while tuner.chosen is None:
        chunk_bytes = tuner.chunk_bytes(strategy.communicator)
        tuner.record(seconds[chunk_bytes])
    assert tuner.chosen == 2


def test_steps_that_keep_results_tune_and_match_fixed_chunks():
    """clipnorm needs every gradient first: those steps aggregate into kept results."""
    states = {}
    for chunk_bytes in ("auto", AUTO_CHUNK_CANDIDATES_BYTES[0]):
        strategy = MPIStrategy(allreduce_chunk_bytes=chunk_bytes)
        rng = np.random.default_rng(strategy.rank)
        with strategy.scope():
            variables = _variables()
            opt = SGD(0.01, momentum=0.9, clipnorm=1e3)
            for call in range(CALLS):
                opt.apply_gradients(zip(_gradients(rng, call, strategy.rank), variables,
                                        strict=True))
        states[chunk_bytes] = [v.numpy() for v in variables] + [w.numpy() for w in opt.weights]
        if chunk_bytes == "auto":
            tuned = strategy._gradient_aggregator().chosen_chunk_bytes()
            assert len(tuned) == (strategy.num_replicas_in_sync == 2)
    for a, b in zip(*states.values(), strict=True):
        assert a.tobytes() == b.tobytes()


def test_streamed_steps_keep_their_chunk_size():
    strategy = MPIStrategy()
    rng = np.random.default_rng(strategy.rank)
    with strategy.scope():
        variables = _variables()
        opt = SGD(0.01, momentum=0.9)
        for call in range(CALLS):
            opt.apply_gradients(zip(_gradients(rng, call, strategy.rank), variables,
                                    strict=True))
    assert strategy._gradient_aggregator().chosen_chunk_bytes() == []
