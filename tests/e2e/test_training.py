"""The main job end to end: accuracy, agreeing replicas, checkpoint/resume, output files."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.slow

FINAL = re.compile(r"^final: test_accuracy=([0-9.]+) steps=(\d+) replicas=(\d+) "
                   r"digest=([0-9a-f]{64})$", re.MULTILINE)


def final_line(result):
    assert result.returncode == 0, result.stdout + result.stderr
    match = FINAL.search(result.stdout)
    assert match, result.stdout
    assert result.stdout.strip().splitlines()[-1] == match.group(0)
    accuracy, steps, replicas, digest = match.groups()
    return float(accuracy), int(steps), int(replicas), digest


def single(*args):
    return subprocess.run([sys.executable, "-m", "distsgd.train", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_default_run_reaches_the_accuracy_bar_on_two_ranks(mpirun, tmp_path):
    result = mpirun(2, "-m", "distsgd.train", "--metrics", tmp_path / "m.jsonl",
                    "--timeline", tmp_path / "trace.json")
    accuracy, steps, replicas, _ = final_line(result)
    assert accuracy >= 0.95 and replicas == 2 and steps == 20 * 22
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    assert all(r["replicas"] == 2 and r["samples_per_second"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    spans = {(e["pid"], e["name"]) for e in trace if e["ph"] == "X"}
    for rank in (0, 1):
        assert {(rank, "compute"), (rank, "aggregate"), (rank, "update"),
                (rank, "bucket 1")} <= spans
    assert all(e["dur"] >= 0 and "ts" in e for e in trace if e["ph"] == "X")


def test_single_process_is_deterministic_and_accurate():
    first = final_line(single("--epochs", "15", "--quiet"))
    second = final_line(single("--epochs", "15", "--quiet"))
    assert first == second
    assert first[0] >= 0.95 and first[2] == 1


def test_two_ranks_are_deterministic(mpirun):
    runs = [final_line(mpirun(2, "-m", "distsgd.train", "--epochs", "3", "--quiet"))
            for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("ranks", [1, 2])
def test_stop_and_resume_equals_an_uninterrupted_run(mpirun, tmp_path, ranks):
    common = ["-m", "distsgd.train", "--epochs", "3", "--quiet", "--momentum", "0.9",
              "--nesterov"]
    uninterrupted = final_line(mpirun(ranks, *common))
    directory = tmp_path / "ckpt"
    stopped = final_line(mpirun(ranks, *common, "--checkpoint-dir", directory,
                                "--checkpoint-every", "10", "--max-steps", "31"))
    assert stopped[1] == 31
    resumed = final_line(mpirun(ranks, *common, "--checkpoint-dir", directory, "--resume"))
    assert resumed == uninterrupted


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(mpirun, tmp_path):
    directory = tmp_path / "ckpt"
    common = ("-m", "distsgd.train", "--epochs", "2", "--quiet")
    uninterrupted = final_line(mpirun(2, *common))
    final_line(mpirun(2, *common, "--max-steps", "30", "--checkpoint-dir", directory,
                      "--checkpoint-every", "10"))
    newest = directory / (directory / "latest").read_text().strip()
    assert newest.name == "ckpt-0000000030"
    arrays = newest / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    result = mpirun(2, *common, "--checkpoint-dir", directory, "--resume")
    assert final_line(result) == uninterrupted
    assert "checkpoint ckpt-0000000030 is unusable" in result.stderr
    assert "arrays.npz is corrupt or truncated (sha256 mismatch)" in result.stderr
    assert "loaded ckpt-0000000020 instead" in result.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    final_line(single("--epochs", "1", "--quiet", "--checkpoint-dir", directory,
                      "--checkpoint-every", "5"))
    result = single("--epochs", "2", "--quiet", "--hidden", "32", "--checkpoint-dir",
                    directory, "--resume")
    assert result.returncode != 0
    assert "'var/dense_0/kernel' has shape [64, 128], the model has [64, 32]" in result.stderr


def test_synthetic_mode_sizes_the_model():
    result = single("--synthetic-params", "100000", "--epochs", "1")
    final_line(result)
    params = int(re.search(r"\(([\d,]+) parameters\)", result.stdout).group(1).replace(",", ""))
    assert 90_000 <= params <= 100_000


def test_plot_command_writes_a_png(tmp_path):
    metrics = tmp_path / "m.jsonl"
    final_line(single("--epochs", "2", "--quiet", "--metrics", metrics))
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "distsgd.train.plot", metrics, "-o", out],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.frombuffer(out.read_bytes()[16:24], dtype=">u4").tolist() == [1000, 400]


def test_bfloat16_transport_trains_as_well_as_exact_transport(mpirun):
    common = ("-m", "distsgd.train", "--epochs", "5", "--quiet")
    exact = final_line(mpirun(2, *common))
    compressed = final_line(mpirun(2, *common, "--compression", "bfloat16"))
    assert compressed[3] != exact[3]  # the gradients did travel rounded
    assert compressed[0] >= exact[0] - 0.02 and compressed[1:3] == exact[1:3]
