#!/usr/bin/env bash
# Make (or reuse) a virtual environment for one supported mitmproxy line and print its path.
#
#   scripts/venv.sh 12   # mitmproxy 12.x on the newest Python >= 3.12 found
#   scripts/venv.sh 11   # mitmproxy 11.x on Python 3.11 or 3.10
#   scripts/venv.sh      # 12 if such a Python exists, else 11
#   scripts/venv.sh 11.1 # mitmproxy 11.1.x alone, on Python >= 3.12: the tests run
#                        # the addon in it too (tests/test_versions.py)
#
# Interpreters are looked for on PATH and in pyenv's versions folder, and each
# candidate is run before it is trusted: a pyenv shim for a version that is not
# selected exists on PATH but does not run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

candidates() {  # every python executable we might use, best first
  local minors=("$@") m
  for m in "${minors[@]}"; do
    command -v "python3.$m" || true
    if command -v pyenv >/dev/null 2>&1; then
      ls -d "$(pyenv root)"/versions/3."$m".*/bin/python3 2>/dev/null | sort -V -r || true
    fi
    ls -d "$HOME"/.pyenv/versions/3."$m".*/bin/python3 2>/dev/null | sort -V -r || true
  done
  command -v python3 || true
}

find_python() {  # first candidate that runs and has a version in the given minors
  local want=" $* " py minor
  while read -r py; do
    [ -n "$py" ] || continue
    minor=$("$py" -c 'import sys, venv; print(sys.version_info[1]) if sys.version_info[0] == 3 else None' 2>/dev/null) || continue
    [[ "$want" == *" $minor "* ]] && { echo "$py"; return 0; }
  done < <(candidates "$@")
  return 1
}

line=${1:-}
if [ -z "$line" ]; then
  if find_python 14 13 12 >/dev/null; then line=12; else line=11; fi
fi
case "$line" in
  12) python=$(find_python 14 13 12) || { echo "no working Python >= 3.12 found for mitmproxy 12" >&2; exit 3; }
      spec='mitmproxy>=12,<13' ;;
  11) python=$(find_python 11 10) || { echo "no working Python 3.11 or 3.10 found for mitmproxy 11" >&2; exit 3; }
      spec='mitmproxy>=11,<12' ;;
  11.1) python=$(find_python 14 13 12) || { echo "no working Python >= 3.12 found for mitmproxy 11.1" >&2; exit 3; }
      spec='mitmproxy>=11.1,<11.2' ;;
  *) echo "usage: $0 [11|12|11.1]" >&2; exit 2 ;;
esac

venv="$root/.venv-mitmproxy$line"
stamp="$venv/.ws-encode-installed"
want_stamp="$(sha1sum "$root/pyproject.toml" | cut -d' ' -f1) $spec"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  if [ -L "$venv" ]; then
    # `venv --clear` on a link empties the folder it points to, then fails: another
    # checkout's environment, shared by a link (a git worktree), would be lost.
    echo "$venv is a link to $(readlink "$venv"), set up for another checkout; not changing it:" \
         "run scripts/venv.sh $line where it lives, or remove the link to get one of this checkout's own" >&2
    exit 4
  fi
  echo "setting up $venv with $("$python" --version) and $spec ..." >&2
  "$python" -m venv --clear "$venv" >&2
  # (this machine's pip config names local indexes that may not exist; pip warns once per package)
  quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" >&2 || true; }; }
  quiet "$venv/bin/python" -m pip install -q --upgrade pip
  if [ "$line" = 11.1 ]; then quiet "$venv/bin/python" -m pip install -q "$spec"
  # Editable: the venv imports the addon and the tools from this checkout, and has its console scripts.
  else quiet "$venv/bin/python" -m pip install -q "$spec" -e "$root[test]"; fi
  echo "$want_stamp" > "$stamp"
fi
echo "$venv"
