#!/usr/bin/env bash
# The shell steps of the sway-mlx GitHub Action (action.yml), kept in one script that the
# tests run. Inputs come in environment variables, never spliced into the command text.
#
#   action-gate.sh install  pip-install sway-mlx from $SWAY_SOURCE with the extras in
#                           $SWAY_EXTRAS (and $SWAY_PIP_ARGS); write the null-statistics
#                           cache dir to $GITHUB_OUTPUT as null-cache-dir
#   action-gate.sh gate     `sway-mlx gate $SWAY_SPEC` (with $SWAY_THRESHOLD, $SWAY_ARGS),
#                           writing sway.json, sway.xml (JUnit), sway.html and sway.md into
#                           $SWAY_OUT; verdict and exit-code to $GITHUB_OUTPUT, the Markdown
#                           report to $GITHUB_STEP_SUMMARY; exits as the gate does
#                           (0 pass, 1 fail, 2 bad input or error)
set -euo pipefail
# (`${a[@]+"${a[@]}"}` below: an empty array under `set -u` in the bash 3.2 of macOS.)

output() {
    if [ -n "${GITHUB_OUTPUT:-}" ]; then
        printf '%s=%s\n' "$1" "$2" >>"$GITHUB_OUTPUT"
    fi
}

install() {
    local source="${SWAY_SOURCE:?set SWAY_SOURCE to the sway-mlx checkout to install}"
    local extras="${SWAY_EXTRAS:-}" target pip_args=()
    if ! [[ "$extras" =~ ^[a-z0-9_,-]*$ ]]; then
        echo "error: extras '$extras' must be a comma-separated list such as hf,plot" >&2
        exit 2
    fi
    target="$source"
    if [ -n "$extras" ]; then target="$source[$extras]"; fi
    read -r -a pip_args <<<"${SWAY_PIP_ARGS:-}"
    python -m pip install --quiet --disable-pip-version-check ${pip_args[@]+"${pip_args[@]}"} "$target"
    output null-cache-dir "$(python -c 'from sway_common.app.options import null_cache
print(null_cache(False).root)')"
}

gate() {
    local spec="${SWAY_SPEC:?set SWAY_SPEC to the suite spec to gate}"
    local out="${SWAY_OUT:-sway-report}" extra=() code verdict
    mkdir -p "$out"
    local args=(gate "$spec" --json "$out/sway.json" --junit "$out/sway.xml"
        --html "$out/sway.html" --markdown "$out/sway.md")
    if [ -n "${SWAY_THRESHOLD:-}" ]; then args+=(--threshold "$SWAY_THRESHOLD"); fi
    read -r -a extra <<<"${SWAY_ARGS:-}"
    set +e
    sway-mlx "${args[@]}" ${extra[@]+"${extra[@]}"}
    code=$?
    set -e
    verdict=$(python -c 'import json, sys
print(json.load(open(sys.argv[1], encoding="utf-8"))["verdict"])' "$out/sway.json" 2>/dev/null) ||
        verdict=ERROR
    output verdict "$verdict"
    output exit-code "$code"
    if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$out/sway.md" ]; then
        cat "$out/sway.md" >>"$GITHUB_STEP_SUMMARY"
    fi
    exit "$code"
}

case "${1:-}" in
install) install ;;
gate) gate ;;
*)
    echo "usage: action-gate.sh install|gate (inputs in SWAY_* environment variables)" >&2
    exit 2
    ;;
esac
