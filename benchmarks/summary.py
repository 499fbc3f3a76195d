"""`python -m benchmarks summary PATH.json`: the README's summary of a results file, in Markdown.

Prints the machine, a table of ngcuda-against-baseline ratios (all measured in the same run) and
one sentence per fitted growth exponent, so that the README quotes numbers straight from the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def _span(values: Iterable[Optional[float]]) -> str:
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return "n/a"
    return _x(vs[0]) if len(vs) == 1 or vs[0] == vs[-1] else f"{_x(vs[0])} – {_x(vs[-1])}"


def _sizes(values: Sequence[Any]) -> str:
    def k(v: Any) -> str:
        return f"{v // 1000}k" if isinstance(v, int) and v >= 1000 and v % 1000 == 0 else str(v)

    return f"{k(values[0])}…{k(values[-1])}" if len(values) > 1 else k(values[0])


def factor_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    dense = s["dense_by_N"] + s["dense_by_d"]
    ns = sorted({r["N"] for r in dense})
    ds = sorted({r["d"] for r in dense})
    rows.append((f"`factor_update_` vs `cat([x, 1])` + `addmm_`, N = {_sizes(ns)}, d = {_sizes(ds)}",
                 _span(r["speedup_vs_torch"] for r in dense)))
    for r in s["sparse_real"]:
        if "skipped" in r:
            rows.append((f"`sparse_factor_update_`, {r['graph']}", f"skipped: {r['skipped']}"))
            continue
        ratio = f"{_x(r['speedup_vs_sparse_mm'])} / {_x(r['speedup_vs_scatter_add'])}"
        if "speedup_vs_torch_scatter" in r:
            ratio += f" / {_x(r['speedup_vs_torch_scatter'])} (torch_scatter)"
        if "ngcuda_peak_mib" in r:
            ratio += f"; peak {r['ngcuda_peak_mib']:.0f} MiB vs {r['sparse_mm_peak_mib']:.0f} MiB"
        rows.append((f"`sparse_factor_update_`, {r['graph']} ({r['N']} × {r['d']}, {r['nnz']} nnz) "
                     "vs `sparse.mm` / `scatter_add_`, each + `addmm_`", ratio))
    rand = s["sparse_random"]
    if rand:
        rows.append((f"`sparse_factor_update_`, random graphs N = {_sizes([r['N'] for r in rand])}, "
                     f"d = {rand[0]['d']}, vs `sparse.mm` / `scatter_add_`",
                     f"{_span(r['speedup_vs_sparse_mm'] for r in rand)} / "
                     f"{_span(r['speedup_vs_scatter_add'] for r in rand)}"))
    return rows


def eigh_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    by_n = s["by_n"]
    sizes = " / ".join(str(r["n"]) for r in by_n)
    batches = " / ".join(str(r["batch"]) for r in by_n)
    for mode in ("cold", "warm"):
        rows.append((f"`batched_eigh` {mode} vs stacked `torch.linalg.eigh`, n = {sizes} (batch {batches})",
                     " / ".join(_x(r[f"speedup_{mode}_vs_stacked"]) for r in by_n)))
    rows.append(("`batched_eigh` cold vs looped `torch.linalg.eigh`, same sizes",
                 " / ".join(_x(r["speedup_cold_vs_looped"]) for r in by_n)))
    worst = max(r["methods"]["ngcuda_cold"]["residual"] for r in by_n)
    worst_t = max(r["methods"]["torch_stacked"]["residual"] for r in by_n)
    orth = max(r["methods"]["ngcuda_cold"]["orthogonality"] for r in by_n)
    orth_t = max(r["methods"]["torch_stacked"]["orthogonality"] for r in by_n)
    rows.append(("`batched_eigh` accuracy, worst residual / orthogonality over all n (torch's)",
                 f"{worst:.1e} / {orth:.1e} ({worst_t:.1e} / {orth_t:.1e})"))
    b = s["by_batch"]
    rows.append((f"`batched_eigh` cold vs stacked, n = {s['config']['batch_sweep_n']}, batch "
                 + " / ".join(str(r["batch"]) for r in b), " / ".join(_x(r["speedup_cold_vs_stacked"]) for r in b)))
    return rows


def precondition_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    models = s["models"]
    sweep = s["sweep"]
    return [
        ("`precondition` grouped vs a per-layer loop: " + " / ".join(r["model"] for r in models),
         " / ".join(_x(r["speedup_vs_torch_loop"]) for r in models)),
        (f"`precondition`, {s['config']['sweep_layers']} square layers, d = {_sizes([r['d'] for r in sweep])}",
         _span(r["speedup_vs_torch_loop"] for r in sweep)),
    ]


def step_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for w in s["workloads"]:
        by = {r["variant"]: r for r in w["variants"]}
        ours = by.get("ngcuda-kfac")
        if ours is None:
            continue
        text = f"{ours['ms_per_step']:.1f} ms/step, {_x(ours['ratio_vs_adam'])} Adam's time"
        if ours.get("speedup_vs_torch_kfac") is not None:
            text += f"; {_x(ours['speedup_vs_torch_kfac'])} the speed of plain-PyTorch K-FAC"
        rows.append((f"optimizer step, {w['description']}, inverse every {w['steps_per_block']}", text))
    return rows


def growth_sentences(data: dict[str, Any]) -> list[str]:
    out = []
    b = data["benchmarks"]

    def fit(g: dict[str, Any]) -> str:
        return (f"{g['variable']}^{g['exponent_large']:.2f} for {g['variable']} ≥ {g['large_from']:g} "
                f"({g['exponent_all']:.2f} over all sizes)") if g.get("exponent_large") is not None \
            else f"{g['variable']}^{g['exponent_all']:.2f}"

    def verdict(*gs: dict[str, Any]) -> str:
        return "follows" if all(g.get("follows_expected") for g in gs) else "does not follow"

    if "factor" in b:
        f, cfg = b["factor"]["growth"], b["factor"]["config"]
        n, d = f["dense_time_vs_N"], f["dense_time_vs_d"]
        out.append(f"`factor_update_` time grows as {fit(n)} at d = {cfg['d_fixed']} and as {fit(d)} at "
                   f"N = {cfg['n_fixed']}: it {verdict(n, d)} O(N·d²) (exponents 1 and 2, ±0.25).")
        sp = f["sparse_time_vs_N"]
        out.append(f"`sparse_factor_update_` on random graphs grows as {fit(sp)} at d = {cfg['graph_d']} "
                   f"(expected 1 at fixed degree): it {verdict(sp)}.")
    if "eigh" in b:
        g = b["eigh"]["growth"]
        out.append(f"`batched_eigh` time per matrix grows as {fit(g['ngcuda_cold'])} cold and "
                   f"{fit(g['ngcuda_warm'])} warm; `torch.linalg.eigh` as {fit(g['torch_stacked'])}: "
                   f"ngcuda {verdict(g['ngcuda_cold'])} O(n³) (±0.25).")
    if "precondition" in b:
        g = b["precondition"]["growth"]["time_vs_d"]
        out.append(f"`precondition` on square layers grows as {fit(g)}: it {verdict(g)} O(d³).")
    return out


def markdown(data: dict[str, Any], path: str) -> str:
    env = data["environment"]
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    head = (f"### Microbenchmarks ({env['device']}, {env['cpu_model']}, {threads}, "
            f"torch {env['torch']}, commit {env['git_commit']}; `{path}`)")
    rows: list[tuple[str, str]] = []
    builders = {"factor": factor_rows, "eigh": eigh_rows, "precondition": precondition_rows, "step": step_rows}
    for name, build in builders.items():
        if name in data["benchmarks"]:
            rows += build(data["benchmarks"][name])
    ceil = data["ceilings"]
    lines = [head, "",
             f"Ceilings measured in the same run: {ceil['memory_bandwidth_gbs']:.1f} GB/s copy, "
             f"{ceil['matmul_gflops']:.0f} GFLOP/s float32 matmul. Load average "
             f"{env.get('load_average_start')} at the start, {env.get('load_average_end')} at the end; "
             f"{data['wall_seconds'] / 60:.1f} min in all. Ratios > 1: ngcuda is faster.", "",
             "| what | ngcuda vs baseline, same run |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "Growth (fitted log-log slopes, stored in the JSON under `growth`):", ""]
    lines += [f"- {s}" for s in growth_sentences(data)]
    if data.get("quick"):
        lines[1:1] = ["", "**A quick run** (tiny sizes, few repeats, to check the harness): these ratios and "
                      "growth fits are not measurements."]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    data = json.loads(Path(argv[0]).read_text())
    if "benchmarks" not in data:
        print(f"{argv[0]}: not a results file of this harness (no 'benchmarks' section)")
        return 2
    print(markdown(data, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
