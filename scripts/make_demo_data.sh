#!/usr/bin/env bash
# Regenerate src/sftjuice/demo_data/ with DeepMind's mathematics_dataset.
#
# mathematics-dataset 1.0.1 needs sympy 1.5 (and a numpy that still has
# np.object), which clashes with the sympy that torch needs, so the generator
# runs in its own venv, outside the project's:
#   ${SFTJUICE_MATHDATA_VENV:-${XDG_CACHE_HOME:-~/.cache}/sftjuice/mathdata-venv}
# It is created (or re-created when the pins below change) on first use.
#
# Usage: scripts/make_demo_data.sh [module:difficulty ...]
#   env: SEED (default 20240611), TRAIN_ROWS (2000), TEST_ROWS (500),
#        OUT_DIR (src/sftjuice/demo_data), PYTHON (python3, for the venv)
# With no arguments it writes the default task list of
# scripts/mathdata_generate.py. Output is deterministic for a given seed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SFTJUICE_MATHDATA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sftjuice/mathdata-venv}"
seed="${SEED:-20240611}"
train_rows="${TRAIN_ROWS:-2000}"
test_rows="${TEST_ROWS:-500}"
out_dir="${OUT_DIR:-$repo/src/sftjuice/demo_data}"
python="${PYTHON:-python3}"

# Everything pinned so that the same seed gives the same rows.
pins=(
  "mathematics-dataset==1.0.1"
  "sympy==1.5"
  "mpmath==1.3.0"
  "numpy==1.23.5"
  "absl-py==2.1.0"
  "six==1.16.0"
)
stamp="$venv/.sftjuice-pins"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "${pins[*]}" ]]; then
  echo "make_demo_data: creating generator venv in $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  printf '%s' "${pins[*]}" >"$stamp"
fi

mkdir -p "$out_dir"
# PYTHONHASHSEED: keep any set/dict-order dependence in sympy reproducible.
PYTHONHASHSEED=0 "$venv/bin/python" -W ignore "$repo/scripts/mathdata_generate.py" \
  --out-dir "$out_dir" --seed "$seed" --train "$train_rows" --test "$test_rows" "$@"

versions="$("$venv/bin/python" -m pip freeze --disable-pip-version-check | LC_ALL=C sort | sed 's/^/    /')"
pyver="$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
cmd="scripts/make_demo_data.sh${*:+ $*}"
env_note=""
[[ "$seed" != 20240611 || "$train_rows" != 2000 || "$test_rows" != 500 ]] &&
  env_note="SEED=$seed TRAIN_ROWS=$train_rows TEST_ROWS=$test_rows "

{
  cat <<EOF
# sftjuice demo data

Generated, not hand-written: every \`prompt\` / \`completion\` is the question /
answer text of DeepMind's \`mathematics_dataset\` generator, unchanged.

Made by (from the repository root):

    ${env_note}${cmd}

Seed: $seed (each task is seeded with a value derived from it and the task
name; \`PYTHONHASHSEED=0\`). Generator run with Python $pyver in its own venv
with exactly:

$versions

Each line: \`{"prompt", "completion", "task", "difficulty"}\`. \`task\` is the
generator's module name; \`difficulty\` \`easy\`/\`medium\`/\`hard\` is the first /
second / third of that module's training entropy range, i.e. the generator's
\`train-easy\`/\`train-medium\`/\`train-hard\` splits. Problems the generator
itself drops (question > 160 or answer > 30 characters) are skipped, questions
are deduplicated, and \`<task>.train.jsonl\` ($train_rows rows) and
\`<task>.test.jsonl\` ($test_rows rows) share no question.

| file | rows | difficulty |
| --- | --- | --- |
EOF
  for f in "$out_dir"/*.jsonl; do
    n="$(wc -l <"$f" | tr -d ' ')"
    d="$(head -n1 "$f" | sed -n 's/.*"difficulty": "\([^"]*\)".*/\1/p')"
    echo "| $(basename "$f") | $n | $d |"
  done
  cat <<EOF

The generator is Apache-2.0 licensed (Copyright 2018 DeepMind Technologies
Limited); see the \`mathematics-dataset\` package.
EOF
} >"$out_dir/README.md"

du -sh "$out_dir" >&2
