"""benchmarks/peers.py where torch is not installed: the torch parts are skipped with a
message (exit 0, RESULTS.md untouched); a mistyped part is refused by name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *parts):
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('no torch here')\n")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), *parts],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})


def test_without_torch_the_torch_parts_are_skipped_with_a_message(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    result = _run(tmp_path, "update", "mlp")
    assert result.returncode == 0, result.stderr
    assert "parts ['update', 'mlp'] need torch" in result.stdout
    assert "skipped" in result.stdout
    assert results.read_text() == before


def test_a_mistyped_part_is_refused_by_name(tmp_path):
    result = _run(tmp_path, "updat")
    assert result.returncode != 0
    assert "unknown parts ['updat']" in result.stderr
