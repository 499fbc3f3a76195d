"""Command line: `ngcuda train` (GNN node classification), `ngcuda train-ae` (MNIST autoencoder),
`ngcuda train-vae` (MNIST variational autoencoder) and `ngcuda bench` (the microbenchmarks of a source
checkout, as `python -m benchmarks`).

The training commands train the same model with several optimizers side by side over one or more seeds,
write metrics.json, metrics.csv and curves.png into --out, and print a results table. Examples:

    ngcuda train                                   # GCN on Cora, K-FAC vs Adam
    ngcuda train --dataset citeseer --optimizers kfac-adam,adam --seeds 10
    ngcuda train --dataset coauthor-cs --data-root shared/data/npz --model deep-gcn --layers 8
    ngcuda train-ae --optimizers kfac,adam,sgd --epochs 20
    torchrun --nproc_per_node 2 -m ngcuda train --distributed     # data parallel, 2 processes
    ngcuda train-vae --data-root shared/data/mnist --epochs 20
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data import GRAPH_DATASETS, NPZ_DATASETS, load_graph, load_mnist
from .models import GNN_MODELS
from .train.metrics import SELECTION_TEXT, SELECTIONS

DEFAULT_DEEP_LAYERS = 8


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def _unit_float(text: str) -> float:
    value = _nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _dropout(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text} (1 drops every unit)")
    return value


MAX_SEED = 2**32 - 1  # the samplers derive further seeds from it (seed * 1_000_003 + epoch) within 64 bits


def parse_seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '0,5,7' -> [0, 5, 7] (a list)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a comma list (0,5,7), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--seeds is empty")
    if len(values) == 1 and "," not in text:
        if not 1 <= values[0] <= 10_000:
            raise argparse.ArgumentTypeError(f"--seeds count must be at least 1 and at most 10000, got {values[0]}")
        return list(range(values[0]))
    if any(not 0 <= v <= MAX_SEED for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"--seeds list must hold distinct integers in 0..{MAX_SEED}, got {text!r}")
    return values


def _neighbors(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or any(v == 0 or v < -1 for v in values):
        raise argparse.ArgumentTypeError(f"neighbours per hop must be positive or -1, got {text!r}")
    return values


def _init_distributed(parser: argparse.ArgumentParser, device_name: str, timeout: float) -> tuple[int, int]:
    """Joins torchrun's process group (gloo on CPU, NCCL on CUDA); returns (rank, world size)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error("--distributed: run under torchrun (e.g. torchrun --nproc_per_node 2 -m ngcuda train "
                     "--distributed); RANK and WORLD_SIZE are not set")
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            parser.error(f"--distributed: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                         "device(s); start at most that many processes per node, or use --device cpu")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def _factor_structure(text: str) -> str | dict[str, str]:
    """'lowrank:64' -> 'lowrank:64'; 'conv1=diag,conv2=full' -> {'conv1': 'diag', 'conv2': 'full'}."""
    from .optim.structure import parse_structure

    def check(spec: str) -> str:
        if spec.strip().lower() != "auto":
            try:
                parse_structure(spec)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return spec.strip().lower()

    if "=" not in text:
        return check(text)
    out = {}
    for part in text.split(","):
        name, sep, spec = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected LAYER=STRUCTURE pairs, got {part!r}")
        out[name.strip()] = check(spec)
    return out


def _optimizers(text: str) -> list[str]:
    from .train.optimizers import parse_optimizers

    try:
        return parse_optimizers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _per_optimizer(convert):
    """argparse type: VALUE for every optimizer, or NAME=VALUE,... per optimizer (an unnamed VALUE in the list
    is the default for the others), e.g. --lr 0.01,kfac=0.05."""
    from .train.optimizers import parse_per_optimizer

    def parse(text: str):
        try:
            return parse_per_optimizer(text, convert)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = convert.__name__.lstrip("_")
    return parse


def _fisher(text: str) -> str:
    if text not in ("true", "empirical"):
        raise argparse.ArgumentTypeError(f"expected true or empirical, got {text!r}")
    return text


def _with_default(value, default):
    """A per-optimizer dict gets `default` for the optimizers it does not name."""
    if value is None:
        return default
    if isinstance(value, dict) and "*" not in value:
        return {"*": default, **value}
    return value


def _common(p: argparse.ArgumentParser, default_epochs: int, graphs: bool = False) -> None:
    """The options every training command shares; `graphs` adds the GNN-only K-FAC options."""
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="folder with the dataset files (default: the data shipped with ngcuda)")
    p.add_argument("--optimizers", type=_optimizers, default=None, metavar="LIST",
                   help="comma list of adam, sgd, kfac, kfac-adam, kfac-sgd "
                   "(default: train kfac,adam; train-ae kfac,adam,sgd; train-vae kfac,kfac-adam,adam)")
    p.add_argument("--seeds", type=parse_seeds, default=None, metavar="N|LIST",
                   help="number of seeds (3 means 0,1,2) or a comma list of seeds (default 1: seed 0)")
    p.add_argument("--epochs", type=_positive_int, default=default_epochs, help=f"default {default_epochs}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    g = p.add_argument_group(
        "optimizer hyperparameters (K-FAC options default to the task's KFAC_DEFAULTS in ngcuda.train.optimizers, "
        "then to ngcuda.KFAC's own)",
        "--lr to --fisher-type each take one VALUE for every optimizer, or a per-optimizer list NAME=VALUE,... "
        "where an unnamed VALUE is the default for the others: --lr 0.01,kfac=0.05 --damping kfac=0.01,kfac-adam=1; "
        "--factor-structure, --gcn-factoring, --adaptive-damping and --ekfac apply to every K-FAC variant")
    g.add_argument("--lr", type=_per_optimizer(_positive_float), default=None,
                   help="learning rate (default: per optimizer, see ngcuda.train.optimizers)")
    g.add_argument("--momentum", type=_per_optimizer(_unit_float), default=None,
                   help="SGD and K-FAC momentum (default 0.9; train-ae's and train-vae's kfac 0, see ngcuda.train.optimizers)")
    g.add_argument("--weight-decay", type=_per_optimizer(_nonneg_float), default=None,
                   help="L2 coefficient (default: train 5e-4, train-ae and train-vae 0)")
    g.add_argument("--damping", type=_per_optimizer(_positive_float), default=None, help="K-FAC Tikhonov damping")
    g.add_argument("--factor-decay", type=_per_optimizer(_unit_float), default=None,
                   help="K-FAC factor moving-average decay")
    g.add_argument("--factor-every", type=_per_optimizer(_positive_int), default=None,
                   help="update the Kronecker factors every N steps (KFAC default 1)")
    g.add_argument("--inverse-every", type=_per_optimizer(_positive_int), default=None,
                   help="K-FAC: steps between eigendecompositions")
    g.add_argument("--kl-clip", type=_per_optimizer(_nonneg_float), default=None,
                   help="K-FAC KL clipping bound; 0 turns clipping off (as Izadi et al.)")
    g.add_argument("--fisher-type", type=_per_optimizer(_fisher), default=None, metavar="{true,empirical}",
                   help="K-FAC Fisher: true (targets sampled from the model, KFAC default) or empirical "
                   "(the loss gradients, as Izadi et al.)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's own choice)")
    g.add_argument("--factor-structure", type=_factor_structure, default=None, metavar="S",
                   help="K-FAC input-factor structure of every layer: auto (default), full, block:K, "
                   "lowrank:R or diag; or per layer: conv1=lowrank:64,conv2=full (others auto)")
    if graphs:
        g.add_argument("--gcn-factoring", choices=("aggregated", "input"), default=None,
                       help="K-FAC factors of a GCNConv: aggregated (default; A from ÂH and G at Z = ÂHW + b, "
                       "as Izadi et al.) or input (its Linear alone: A from H, G at HW; layers conv1.lin, ...)")
    g.add_argument("--adaptive-damping", action="store_true",
                   help="K-FAC variants: adapt the damping every 5 steps by the Levenberg-Marquardt rule "
                   "(Martens & Grosse 2015), at the cost of one more forward pass on those steps")
    g.add_argument("--ekfac", action="store_true",
                   help="K-FAC variants: eigenvalue-corrected K-FAC (George et al. 2018)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default runs/<timestamp>/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngcuda", description="K-FAC natural-gradient training of graph neural networks and MLPs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="node classification with a GNN, optimizers side by side",
                       description="Train a GNN for node classification with several optimizers side by side.")
    t.add_argument("--dataset", choices=GRAPH_DATASETS, default="cora", help="default cora")
    t.add_argument("--split", choices=("public", "full", "random"), default=None,
                   help="Planetoid: public (default), full or random; npz graphs: random (20/30 per class)")
    t.add_argument("--model", choices=GNN_MODELS, default="gcn", help="default gcn")
    t.add_argument("--layers", type=_positive_int, default=None,
                   help=f"deep-gcn: number of GCN layers (default {DEFAULT_DEEP_LAYERS})")
    t.add_argument("--skip", action="store_true", help="deep-gcn: residual connections")
    t.add_argument("--hidden", type=_positive_int, default=16, help="hidden width (default 16)")
    t.add_argument("--dropout", type=_dropout, default=0.5, help="in [0, 1), default 0.5")
    t.add_argument("--pseudo-label-gamma", type=_nonneg_float, default=None, metavar="GAMMA",
                   help="add (t/T)^GAMMA x cross-entropy of unlabelled nodes against their argmax prediction")
    t.add_argument("--no-normalize-features", dest="normalize_features", action="store_false",
                   help="keep raw features (default: row-normalise, as GCN does)")
    t.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="mini-batch training: B training (seed) nodes per NeighborLoader batch (default: full batch)")
    t.add_argument("--num-neighbors", type=_neighbors, default=None, metavar="K1,K2",
                   help="mini-batch: neighbours sampled per hop, -1 for all (default 10,10)")
    t.add_argument("--distributed", action="store_true",
                   help="data parallel over the processes of torchrun (gloo on CPU, NCCL on GPU): each rank "
                   "takes its share of the training nodes (full batch) or of the batches")
    t.add_argument("--dist-timeout", type=_positive_float, default=300.0, metavar="S",
                   help="--distributed: seconds a rank waits for the others before failing (default 300)")
    t.add_argument("--no-input-dropout", dest="input_dropout", action="store_false",
                   help="no dropout on the input features (Izadi et al.'s GCN; K-FAC then computes the first "
                   "layer's input factor once); default: dropout on the input too, as Kipf & Welling")
    t.add_argument("--fisher-nodes", choices=("loss", "all"), default="loss",
                   help="K-FAC's true Fisher over the loss's nodes (loss, default: the labelled ones, plus "
                   "the pseudo-labelled ones at their weight) or over all nodes, labels sampled from the "
                   "model (all; full batch only)")
    t.add_argument("--select", choices=SELECTIONS, default="val-acc",
                   help="model selection: report test accuracy at the epoch of best validation accuracy "
                   "(val-acc, default) or of lowest validation loss (val-loss, Izadi et al.)")
    _common(t, default_epochs=200, graphs=True)
    t.set_defaults(_handler=cmd_train, _parser=t)

    a = sub.add_parser("train-ae", help="MNIST deep autoencoder, optimizers side by side",
                       description="Train the 784-1000-500-250-30 MNIST autoencoder with several optimizers. "
                       "Without --data-root the shipped 10k MNIST test images are used: 8000 train, 2000 test.")
    a.add_argument("--init", choices=("default", "sparse"), default="sparse",
                   help="weight init: the sparse init of Martens & Grosse (sparse, default: 15 N(0,1) "
                   "weights per unit, zero biases), or torch's (default)")
    _mnist_options(a)
    _common(a, default_epochs=30)
    a.set_defaults(_handler=cmd_train_ae, _parser=a)

    v = sub.add_parser("train-vae", help="MNIST variational autoencoder, optimizers side by side",
                       description="Train a VAE (encoder 784-512-256 to mu and log sigma^2, mirrored Bernoulli "
                       "decoder) on MNIST by minimising the negative ELBO, with several optimizers. Data as "
                       "train-ae: without --data-root the shipped 10k MNIST test images, 8000 train / 2000 test.")
    v.add_argument("--latent", type=_positive_int, default=20, help="latent dimensions (default 20)")
    v.add_argument("--no-kl-curvature", dest="kl_curvature", action="store_false",
                   help="K-FAC: leave the KL term's Gauss-Newton curvature out of the encoder's Fisher (ablation)")
    v.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="report test metrics after this much training time too (default: the shortest run's time)")
    _mnist_options(v)
    _common(v, default_epochs=10)
    v.set_defaults(_handler=cmd_train_vae, _parser=v)

    # listed for `ngcuda --help`; main() hands everything after `bench` to the benchmarks' parser
    sub.add_parser("bench", add_help=False, help="microbenchmarks, as python -m benchmarks (source checkout)")
    return parser


def _mnist_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="default 1000")
    p.add_argument("--train-size", type=_positive_int, default=None, metavar="N",
                   help="use only the first N training images (quick runs)")


def cmd_bench(argv: Sequence[str]) -> int:
    """`ngcuda bench ...` is `python -m benchmarks ...`. The benchmarks are not installed with the
    package, so they are looked up next to it (an editable install or a checkout)."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench = importlib.import_module("benchmarks.cli")
    except ImportError:
        print("ngcuda bench: the benchmarks/ folder is not here; run it from a source checkout "
              "(pip install -e .) or use `python -m benchmarks` there", file=sys.stderr)
        return 2
    return bench.main(list(argv))


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _out_dir(parser: argparse.ArgumentParser, out: Path | None) -> Path:
    """Creates the output folder before any training, so that a bad --out fails at once rather than
    after the last epoch. The default runs/<timestamp>[-k]/ is claimed with an exclusive mkdir, so
    runs started in the same second never share one."""
    if out is None:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, k = base, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                return path
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")
            except OSError as e:
                parser.error(f"cannot create the output folder {path}: {e.strerror or e}")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out}: cannot create it ({e.strerror or e})")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: the folder is not writable")
    return out


def _check_kfac_options(parser: argparse.ArgumentParser, optimizers: list[str], opt_cfg,
                        build_model: Callable[[], torch.nn.Module]) -> None:
    """Builds each K-FAC optimizer once on a throwaway model (on the CPU), so that options only
    ngcuda.KFAC can check (layer names in --factor-structure, ...) fail before any run, not after
    the runs of the optimizers listed before it."""
    from .train import make_optimizer

    for name in optimizers:
        if name.startswith("kfac"):
            try:
                make_optimizer(name, build_model(), opt_cfg)
            except (ValueError, TypeError) as e:
                parser.error(f"--optimizers {name}: {e}")


def _warn_unused_kfac_options(args: argparse.Namespace, names: list[str]) -> None:
    """A K-FAC option given when no K-FAC variant runs does nothing: say so rather than let a user
    believe it was applied."""
    from .train.optimizers import KFAC_OPTIONS, KFAC_SWITCHES

    if any(n.startswith("kfac") for n in names):
        return
    given = [f"--{k.replace('_', '-')}" for k in KFAC_OPTIONS + KFAC_SWITCHES
             if getattr(args, k, None) not in (None, False)]
    if given:
        print(f"ngcuda {args.command}: note: {', '.join(given)} apply to the K-FAC variants only, and "
              f"none is in --optimizers {','.join(names)}", file=sys.stderr)


def _warn_unlisted_optimizer_values(args: argparse.Namespace, names: list[str]) -> None:
    """A per-optimizer value (``--lr kfac-sgd=0.1``) for an optimizer not in --optimizers does
    nothing, most often a typo of the one meant: say so."""
    from .train.optimizers import PER_OPTIMIZER_FIELDS

    for field in PER_OPTIMIZER_FIELDS:
        value = getattr(args, field, None)
        if isinstance(value, dict):
            unused = [k for k in value if k != "*" and k not in names]
            if unused:
                print(f"ngcuda {args.command}: note: --{field.replace('_', '-')} gives a value for "
                      f"{', '.join(unused)}, not in --optimizers {','.join(names)}; it is unused",
                      file=sys.stderr)


def _warn_about_options(names: list[str], args: argparse.Namespace) -> None:
    _warn_unused_kfac_options(args, names)
    _warn_unlisted_optimizer_values(args, names)


def _progress(total: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=quiet, unit="epoch", dynamic_ncols=True, leave=False)


def _config(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


def _optimizer_settings(optimizers: list[str], opt_cfg) -> dict[str, dict]:
    """Each optimizer's hyperparameters as used: the command line's, else the task's defaults, else
    ngcuda.KFAC's own (for metrics.json, so that a run can be repeated without knowing the defaults)."""
    import inspect

    import ngcuda

    from .train.optimizers import KFAC_OPTIONS, KFAC_SWITCHES

    kfac_defaults = {k: p.default for k, p in inspect.signature(ngcuda.KFAC).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    out = {}
    for name in optimizers:
        cfg = opt_cfg.for_optimizer(name)
        row: dict = {"lr": opt_cfg.lr_for(name), "weight_decay": cfg.weight_decay}
        if name in ("sgd", "kfac", "kfac-sgd"):  # Adam and Adam-KFAC have no momentum setting
            row["momentum"] = cfg.momentum
        if name.startswith("kfac"):
            for key in KFAC_OPTIONS:
                value = cfg.kfac_option(key)
                row[key] = kfac_defaults.get(key) if value is None else value
            row.update({key: getattr(cfg, key) for key in KFAC_SWITCHES})
        out[name] = row
    return out


def _versions() -> dict:
    from ._extension import build_info

    return {"torch": torch.__version__, "build": build_info()}


def _optimizer_config(args: argparse.Namespace, task: str, weight_decay: float):
    """The OptimizerConfig of the common options; `weight_decay` applies when --weight-decay is not given."""
    from .train import OptimizerConfig

    return OptimizerConfig(
        lr=args.lr, momentum=args.momentum, weight_decay=_with_default(args.weight_decay, weight_decay),
        damping=args.damping, factor_decay=args.factor_decay, factor_every=args.factor_every,
        inverse_every=args.inverse_every, kl_clip=args.kl_clip, fisher_type=args.fisher_type,
        factor_structure=args.factor_structure, gcn_factoring=getattr(args, "gcn_factoring", None),
        adaptive_damping=args.adaptive_damping, ekfac=args.ekfac, task=task,
        dist_timeout=args.dist_timeout if getattr(args, "distributed", False) else None,
    )


def _side_by_side(
    optimizers: list[str],
    seeds: list[int],
    args: argparse.Namespace,
    train_one: Callable[[str, int, Callable[[dict], None]], dict],
    postfix: Callable[[dict], dict[str, str]],
    on_run: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Runs train_one(name, seed, on_epoch) for every seed and optimizer under one progress bar
    (showing postfix(row) after each epoch), calling on_run(runs so far) after each; returns the runs
    in that order."""
    runs = []
    bar = _progress(len(optimizers) * len(seeds) * args.epochs, args.quiet)
    try:
        for seed in seeds:
            for name in optimizers:
                bar.set_description(f"{name} seed {seed}")
                bar.set_postfix_str("", refresh=False)  # the previous run's numbers are not this one's

                def tick(row: dict) -> None:
                    bar.update(1)
                    bar.set_postfix(**postfix(row), refresh=False)

                runs.append(train_one(name, seed, tick))
                if on_run is not None:
                    on_run(runs)
    finally:
        bar.close()
    return runs


@dataclass
class _MnistJob:
    """What train-ae and train-vae share: optimizers, seeds, device and the images."""

    optimizers: list[str]
    seeds: list[int]
    device: torch.device
    x_train: torch.Tensor
    x_test: torch.Tensor
    source: str

    def payload(self, args: argparse.Namespace, opt_cfg, summary: dict | None, runs: list[dict],
                **extra) -> dict:
        """The metrics.json contents; `summary` None while runs are still to come."""
        config = _config(args) | {"optimizers": self.optimizers, "seeds": self.seeds, "data": self.source}
        return {"command": args.command, "complete": summary is not None, "config": config,
                "optimizer_settings": _optimizer_settings(self.optimizers, opt_cfg), "ngcuda": _versions(),
                "device": str(self.device), **extra, "summary": summary, "runs": runs}


def _mnist_job(parser: argparse.ArgumentParser, args: argparse.Namespace, default_optimizers: list[str]
               ) -> _MnistJob | None:
    """Checks the options and reads MNIST as train-ae and train-vae do: --data-root's 60k/10k files, or the
    shipped 10k split 8000/2000; --train-size keeps the first N. None (after a message) when data is missing."""
    optimizers = args.optimizers or default_optimizers
    _warn_about_options(optimizers, args)
    device = _device(parser, args.device)
    try:
        x_train, _ = load_mnist(args.data_root, train=True)
        x_test, _ = load_mnist(args.data_root, train=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"ngcuda {args.command}: error: {e}", file=sys.stderr)
        return None
    if args.train_size is not None:
        x_train = x_train[: args.train_size]
    source = "shipped 10k test set (8000/2000)" if args.data_root is None else str(args.data_root)
    if not args.quiet:
        print(f"MNIST from {source}: {x_train.shape[0]} train, {x_test.shape[0]} test images; "
              f"batch {args.batch_size}; device {device}", flush=True)
    return _MnistJob(optimizers, args.seeds or [0], device, x_train, x_test, source)


def cmd_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.model != "deep-gcn" and args.layers is not None:
        parser.error(f"--layers applies to --model deep-gcn only (got --model {args.model})")
    if args.model != "deep-gcn" and args.skip:
        parser.error(f"--skip applies to --model deep-gcn only (got --model {args.model})")
    if args.dataset in NPZ_DATASETS and args.split not in (None, "random"):
        parser.error(f"--split {args.split}: {args.dataset} has only the random split (20/30 per class)")
    if args.distributed and args.pseudo_label_gamma is not None:
        parser.error("--pseudo-label-gamma is not supported with --distributed")
    if args.batch_size and args.pseudo_label_gamma is not None:
        parser.error("--pseudo-label-gamma needs full-batch training (not --batch-size): the pseudo-labels "
                     "are taken over every unlabelled node each epoch")
    if args.num_neighbors is not None and not args.batch_size:
        parser.error("--num-neighbors applies to mini-batch training only (give --batch-size)")
    structures = args.factor_structure if isinstance(args.factor_structure, dict) else {"*": args.factor_structure}
    if args.distributed and any(v not in (None, "auto", "full") for v in structures.values()):
        parser.error("--factor-structure: distributed runs use full factors only (auto or full)")
    if args.fisher_nodes == "all" and (args.distributed or args.batch_size):
        parser.error("--fisher-nodes all needs a full-batch, single-process run "
                     "(not --distributed or --batch-size)")
    for flag in ("adaptive_damping", "ekfac"):
        if args.distributed and getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} is not supported with --distributed")
    optimizers = args.optimizers or ["kfac", "adam"]
    seeds = args.seeds or [0]
    _warn_about_options(optimizers, args)
    _device(parser, args.device)
    try:
        with warnings.catch_warnings():  # torch_geometric's own use of torch.jit.script, not ours to fix
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            import torch_geometric  # noqa: F401
    except ImportError:
        print("ngcuda train: error: the GNN models need torch_geometric: pip install torch-geometric",
              file=sys.stderr)
        return 1
    rank, world = _init_distributed(parser, args.device, args.dist_timeout) if args.distributed else (0, 1)
    try:
        return _train(parser, args, optimizers, seeds, rank, world)
    finally:
        if args.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, optimizers: list[str], seeds: list[int],
           rank: int, world: int) -> int:
    from .models import build_gnn
    from .train import NodeConfig, summarise_node_runs, train_node_classifier, write_metrics
    from .train.metrics import node_table
    from .train.plot import plot_runs

    device = _device(parser, args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if rank != 0:
        args.quiet = True  # rank 0 reports and writes
    layers = args.layers or (DEFAULT_DEEP_LAYERS if args.model == "deep-gcn" else 2)
    if args.model == "deep-gcn" and layers < 2:
        parser.error(f"--layers must be at least 2, got {layers}")
    cfg = NodeConfig(
        model=args.model, hidden=args.hidden, dropout=args.dropout, layers=layers, skip=args.skip,
        epochs=args.epochs, pseudo_label_gamma=args.pseudo_label_gamma, normalize_features=args.normalize_features,
        batch_size=args.batch_size, num_neighbors=args.num_neighbors or (10, 10),
        input_dropout=args.input_dropout, fisher_nodes=args.fisher_nodes,
    )
    opt_cfg = _optimizer_config(args, "gnn", weight_decay=5e-4)
    if args.fisher_nodes == "all":
        empirical = [n for n in optimizers if n.startswith("kfac")
                     and opt_cfg.for_optimizer(n).kfac_option("fisher_type") == "empirical"]
        if empirical:
            parser.error(f"--fisher-nodes all needs the true Fisher; {','.join(empirical)} use the empirical "
                         "one (see --fisher-type)")
    split = args.split or ("random" if args.dataset in NPZ_DATASETS else "public")
    try:
        if split == "random":  # one split per seed
            graphs = {s: load_graph(args.dataset, args.data_root, split, seed=s) for s in seeds}
        else:
            g = load_graph(args.dataset, args.data_root, split)
            graphs = {s: g for s in seeds}
    except (FileNotFoundError, ValueError) as e:
        print(f"ngcuda train: error: {e}", file=sys.stderr)
        return 1
    g0 = graphs[seeds[0]]
    _check_kfac_options(parser, optimizers, opt_cfg, lambda: build_gnn(
        args.model, g0.num_features, g0.num_classes, args.hidden, args.dropout, layers, args.skip,
        input_dropout=args.input_dropout))
    out = _out_dir(parser, args.out) if rank == 0 else None
    if not args.quiet:
        print(
            f"{args.dataset}: {g0.num_nodes} nodes, {g0.num_edges} directed edges, {g0.num_features} features, "
            f"{g0.num_classes} classes; split {split} {int(g0.train_mask.sum())}/{int(g0.val_mask.sum())}/"
            f"{int(g0.test_mask.sum())}; model {args.model}; device {device}"
            + (f"; {world} processes" if world > 1 else "")
            + (f"; mini-batches of {args.batch_size}" if args.batch_size else ""),
            flush=True,
        )

    def payload(runs: list[dict], complete: bool) -> dict:
        return {
            "command": "train",
            "complete": complete,
            "world_size": world,
            "config": _config(args) | {"optimizers": optimizers, "seeds": seeds, "split": split, "layers": layers},
            "optimizer_settings": _optimizer_settings(optimizers, opt_cfg),
            "ngcuda": _versions(),
            "device": str(device),
            "dataset": {
                "name": g0.name, "nodes": g0.num_nodes, "edges": g0.num_edges, "features": g0.num_features,
                "classes": g0.num_classes, "train": int(g0.train_mask.sum()), "val": int(g0.val_mask.sum()),
                "test": int(g0.test_mask.sum()),
            },
            "selection": SELECTION_TEXT[args.select],
            "summary": summarise_node_runs(runs, args.select) if complete else None,
            "runs": runs,
        }

    runs = _side_by_side(
        optimizers, seeds, args,
        lambda name, seed, tick: train_node_classifier(graphs[seed], name, seed, cfg, opt_cfg, device, tick),
        lambda row: {"loss": f"{row['train_loss']:.3f}", "val": f"{row['val_acc']:.3f}"},
        None if out is None else lambda done: write_metrics(out, payload(done, complete=False)),
    )
    if rank != 0:
        return 0
    final = payload(runs, complete=True)
    json_path, csv_path = write_metrics(out, final)
    png = plot_runs(
        runs, out / "curves.png",
        [("val_acc", "validation accuracy", False), ("train_loss", "training loss", True)],
        f"{args.model} on {args.dataset} ({split} split), mean over {len(seeds)} seed(s)",
    )
    print(node_table(final["summary"]))
    print(f"wrote {json_path}, {csv_path}, {png}")
    return 0


def cmd_train_ae(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .models import Autoencoder
    from .train import AEConfig, summarise_ae_runs, train_autoencoder, write_metrics
    from .train.metrics import ae_table
    from .train.plot import plot_runs

    job = _mnist_job(parser, args, ["kfac", "adam", "sgd"])
    if job is None:
        return 1
    cfg = AEConfig(epochs=args.epochs, batch_size=args.batch_size, init=args.init)
    opt_cfg = _optimizer_config(args, "ae", weight_decay=0.0)
    _check_kfac_options(parser, job.optimizers, opt_cfg, lambda: Autoencoder(init=args.init))
    out = _out_dir(parser, args.out)
    runs = _side_by_side(
        job.optimizers, job.seeds, args,
        lambda name, seed, tick: train_autoencoder(job.x_train, job.x_test, name, seed, cfg, opt_cfg, job.device,
                                                   tick),
        lambda row: {"ce": f"{row['train_bce']:.1f}", "se": f"{row['train_sq_err']:.2f}"},
        lambda done: write_metrics(out, job.payload(args, opt_cfg, None, done)),
    )
    summary = summarise_ae_runs(runs)
    json_path, csv_path = write_metrics(out, job.payload(args, opt_cfg, summary, runs))
    png = plot_runs(
        runs, out / "curves.png",
        [("train_bce", "train cross-entropy / image", True), ("train_sq_err", "train squared error / image", True)],
        f"MNIST autoencoder, mean over {len(job.seeds)} seed(s)",
    )
    print(ae_table(summary))
    print(f"wrote {json_path}, {csv_path}, {png}")
    return 0


def cmd_train_vae(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .models import VAE
    from .train import VAEConfig, summarise_vae_runs, train_vae, write_metrics
    from .train.metrics import vae_table
    from .train.plot import plot_runs, plot_vae_grid
    from .train.vae import vae_images

    job = _mnist_job(parser, args, ["kfac", "kfac-adam", "adam"])
    if job is None:
        return 1
    cfg = VAEConfig(epochs=args.epochs, batch_size=args.batch_size, latent=args.latent,
                    kl_curvature=args.kl_curvature)
    opt_cfg = _optimizer_config(args, "vae", weight_decay=0.0)
    _check_kfac_options(parser, job.optimizers, opt_cfg, lambda: VAE(latent=args.latent))
    out = _out_dir(parser, args.out)
    grids = []

    def train_one(name: str, seed: int, tick: Callable[[dict], None]) -> dict:
        run, model = train_vae(job.x_train, job.x_test, name, seed, cfg, opt_cfg, job.device, tick)
        if seed == job.seeds[0]:  # one grid per optimizer, from its first seed
            orig, rec, drawn = vae_images(model, job.x_test[:20].to(job.device), samples=30, seed=seed)
            grids.append(plot_vae_grid(orig, rec, drawn, out / f"grid-{name}.png",
                                       f"VAE, {name}, seed {seed}, after {args.epochs} epochs"))
        return run

    metrics = "per image, one z sample per image from a fixed noise seed: neg_elbo = bce + kl"
    runs = _side_by_side(
        job.optimizers, job.seeds, args, train_one,
        lambda row: {"train_neg_elbo": f"{row['train_neg_elbo']:.1f}", "test_ce": f"{row['test_bce']:.1f}"},
        lambda done: write_metrics(out, job.payload(args, opt_cfg, None, done, metrics=metrics)),
    )
    summary = summarise_vae_runs(runs, args.time_budget)
    payload = job.payload(args, opt_cfg, summary, runs, metrics=metrics)
    json_path, csv_path = write_metrics(out, payload)
    png = plot_runs(
        runs, out / "curves.png",
        [("test_neg_elbo", "test negative ELBO / image", False),
         ("test_bce", "test reconstruction CE / image", False),
         ("test_kl", "test KL / image", False)],
        f"MNIST VAE (latent {args.latent}), mean over {len(job.seeds)} seed(s)",
    )
    print(vae_table(summary))
    print(f"wrote {json_path}, {csv_path}, {png}, {', '.join(str(g) for g in grids)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ngcuda` command. Returns the exit status (argparse errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args._handler(args._parser, args)


if __name__ == "__main__":
    sys.exit(main())
