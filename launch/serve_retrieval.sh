#!/usr/bin/env bash
# Starts the retrieval server (python -m retrieval_service.serve) in the foreground.
#
#   launch/serve_retrieval.sh INDEX_DIR [more serve options...]
#   launch/serve_retrieval.sh --synthetic [more serve options...]
#
# --synthetic first writes the synthetic world to $WORKDIR (default workdir/synthetic) and builds
# its $KIND index (bm25 or dense, default bm25), unless they are already there.
#
# Environment: HOST (default 127.0.0.1: loopback only), PORT (default 8000), TOPK (default 3),
# PYTHON (default .venv/bin/python when it exists, else python3), DGPO_RETRIEVAL_TOKEN (when
# set, clients must send "Authorization: Bearer $DGPO_RETRIEVAL_TOKEN").
# Example: PORT=8001 launch/serve_retrieval.sh workdir/wiki/index_dense --torch-threads 4
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 2
fi

if [[ "$1" == "--synthetic" ]]; then
  shift
  workdir="${WORKDIR:-workdir/synthetic}"
  kind="${KIND:-bm25}"
  index="$workdir/index_$kind"
  if [[ ! -f "$workdir/corpus.jsonl" ]]; then
    "$PYTHON" -m dgpo_jax.data.synthetic --out "$workdir"
  fi
  if [[ ! -f "$index/manifest.json" ]]; then
    "$PYTHON" -m retrieval_service.build_index --corpus "$workdir/corpus.jsonl" --out "$index" --kind "$kind"
  fi
else
  index="$1"
  shift
fi

exec "$PYTHON" -m retrieval_service.serve --index "$index" --host "${HOST:-127.0.0.1}" \
  --port "${PORT:-8000}" --topk "${TOPK:-3}" "$@"
