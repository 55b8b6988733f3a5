#!/usr/bin/env bash
# Regenerates the stubs of apportion._core from the installed module and compares them with the
# committed ones. `tools/check_stubs.sh --write` updates the committed stubs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Run from outside the checkout so the installed package is the one imported.
(cd "$out" && python -m pybind11_stubgen apportion._core -o "$out/stubs" >/dev/null)
gen="$out/stubs/apportion"
python tools/stub_overrides.py "$gen"  # what the generator cannot see (see the script)
if [ "${1:-}" = "--write" ]; then
  rm -rf python/apportion/_core.pyi python/apportion/_core
  cp -r "$gen"/_core* python/apportion/
  echo "stubs written"
  exit 0
fi
status=0
for f in $(cd "$gen" && find . -name '*.pyi'); do
  if ! diff -u "python/apportion/$f" "$gen/$f"; then status=1; fi
done
committed=$(cd python/apportion && find . -path './_core*' -name '*.pyi' | sort)
generated=$(cd "$gen" && find . -name '*.pyi' | sort)
if [ "$committed" != "$generated" ]; then
  echo "stub files differ: committed [$committed] generated [$generated]"; status=1
fi
if [ $status -ne 0 ]; then
  echo "committed stubs are stale: run tools/check_stubs.sh --write after installing the package" >&2
fi
exit $status
