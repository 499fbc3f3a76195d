"""Join `ngcuda train-vae` runs made by separate invocations (same data, seed and options) into the files
committed here, with the functions the command itself uses: summary.json (each invocation's config and
device, and summarise_vae_runs over all runs: the time budget is the shortest run's training time and the
reference is Adam's final test reconstruction CE), metrics.csv (every epoch) and curves.png; prints the table.

    PYTHONPATH=. python docs/results/vae-mnist/combine.py OUT_DIR runs/a/metrics.json [runs/b/metrics.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from ngcuda.train.metrics import summarise_vae_runs, vae_table, write_metrics
from ngcuda.train.plot import plot_runs


def main(out: str, sources: list[str]) -> None:
    payloads = [json.loads(Path(s).read_text()) for s in sources]
    runs = [r for p in payloads for r in p["runs"]]
    summary = summarise_vae_runs(runs)
    out_dir = Path(out)
    write_metrics(out_dir, {"runs": runs})
    (out_dir / "metrics.json").unlink()  # the histories stay in metrics.csv only
    combined = {
        "command": "train-vae",
        "invocations": [{k: p[k] for k in ("config", "device", "metrics")} for p in payloads],
        "summary": summary,
    }
    (out_dir / "summary.json").write_text(json.dumps(combined, indent=1) + "\n")
    seeds = sorted({r["seed"] for r in runs})
    png = plot_runs(runs, out_dir / "curves.png",
              [("test_neg_elbo", "test negative ELBO / image", False),
               ("test_bce", "test reconstruction CE / image", False),
               ("test_sq_err", "test squared error / image", False)],
              f"MNIST VAE (latent 20), 60k training images, seed(s) {', '.join(map(str, seeds))}")
    Image.open(png).convert("RGB").quantize(32).save(png, optimize=True)  # a small PNG for the repository
    print(vae_table(summary))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
