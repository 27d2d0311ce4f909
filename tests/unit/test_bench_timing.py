"""The benchmark's timing loop: under mpirun every rank must call the candidates (which
issue collectives) in the same order, and each candidate gets one sample per round."""

from __future__ import annotations

from benchmarks.bench import timed


def _record(rounds: int, warmup: int) -> tuple[list[str], dict]:
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(f"setup {name}"),
                         lambda name=name: calls.append(name))
                  for name in "abcde"}
    timings = timed(candidates, rounds=rounds, warmup=warmup)
    return calls, timings.samples


def test_every_candidate_one_sample_per_round_after_its_setup() -> None:
    calls, samples = _record(rounds=6, warmup=2)
    assert {name: len(values) for name, values in samples.items()} == dict.fromkeys("abcde", 6)
    assert all(calls[i] == f"setup {calls[i + 1]}" for i in range(0, len(calls), 2))
    assert calls.count("a") == 2 + 6


def test_same_order_in_every_process_and_a_new_order_each_round() -> None:
    first, _ = _record(rounds=8, warmup=1)
    second, _ = _record(rounds=8, warmup=1)
    assert first == second  # what two ranks do: their collectives match
    timed_calls = [c for c in first if not c.startswith("setup")][5:]  # after the warmup
    orders = {tuple(timed_calls[r * 5:(r + 1) * 5]) for r in range(8)}
    assert all(sorted(order) == list("abcde") for order in orders)
    assert len(orders) > 1
