# Shared by launch/tpu_pod.sh, launch/gpu_node.sh and launch/slurm_multinode.sbatch (sourced
# after each sets `me`, its own name for messages). Not run on its own. Reads:
#   DRY_RUN          1: print each command (`+ ` and the shell-quoted words) instead of running it
#   RETRIEVAL        where the retrieval service runs: per_host | shared | none [per_host]
#   RETRIEVAL_PORT   per-host server port [8000]
#   RETRIEVAL_WAIT_S seconds to wait for a per-host server's /health [600]
#   INDEX_DIR        index directory of the per-host servers (RETRIEVAL=per_host)
#   RETRIEVAL_URLS   comma-separated server URLs (RETRIEVAL=shared)

DRY_RUN=${DRY_RUN:-0}

quote() {  # the arguments as one shell-quoted line (words quoted only where needed)
  local word out=() plain='^[A-Za-z0-9_./:=,@%+-]+$'
  for word in "$@"; do
    if [[ $word =~ $plain ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() { if [[ $DRY_RUN == 1 ]]; then echo "+ $(quote "$@")"; else "$@"; fi; }
die() { echo "$me: $*" >&2; exit 2; }
need() { [[ -n ${!1:-} ]] || die "$1 is not set: $2"; }

# Sets RETRIEVAL, RETRIEVAL_PORT, RETRIEVAL_WAIT_S and `urls` (the launcher's
# --config.retrieval.urls; empty for RETRIEVAL=none). $1: where the per-host index must be.
retrieval_placement() {
  RETRIEVAL=${RETRIEVAL:-per_host}
  RETRIEVAL_PORT=${RETRIEVAL_PORT:-8000}
  RETRIEVAL_WAIT_S=${RETRIEVAL_WAIT_S:-600}
  case $RETRIEVAL in
    per_host) need INDEX_DIR "RETRIEVAL=per_host needs the index directory$1"
              urls=http://127.0.0.1:$RETRIEVAL_PORT ;;
    shared) need RETRIEVAL_URLS "RETRIEVAL=shared needs the server URLs (comma-separated)"
            urls=$RETRIEVAL_URLS ;;
    none) urls= ;;
    *) die "RETRIEVAL=$RETRIEVAL: expected per_host, shared or none" ;;
  esac
}
