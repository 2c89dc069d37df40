#!/usr/bin/env bash
# A change reviewed against BASE (a commit, branch or tag), as Markdown for a pull request: the params that
# changed, how every model's quality and every method's cost moved, and the training curves side by side.
#   bash scripts/review.sh main                  # Markdown on stdout; the curves in review_plots/index.html
#   bash scripts/review.sh HEAD~1 out/plots      # another base and plots folder
# Compares BASE's committed metrics with the workspace's: run `dvc pull` (or `dvc repro`) first.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bash scripts/review.sh BASE [PLOTS_DIR]}
plots=${2:-review_plots}
git rev-parse --verify --quiet "$base^{commit}" >/dev/null || { echo "review.sh: $base is not a commit here" >&2; exit 2; }

# Rows of a `dvc ... diff --md` table whose metric matches $1 (the header always kept); "" when none changed.
keep() { awk -v re="$1" -F'|' 'NR <= 2 || $3 ~ re'; }
section() {  # $1 title, $2 the table; a line saying nothing changed instead of an empty table
  echo "### $1"; echo
  if [ "$(printf '%s\n' "$2" | grep -c '^|')" -gt 2 ]; then printf '%s\n' "$2"; else echo "No change."; fi
  echo
}

echo "## Review against \`$base\` ($(git rev-parse --short "$base"))"
echo
section "Params" "$(dvc params diff "$base" --md)"
quality='^ *(overall\.(bleu4_corpus_0_100|rouge_l_f1_0_1)|accuracy\.overall\.exact_match_0_1) *$'
section "Quality (test set)" "$(dvc metrics diff "$base" --md --precision 4 --targets metrics/eval | keep "$quality")"
cost='^ *(peak_memory_gb|train_seconds|steady_tokens_per_s|trained_tokens|steps|final_train_loss|validation_loss) *$'
section "Cost (training)" "$(dvc metrics diff "$base" --md --precision 4 --targets metrics/train | keep "$cost")"
dvc plots diff "$base" -o "$plots" >/dev/null
echo "Training curves of \`$base\` and the workspace side by side: \`$plots/index.html\` (\`dvc plots diff $base\`)."
