"""Ctrl-C and SIGTERM, to one rank or to mpirun: every rank stops at the same step, writes
a checkpoint, says where, exits 128 + signal within seconds; --resume then ends with the
digest of a run that was never interrupted. A second signal aborts at once."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import PROGRAMS, ROOT
from tests.e2e.test_training import final_line
from tests.netns import mpirun_path

pytestmark = pytest.mark.slow

# long enough (about 5 s at 2 ranks here) that the signal lands mid-training, not at exit
TRAIN = ["-m", "distsgd.train", "--epochs", "150", "--quiet", "--seed", "5"]


@pytest.fixture(scope="module")
def uninterrupted():
    """The final line of an uninterrupted run, per world size."""
    cache = {}

    def get(mpirun, ranks):
        if ranks not in cache:
            cache[ranks] = final_line(mpirun(ranks, *TRAIN))
        return cache[ranks]

    return get


def _start(ranks, *args):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in [k for k in environment if k.startswith(("PMI_", "PMIX_", "HYDI_"))]:
        del environment[name]
    return subprocess.Popen([mpirun_path(), "-n", str(ranks), sys.executable, *map(str, args)],
                            cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ranks_of(job, marker):
    pids = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return sorted(int(p) for p in pids.split() if int(p) != job.pid)


def _wait_for(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(("ranks", "target", "signum"), [
    (2, "one rank", signal.SIGINT), (3, "one rank", signal.SIGINT),
    (2, "mpirun", signal.SIGINT), (3, "mpirun", signal.SIGTERM),
    (2, "one rank", signal.SIGTERM)])
def test_a_signal_stops_every_rank_at_one_step_and_resume_loses_nothing(
        mpirun, uninterrupted, tmp_path, ranks, target, signum):
    directory = tmp_path / "ckpt"
    job = _start(ranks, *TRAIN, "--checkpoint-dir", directory)
    try:
        _wait_for(lambda: (directory / ".lock").exists())
        time.sleep(1.5)  # some steps in
        assert job.poll() is None, job.communicate()
        victims = _ranks_of(job, f"{TRAIN[-1]} --checkpoint-dir {directory}")
        victim = job.pid if target == "mpirun" else victims[-1]
        sent = time.monotonic()
        os.kill(victim, signum)
        stdout, stderr = job.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if "stopped by" in line]
    assert len(lines) == 1 and f"stopped by {name} at step" in lines[0], stderr
    assert "(continue with --resume)" in lines[0] and "Traceback" not in stderr
    assert "final:" not in stdout
    assert seconds < 10, seconds
    resumed = final_line(mpirun(ranks, *TRAIN, "--checkpoint-dir", directory, "--resume"))
    assert resumed == uninterrupted(mpirun, ranks)


def test_a_second_signal_aborts_at_once(tmp_path):
    """The first Ctrl-C waits for the next step, which a 60 s computation delays; the
    second ends the job there and then."""
    job = _start(2, PROGRAMS / "slow_steps.py", "60", "3")
    try:
        text = ""
        # both ranks took step 0; rank 0 now computes for 60 s (mpirun may interleave the
        # ranks' lines: "rank 0 step 0rank 1 step 0\n\n")
        while len(set(re.findall(r"rank (\d+) step 0", text))) < 2:
            line = job.stdout.readline()
            assert line, (text, job.communicate())
            text += line
        time.sleep(1)
        victim = _ranks_of(job, "slow_steps.py 60")[0]
        os.kill(victim, signal.SIGINT)
        time.sleep(1)
        sent = time.monotonic()
        os.kill(victim, signal.SIGINT)
        _, stderr = job.communicate(timeout=30)
        seconds = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "second SIGINT: aborting the whole job now" in stderr
    assert seconds < 5


def test_ctrl_c_in_one_process_stops_at_a_step_too(tmp_path):
    directory = tmp_path / "ckpt"
    job = subprocess.Popen([sys.executable, "-m", "distsgd.train", "--epochs", "100000",
                            "--quiet", "--checkpoint-dir", directory], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={k: v for k, v in os.environ.items()
                                if not k.startswith(("PMI_", "PMIX_", "HYDI_"))})
    try:
        _wait_for(lambda: (directory / ".lock").exists())
        time.sleep(1)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130 and "stopped by SIGINT at step" in stderr, stderr
    assert (directory / "latest").exists()
