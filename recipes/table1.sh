#!/bin/bash
# The paper's Table 1 at one size: one array task per placement (default Post-LN, DeepNorm, Pre-LN, Mix-LN).
#   bash recipes/table1.sh 130m [PLACEMENTS="post deepnorm pre mix lns"] [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?usage: bash recipes/table1.sh 71m|130m|250m|1b [PLACEMENTS=\"...\"] [section.field=value ...]}
shift
config=configs/llama_${size}.yaml
[ -f "$config" ] || { echo "error: no $config: sizes are 71m, 130m, 250m, 1b" >&2; exit 2; }
placements="post deepnorm pre mix"
if [ $# -ge 1 ] && [ "${1%%=*}" = PLACEMENTS ]; then placements=${1#PLACEMENTS=}; shift; fi
read -ra list <<< "$placements"
PLACEMENTS="$placements" sbatch --array=0-$((${#list[@]} - 1)) slurm/compare.sbatch "$config" "$@"
echo "when every task has ended: mixln-compare $(printf "runs/llama_${size}_%s " "${list[@]}")"
