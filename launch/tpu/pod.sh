#!/usr/bin/env bash
# Cloud TPU VM slices for dreamvideo_jax: create a slice, install the project on every worker, train on all workers.
#
#   bash launch/tpu/pod.sh COMMAND [--option=value ...] [--dry_run]
#
# Commands
#   compile  compile the train step for the slice here, with libtpu (python -m dreamvideo_jax.aot; needs
#            `bash launch/setup.sh tpu` or the test extras): fails when it does not fit the chips' HBM
#   create   create the TPU VM slice (gcloud compute tpus tpu-vm create)
#   setup    copy this checkout (git archive of HEAD) to every worker and install it in ~/dreamvideo_jax/.venv
#   train    start training on every worker (background, log in ~/dreamvideo_jax/train.log on each worker);
#            rerun it after a preemption: training resumes from the workdir's latest checkpoint
#   all      compile + create + setup + train (a config that does not fit is refused before any VM exists)
#   status   show the slice's state        logs   print the last lines of worker 0's log
#   stop     stop the training processes   delete delete the slice
#
# Options (each also read from the environment variable in brackets)
#   --name=NAME               TPU name [TPU_NAME]                                    (required)
#   --zone=ZONE               e.g. us-central2-b [TPU_ZONE]                          (required)
#   --project=PROJECT         GCP project [TPU_PROJECT]; default: gcloud's configured project
#   --accelerator=TYPE        e.g. v4-32, v5litepod-16 [TPU_ACCELERATOR]             (create)
#   --version=RUNTIME         TPU VM runtime, e.g. tpu-ubuntu2204-base [TPU_VERSION] (create)
#   --spot                    create a Spot (preemptible) slice
#   --workdir=gs://...        training workdir [WORKDIR]                             (train; must be gs://)
#   --data_dir=gs://...       tfds data dir [DATA_DIR]                               (train)
#   --config=configs/X.py     config file [CONFIG]; default configs/modelscope_t2v.py
#   --init_from=PATH          base checkpoint or workdir to start from [INIT_FROM]   (train, optional)
#   --extra="--config.a=b"    more flags passed to dreamvideo_jax.train [EXTRA]
#   --skip_compile            all: skip the compile check (it takes minutes at full size)
#   --dry_run                 print every command instead of running it
#
# Example
#   bash launch/tpu/pod.sh all --name=dv --zone=us-central2-b --accelerator=v4-32 \
#       --version=tpu-ubuntu2204-base --workdir=gs://BUCKET/runs/dv1 --data_dir=gs://BUCKET/tfds \
#       --init_from=gs://BUCKET/base/modelscope_t2v
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO_ROOT="$(pwd)"

usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; }

COMMAND="${1:-}"
if [ -z "$COMMAND" ] || [ "$COMMAND" = "-h" ] || [ "$COMMAND" = "--help" ]; then
  usage
  exit 0
fi
shift

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-}"
VERSION="${TPU_VERSION:-}"
SPOT=0
SKIP_COMPILE=0
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
CONFIG="${CONFIG:-configs/modelscope_t2v.py}"
INIT_FROM="${INIT_FROM:-}"
EXTRA="${EXTRA:-}"
DRY_RUN=0
REMOTE_DIR='~/dreamvideo_jax'

die() { echo "error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --data_dir=*) DATA_DIR="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --init_from=*) INIT_FROM="${arg#*=}" ;;
    --extra=*) EXTRA="${arg#*=}" ;;
    --skip_compile) SKIP_COMPILE=1 ;;
    --dry_run|--dry-run) DRY_RUN=1 ;;
    *) die "unknown option $arg (see: bash launch/tpu/pod.sh --help)" ;;
  esac
done

[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then LOC+=(--project="$PROJECT"); fi

# Single-quotes an argument when it holds anything but safe characters (the printed line can be pasted).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (one line, pasteable) and runs it unless --dry_run.
run() {
  local line="" a
  for a in "$@"; do line+="$(quote "$a") "; done
  echo "+ ${line% }"
  if [ "$DRY_RUN" = 0 ]; then
    "$@"
  fi
}

on_all_workers() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

cmd_compile() {
  [ -n "$ACCELERATOR" ] || die "--accelerator is required for compile (e.g. v4-32)"
  local python="${PYTHON:-python}"
  if [ -z "${PYTHON:-}" ] && [ -x "$REPO_ROOT/.venv/bin/python" ]; then python="$REPO_ROOT/.venv/bin/python"; fi
  local args=("$python" -m dreamvideo_jax.aot --config="$CONFIG" --topology="$ACCELERATOR" --program=train)
  local a
  for a in $EXTRA; do case "$a" in --config.*) args+=("$a") ;; esac; done
  run "${args[@]}" || die "the train step does not fit a $ACCELERATOR slice (the report above names the largest buffers and what to change); or pass --skip_compile"
}

cmd_create() {
  [ -n "$ACCELERATOR" ] || die "--accelerator is required for create (e.g. v4-32)"
  [ -n "$VERSION" ] || die "--version (TPU VM runtime) is required for create (e.g. tpu-ubuntu2204-base)"
  local args=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if [ "$SPOT" = 1 ]; then args+=(--spot); fi
  run "${args[@]}"
}

cmd_setup() {
  local tarball="/tmp/dreamvideo_jax_${NAME}.tar.gz"
  # The committed tree (HEAD): what runs on the pod is exactly a commit.
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=dreamvideo_jax/ -o "$tarball" HEAD
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:/tmp/dreamvideo_jax.tar.gz" "${LOC[@]}" --worker=all
  local install="set -e; rm -rf $REMOTE_DIR; tar xzf /tmp/dreamvideo_jax.tar.gz -C ~;"
  install+=" cd $REMOTE_DIR && bash launch/setup.sh tpu && . .venv/bin/activate"
  install+=" && python -m pip install -q gcsfs google-cloud-storage"
  install+=" && python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'"
  on_all_workers "$install"
}

cmd_train() {
  [ -n "$WORKDIR" ] || die "--workdir is required for train"
  case "$WORKDIR" in gs://*) ;; *) die "--workdir must be a gs:// path (every worker writes to it), got $WORKDIR" ;; esac
  [ -n "$DATA_DIR" ] || die "--data_dir is required for train"
  local flags="--config=$CONFIG --workdir=$WORKDIR --config.data.data_dir=$DATA_DIR --multihost"
  if [ -n "$INIT_FROM" ]; then flags+=" --config.init_from=$INIT_FROM"; fi
  if [ -n "$EXTRA" ]; then flags+=" $EXTRA"; fi
  local cmd="cd $REMOTE_DIR && . .venv/bin/activate && nohup python -m dreamvideo_jax.train $flags"
  cmd+=" > train.log 2>&1 < /dev/null & echo \$! > train.pid"
  on_all_workers "$cmd"
}

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  compile) cmd_compile ;;
  all) if [ "$SKIP_COMPILE" = 0 ]; then cmd_compile; fi; cmd_create; cmd_setup; cmd_train ;;
  status) run "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format="value(state,health,acceleratorType)" ;;
  logs) run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -n 50 $REMOTE_DIR/train.log" ;;
  # SIGTERM: each worker saves a checkpoint at the current step and exits cleanly.
  stop) on_all_workers "kill -TERM \$(cat $REMOTE_DIR/train.pid) || true" ;;
  delete) run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet ;;
  *) die "unknown command $COMMAND (compile|create|setup|train|all|status|logs|stop|delete)" ;;
esac
