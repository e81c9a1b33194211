#!/usr/bin/env bash
# Set up and run the whole test suite, once per supported mitmproxy line:
# mitmproxy 12 on the newest Python >= 3.12 found, mitmproxy 11 on Python 3.11/3.10.
#
# usage: scripts/test.sh [11|12] [--quick] [pytest's arguments]
#   scripts/test.sh            # both lines (a line with no Python here is skipped, loudly)
#   scripts/test.sh 11         # one line
#   scripts/test.sh --quick    # the quick subset (pytest -m quick, under 90 s): the tests that
#                              # start no proxy, and one through a real mitmdump per transport
#   scripts/test.sh 12 -k h2   # extra arguments go to pytest
#   scripts/test.sh 12 -n 0    # one pytest process, no workers (for pdb, -s, or a clearer order)
#   scripts/test.sh --help     # this text (pytest's own: .venv-mitmproxy12/bin/python -m pytest --help)
#
# Both lines are set up, at once, before either runs: some tests (a flow file
# written on one line must load on the other) use the other line's
# interpreter. The lines then run side by side, each in two pytest workers
# (pytest-xdist, a test file's tests in one worker: its module fixtures are
# made once); their waits for stalls and timeouts leave a core idle a quarter
# of the time otherwise. Each line's output is shown whole when it ends.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lines=(12 11)
if [[ "${1:-}" =~ ^1[12]$ ]]; then lines=("$1"); shift; fi
pytest_args=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;  # the comment above, before anything is built
    --quick) pytest_args+=(-m quick) ;;  # (the marker is applied in tests/conftest.py)
    *) pytest_args+=("$arg") ;;
  esac
done

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
declare -A venvs pids setups
# Both lines always (see above), and mitmproxy 11.1 (alone, no test dependencies:
# tests/test_versions.py runs the addon in it, and skips, saying so, without a
# Python for it); the three at once, each into its own folder.
for line in 12 11 11.1; do
  "$root/scripts/venv.sh" "$line" > "$logs/venv-$line" 2> "$logs/venv-$line.err" &
  setups[$line]=$!
done
for line in 12 11 11.1; do
  wait "${setups[$line]}"
  status=$?
  cat "$logs/venv-$line.err" >&2
  if [ "$status" = 3 ]; then
    [ "$line" = 11.1 ] || echo "== mitmproxy $line: SKIPPED, no suitable Python on this machine"
    continue
  fi
  [ "$status" = 0 ] || { echo "== mitmproxy $line: setup failed"; failed=1; continue; }
  venvs[$line]=$(cat "$logs/venv-$line")
done

for line in "${lines[@]}"; do
  venv=${venvs[$line]:-}
  [ -n "$venv" ] || continue
  # Every mitmdump and tool a test starts imports the addon and the tools: compiled
  # once here, not in each of several hundred processes (with PYTHONDONTWRITEBYTECODE
  # set, as here, Python would never keep what it compiled).
  "$venv/bin/python" -m compileall -q "$root/addon" "$root/scripts" >/dev/null
  (
    echo "== mitmproxy $("$venv/bin/python" -c 'import mitmproxy.version as v; print(v.VERSION)') on $("$venv/bin/python" --version)"
    cd "$root" && exec "$venv/bin/python" -m pytest -p no:cacheprovider -n 2 --dist loadfile "${pytest_args[@]}"
  ) > "$logs/$line.log" 2>&1 &
  pids[$line]=$!
done
[ "${#pids[@]}" -gt 0 ] || { echo "no mitmproxy line could be tested"; exit 1; }
for line in "${lines[@]}"; do
  [ -n "${pids[$line]:-}" ] || continue
  wait "${pids[$line]}" || failed=1
  cat "$logs/$line.log"
done
exit "$failed"
