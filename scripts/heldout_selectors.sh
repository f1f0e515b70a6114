#!/usr/bin/env bash
# Held-out selector comparison on the embedded pair (issue 12; the paper's Table 2/3 question at demo
# scale): train the student with each selector at a 5% budget on one half of the 300 demo contexts,
# then measure the checkpoint gain (`probe --student-after`) on held-out contexts of the other half.
#
#   bash scripts/heldout_selectors.sh OUT [HELDOUT_N] [THREADS]
#
# The split is a seeded permutation of the demo records (seed 0): the first 150 train, the next
# HELDOUT_N (default 100) are scored. Every run is a normal teachdiag run folder under OUT;
# `python -m teachdiag.analysis.heldout OUT` compares them.
set -euo pipefail
OUT=${1:?usage: heldout_selectors.sh OUT [HELDOUT_N] [THREADS]}
N=${2:-100}
THREADS=${3:-1}
SELECTORS=${SELECTORS:-"teachability fkl entropy tip random"}
# the selection rule data/demo_heldout was trained with (teachdiag 0.2's); RULE="released topk" for
# the released TA-OPD rule that `teachdiag train` uses by default
read -r SELECT_RULE SELECT_SIGNALS <<< "${RULE:-paper_text full}"
mkdir -p "$OUT"
python - "$OUT" "$N" <<'PY'
import json, sys
import numpy as np
from teachdiag.demo import DEMO_ROLLOUTS
out, n = sys.argv[1], int(sys.argv[2])
lines = open(DEMO_ROLLOUTS, encoding="utf-8").read().splitlines()
order = np.random.default_rng(0).permutation(len(lines))
half = len(lines) // 2
for name, idx in (("train", order[:half]), ("heldout", order[half:half + n])):
    with open(f"{out}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(lines[i] + "\n" for i in sorted(idx))
PY
for s in $SELECTORS; do
  # done = train.json says all 10 steps (the trainer also saves a model before its last step)
  python -c "import json,sys; sys.exit(json.load(open('$OUT/train_$s/train.json')).get('steps_done') != 10)" 2>/dev/null \
    || teachdiag train --teacher smollm2-135m --student smollm2-135m-pruned --contexts "$OUT/train.jsonl" --select "$s" \
      --budget 0.05 --steps 10 --batch 8 --lr 1e-6 --select-rule "$SELECT_RULE" --select-signals "$SELECT_SIGNALS" \
      --threads "$THREADS" --out "$OUT/train_$s" --overwrite
  [ -f "$OUT/gain_$s/tokens.csv" ] || teachdiag probe --teacher smollm2-135m --student smollm2-135m-pruned --contexts "$OUT/heldout.jsonl" --positions all \
      --student-after "$OUT/train_$s/model" --threads "$THREADS" --out "$OUT/gain_$s" --overwrite
done
