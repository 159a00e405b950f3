# Time-box helpers for bench/gpu_suite.sh (sourced).
# The caller sets BUDGET (seconds for the whole suite) and START=$SECONDS first.

elapsed() { echo $((SECONDS - START)); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for what follows.
cap() {
    local want=$1 left=$((BUDGET - (SECONDS - START) - $2))
    ((left < want)) && want=$left
    ((want < 0)) && want=0
    echo "$want"
}
say() { printf '\n=== [%3ss] %s\n' "$(elapsed)" "$*"; }
