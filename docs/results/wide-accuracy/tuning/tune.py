"""Validation-only tuning of kfac (auto structure): prints the highest validation accuracy and the lowest validation loss per config (mean over seeds),
never test accuracy. usage (from the repository root): PYTHONPATH=. python docs/results/wide-accuracy/tuning/tune.py DATASET SEEDS CONFIGS_JSON OUTFILE
Configs are OptimizerConfig fields (optimizer defaults to kfac), weight decay 5e-4 unless given,
plus "kfac": {ngcuda.KFAC keyword: value} for options the main job does not expose (e.g. decoupled_weight_decay),
and "node": {NodeConfig field: value} (e.g. fisher_nodes), momentum 0.9, one torch thread."""
import functools, json, sys, time, torch
import ngcuda
from ngcuda import KFAC
from ngcuda.data import load_graph, NPZ_DATASETS
from ngcuda.train import NodeConfig, OptimizerConfig, train_node_classifier
from ngcuda.train.metrics import best_epoch, mean_std
torch.set_num_threads(1)
ds, seeds, configs, outfile = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], json.loads(sys.argv[3]), sys.argv[4]
root = "../shared/data/npz" if ds in NPZ_DATASETS else None
split = "random" if ds in NPZ_DATASETS else "public"
graphs = {s: load_graph(ds, root, split, seed=s) for s in seeds}
for c in configs:
    name = c.pop("optimizer", "kfac")
    extra = c.pop("kfac", {})
    node = c.pop("node", {})
    cfg = NodeConfig(**node)  # the main job's GCN, 200 epochs, input dropout, unless `node` says otherwise
    ngcuda.KFAC = functools.partial(KFAC, **extra)  # the main job builds its optimizer through ngcuda.KFAC
    vals, maxv, vloss = [], [], []
    t0 = time.time()
    for s in seeds:
        oc = OptimizerConfig(**{"weight_decay": 5e-4, "task": "gnn", **c})
        run = train_node_classifier(graphs[s], name, s, cfg, oc, torch.device("cpu"))
        h = run["history"]
        vals.append(best_epoch(h, "val-acc")["val_acc"]); vloss.append(min(r["val_loss"] for r in h))
    rec = {"dataset": ds, "optimizer": name, **c, **({"kfac": extra} if extra else {}), **({"node": node} if node else {}), "seeds": seeds, "max_val_acc": vals,
           "max_val_acc_mean": mean_std(vals)[0], "min_val_loss_mean": mean_std(vloss)[0], "sec": time.time() - t0}
    print(json.dumps(rec), flush=True)
    with open(outfile, "a") as f:
        f.write(json.dumps(rec) + "\n")
