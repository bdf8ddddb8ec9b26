#!/usr/bin/env bash
# layerstore demo, as root on a fresh Debian 12/13 machine:
#   bash scripts/demo.sh          install, start a local registry with a sample eStargz image,
#                                 mount the store, pull the image lazily with Podman and run it.
#                                 The registry and the store keep running afterwards.
#   bash scripts/demo.sh stop     stop the store and the registry, unmount.
#
# Podman is configured only through files under $DEMO (CONTAINERS_*_CONF); the machine's
# /etc/containers is never touched. Network: the package mirrors (install) and 127.0.0.1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LAYERSTORE_VENV:-$REPO/.venv}
DEMO=${LAYERSTORE_DEMO_DIR:-/var/lib/layerstore-demo}
STORE_ROOT=${LAYERSTORE_ROOT:-/var/lib/layerstore}
MNT=$STORE_ROOT/store
PORT=${LAYERSTORE_DEMO_PORT:-5000}
REG=127.0.0.1:$PORT
IMAGE=$REG/layerstore/sample
export PODMAN_IGNORE_CGROUPSV1_WARNING=1

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_all() {
  if alive "$DEMO/store.pid"; then
    kill -TERM "$(cat "$DEMO/store.pid")"
    for _ in $(seq 50); do alive "$DEMO/store.pid" || break; sleep 0.2; done
  fi
  if grep -qs " $MNT " /proc/self/mountinfo; then fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT"; fi
  alive "$DEMO/registry.pid" && kill "$(cat "$DEMO/registry.pid")" || true
  alive "$DEMO/containerd.pid" && kill "$(cat "$DEMO/containerd.pid")" || true
  rm -f "$DEMO"/*.pid
}

if [ "${1:-}" = stop ]; then
  stop_all
  echo "stopped; state is kept in $DEMO and $STORE_ROOT"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts and rootful Podman)"

say "Installing packages and the layerstore venv"
bash "$REPO/scripts/install.sh"
mkdir -p "$DEMO"

say "Podman configuration in $DEMO (written before Podman's first use of it)"
mkdir -p "$MNT" "$DEMO/storage" "$DEMO/tmp"
cat > "$DEMO/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$DEMO/storage"
runroot = "/run/layerstore-demo/storage"

[storage.options]
additionallayerstores = ["$MNT:ref"]
CONF
cat > "$DEMO/storage-plain.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$DEMO/storage-plain"
runroot = "/run/layerstore-demo/storage-plain"
CONF
cat > "$DEMO/containers.conf" <<CONF
[containers]
# explicit limits: without CAP_SYS_RESOURCE podman's root defaults cannot be applied
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
tmp_dir = "/run/layerstore-demo/libpod"
CONF
cat > "$DEMO/registries.conf" <<CONF
[[registry]]
location = "$REG"
insecure = true
CONF
cat > "$DEMO/env.sh" <<CONF
export CONTAINERS_STORAGE_CONF=$DEMO/storage.conf
export CONTAINERS_CONF=$DEMO/containers.conf
export CONTAINERS_REGISTRIES_CONF=$DEMO/registries.conf
export PODMAN_IGNORE_CGROUPSV1_WARNING=1
CONF
export CONTAINERS_CONF=$DEMO/containers.conf CONTAINERS_REGISTRIES_CONF=$DEMO/registries.conf
with_store() { CONTAINERS_STORAGE_CONF=$DEMO/storage.conf "$@"; }
without_store() { CONTAINERS_STORAGE_CONF=$DEMO/storage-plain.conf "$@"; }

say "Local registry on $REG"
if ! alive "$DEMO/registry.pid"; then
  mkdir -p "$DEMO/registry-data"
  cat > "$DEMO/registry.yml" <<CONF
version: 0.1
log: {level: info}
storage: {filesystem: {rootdirectory: $DEMO/registry-data}, delete: {enabled: true}}
http: {addr: $REG}
CONF
  nohup docker-registry serve "$DEMO/registry.yml" > "$DEMO/registry.log" 2>&1 &
  echo $! > "$DEMO/registry.pid"
fi
for _ in $(seq 50); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || die "registry did not start (see $DEMO/registry.log)"

if ! curl -sf -o /dev/null "http://$REG/v2/layerstore/sample/manifests/esgz"; then
  say "Building the sample image (busybox + 96 MB of data) and converting it to eStargz"
  rm -rf "$DEMO/rootfs"; mkdir -p "$DEMO"/rootfs/{bin,etc,tmp,proc,sys,dev,root,data}
  cp /bin/busybox "$DEMO/rootfs/bin/"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$DEMO/rootfs/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$DEMO/rootfs/etc/passwd"
  echo 'root:x:0:' > "$DEMO/rootfs/etc/group"
  chmod 1777 "$DEMO/rootfs/tmp"
  echo "Hello from a layer that was never downloaded." > "$DEMO/rootfs/data/hello.txt"
  head -c 100663296 /dev/urandom > "$DEMO/rootfs/data/big.bin"
  tar -C "$DEMO/rootfs" -cf "$DEMO/rootfs.tar" .
  without_store podman import -q --change 'CMD ["/bin/sh"]' "$DEMO/rootfs.tar" "$IMAGE:gzip" >/dev/null
  without_store podman push -q --tls-verify=false "$IMAGE:gzip"
  # eStargz conversion with the reference tool (containerd + ctr-remote), own state dirs.
  C=$DEMO/containerd; mkdir -p "$C/root" "$C/state" "$C/opt"
  cat > "$C/config.toml" <<CONF
version = 2
root = "$C/root"
state = "$C/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$C/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$C/opt"
CONF
  containerd --config "$C/config.toml" > "$C/containerd.log" 2>&1 & echo $! > "$DEMO/containerd.pid"
  for _ in $(seq 100); do [ -S "$C/containerd.sock" ] && break; sleep 0.1; done
  A="ctr-remote -a $C/containerd.sock"
  $A image pull --plain-http "$IMAGE:gzip" >/dev/null
  $A image convert --estargz --oci "$IMAGE:gzip" "$IMAGE:esgz" >/dev/null
  $A image push --plain-http "$IMAGE:esgz" >/dev/null
  kill "$(cat "$DEMO/containerd.pid")"; rm -f "$DEMO/containerd.pid" "$DEMO/rootfs.tar"
  rm -rf "$DEMO/rootfs"
fi

say "Mounting layerstore at $MNT"
if ! alive "$DEMO/store.pid"; then
  nohup "$VENV/bin/layerstore" serve --root "$STORE_ROOT" "$MNT" > "$DEMO/layerstore.log" 2>&1 &
  echo $! > "$DEMO/store.pid"
fi
for _ in $(seq 75); do grep -qs " $MNT " /proc/self/mountinfo && break; sleep 0.2; done
grep -qs " $MNT " /proc/self/mountinfo || die "store did not mount (see $DEMO/layerstore.log)"

say "Normal pull of $IMAGE:esgz (no store), for comparison"
without_store podman rmi -f "$IMAGE:esgz" >/dev/null 2>&1 || true
t0=$(date +%s.%N)
without_store podman pull -q --tls-verify=false "$IMAGE:esgz" >/dev/null
normal=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')

say "Lazy pull of $IMAGE:esgz through layerstore"
with_store podman rmi -f "$IMAGE:esgz" >/dev/null 2>&1 || true
before=$(wc -l < "$DEMO/registry.log")
t0=$(date +%s.%N)
with_store podman pull --tls-verify=false "$IMAGE:esgz"
lazy=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')
layers=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://$REG/v2/layerstore/sample/manifests/esgz" | jq -r '.layers[].digest')
full=0
for d in $layers; do
  n=$(tail -n +"$((before + 1))" "$DEMO/registry.log" | grep -c "GET /v2/layerstore/sample/blobs/$d HTTP/1.1\" 200" || true)
  full=$((full + n))
done
printf 'normal pull: %.2f s   lazy pull: %.2f s   full layer downloads during the lazy pull: %s\n' "$normal" "$lazy" "$full"

say "Running it: files are fetched on demand"
with_store podman run --rm --pull=never --network=none "$IMAGE:esgz" sh -c 'cat /data/hello.txt; ls -l /data'

cat <<INFO

The store keeps running (pid $(cat "$DEMO/store.pid"), log $DEMO/layerstore.log).
Use it from this shell:
  source $DEMO/env.sh
  podman run --rm -it $IMAGE:esgz sh
Stop everything:
  bash $REPO/scripts/demo.sh stop
INFO
