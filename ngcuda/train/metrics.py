"""Writing run histories (metrics.json, metrics.csv) and summarising them."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


SELECTIONS = ("val-acc", "val-loss")

SELECTION_TEXT = {
    "val-acc": "test accuracy at the epoch of best validation accuracy (ties: lower validation loss)",
    "val-loss": "test accuracy at the epoch of lowest validation loss (ties: higher validation accuracy)",
}


def best_epoch(history: list[dict[str, float]], select: str = "val-acc") -> dict[str, float]:
    """The model-selection epoch row. select="val-acc": highest val_acc, ties to the lower val_loss;
    "val-loss" (Izadi et al.): lowest val_loss, ties to the higher val_acc. Then the earlier epoch."""
    if select == "val-acc":
        return max(history, key=lambda r: (r["val_acc"], -r["val_loss"], -r["epoch"]))
    if select == "val-loss":
        return max(history, key=lambda r: (-r["val_loss"], r["val_acc"], -r["epoch"]))
    raise ValueError(f"unknown selection {select!r}: use one of {', '.join(SELECTIONS)}")


def first_best_val_acc_epoch(history: list[dict[str, float]]) -> int:
    """The first epoch at which the run reaches its highest validation accuracy."""
    top = max(r["val_acc"] for r in history)
    return next(int(r["epoch"]) for r in history if r["val_acc"] == top)


def summarise_node_runs(runs: list[dict[str, Any]], select: str = "val-acc") -> dict[str, dict[str, float]]:
    """Per optimizer over seeds: test accuracy at the selected epoch (see best_epoch; mean, std), that
    epoch, the first epoch reaching the run's best validation accuracy, seconds/epoch."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        bests = [best_epoch(r["history"], select) for r in mine]
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
            "first_best_val_acc_epoch_mean": mean_std([first_best_val_acc_epoch(r["history"]) for r in mine])[0],
            "seconds_per_epoch": mean_std(spe)[0],
            "final_train_loss_mean": mean_std([r["history"][-1]["train_loss"] for r in mine])[0],
        }
    return out


def epochs_to_reach(history: list[dict[str, float]], key: str, target: float) -> tuple[int, float] | None:
    """(first epoch, its cumulative seconds) at which history[key] <= target; None if never."""
    for h in history:
        if h[key] <= target:
            return int(h["epoch"]), float(h["seconds"])
    return None


def summarise_ae_runs(runs: list[dict[str, Any]], reference: str = "adam") -> dict[str, dict[str, float]]:
    """Per optimizer over seeds: final training Bernoulli CE and squared error per image, seconds/epoch and,
    when `reference` ran, the epochs and seconds each optimizer needs to reach the reference's final
    training error of the same seed (CE and squared error; None for a seed that never gets there)."""
    out: dict[str, dict[str, float]] = {}
    ref_final = {r["seed"]: r["history"][-1] for r in runs if r["optimizer"] == reference}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        last = [r["history"][-1] for r in mine]
        ce_m, ce_s = mean_std([h["train_bce"] for h in last])
        se_m, se_s = mean_std([h["train_sq_err"] for h in last])
        reach = {}
        for key in ("train_bce", "train_sq_err"):
            hits = [epochs_to_reach(r["history"], key, ref_final[r["seed"]][key]) for r in mine
                    if r["seed"] in ref_final]
            ok = [h for h in hits if h is not None]
            reach[f"epochs_to_{reference}_final_{key}"] = mean_std([h[0] for h in ok])[0] if hits and len(
                ok) == len(hits) else None
            reach[f"seconds_to_{reference}_final_{key}"] = mean_std([h[1] for h in ok])[0] if hits and len(
                ok) == len(hits) else None
            reach[f"seeds_reaching_{reference}_final_{key}"] = len(ok)
        out[name] = {
            "seeds": len(mine),
            "train_bce_mean": ce_m,
            "train_bce_std": ce_s,
            "train_sq_err_mean": se_m,
            "train_sq_err_std": se_s,
            "test_sq_err_mean": mean_std([h["test_sq_err"] for h in last])[0],
            "seconds_per_epoch": mean_std([h["seconds"] / h["epoch"] for h in last])[0],
            "epochs": mean_std([h["epoch"] for h in last])[0],
            **(reach if ref_final else {}),
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


def _json_safe(value: Any) -> Any:
    """NaN and ±inf (a diverged run) as null: strict JSON readers (jq, JavaScript) refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _replace_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temporary file next to `path`, then rename it over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_metrics(out_dir: Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write payload as metrics.json and its per-epoch rows (optimizer, seed, epoch, ...) as metrics.csv,
    each replaced atomically (the main job rewrites both after every run). Non-finite numbers are null
    in the JSON and nan/inf in the CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    text = json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False) + "\n"
    _replace_atomically(json_path, lambda f: f.write(text))
    rows = [{"optimizer": r["optimizer"], "seed": r["seed"], **h} for r in payload["runs"] for h in r["history"]]
    csv_path = out_dir / "metrics.csv"

    def write_csv(f: Any) -> None:
        fields = list(rows[0]) if rows else ["optimizer", "seed", "epoch"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    _replace_atomically(csv_path, write_csv)
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
            f"{s['first_best_val_acc_epoch_mean']:.1f}",
            f"{1000 * s['seconds_per_epoch']:.2f}",
            str(s["seeds"]),
        ]
        for name, s in summary.items()
    ]
    headers = ["optimizer", "test acc % (selected)", "val acc %", "selected epoch", "max-val-acc epoch",
               "ms/epoch", "seeds"]
    return format_table(headers, rows)


def ae_table(summary: dict[str, dict[str, float]], reference: str = "adam") -> str:
    reach = any(f"epochs_to_{reference}_final_train_bce" in s for s in summary.values())

    def to_ref(s: dict, key: str) -> str:
        e, sec = s.get(f"epochs_to_{reference}_final_{key}"), s.get(f"seconds_to_{reference}_final_{key}")
        return "never" if e is None else f"{e:.1f} ({sec:.1f} s)"

    rows = [
        [
            name,
            f"{s['train_bce_mean']:.2f}" + (f" ± {s['train_bce_std']:.2f}" if s["seeds"] > 1 else ""),
            f"{s['train_sq_err_mean']:.3f}" + (f" ± {s['train_sq_err_std']:.3f}" if s["seeds"] > 1 else ""),
            f"{s['test_sq_err_mean']:.3f}",
            f"{s['seconds_per_epoch']:.3f}",
            str(s["seeds"]),
        ] + ([to_ref(s, "train_bce"), to_ref(s, "train_sq_err")] if reach else [])
        for name, s in summary.items()
    ]
    headers = ["optimizer", "train CE/image", "train sq.err/image", "test sq.err/image", "s/epoch", "seeds"]
    if reach:
        headers += [f"epochs to {reference}'s final CE", f"epochs to {reference}'s final sq.err"]
    return format_table(headers, rows)


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
    table = format_table(
        ["optimizer", "epochs", "test -ELBO", "test CE", "test sq.err", "test KL",
         f"epoch@{budget}", f"-ELBO@{budget}", f"CE@{budget}", f"epochs to {ref} CE", "s/epoch", "seeds"], rows
    )
    notes = [f"@{budget}: the last epoch finished within {budget} of training ('-': none was)"]
    notes.append(f"epochs to {ref} CE: the first epoch at or below {ref}'s final test CE"
                 if first and first["reference"] else
                 "epochs to reference CE: '-' because adam, the reference, was not among the optimizers")
    return table + "\n" + "\n".join(notes)
