"""``python -m distsgd.train.plot METRICS.jsonl [...] -o curves.png``: loss and accuracy curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["main", "read_metrics"]


def read_metrics(path: Path) -> list[dict]:
    """The JSON-lines rows of a ``--metrics`` file (blank lines skipped)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise SystemExit(f"{path}:{number}: not JSON ({error})") from None
    if not rows:
        raise SystemExit(f"{path}: no metrics rows")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distsgd.train.plot",
                                     description="Plot --metrics files: loss and accuracy.")
    parser.add_argument("metrics", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, default=Path("training-curves.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.metrics:
        rows = read_metrics(path)
        label = f"{path.stem} ({rows[-1].get('replicas', '?')} replicas)"
        epochs = [row["epoch"] for row in rows]
        loss_axes.plot(epochs, [row["loss"] for row in rows], marker="o", label=label)
        accuracy_axes.plot(epochs, [row["test_accuracy"] for row in rows], marker="o",
                           label=label)
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
