#!/usr/bin/env bash
# Builds the lmps container images without a Docker engine or a registry:
#
#   1. builds the daemons with Bazel (or takes them from --bin_dir);
#   2. stages them and every shared library they need except glibc's own
#      (and CUDA's, which come from the CUDA base image) into a build context;
#   3. makes a local Debian 12 base image with debootstrap (minbase) and
#      `podman import`, unless --base names an image that is already there;
#   4. builds each image with `buildah bud --isolation chroot` from
#      deploy/docker/Dockerfile.<image>;
#   5. runs `<binary> --help` inside every image it built (`buildah from` +
#      `buildah run --isolation chroot`) to prove the binary starts there;
#   6. when scheduler, server and worker-cpu were built, trains a 5-step job
#      with one container of each talking gRPC over loopback.
#
# Usage: deploy/build_images.sh [options]
#   --images=LIST      comma list of scheduler,server,worker-cpu,worker
#                      (default: all; worker = CUDA, built only if
#                      --cuda_base is present locally or --pull is given)
#   --base=IMAGE       base for scheduler/server/worker-cpu
#                      (default localhost/lmps-base:bookworm, made here)
#   --cuda_base=IMAGE  base for the CUDA worker
#                      (default nvidia/cuda:13.0.0-runtime-ubuntu24.04)
#   --pull             let buildah pull bases from a registry
#   --tag=TAG          image tag (default dev); images are lmps-<image>:TAG
#   --bin_dir=DIR      take lmps_* binaries from DIR instead of Bazel
#   --context=DIR      staging directory, one build context per image
#                      (default out/images/context)
#   --mirror=URL       Debian mirror for debootstrap (default: apt's)
#   --skip_missing     build only the images whose binaries exist
#   --no_install       do not apt-get install buildah/podman/debootstrap
#   --no_train_check   skip step 6
#
# Needs root (buildah storage, debootstrap). Not part of `bazel test`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
images="scheduler,server,worker-cpu,worker"
base="localhost/lmps-base:bookworm"
cuda_base="nvidia/cuda:13.0.0-runtime-ubuntu24.04"
pull=""
tag="dev"
bin_dir=""
context="$repo/out/images/context"
mirror=""
skip_missing=""
install=1
train_check=1

for arg in "$@"; do
  case "$arg" in
    --images=*) images="${arg#*=}" ;;
    --base=*) base="${arg#*=}" ;;
    --cuda_base=*) cuda_base="${arg#*=}" ;;
    --pull) pull=1 ;;
    --tag=*) tag="${arg#*=}" ;;
    --bin_dir=*) bin_dir="${arg#*=}" ;;
    --context=*) context="${arg#*=}" ;;
    --mirror=*) mirror="${arg#*=}" ;;
    --skip_missing) skip_missing=1 ;;
    --no_install) install="" ;;
    --no_train_check) train_check="" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_images: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "build_images: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Which binaries each image needs (the first is the one smoke-tested).
binaries_of() {
  case "$1" in
    scheduler) echo "lmps_scheduler" ;;
    server) echo "lmps_server lmps_export" ;;
    worker) echo "lmps_worker_cuda" ;;
    worker-cpu) echo "lmps_worker" ;;
    *) die "unknown image '$1' (scheduler, server, worker-cpu, worker)" ;;
  esac
}
bazel_target_of() {
  case "$1" in
    lmps_scheduler) echo "//server/scheduler:lmps_scheduler" ;;
    lmps_server) echo "//server:lmps_server" ;;
    lmps_export) echo "//server:lmps_export" ;;
    lmps_worker) echo "//worker:lmps_worker" ;;
    lmps_worker_cuda) echo "//worker:lmps_worker_cuda" ;;
  esac
}

IFS=, read -r -a wanted <<<"$images"
[ "$(id -u)" -eq 0 ] || die "needs root (buildah storage and debootstrap)"

# --- tools -------------------------------------------------------------------
need_pkgs=()
command -v buildah >/dev/null || need_pkgs+=(buildah)
command -v podman >/dev/null || need_pkgs+=(podman)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ -n "$install" ] || die "missing ${need_pkgs[*]} (and --no_install given)"
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- binaries ----------------------------------------------------------------
declare -A bin_path
all_bins=()
for image in "${wanted[@]}"; do
  for b in $(binaries_of "$image"); do
    [[ " ${all_bins[*]} " == *" $b "* ]] || all_bins+=("$b")
  done
done

if [ -z "$bin_dir" ]; then
  cd "$repo"
  targets=()
  for b in "${all_bins[@]}"; do
    t="$(bazel_target_of "$b")"
    if bazel query "$t" >/dev/null 2>&1; then
      targets+=("$t")
    elif [ -n "$skip_missing" ]; then
      log "skipping $b: $t does not exist (yet)"
    else
      die "$t does not exist (use --skip_missing to build the other images)"
    fi
  done
  if [ ${#targets[@]} -gt 0 ]; then
    log "bazel build ${targets[*]}"
    if ! bazel build "${targets[@]}" >&2; then
      [ -n "$skip_missing" ] || die "bazel build failed"
      log "bazel build of all at once failed; building one by one"
      for t in "${targets[@]}"; do bazel build "$t" >&2 || log "skipping $t: build failed"; done
    fi
  fi
  for b in "${all_bins[@]}"; do
    t="$(bazel_target_of "$b")"
    p="$repo/.bazel/bin/${t#//}"
    p="${p/://}"
    [ -x "$p" ] && bin_path[$b]="$p"
  done
else
  for b in "${all_bins[@]}"; do
    [ -x "$bin_dir/$b" ] && bin_path[$b]="$(cd "$bin_dir" && pwd)/$b"
  done
fi

build_list=()
for image in "${wanted[@]}"; do
  missing=""
  for b in $(binaries_of "$image"); do [ -n "${bin_path[$b]:-}" ] || missing+=" $b"; done
  if [ -n "$missing" ]; then
    [ -n "$skip_missing" ] || die "image $image needs$missing, which did not build"
    log "skipping image $image: no$missing"
    continue
  fi
  build_list+=("$image")
done
[ ${#build_list[@]} -gt 0 ] || die "nothing to build"

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
if [[ " ${build_list[*]} " == *" worker "* ]] && ! have_image "$cuda_base" && [ -z "$pull" ]; then
  log "skipping image worker: CUDA base $cuda_base is not present locally (pass --pull where a registry is reachable)"
  kept=()
  for image in "${build_list[@]}"; do [ "$image" = worker ] || kept+=("$image"); done
  build_list=("${kept[@]}")
  [ ${#build_list[@]} -gt 0 ] || die "nothing to build"
fi


# glibc's libraries come from the base image; CUDA's from the CUDA base.
is_system_lib() {
  case "$(basename "$1")" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|\
    libresolv.so*|libutil.so*|libanl.so*|libnss_*|libmvec.so*) return 0 ;;
  esac
  return 1
}
is_cuda_lib() {
  case "$1" in
    /usr/local/cuda*|*/libcuda.so*|*/libcudart.so*|*/libcublas*|*/libnccl*|*/libnvidia*|\
    */libcufft*|*/libcurand*|*/libcusparse*|*/libcusolver*|*/libnvrtc*|*/libnvJitLink*) return 0 ;;
  esac
  return 1
}

# lmps_worker is CPU-only; lmps_worker_cuda (built where nvcc exists) loads
# the CUDA backend plugin, which links cuBLAS/cudart from the CUDA base image.
# --- build context -------------------------------------------------------------
# One context per image, <context>/<image>/{bin,lib}, holding only what that
# image's binaries need.
rm -rf "$context"
declare -A needs_cuda
max_glibc="2.0"
stage() {  # stage IMAGE BINARY
  local dir="$context/$1" b="$2" src="${bin_path[$2]}" plugin
  mkdir -p "$dir/bin" "$dir/lib"
  cp "$src" "$dir/bin/$b"
  chmod 0755 "$dir/bin/$b"
  stage_libs "$1" "$src"
  if [ "$b" = lmps_worker_cuda ]; then
    # The CUDA backend plugin (worker/backend/cuda/cuda_plugin.h), loaded
    # from LD_LIBRARY_PATH (/usr/local/lib/lmps) with --backend=cuda.
    plugin="$(dirname "$src")/backend/cuda/liblmps_cuda_backend.so"
    [ -f "$plugin" ] || plugin="$(dirname "$src")/liblmps_cuda_backend.so"
    [ -f "$plugin" ] || die "lmps_worker_cuda needs liblmps_cuda_backend.so beside it"
    cp "$plugin" "$dir/lib/liblmps_cuda_backend.so"
    stage_libs "$1" "$plugin"
  fi
}
stage_libs() {  # stage_libs IMAGE FILE: the shared libraries FILE needs
  local dir="$context/$1" b src="$2" out lib real v
  b="$(basename "$src")"
  if ! out="$(ldd "$src" 2>&1)"; then die "ldd $b: $out"; fi
  if grep -q "not found" <<<"$out"; then
    die "$b has unresolved libraries:"$'\n'"$(grep 'not found' <<<"$out")"
  fi
  while read -r lib; do
    [ -n "$lib" ] || continue
    if is_system_lib "$lib"; then continue; fi
    if is_cuda_lib "$lib"; then needs_cuda[$1]=1; continue; fi
    real="$(readlink -f "$lib")"
    cp -n "$real" "$dir/lib/$(basename "$lib")"
    v="$(objdump -T "$real" 2>/dev/null | awk '/\*UND\*/' | grep -o 'GLIBC_2\.[0-9]*' |
         sort -t. -k2 -n | tail -1 || true)"
    [ -z "$v" ] || max_glibc="$(printf '%s\n%s\n' "$max_glibc" "${v#GLIBC_}" | sort -t. -k2 -n | tail -1)"
  done < <(awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}' <<<"$out")
}
# GPT-2's vocabulary for the worker images (the sample text of a job with
# GPT-2's tokens: data.tokenizer_dir's default, docs/data.md), from where
# scripts/install_deps.sh put it.
source "$repo/scripts/gpt2_paths.sh" || die "see above"
stage_vocab() {  # stage_vocab IMAGE
  local dir="$context/$1/share/gpt2" f
  mkdir -p "$dir"
  for f in encoder.json vocab.bpe; do
    [ -f "$gpt2_pkg/$f" ] ||
      die "GPT-2's $f is not in $gpt2_pkg (scripts/install_deps.sh installs it)"
    cp "$gpt2_pkg/$f" "$dir/$f"
  done
}
for image in "${build_list[@]}"; do
  for b in $(binaries_of "$image"); do stage "$image" "$b"; done
  if [[ "$image" == worker* ]]; then stage_vocab "$image"; fi
  log "staged $image: $(ls "$context/$image/bin" | tr '\n' ' ')+ $(ls "$context/$image/lib" | wc -l)" \
      "libraries ($(du -sh "$context/$image" | cut -f1))"
done
log "the staged files need glibc >= $max_glibc in the base image"
if [ -n "${needs_cuda[worker-cpu]:-}" ]; then
  die "the worker-cpu image's lmps_worker links CUDA libraries, which it does not ship"
fi

# --- base images ---------------------------------------------------------------

if [[ " ${build_list[*]} " =~ " scheduler "|" server "|" worker-cpu " ]] && ! have_image "$base"; then
  if [ "$base" != "localhost/lmps-base:bookworm" ]; then
    [ -n "$pull" ] || die "base image $base is not present locally (pass --pull to fetch it)"
  else
    if [ -z "$mirror" ]; then
      mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
      [ -n "$mirror" ] || mirror="$(awk '/^deb / && $3 ~ /bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
    fi
    rootfs="$(mktemp -d /tmp/lmps-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap --variant=minbase bookworm ${mirror:-(default mirror)} (about a minute)"
    debootstrap --variant=minbase bookworm "$rootfs" ${mirror:+"$mirror"} >/dev/null ||
      die "debootstrap failed"
    # Trim what a runtime image never needs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null ||
      die "podman import failed"
    rm -rf "$rootfs"
    trap - EXIT
    log "made base image $base"
  fi
fi
# --- images ------------------------------------------------------------------------
built=()
pull_mode=never
[ -z "$pull" ] || pull_mode=true
for image in "${build_list[@]}"; do
  name="lmps-$image:$tag"
  image_base="$base"
  [ "$image" != worker ] || image_base="$cuda_base"
  log "buildah bud $name (base $image_base)"
  old_id="$(buildah images -q --no-trunc "$name" 2>/dev/null | head -1 || true)"
  buildah bud --isolation chroot --layers=false --pull="$pull_mode" \
    --build-arg "BASE=$image_base" -f "$repo/deploy/docker/Dockerfile.$image" \
    -t "$name" "$context/$image" >&2 || die "buildah bud $name failed"
  # The previous build of this name is now untagged: drop it.
  new_id="$(buildah images -q --no-trunc "$name" | head -1)"
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then buildah rmi "$old_id" >/dev/null 2>&1 || true; fi
  built+=("$name")
done

# --- smoke test: every binary starts inside its image ---------------------------------
for name in "${built[@]}"; do
  image="${name#lmps-}"; image="${image%%:*}"
  ctr="$(buildah from --pull=never "$name")"
  for b in $(binaries_of "$image"); do
    # --helpfull is absl's flag listing; it exits 1 by design, so look at the output.
    out="$(buildah run --isolation chroot "$ctr" -- "/usr/local/bin/$b" --helpfull 2>&1 || true)"
    if ! grep -q "Flags from" <<<"$out" ||
       grep -q -E "error while loading shared libraries|version .GLIBC" <<<"$out"; then
      buildah rm "$ctr" >/dev/null
      die "$b does not run in $name:"$'\n'"$out"
    fi
    user="$(buildah run --isolation chroot "$ctr" -- /usr/bin/id -u 2>/dev/null || echo '?')"
    log "ok: $b runs in $name as uid $user ($(grep -c -- '^ *--' <<<"$out") flags listed)"
  done
  if [[ "$image" == worker* ]]; then
    buildah run --isolation chroot "$ctr" -- /bin/sh -c \
        "test -r '$gpt2_pkg/encoder.json' && test -r '$gpt2_pkg/vocab.bpe'" ||
      { buildah rm "$ctr" >/dev/null; die "GPT-2's vocabulary is not readable at $gpt2_pkg in $name"; }
    log "ok: GPT-2's vocabulary is in $name at $gpt2_pkg"
  fi
  buildah rm "$ctr" >/dev/null
done
# --- a 5-step training job across the three CPU images (host network) ---------------------
if [ -n "$train_check" ] && [[ " ${built[*]} " == *" lmps-scheduler:"* ]] &&
   [[ " ${built[*]} " == *" lmps-server:"* ]] && [[ " ${built[*]} " == *" lmps-worker-cpu:"* ]]; then
  ports=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(2)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'))
  logs="$(mktemp -d /tmp/lmps-train-check.XXXXXX)"
  s_ctr="$(buildah from --pull=never "lmps-scheduler:$tag")"
  v_ctr="$(buildah from --pull=never "lmps-server:$tag")"
  w_ctr="$(buildah from --pull=never "lmps-worker-cpu:$tag")"
  log "training 5 steps: scheduler, server and worker-cpu containers on 127.0.0.1:${ports[0]}"
  timeout 180 buildah run --isolation chroot "$s_ctr" -- /usr/local/bin/lmps_scheduler \
    --workers=1 --shards=1 --steps=5 --listen="127.0.0.1:${ports[0]}" >"$logs/scheduler.log" 2>&1 &
  s_pid=$!
  timeout 180 buildah run --isolation chroot "$v_ctr" -- /usr/local/bin/lmps_server \
    --scheduler="127.0.0.1:${ports[0]}" --listen="127.0.0.1:${ports[1]}" --advertise_host=127.0.0.1 \
    --shard=0 --checkpoint_dir=/ckpt >"$logs/server.log" 2>&1 &
  v_pid=$!
  ok=1
  timeout 180 buildah run --isolation chroot "$w_ctr" -- /usr/local/bin/lmps_worker \
    --scheduler="127.0.0.1:${ports[0]}" --data=/usr/share/common-licenses/GPL-3 --threads=1 \
    >"$logs/worker.log" 2>&1 || ok=""
  wait "$s_pid" || ok=""
  wait "$v_pid" || ok=""
  ckpt="$(buildah run --isolation chroot "$v_ctr" -- ls /ckpt 2>/dev/null | tr '\n' ' ')"
  buildah rm "$s_ctr" "$v_ctr" "$w_ctr" >/dev/null
  if [ -z "$ok" ] || ! grep -q "done: step 5" "$logs/worker.log"; then
    tail -n 5 "$logs"/*.log >&2
    die "the training check failed (logs in $logs)"
  fi
  log "ok: trained 5 steps in containers: $(grep -o 'done: step 5.*' "$logs/worker.log"); checkpoints: $ckpt"
  rm -rf "$logs"
fi

buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "lmps-(base|scheduler|server|worker)" >&2 || true
log "built: ${built[*]}"
