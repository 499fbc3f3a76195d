"""Validation only (seeds 100-102): standalone kfac with pseudo-labels (gamma 3, no input dropout,
full factors, true Fisher) with Izadi et al.'s Fisher row weights (1 per training node, lambda per
other node) against the loss's own per-node weights (1/|train| and lambda/|rest|).
usage (repository root): PYTHONPATH=. python docs/results/sweeps/pl_fisher_weights.py cora|citeseer"""
import json, sys, torch
sys.path.insert(0, "docs/results/sweeps")
import sweep
import ngcuda.train.node as node
from ngcuda.data import load_graph
torch.set_num_threads(1)
ds = sys.argv[1]
orig = node.fisher_row_weights
def exact(train_mask, lam, fisher_nodes):
    if fisher_nodes != "loss":
        return orig(train_mask, lam, fisher_nodes)
    t = train_mask.to(torch.float32)
    w = t / t.sum()
    if lam > 0:
        r = (~train_mask).to(torch.float32)
        w = w + lam * r / r.sum()
    return w
graph = load_graph(ds, None, "public")
OFTEN = dict(factor_every=10, inverse_every=10, factor_decay=0.95)
kfac = dict(optimizer="kfac", damping=1e-2, lr=0.05, kl_clip=1e-3, fisher_type="true", **OFTEN)
for factoring in ("input", "aggregated"):
    for mode in ("izadi", "exact"):
        node.fisher_row_weights = exact if mode == "exact" else orig
        cfg = dict(input_dropout=False, pseudo_label_gamma=3.0, gcn_factoring=factoring, factor_structure="full", **kfac)
        e = sweep.run_one(graph, cfg)
        a = sweep.aggregate(e)
        rec = {"dataset": ds, "mode": mode, "factoring": factoring, "val_acc": a["val_acc@acc"][0], "val_loss": a["val_loss@loss"][0],
               "per_seed": [r["val_acc@acc"] for r in e["runs"]], "sec": e["seconds"], "config": cfg, "runs": e["runs"]}
        print(json.dumps({k: v for k, v in rec.items() if k != "runs"}), flush=True)
        with open("docs/results/sweeps/pl-fisher-weights.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")
