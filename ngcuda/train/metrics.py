"""Writing run histories (metrics.json, metrics.csv) and summarising them."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch row with the highest val_acc; ties go to the lower val_loss, then the earlier epoch."""
    return max(history, key=lambda r: (r["val_acc"], -r["val_loss"], -r["epoch"]))


def summarise_node_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per optimizer over seeds: test accuracy at best validation (mean, std), best epoch, seconds/epoch."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        bests = [best_epoch(r["history"]) for r in mine]
        acc_m, acc_s = mean_std([b["test_acc"] for b in bests])
        val_m, _ = mean_std([b["val_acc"] for b in bests])
        ep_m, _ = mean_std([b["epoch"] for b in bests])
        spe = [r["history"][-1]["seconds"] / r["history"][-1]["epoch"] for r in mine]
        out[name] = {
            "seeds": len(mine),
            "test_acc_mean": acc_m,
            "test_acc_std": acc_s,
            "val_acc_mean": val_m,
            "best_epoch_mean": ep_m,
            "seconds_per_epoch": mean_std(spe)[0],
            "final_train_loss_mean": mean_std([r["history"][-1]["train_loss"] for r in mine])[0],
        }
    return out


def summarise_ae_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per optimizer over seeds: final training Bernoulli CE and squared error per image, seconds/epoch."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        last = [r["history"][-1] for r in mine]
        ce_m, ce_s = mean_std([h["train_bce"] for h in last])
        se_m, se_s = mean_std([h["train_sq_err"] for h in last])
        out[name] = {
            "seeds": len(mine),
            "train_bce_mean": ce_m,
            "train_bce_std": ce_s,
            "train_sq_err_mean": se_m,
            "train_sq_err_std": se_s,
            "test_sq_err_mean": mean_std([h["test_sq_err"] for h in last])[0],
            "seconds_per_epoch": mean_std([h["seconds"] / h["epoch"] for h in last])[0],
        }
    return out


def at_seconds(history: list[dict[str, float]], budget: float) -> dict[str, float] | None:
    """The last epoch row whose cumulative training seconds are within `budget` (None: not even the first)."""
    rows = [h for h in history if h["seconds"] <= budget]
    return rows[-1] if rows else None


def first_epoch_reaching(history: list[dict[str, float]], key: str, target: float) -> dict[str, float] | None:
    """The first epoch row with row[key] <= target (None if it never gets there)."""
    return next((h for h in history if h[key] <= target), None)


VAE_KEYS = ("neg_elbo", "bce", "sq_err", "kl")


def summarise_vae_runs(
    runs: list[dict[str, Any]], budget_seconds: float | None = None, reference: str = "adam"
) -> dict[str, dict[str, Any]]:
    """Per optimizer, means over seeds of:

    * ``final``: train/test negative ELBO, reconstruction CE, squared error and KL per image at the last epoch;
    * ``at_budget``: the test metrics and epoch of the last epoch within `budget_seconds` of training
      (default: the shortest run's total training time, so every optimizer has the same time);
    * ``epochs_to_reference``: the first epoch whose test reconstruction CE is at most the `reference`
      optimizer's final test CE (mean over its seeds), with its seconds; None where a seed never reaches it.
    """
    if budget_seconds is None and runs:
        budget_seconds = min(r["history"][-1]["seconds"] for r in runs)
    ref_runs = [r for r in runs if r["optimizer"] == reference]
    ref_bce = mean_std([r["history"][-1]["test_bce"] for r in ref_runs])[0] if ref_runs else None
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        last = [r["history"][-1] for r in mine]
        final = {f"{s}_{k}": mean_std([h[f"{s}_{k}"] for h in last])[0] for s in ("train", "test") for k in VAE_KEYS}
        final["test_bce_std"] = mean_std([h["test_bce"] for h in last])[1]
        final["epoch"] = mean_std([h["epoch"] for h in last])[0]
        budget_rows = [at_seconds(r["history"], budget_seconds) for r in mine]
        at_budget = None
        if all(b is not None for b in budget_rows):
            at_budget = {f"test_{k}": mean_std([b[f"test_{k}"] for b in budget_rows])[0] for k in VAE_KEYS}
            at_budget["epoch"] = mean_std([b["epoch"] for b in budget_rows])[0]
        reach = None
        if ref_bce is not None:
            hits = [first_epoch_reaching(r["history"], "test_bce", ref_bce) for r in mine]
            if all(h is not None for h in hits):
                reach = {"epoch": mean_std([h["epoch"] for h in hits])[0],
                         "seconds": mean_std([h["seconds"] for h in hits])[0]}
        out[name] = {
            "seeds": len(mine),
            "final": final,
            "budget_seconds": budget_seconds,
            "at_budget": at_budget,
            "reference": reference if ref_bce is not None else None,
            "reference_test_bce": ref_bce,
            "epochs_to_reference": reach,
            "seconds_per_epoch": mean_std([h["seconds"] / h["epoch"] for h in last])[0],
        }
    return out


def write_metrics(out_dir: Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write payload as metrics.json and its per-epoch rows (optimizer, seed, epoch, ...) as metrics.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    rows = [{"optimizer": r["optimizer"], "seed": r["seed"], **h} for r in payload["runs"] for h in r["history"]]
    csv_path = out_dir / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        fields = list(rows[0]) if rows else ["optimizer", "seed", "epoch"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def node_table(summary: dict[str, dict[str, float]]) -> str:
    rows = [
        [
            name,
            f"{100 * s['test_acc_mean']:.2f}" + (f" ± {100 * s['test_acc_std']:.2f}" if s["seeds"] > 1 else ""),
            f"{100 * s['val_acc_mean']:.2f}",
            f"{s['best_epoch_mean']:.1f}",
            f"{1000 * s['seconds_per_epoch']:.2f}",
            str(s["seeds"]),
        ]
        for name, s in summary.items()
    ]
    return format_table(["optimizer", "test acc % (best val)", "val acc %", "best epoch", "ms/epoch", "seeds"], rows)


def ae_table(summary: dict[str, dict[str, float]]) -> str:
    rows = [
        [
            name,
            f"{s['train_bce_mean']:.2f}" + (f" ± {s['train_bce_std']:.2f}" if s["seeds"] > 1 else ""),
            f"{s['train_sq_err_mean']:.3f}" + (f" ± {s['train_sq_err_std']:.3f}" if s["seeds"] > 1 else ""),
            f"{s['test_sq_err_mean']:.3f}",
            f"{s['seconds_per_epoch']:.3f}",
            str(s["seeds"]),
        ]
        for name, s in summary.items()
    ]
    return format_table(
        ["optimizer", "train CE/image", "train sq.err/image", "test sq.err/image", "s/epoch", "seeds"], rows
    )


def vae_table(summary: dict[str, dict[str, Any]]) -> str:
    """Final test metrics, test metrics at the common time budget and epochs to the reference's final CE."""
    def cell(d: dict[str, Any] | None, key: str, fmt: str) -> str:
        return "-" if d is None else format(d[key], fmt)

    rows = []
    for name, s in summary.items():
        f, b, r = s["final"], s["at_budget"], s["epochs_to_reference"]
        rows.append([
            name,
            f"{f['epoch']:.0f}",
            f"{f['test_neg_elbo']:.2f}",
            f"{f['test_bce']:.2f}",
            f"{f['test_sq_err']:.2f}",
            f"{f['test_kl']:.2f}",
            cell(b, "epoch", ".1f"),
            cell(b, "test_neg_elbo", ".2f"),
            cell(b, "test_bce", ".2f"),
            "never" if r is None and s["reference"] else cell(r, "epoch", ".1f"),
            f"{s['seconds_per_epoch']:.2f}",
            str(s["seeds"]),
        ])
    first = next(iter(summary.values()), None)
    budget = f"{first['budget_seconds']:.0f}s" if first else "budget"
    ref = first["reference"] if first and first["reference"] else "reference"
    return format_table(
        ["optimizer", "epochs", "test -ELBO", "test CE", "test sq.err", "test KL",
         f"epoch@{budget}", f"-ELBO@{budget}", f"CE@{budget}", f"epochs to {ref} CE", "s/epoch", "seeds"], rows
    )
