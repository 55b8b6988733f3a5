#!/usr/bin/env bash
# The peer comparison in one command (not part of CI): installs Triton (nvidia-pytriton, which
# ships the tritonserver binary run.py's "triton" rows run and PyTriton its "pytriton" rows),
# Ray Serve and LitServe each in a venv of its own under build/peers/<peer> (torch==2.13.0;
# kept between runs), then drives them and `apportion serve` with the same v2 client and load
# (`apportion bench --url`, see run.py for the scenarios). A peer that cannot be installed is
# reported with its error in the table and the others go on. Every server listens on
# 127.0.0.1 only; every measurement is bounded (warm-up + 3 windows).
#
#   bash bench/peers/run.sh [run.py options, e.g. --window-s 3 --binary]
# Run it from a venv with apportion installed with its load and serve extras.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
mkdir -p build/peers
for peer in pytriton ray litserve; do
  if bash "$here/install.sh" "$peer"; then
    echo "installed $peer (build/peers/$peer)"
  else
    echo "could not install $peer: see build/peers/$peer.log" >&2
  fi
done
exec python "$here/run.py" "$@"
