"""docker-compose.yml, the Dockerfile and the launch scripts: parsed, cross-checked, run.

No Docker engine is needed: the files are validated structurally and the scripts'
commands run here against stand-ins for ssh and mpirun.
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["run", "test", "bench", "_env.sh", "compose-head", "compose-worker", "slurm.sbatch"]


def _in_repo(container_path: str) -> Path:
    assert container_path.startswith("/opt/distsgd/"), container_path
    return ROOT / container_path.removeprefix("/opt/distsgd/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if script != "_env.sh":
        assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def test_compose_file_brings_up_a_head_and_workers():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"head", "worker"}
    for name, service in services.items():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        command = _in_repo(service["command"][0])
        assert command.is_file() and os.access(command, os.X_OK), name
        for volume in service["volumes"]:
            assert volume.split(":")[0] in compose["volumes"]
    assert services["worker"]["deploy"]["replicas"] == "${WORKERS:-2}"
    assert services["head"]["environment"]["WORKERS"] == "${WORKERS:-2}"
    assert services["head"]["depends_on"] == ["worker"]
    head_args = services["head"]["command"][1:]
    from distsgd.train.cli import parse_args

    parsed = parse_args(head_args)
    assert parsed.resume and parsed.checkpoint_dir == Path("/checkpoints")


def test_dockerfile_builds_from_files_that_exist():
    parser = DockerfileParser(path=str(LAUNCH / "Dockerfile"))
    assert parser.baseimage.startswith("python:3.11")
    instructions = parser.structure
    for instruction in instructions:
        if instruction["instruction"] == "COPY":
            *sources, _ = instruction["value"].split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
    run_lines = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert 'pip install --no-cache-dir ".[mpi,fast,examples]"' in run_lines
    assert {"mpi", "fast", "examples"} <= set(extras)
    cmd = [i for i in instructions if i["instruction"] == "CMD"][-1]["value"]
    assert _in_repo(cmd.strip('[]"')).is_file()


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_compose_head_writes_the_hostfile_and_runs_mpirun(tmp_path):
    """Run the head script for real, with localhost as the worker service."""
    _stub(tmp_path, "ssh", "exit 0")
    _stub(tmp_path, "mpirun", 'echo "mpirun $*"; cat "$2"')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "WORKERS": "1",
           "RANKS_PER_HOST": "2", "WORKER_SERVICE": "localhost", "WAIT_SECONDS": "5"}
    result = subprocess.run([str(LAUNCH / "compose-head"), "--epochs", "1"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].endswith("-launcher ssh -n 4 python -m distsgd.train --epochs 1")
    assert lines[2] == "127.0.0.1:2" and lines[1].endswith(":2")


def test_compose_head_gives_up_when_workers_are_missing(tmp_path):
    env = {**os.environ, "WORKERS": "3", "WORKER_SERVICE": "localhost", "WAIT_SECONDS": "1"}
    result = subprocess.run([str(LAUNCH / "compose-head")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "found 1 of 3 'localhost' containers" in result.stderr


def test_slurm_script_and_hostfile_example():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "python -m distsgd.train" in text
    hosts = [line for line in (LAUNCH / "hostfile.example").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(line.split(":")[1].isdigit() for line in hosts)


def test_training_options_in_the_docs_exist():
    from distsgd.train.cli import parse_args

    readme = (ROOT / "README.md").read_text()
    for option in ["--epochs", "--batch-size", "--learning-rate", "--momentum", "--nesterov",
                   "--seed", "--checkpoint-dir", "--checkpoint-every", "--resume",
                   "--metrics", "--timeline", "--synthetic-params", "--max-steps"]:
        assert option in readme
    assert parse_args(["--nesterov", "--max-steps", "3"]).max_steps == 3
