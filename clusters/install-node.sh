#!/usr/bin/env bash
# Every node of a cluster installs the same versions, whatever day it starts. The first node to
# install (the head, at `ray up`) resolves the project's dependencies and writes what it got,
# `pip freeze`, to the shared mount; every later node (a worker the autoscaler starts a week
# later too) installs under that lock, so a release of vLLM, torch or transformers in between
# cannot split the cluster. Delete the lock to move the cluster to new versions.
#   usage (from the project folder): bash clusters/install-node.sh PIP_INSTALL_ARGS...
#   e.g. bash clusters/install-node.sh -e '.[vllm,tensorboard]'
set -euo pipefail
lock="${RLAIF_RAY_LOCK:-/shared/rlaif-ray-lock.txt}"
test -x .venv/bin/python || python3 -m venv .venv
if [ -s "$lock" ]; then
    .venv/bin/pip install -q -c "$lock" "$@"
else
    .venv/bin/pip install -q "$@"
    tmp="$lock.partial-$$"
    .venv/bin/pip freeze --exclude-editable > "$tmp" && mv "$tmp" "$lock"   # whole or not at all
    echo "wrote $lock: every later node installs these versions"
fi
