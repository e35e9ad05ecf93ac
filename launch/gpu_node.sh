#!/usr/bin/env bash
# Runs the dgpo_jax launcher on one multi-GPU node: a single process drives every visible GPU
# (JAX single-controller; the mesh spans all local devices), optionally with a retrieval server
# started on this node first.
#
#   WORKDIR=/shared/runs/dgpo INDEX_DIR=/data/wiki_index bash launch/gpu_node.sh \
#     configs/dgpo_nq.py --config.mesh.shape.fsdp=-1
#   RETRIEVAL=shared RETRIEVAL_URLS=http://search-a:8000,http://search-b:8000 \
#     WORKDIR=gs://my-bucket/runs/dgpo bash launch/gpu_node.sh configs/dgpo_nq.py
#   CUDA_VISIBLE_DEVICES=0,1,2,3 WORKDIR=runs/dgpo RETRIEVAL=none bash launch/gpu_node.sh \
#     configs/quickstart.py
#   DRY_RUN=1 WORKDIR=runs/x INDEX_DIR=idx bash launch/gpu_node.sh configs/dgpo_nq.py
#
# Arguments: CONFIG (relative to the repository root, or absolute), then launcher overrides
# (--config.key=value ...), passed through unchanged.
#
# Environment (defaults in brackets):
#   WORKDIR           run directory: checkpoints (orbax), metrics.jsonl, tensorboard/; passed as
#                     --config.workdir. A local or shared filesystem path, or gs://bucket/path
#                     (see docs/scaleout.md) [required]
#   RETRIEVAL         where the retrieval service runs [per_host]:
#                       per_host  a server on this node (127.0.0.1:$RETRIEVAL_PORT), started
#                                 first, waited for (/health), stopped when this script exits
#                       shared    existing servers at $RETRIEVAL_URLS, balanced client side
#                       none      leave the config's retrieval settings alone
#   INDEX_DIR         per_host: index directory (build_index output) [required for per_host]
#   RETRIEVAL_PORT    per_host: server port [8000]
#   RETRIEVAL_WAIT_S  per_host: seconds to wait for /health (a large dense index loads slowly)
#                     [600]
#   RETRIEVAL_LOG     per_host: the server's log file [/tmp/dgpo_retrieval_$RETRIEVAL_PORT.log]
#   RETRIEVAL_URLS    shared: comma-separated server URLs [required for shared]
#   PYTHON            interpreter [.venv/bin/python]
#   CUDA_VISIBLE_DEVICES  the GPUs to use (read by CUDA, not by this script) [all]
#   DRY_RUN           1: print every command (prefixed "+ "), run nothing [0]
# No jax.distributed here: with one process launch.py skips it (it runs only when
# JAX_COORDINATOR_ADDRESS, DGPO_NUM_PROCESSES, SLURM_NTASKS>1 or TPU_WORKER_HOSTNAMES say so).
set -euo pipefail
me=gpu_node.sh
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh

[[ $# -ge 1 && $1 != -* ]] || die "missing CONFIG: bash launch/$me CONFIG [--config.key=value ...]"
config=$1
shift
[[ -f $config ]] || die "CONFIG $config is not a file (relative to $PWD)"
need WORKDIR "the run directory (a filesystem path or gs://bucket/path)"
retrieval_placement ""
RETRIEVAL_LOG=${RETRIEVAL_LOG:-/tmp/dgpo_retrieval_$RETRIEVAL_PORT.log}
PYTHON=${PYTHON:-.venv/bin/python}

if [[ $RETRIEVAL == per_host ]]; then
  server=(env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PYTHON" -m retrieval_service.serve
          --index "$INDEX_DIR" --host 127.0.0.1 --port "$RETRIEVAL_PORT")
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ $(quote "${server[@]}") > $(quote "$RETRIEVAL_LOG") 2>&1 &"
  else
    echo "$me: starting the retrieval server (log: $RETRIEVAL_LOG)" >&2
    "${server[@]}" > "$RETRIEVAL_LOG" 2>&1 &
    server_pid=$!
  fi
  stop_server() {
    # shellcheck disable=SC2016  # the variable name is printed on purpose
    if [[ $DRY_RUN == 1 ]]; then echo '+ kill $server_pid'; return; fi
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  }
  trap stop_server EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  probe=(curl -sf -o /dev/null --max-time 5 "$urls/health")
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ until $(quote "${probe[@]}"); do sleep 0.5; done"
  else
    deadline=$((SECONDS + RETRIEVAL_WAIT_S))
    until "${probe[@]}"; do
      kill -0 "$server_pid" 2>/dev/null || die "the retrieval server exited; see $RETRIEVAL_LOG"
      ((SECONDS < deadline)) ||
        die "the retrieval server did not answer $urls/health in ${RETRIEVAL_WAIT_S}s; see $RETRIEVAL_LOG"
      sleep 0.5
    done
  fi
fi

launcher=("$PYTHON" -m dgpo_jax.launch "--config=$config" "--config.workdir=$WORKDIR")
if [[ -n $urls ]]; then launcher+=(--config.retrieval.kind=http "--config.retrieval.urls=$urls"); fi
run env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "${launcher[@]}" "$@"
