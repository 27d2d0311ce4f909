"""The benchmark's timing loop: under mpirun every rank must call the candidates (which
issue collectives) in the same order, and each candidate gets one sample per round."""

from __future__ import annotations

import pytest

from benchmarks.bench import summarize_aggregate, timed


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


def test_aggregation_launches_are_pooled_round_by_round() -> None:
    def launch(raw1, raw4, raw16, distsgd, mine):  # milliseconds, two rounds each
        samples = {"whole-buffer Allreduce + numpy loop": [100, 100],
                   "raw chunks of 256 Ki": raw1, "raw chunks of 1024 Ki": raw4,
                   "raw chunks of 4096 Ki": raw16, "distsgd aggregate": distsgd,
                   "distsgd aggregate + update": [50, 50],
                   "distsgd aggregate + update, GradientBuffer": [40, 40]}
        return {"ranks": 2, "same_chunks": f"raw chunks of {mine} Ki",
                "samples": {k: [v / 1e3 for v in values] for k, values in samples.items()}}

    # 16 MiB chunks win the first launch, 4 MiB the second; over both, 4 MiB is best
    # distsgd used the chunk size that won each launch
    summary = summarize_aggregate([launch([50, 50], [42, 42], [40, 40], [44, 44], 4096),
                                   launch([50, 50], [40, 40], [46, 46], [42, 42], 1024)])
    assert summary["launches"] == 2 and summary["rounds"] == 4
    assert summary["per_launch"]["best_raw_chunks"] == ["raw chunks of 4096 Ki",
                                                        "raw chunks of 1024 Ki"]
    assert summary["per_launch"]["aggregate_vs_best_raw_chunks"] == pytest.approx([1.1, 1.05])
    assert summary["best_raw_chunks"] == "raw chunks of 1024 Ki"
    # the median of the four rounds' ratios 44/42, 44/42, 42/40, 42/40
    assert summary["aggregate_vs_best_raw_chunks"] == pytest.approx((44 / 42 + 42 / 40) / 2)
    assert summary["full_step_vs_whole_plus_loop"] == pytest.approx(0.5)
    # against raw chunks of its own size, launch by launch: 44/40, then 42/40
    assert summary["per_launch"]["distsgd_chunks"] == ["raw chunks of 4096 Ki",
                                                       "raw chunks of 1024 Ki"]
    assert summary["per_launch"]["aggregate_vs_raw_same_chunks"] == pytest.approx([1.1, 1.05])
    assert summary["aggregate_vs_raw_same_chunks"] == pytest.approx((1.1 + 1.05) / 2)
    assert "raw Allreduce of distsgd's chunk size" not in summary["ms"]
