import os

# Collectives in tests give up after this many seconds instead of hanging the suite.
os.environ.setdefault("DISTSGD_TIMEOUT", "60")


def pytest_report_header(config):
    from distsgd.distribute import comm

    if not comm.launched_by_mpi():
        return "distsgd: single process (no MPI launcher)"
    from mpi4py import MPI

    return (f"distsgd: MPI rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()}, "
            f"{MPI.Get_library_version().splitlines()[0]}")
