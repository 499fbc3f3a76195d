"""Validation-only check of a learning-rate decay (tune.py's protocol, no test accuracy): kfac gets a
callable lr (ngcuda.KFAC evaluates it per step), Adam's lr is scaled before each step. "schedule":
constant | cosine (to 0 at epoch 200) | cosine10 (to 10 %) | step (x0.1 at epoch 100).
usage (repository root): PYTHONPATH=. python docs/results/wide-accuracy/tuning/tune_schedule.py DATASET SEEDS CONFIGS_JSON OUTFILE"""
import json, math, sys, time, torch
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
T = 200
def factor(t, kind):
    if kind == "cosine": return 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
    if kind == "cosine10": return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
    if kind == "step": return 0.1 if t >= T // 2 else 1.0
    return 1.0
Adam0 = torch.optim.Adam
for c in configs:
    name = c.pop("optimizer", "kfac"); sched = c.pop("schedule", "constant")
    def kfac(model, lr=None, **kw):
        return KFAC(model, lr=(lambda t, lr=lr: lr * factor(t, sched)), **kw)
    class Adam(Adam0):
        def step(self, closure=None):
            k = self.__dict__.setdefault("_k", 0)
            for g in self.param_groups:
                g.setdefault("lr0", g["lr"]); g["lr"] = g["lr0"] * factor(k, sched)
            self._k = k + 1
            return super().step(closure)
    ngcuda.KFAC = kfac; torch.optim.Adam = Adam
    vals, vloss = [], []
    t0 = time.time()
    for s in seeds:
        oc = OptimizerConfig(**{"weight_decay": 5e-4, "task": "gnn", **c})
        run = train_node_classifier(graphs[s], name, s, NodeConfig(), oc, torch.device("cpu"))
        h = run["history"]
        vals.append(best_epoch(h, "val-acc")["val_acc"]); vloss.append(min(r["val_loss"] for r in h))
    rec = {"dataset": ds, "optimizer": name, "schedule": sched, **c, "seeds": seeds, "max_val_acc": vals,
           "max_val_acc_mean": mean_std(vals)[0], "min_val_loss_mean": mean_std(vloss)[0], "sec": time.time() - t0}
    print(json.dumps(rec), flush=True)
    with open(outfile, "a") as f: f.write(json.dumps(rec) + "\n")
