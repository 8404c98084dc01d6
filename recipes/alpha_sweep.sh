#!/bin/bash
# The paper's alpha ablation (0, 1/6, 1/4, 1/3, 5/12, 1/2 and all of the layers Post-LN) at one size.
#   bash recipes/alpha_sweep.sh 1b [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?usage: bash recipes/alpha_sweep.sh 71m|130m|250m|1b [section.field=value ...]}
shift
config=configs/llama_${size}.yaml
[ -f "$config" ] || { echo "error: no $config: sizes are 71m, 130m, 250m, 1b" >&2; exit 2; }
layers=$(awk '/^ *num_layers:/ {print $2; exit}' "$config")
variants=()
for twelfths in 0 2 3 4 5 6 12; do   # alpha = 0, 16.7 %, 25 %, 33 %, 41.7 %, 50 %, 100 %
    post=$((layers * twelfths / 12))
    variants+=("post$post:model.norm_placement=mix,model.post_layers=$post")
done
VARIANTS="${variants[*]}" sbatch --array=0-$((${#variants[@]} - 1)) slurm/compare.sbatch "$config" "$@"
names=("${variants[@]%%:*}")
echo "when every task has ended: mixln-compare $(printf "runs/llama_${size}_%s " "${names[@]}")"
