# Sourced by launch/run and launch/test: a virtualenv with distsgd and its extras, made once.
# DISTSGD_VENV overrides the location (default: .venv in the checkout).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DISTSGD_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "distsgd needs Python >= 3.10 (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "distsgd: creating the environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.distsgd-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "distsgd: installing distsgd[mpi,fast,test,examples,dev] (numpy, autograd, mpi4py, mpich, ...)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[mpi,fast,test,examples,dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# One BLAS/OpenMP thread per rank unless told otherwise: N ranks x all-core BLAS oversubscribes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
cd "$ROOT"
