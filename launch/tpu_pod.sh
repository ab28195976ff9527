#!/usr/bin/env bash
# Stage 2, the server, on a TPU VM pod slice: one process per TPU host, all in one run
# (`launch.main --distributed`; jax finds the pod's hosts by itself). Run from a workstation
# with gcloud, in the repository's root. See launch/README.md.
#
#   bash launch/tpu_pod.sh [all|create|copy|setup|run|collect|delete]   (default: all)
#
# all = create, copy, setup, run, collect; `delete` (on its own) deletes the slice.
# Payloads: the folders sites uploaded (site_*), copied to BUCKET once and from there to
# every worker's local disk, because each host reads every payload and streams its own slice.
# WORKDIR (checkpoints, metrics, the body export) must be one folder that every worker sees,
# e.g. a Filestore (NFS) share mounted by MOUNT_COMMAND: Orbax writes checkpoints from all
# hosts. Process 0 writes the body export, collected from worker 0 at the end.
set -euo pipefail

# ---------------------------------------------------------------- Settings
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-smsd-server}"
TPU_TYPE="${TPU_TYPE:-v4-32}"                  # v4-32: 4 hosts, 16 chips
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"      # v5e: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5
BUCKET="${BUCKET:-gs://my-bucket/smsd}"        # staging: repo, payloads
PAYLOADS="${PAYLOADS:-runs/gpu_host/payloads}"  # local folder of site_* payloads ("" to skip)
CONFIG="${CONFIG:-configs/tpu_pod.py}"
WORKDIR="${WORKDIR:-/mnt/smsd/tpu_pod}"        # shared by every worker (see above)
MOUNT_COMMAND="${MOUNT_COMMAND:-}"             # e.g. "sudo mkdir -p /mnt/smsd && sudo mount
                                               #  -t nfs 10.0.0.2:/share /mnt/smsd"
COLLECT_TO="${COLLECT_TO:-runs/tpu_pod}"       # local folder the body is copied into
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                 # more launch.main flags, e.g. --config.x=y

REMOTE_REPO=smsd-jax                           # under each worker's home
REMOTE_PAYLOADS=smsd-payloads
tpu() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

# ---------------------------------------------------------------- Steps
create() {
  tpu create "$TPU_NAME" --accelerator-type="$TPU_TYPE" --version="$RUNTIME"
}

copy() {
  # The repository as committed (no runs/, no .git), and the payloads, through the bucket.
  git archive --format=tar.gz -o /tmp/smsd-jax.tar.gz HEAD
  gsutil cp /tmp/smsd-jax.tar.gz "$BUCKET/smsd-jax.tar.gz"
  if [ -n "$PAYLOADS" ]; then
    gsutil -m rsync -r "$PAYLOADS" "$BUCKET/payloads"
  fi
  on_all "set -e; rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO $REMOTE_PAYLOADS
    gsutil cp $BUCKET/smsd-jax.tar.gz /tmp/ && tar xzf /tmp/smsd-jax.tar.gz -C $REMOTE_REPO
    gsutil -m rsync -r $BUCKET/payloads $REMOTE_PAYLOADS"
}

setup() {
  # launch/setup.sh installs the requirements (jax for CPU); jax[tpu] then adds libtpu. The
  # check runs on every worker at once, as a pod's processes must start together.
  on_all "set -e; ${MOUNT_COMMAND:-true}; cd $REMOTE_REPO && bash launch/setup.sh
    python3 -m pip install -q -U 'jax[tpu]>=0.10.2,<0.12'
    python3 -c 'import jax; jax.distributed.initialize(); print(jax.process_index(), \
      jax.device_count())'"
}

run() {
  # Every worker runs the same command; jax.distributed pairs them up.
  on_all "set -e; cd $REMOTE_REPO && python3 -m launch.main --mode=server --distributed \
    --config=$CONFIG --workdir=$WORKDIR \
    --payloads=\$(ls -d \$HOME/$REMOTE_PAYLOADS/site_* | paste -sd, -) $EXTRA_FLAGS"
}

collect() {
  mkdir -p "$COLLECT_TO/server"
  tpu scp --worker=0 --recurse "$TPU_NAME:$WORKDIR/server/body" "$COLLECT_TO/server/"
  echo "body: $COLLECT_TO/server/body"
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

# ---------------------------------------------------------------- Main
step="${1:-all}"
case "$step" in
  all) create; copy; setup; run; collect ;;
  create | copy | setup | run | collect | delete) "$step" ;;
  *) echo "usage: $0 [all|create|copy|setup|run|collect|delete]" >&2; exit 2 ;;
esac
