#!/usr/bin/env bash
# Runs the dgpo_jax launcher on every host of a Cloud TPU pod slice, from a workstation, through
# `gcloud compute tpus tpu-vm ssh --worker=all`. One launcher process per host drives that host's
# chips; together they run one SPMD program over the whole slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project WORKDIR=gs://my-bucket/runs/dgpo \
#     RETRIEVAL=shared RETRIEVAL_URLS=http://10.0.0.5:8000,http://10.0.0.6:8000 \
#     bash launch/tpu_pod.sh configs/dgpo_nq.py --config.train.steps=1000
#   SETUP=1 RETRIEVAL=per_host INDEX_DIR=/mnt/disks/data/wiki_index TPU_NAME=... ZONE=... \
#     WORKDIR=gs://my-bucket/runs/dgpo bash launch/tpu_pod.sh configs/dgpo_nq.py
#   DRY_RUN=1 TPU_NAME=... ZONE=... WORKDIR=... bash launch/tpu_pod.sh configs/dgpo_nq.py
#
# Arguments: CONFIG (a path under REPO_DIR on the workers), then launcher overrides
# (--config.key=value ...), passed through unchanged.
#
# Environment (defaults in brackets):
#   TPU_NAME          TPU VM name [required]
#   ZONE              its zone [required]
#   PROJECT           GCP project [gcloud's configured project]
#   WORKDIR           run directory: checkpoints (orbax), metrics.jsonl, tensorboard/; passed as
#                     --config.workdir. Shared by all hosts: a filesystem every worker mounts
#                     (e.g. gcsfuse) or gs://bucket/path (see docs/scaleout.md) [required]
#   REPO_DIR          the checkout on each worker, absolute or relative to the home dir [dgpo_jax]
#   RETRIEVAL         where the retrieval service runs [per_host]:
#                       per_host  a server on every worker (127.0.0.1:$RETRIEVAL_PORT), started
#                                 first, waited for (/health), stopped when this script exits
#                       shared    existing servers at $RETRIEVAL_URLS, balanced client side
#                       none      leave the config's retrieval settings alone
#   INDEX_DIR         per_host: index directory (build_index output) on every worker [required]
#   RETRIEVAL_PORT    per_host: server port [8000]
#   RETRIEVAL_WAIT_S  per_host: seconds to wait for every server's /health [600]
#   RETRIEVAL_URLS    shared: comma-separated URLs every worker can reach [required]
#   NUM_WORKERS       hosts in the slice (v4-32: 4). When set, DGPO_NUM_PROCESSES=$NUM_WORKERS is
#                     passed so launch.py calls jax.distributed.initialize() (see below) [unset]
#   PASS_ENV          more local variable names to forward, space-separated ("WANDB_API_KEY") []
#   SETUP             1: first copy the committed HEAD (git archive) to every worker, unpack it
#                     into REPO_DIR and run `EXTRAS=$EXTRAS bash launch/setup_env.sh` there [0]
#   EXTRAS            pip extras for SETUP [tpu,retrieval with RETRIEVAL=per_host, else tpu]
#   TMPDIR            where SETUP writes the source tarball locally [/tmp]
#   DRY_RUN           1: print every command (prefixed "+ "), run nothing [0]
# Every DGPO_* variable exported here (DGPO_STUDENT, DGPO_TEACHER, DGPO_TRAIN, DGPO_TEST, ...) is
# forwarded to the launcher on each worker, except DGPO_NUM_PROCESSES, DGPO_PROCESS_ID and
# DGPO_RETRIEVAL_TOKEN (name it in PASS_ENV to forward it: it then shows in process lists).
#
# Distributed start: launch.py calls jax.distributed.initialize() with no arguments (JAX then
# reads the pod layout from the TPU metadata server) when TPU_WORKER_HOSTNAMES is set (GKE sets
# it) or when DGPO_NUM_PROCESSES is set (NUM_WORKERS above). Plain TPU VMs usually lack
# TPU_WORKER_HOSTNAMES in an ssh session, so set NUM_WORKERS there.
set -euo pipefail
me=tpu_pod.sh
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/common.sh"

[[ $# -ge 1 && $1 != -* ]] || die "missing CONFIG: bash launch/$me CONFIG [--config.key=value ...]"
config=$1
shift
need TPU_NAME "the TPU VM to run on"
need ZONE "the zone of the TPU VM"
need WORKDIR "the run directory (gs://bucket/path or a path every worker mounts)"
REPO_DIR=${REPO_DIR:-dgpo_jax}
retrieval_placement " on every worker"

where=(--zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then where+=(--project "$PROJECT"); fi
on_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$1"; }
rdir=$(quote "$REPO_DIR")

# The launcher's environment on every worker.
env_words=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1)
if [[ -n ${NUM_WORKERS:-} ]]; then env_words+=("DGPO_NUM_PROCESSES=$NUM_WORKERS"); fi
for name in $(compgen -e); do
  case $name in DGPO_NUM_PROCESSES | DGPO_PROCESS_ID | DGPO_RETRIEVAL_TOKEN) continue ;; esac
  if [[ $name == DGPO_* && " ${PASS_ENV:-} " != *" $name "* ]]; then
    env_words+=("$name=${!name}")
  fi
done
for name in ${PASS_ENV:-}; do
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ && -n ${!name+set} ]] ||
    die "PASS_ENV names $name, which is not a set variable"
  env_words+=("$name=${!name}")
done
launcher=(.venv/bin/python -m dgpo_jax.launch "--config=$config" "--config.workdir=$WORKDIR")
if [[ -n $urls ]]; then launcher+=(--config.retrieval.kind=http "--config.retrieval.urls=$urls"); fi
launcher+=("$@")

if [[ ${SETUP:-0} == 1 ]]; then
  extras=${EXTRAS:-tpu}
  if [[ -z ${EXTRAS:-} && $RETRIEVAL == per_host ]]; then extras=tpu,retrieval; fi
  tarball=${TMPDIR:-/tmp}/dgpo_jax_src.tar.gz
  run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:dgpo_jax_src.tar.gz" "${where[@]}" \
    --worker=all
  unpack="mkdir -p $rdir && tar -xzf dgpo_jax_src.tar.gz -C $rdir"
  on_all "$unpack && cd $rdir && EXTRAS=$(quote "$extras") bash launch/setup_env.sh"
fi

if [[ $RETRIEVAL == per_host ]]; then
  log=/tmp/dgpo_retrieval_$RETRIEVAL_PORT.log
  pidfile=/tmp/dgpo_retrieval_$RETRIEVAL_PORT.pid
  server=(env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m retrieval_service.serve
          --index "$INDEX_DIR" --host 127.0.0.1 --port "$RETRIEVAL_PORT")
  on_all "cd $rdir && { nohup $(quote "${server[@]}") > $log 2>&1 < /dev/null & echo \$! > $pidfile; }"
  stop_servers() { on_all "kill \$(cat $pidfile) 2>/dev/null || true" || true; }
  trap stop_servers EXIT
  health=(curl -sf -o /dev/null --retry-connrefused --retry "$RETRIEVAL_WAIT_S"
          --retry-delay 1 --retry-max-time "$RETRIEVAL_WAIT_S" "$urls/health")
  unhealthy="echo \"retrieval server on \$(hostname) not healthy, see $log\" >&2; exit 1"
  on_all "$(quote "${health[@]}") || { $unhealthy; }"
fi

on_all "cd $rdir && $(quote env "${env_words[@]}" "${launcher[@]}")"
