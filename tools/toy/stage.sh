# Sourced by the toy scripts (run_all.sh, cora_plus_lvis.sh): one stage of a pipeline.
#   run_stage NAME DONE-TEST COMMAND...
# Skips COMMAND when DONE-TEST (a shell condition) holds; otherwise runs it, checks that DONE-TEST holds
# afterwards (the stage produced its output) and records its wall time in logs/toy/run_all_times.json.
run_stage() {
    local name=$1 done_test=$2
    shift 2
    echo "== $name"
    if eval "$done_test"; then
        echo "   done, skipped"
        return
    fi
    local start=$SECONDS
    "$@"
    if ! eval "$done_test"; then
        echo "${0}: stage '$name' did not produce its output" >&2
        exit 1
    fi
    python -m tools.toy.report record "$name" $((SECONDS - start))
    echo "   $((SECONDS - start)) s"
}
