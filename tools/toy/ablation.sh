#!/usr/bin/env bash
# The paper's ablations in miniature, on the toy world (README "CORA in miniature"):
#   region classification accuracy of CLIP on val boxes without / with the region prompt (stage 3 of run_all.sh),
#   localizer novel / base / all AP50: CORA (run_all.sh's localizer, the bundled model), class-agnostic queries
#   (apm=0), annotated labels (label_version=).
#
# Usage, from the repository root:   bash tools/toy/ablation.sh
# Runs tools/toy/run_all.sh first (each stage skipped when its output exists), then the two localizer
# variants (each skipped when finished), and writes the table to logs/toy/ablation.md. Wall times of
# every stage and variant are in logs/toy/run_all_times.json. LOCALIZER_ARGS applies to every variant.
set -euo pipefail
export data_path=${data_path:-data/toy}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 processes, one per core, as run_all.sh
config=configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh

bash tools/toy/run_all.sh

variant() {  # variant EXP ENV-ASSIGNMENT [MAIN.PY FLAGS...]
    local exp=$1 setting=$2 dir
    shift 2
    dir=logs/toy/$(basename "$config" .sh)/$exp
    echo "== localizer variant $exp ($setting)"
    if python -m tools.toy.report finished "$dir"; then
        echo "   done, skipped"
        return
    fi
    local start=$SECONDS
    # shellcheck disable=SC2086  # LOCALIZER_ARGS is word-split on purpose
    env "$setting" bash "$config" "$exp" 2 local "$@" ${LOCALIZER_ARGS:-}
    python -m tools.toy.report record "localizer_$exp" $((SECONDS - start))
    python -m tools.toy.report summary "$dir"
}

variant noapm apm=0
variant annotated label_version=
python -m tools.toy.report ablation --out logs/toy/ablation.md
