import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import mpirun_path

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).resolve().parent / "programs"


@pytest.fixture
def mpirun():
    """Run ``mpirun -n N python ARGS`` with the repo importable; returns CompletedProcess."""
    path = mpirun_path()
    if path is None:
        pytest.skip("mpirun not found (install the 'mpi' extra: pip install distsgd[mpi])")

    def run(n, *args, env=None, timeout=300, mpi_flags=()):
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        for name in [k for k in environment if k.startswith(("PMI_", "PMIX_", "HYDI_"))]:
            del environment[name]
        return subprocess.run([path, *mpi_flags, "-n", str(n), sys.executable,
                               *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env=environment,
                              cwd=ROOT)

    return run
