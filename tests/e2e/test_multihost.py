"""Training across hosts for real: Linux network namespaces on this machine, each with
its own veth link on a bridge and its own address; MPI ranks are started inside them by
mpiexec's launcher hook (launch/netns-exec), each host with its own hostname, and talk
TCP only (UCX_TLS=tcp,self: no shared memory across hosts, proved by the link-cut test,
which would otherwise keep training). Needs root; skipped elsewhere.
"""

import os
import subprocess
import time

import pytest

from tests import netns
from tests.e2e.conftest import ROOT
from tests.e2e.test_training import final_line
from tests.netns import Hosts, ip

pytestmark = pytest.mark.slow


@pytest.fixture
def hosts():
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    try:
        made = Hosts()
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create network namespaces here: {error.stderr.strip()}")
    try:
        yield made
    finally:
        made.remove()


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


TRAIN = ["-m", "distsgd.train", "--epochs", "3", "--quiet", "--seed", "5"]


@pytest.mark.parametrize("transport", [(), ("--compression", "bfloat16")],
                         ids=["exact", "bfloat16"])
def test_two_hosts_train_to_the_same_digest_as_one_host(hosts, mpirun, transport):
    across = subprocess.run(hosts.mpiexec(1, *TRAIN, *transport), capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=_env())
    one_host = mpirun(2, *TRAIN, *transport)
    assert final_line(across) == final_line(one_host)


def _start_long_run(hosts, tmp_path):
    job = subprocess.Popen(hosts.mpiexec(1, "-m", "distsgd.train", "--epochs", "200",
                                         "--quiet", "--checkpoint-dir", tmp_path,
                                         "--checkpoint-every", "50"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "latest").exists():  # training is under way on both hosts
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def _ranks_alive(hosts):
    alive = []
    for host in range(len(hosts.names)):
        for pid in hosts.pids(host):
            try:
                if "distsgd.train" in open(f"/proc/{pid}/cmdline").read():
                    alive.append(pid)
            except OSError:
                pass
    return alive


def _wait_for_ranks_to_end(hosts, job, limit=60):
    """Seconds until no rank process is left (the launcher may linger: see below)."""
    started = time.monotonic()
    while _ranks_alive(hosts):
        assert time.monotonic() - started < limit, "ranks still running"
        time.sleep(0.05)
    return time.monotonic() - started


def _finish(job, grace=20):
    """The launcher's output; MPICH's mpiexec cannot clean up a proxy behind a cut link
    and would wait for TCP to give up, so after the ranks are gone it gets ``grace``
    seconds, then is ended as a scheduler would."""
    try:
        return job.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, 9)
        return job.communicate()


@pytest.fixture
def jobs():
    """Launchers started by a test; whatever happens, none outlives it."""
    started = []
    yield started
    for job in started:
        if job.poll() is None:
            os.killpg(job.pid, 9)
            job.communicate()


def test_cutting_a_hosts_link_ends_the_job_naming_the_rank(hosts, tmp_path, jobs):
    job = _start_long_run(hosts, tmp_path)
    jobs.append(job)
    ip("link", "set", hosts.links[1], "down")
    seconds = _wait_for_ranks_to_end(hosts, job)
    stdout, stderr = _finish(job)
    print(f"link cut: every rank ended {seconds:.1f} s after the cut")
    assert "final:" not in stdout
    assert "CollectiveTimeoutError: rank 1 sent no heartbeat for 10 s" in stderr, stderr
    assert seconds < 20


def test_killing_a_hosts_ranks_ends_the_job(hosts, tmp_path, jobs):
    job = _start_long_run(hosts, tmp_path)
    jobs.append(job)
    victims = [p for p in _ranks_alive(hosts) if p in hosts.pids(1)]
    assert victims
    for pid in victims:
        os.kill(pid, 9)
    seconds = _wait_for_ranks_to_end(hosts, job)
    stdout, stderr = _finish(job)
    print(f"ranks killed: every rank ended {seconds:.1f} s after the kill")
    assert job.returncode != 0 and "final:" not in stdout
    assert "BAD TERMINATION" in stdout + stderr or "sent no heartbeat" in stderr
