"""The loss curve of the shipped default over all its training stages, one after another.

    .venv/bin/python scripts/plot_training_loss.py

Reads each stage's per-step CSV in results/training (as `memoryllm train` writes metrics.csv),
offsets its steps by the steps of the stages before it, and draws results/training/loss.png
with a dashed line where each stage begins.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from latentmem.train.measure import plot_loss

RESULTS = Path(__file__).resolve().parent.parent / "results" / "training"
STAGES = [("stage 1", "loss.csv"), ("stage 2", "loss_stage2.csv"), ("stage 3", "loss_stage3.csv"), ("stage 4", "loss_stage4.csv"), ("stage 5", "loss_stage5.csv")]


def main() -> None:
    rows, marks, offset = [], {}, 0
    for label, name in STAGES:
        path = RESULTS / name
        if not path.is_file():
            continue
        stage = list(csv.DictReader(path.open()))
        marks[offset + 1] = label
        rows += [{**r, "step": str(int(r["step"]) + offset)} for r in stage]
        offset += len(stage)
    with tempfile.NamedTemporaryFile("w", suffix=".csv", newline="", delete=False) as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(plot_loss(f.name, RESULTS / "loss.png", marks=marks))
    Path(f.name).unlink()


if __name__ == "__main__":
    main()
