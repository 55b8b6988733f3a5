#!/usr/bin/env bash
# Installs one peer in a venv of its own under build/peers/<peer> (idempotent: a venv whose
# install finished is kept). Each venv gets torch==2.13.0, the peer's package, and apportion
# itself (a wheel built from this tree, no deps) only so that the peer's server builds the same
# models from apportion.demo / bench/peers/models.py. Writes build/peers/<peer>.log; exits
# non-zero with the pip error left in that log when the peer cannot be installed.
#
#   bash bench/peers/install.sh PEER      PEER: pytriton | ray | litserve
set -euo pipefail
peer=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$root/build/peers
mkdir -p "$build"
venv=$build/$peer
log=$build/$peer.log
[[ -f $venv/.installed ]] && exit 0

case $peer in
  pytriton) pkgs=("nvidia-pytriton") ;;
  ray) pkgs=("ray[serve]" "orjson") ;;  # orjson: v2json.py's JSON, as apportion serve's
  litserve) pkgs=("litserve" "orjson") ;;
  *) echo "unknown peer $peer (pytriton, ray, litserve)" >&2; exit 2 ;;
esac

{
  echo "# $(date -u +%FT%TZ) installing $peer: ${pkgs[*]} torch==2.13.0"
  rm -rf "$venv"
  python -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0" numpy tomli-w "${pkgs[@]}"
} >"$log" 2>&1
wheel_dir=$build/wheel
if ! ls "$wheel_dir"/apportion-*.whl >/dev/null 2>&1; then
  # Reuses the dev build directory, so this is an incremental build, not a fresh one.
  python -m pip wheel --no-build-isolation --no-deps -w "$wheel_dir" -Cbuild-dir=build/dev "$root" >"$build/wheel.log" 2>&1
fi

"$venv/bin/pip" install -q --no-deps "$wheel_dir"/apportion-*.whl >>"$log" 2>&1
"$venv/bin/pip" freeze >>"$log" 2>&1
touch "$venv/.installed"
