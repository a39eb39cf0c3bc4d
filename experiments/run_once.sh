# Sourced by the experiment scripts. run_once OUT NAME COMMAND...: train into OUT/NAME (COMMAND gets
# --run_folder OUT/NAME, its output goes to OUT/NAME.out) unless that output says the run finished, and record the
# wall time in OUT/times.txt (appended to: a report takes each name's latest time).
run_once() {
    local out=$1 name=$2 start=$SECONDS
    shift 2
    if grep -q "^Done:" "$out/$name.out" 2>/dev/null; then
        echo "$name: finished before, skipped"
        return
    fi
    echo "$name: training ($(date +%H:%M))"
    "$@" --run_folder "$out/$name" > "$out/$name.out" 2>&1
    echo "$name $((SECONDS - start))" >> "$out/times.txt"
}
