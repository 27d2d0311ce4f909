# Sourced by launch/run, launch/test and launch/bench (and safe to source in a shell of
# your own: it changes no shell options and no directory): a virtualenv with distsgd and
# its extras, made once, put first on PATH. DISTSGD_VENV overrides the location (default:
# .venv in the checkout).
_distsgd_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_distsgd_venv=${DISTSGD_VENV:-$_distsgd_root/.venv}
_distsgd_python=${PYTHON:-python3}

_distsgd_setup() {
  if ! "$_distsgd_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "distsgd needs Python >= 3.10 (found: $("$_distsgd_python" --version 2>&1))" >&2
    return 1
  fi
  if [ ! -x "$_distsgd_venv/bin/python" ]; then
    echo "distsgd: creating the environment in $_distsgd_venv" >&2
    "$_distsgd_python" -m venv "$_distsgd_venv" || return 1
  fi
  local stamp="$_distsgd_venv/.distsgd-installed"
  if [ ! -f "$stamp" ] || [ "$_distsgd_root/pyproject.toml" -nt "$stamp" ]; then
    echo "distsgd: installing distsgd[mpi,fast,test,examples,dev] (numpy, autograd, mpi4py, mpich, ...)" >&2
    "$_distsgd_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -e "$_distsgd_root[mpi,fast,test,examples,dev]" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || return 1
    touch "$stamp"
  fi
}

if _distsgd_setup; then
  export PATH="$_distsgd_venv/bin:$PATH"
  # One BLAS/OpenMP thread per rank unless told otherwise: N ranks x all-core BLAS
  # oversubscribes.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
  DISTSGD_ROOT=$_distsgd_root
else
  echo "distsgd: the environment could not be set up (see above)" >&2
  false
fi
