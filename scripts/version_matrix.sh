#!/usr/bin/env bash
# Run a test subset against several transformers versions, one fresh venv each, and print a table.
#
#   scripts/version_matrix.sh                          # transformers 5.24.0 and 4.56.2, fast subset
#   scripts/version_matrix.sh 5.23.0 5.0.0             # other versions
#   TESTS="tests" scripts/version_matrix.sh 5.24.0     # the whole suite
#
# torch stays at 2.13.0 (the CPU wheel; other torch versions pull multi-GB CUDA builds), so this
# matrix says which transformers versions work, not which torch versions do.
# Venvs go to $MATRIX_DIR (default /tmp/teachdiag-matrix); logs beside them.
set -u
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ $# -eq 0 ] && VERSIONS=(5.24.0 4.56.2)
TORCH=${TORCH:-2.13.0}
TESTS=${TESTS:-"tests/test_tokenizers.py tests/test_models.py tests/test_contexts.py tests/test_rollout.py tests/test_cli.py"}
DIR=${MATRIX_DIR:-/tmp/teachdiag-matrix}
mkdir -p "$DIR"
declare -a ROWS
for v in "${VERSIONS[@]}"; do
  venv="$DIR/tf-$v"; log="$DIR/tf-$v.log"
  start=$(date +%s)
  if [ ! -x "$venv/bin/python" ]; then python -m venv "$venv"; fi
  if "$venv/bin/pip" install -q "torch==$TORCH" "transformers==$v" -e ".[dev]" >"$log" 2>&1; then
    # the checkout under test, not another installed teachdiag
    PYTHONPATH="$PWD" OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS >>"$log" 2>&1
    rc=$?
    result=$(tail -1 "$log" | sed 's/=//g; s/^ *//; s/ *$//')
  else
    rc=99; result="install failed (see $log)"
  fi
  tok=$("$venv/bin/python" -c "import tokenizers; print(tokenizers.__version__)" 2>/dev/null || echo "?")
  ROWS+=("$(printf '| %-8s | %-7s | %-10s | %-4s | %-60s | %5ss |' "$v" "$TORCH" "$tok" "$rc" "$result" "$(( $(date +%s) - start ))")")
done
echo "| transformers | torch | tokenizers | rc | tests ($TESTS) | time |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
