"""The training program as a new user meets it: resume rules, checkpoints, errors, notes,
the progress bar, the launch scripts."""

import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_training import final_line, single

pytestmark = pytest.mark.slow

TRAIN = ("-m", "distsgd.train", "--epochs", "3", "--quiet")


def test_resume_takes_the_checkpoints_settings_unless_given(mpirun, tmp_path):
    directory = tmp_path / "ckpt"
    tuned = ("--learning-rate", "0.05", "--momentum", "0.5", "--nesterov", "--seed", "3")
    uninterrupted = final_line(mpirun(2, *TRAIN, *tuned))
    final_line(mpirun(2, *TRAIN, *tuned, "--max-steps", "25", "--checkpoint-dir", directory))
    resumed = mpirun(2, *TRAIN, "--checkpoint-dir", directory, "--resume")  # none given
    assert final_line(resumed) == uninterrupted
    assert "replaces" not in resumed.stderr


def test_a_hyperparameter_given_on_resume_wins_with_a_note(mpirun, tmp_path):
    directory = tmp_path / "ckpt"
    final_line(mpirun(2, *TRAIN, "--max-steps", "25", "--checkpoint-dir", directory))
    result = mpirun(2, *TRAIN, "--checkpoint-dir", directory, "--resume",
                    "--learning-rate", "0.2", "--no-nesterov")
    final_line(result)
    assert "--learning-rate 0.2 given: it replaces the checkpoint's 0.1" in result.stderr
    assert result.stderr.count("replaces") == 1  # --no-nesterov is what it had


def test_another_seed_or_batch_size_on_resume_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    final_line(single(*TRAIN[2:], "--max-steps", "5", "--checkpoint-dir", directory))
    for option, value in (("--seed", "9"), ("--batch-size", "32")):
        result = single(*TRAIN[2:], "--checkpoint-dir", directory, "--resume", option, value)
        assert result.returncode == 2
        assert f"this run has {option} {value}, which would change the data order" in \
            result.stderr


def test_resume_with_nothing_to_resume_is_an_error_unless_asked(mpirun, tmp_path):
    missing = tmp_path / "typo"
    result = mpirun(2, *TRAIN, "--checkpoint-dir", missing, "--resume")
    assert result.returncode == 2
    assert result.stderr.count(f"--resume: no usable checkpoint in {missing}") == 1
    result = mpirun(2, *TRAIN, "--checkpoint-dir", missing, "--resume-if-exists")
    final_line(result)
    assert f"no checkpoint in {missing}: starting from scratch" in result.stderr


def test_resume_path_names_one_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    final_line(single(*TRAIN[2:], "--max-steps", "30", "--checkpoint-dir", directory,
                      "--checkpoint-every", "10"))
    result = single(*TRAIN[2:], "--resume", directory / "ckpt-0000000010", "--max-steps", "12",
                    "--epochs", "3")
    assert final_line(result)[1] == 12 and "resumed from step 10" not in result.stdout


def test_a_checkpoint_dir_alone_writes_a_final_checkpoint_and_says_so(tmp_path):
    directory = tmp_path / "ckpt"
    result = single(*TRAIN[2:], "--checkpoint-dir", directory)
    steps = final_line(result)[1]
    assert (directory / "latest").read_text().strip() == f"ckpt-{steps:010d}"
    assert "checkpoints go to" in result.stderr and "at the end of the run" in result.stderr


def test_an_unwritable_checkpoint_dir_fails_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("")
    started = time.monotonic()
    result = single(*TRAIN[2:], "--epochs", "50", "--checkpoint-dir", tmp_path / "file" / "x")
    assert result.returncode == 2 and "is not writable" in result.stderr
    assert "epoch" not in result.stdout and time.monotonic() - started < 30


def test_a_directory_in_use_by_another_run_is_refused_at_start(mpirun, tmp_path):
    directory = tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, *TRAIN[:2], "--epochs", "2000", "--quiet",
                              "--checkpoint-dir", directory], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (directory / ".lock").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        second = mpirun(2, *TRAIN, "--checkpoint-dir", directory)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"checkpoint directory {directory} is in use by pid {first.pid}" in second.stderr


def test_a_bad_option_is_reported_once(mpirun):
    result = mpirun(3, "-m", "distsgd.train", "--epochz", "3")
    assert result.returncode != 0
    assert result.stderr.count("unrecognized arguments: --epochz") == 1, result.stderr


def test_the_first_epochs_throughput_leaves_out_the_warm_up(mpirun):
    result = mpirun(2, "-m", "distsgd.train", "--epochs", "2")
    final_line(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert "samples/s (after warm-up)" in lines[0] and "warm-up" not in lines[1]


def test_a_progress_bar_appears_when_rank_0_writes_to_a_terminal(mpirun):
    """Under mpirun the ranks write to pipes; the bar follows the launcher's terminal."""
    primary, secondary = pty.openpty()
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PMI_", "PMIX_", "HYDI_", "DISTSGD_PROGRESS"))}
    job = subprocess.Popen([shutil.which("mpirun"), "-n", "2", sys.executable, "-m",
                            "distsgd.train", "--epochs", "3", "--synthetic-params", "300000"],
                           stdout=secondary, stderr=secondary, cwd=ROOT, env=environment)
    os.close(secondary)
    output = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    job.wait(timeout=60)
    text = output.decode(errors="replace")
    assert job.returncode == 0, text
    assert "step/s" in text or "s/step" in text, text


def test_more_ranks_than_cores_are_warned_about(mpirun):
    cores = len(os.sched_getaffinity(0))
    if cores >= 4:
        pytest.skip("needs a host with fewer than 4 cores")
    result = mpirun(4, *TRAIN[:2], "--epochs", "1", "--quiet")
    final_line(result)
    assert result.stderr.count("oversubscribed") == 1


def test_resuming_at_another_world_size_is_noted(mpirun, tmp_path):
    directory = tmp_path / "ckpt"
    final_line(mpirun(2, *TRAIN, "--max-steps", "10", "--checkpoint-dir", directory))
    result = mpirun(1, *TRAIN, "--checkpoint-dir", directory, "--resume")
    final_line(result)
    assert "resuming a checkpoint written by 2 ranks at 1" in result.stderr


def test_env_sh_is_safe_to_source_in_an_interactive_shell():
    script = (f"source {ROOT}/launch/_env.sh; false; echo still-here; "
              "case $- in *e*) echo errexit-on;; *) echo errexit-off;; esac; "
              "set -o | grep -E '^(nounset|pipefail)' ; pwd")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            cwd="/tmp", timeout=600)
    assert "still-here" in result.stdout and "errexit-off" in result.stdout
    assert "nounset        \toff" in result.stdout and "pipefail       \toff" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "/tmp"


def test_launch_run_takes_paths_relative_to_the_callers_directory(tmp_path):
    result = subprocess.run([str(ROOT / "launch" / "run"), "--epochs", "1", "--quiet",
                             "--checkpoint-dir", "relative-ckpt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    final_line(result)
    assert (tmp_path / "relative-ckpt" / "latest").exists()
    assert not (ROOT / "relative-ckpt").exists()
