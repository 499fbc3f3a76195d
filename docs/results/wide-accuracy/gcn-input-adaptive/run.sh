# issue #10, tuning round 4: input factoring with Levenberg-Marquardt damping, the wide-accuracy protocol (one process per seed)
set -e  # from the repository root: bash docs/results/wide-accuracy/gcn-input-adaptive/run.sh cora citeseer coauthor-cs coauthor-physics
for ds in "$@"; do
  case $ds in cora|citeseer) seeds="0 1 2 3 4 5 6 7 8 9"; extra="";;
              *) seeds="0 1 2 3 4"; extra="--data-root ../shared/data/npz --split random";; esac
  for s in $seeds; do
    OMP_NUM_THREADS=1 .venv/bin/ngcuda train --dataset $ds $extra --seeds "$s," --optimizers kfac,adam --epochs 200 \
      --threads 1 --quiet --gcn-factoring input --adaptive-damping --out runs/acc-lm/$ds/seed$s
  done
  .venv/bin/python docs/results/merge_runs.py runs/acc-lm/merged/$ds runs/acc-lm/$ds/seed*/metrics.json
  .venv/bin/python docs/results/summarise_run.py runs/acc-lm/merged/$ds/metrics.json runs/acc-lm/merged/$ds/summary.json
done
