#!/usr/bin/env bash
# Builds funcmesh's local Docker images from Debian packages, without any image registry:
# debootstrap a Debian root filesystem, strip it, and `docker import` it.
#
#   scripts/build-image.sh [python|base|node] [--force]
#
#   base    minimal Debian bookworm (debootstrap --variant=minbase)  -> funcmesh/base:bookworm
#   python  base + python3, python3-cloudpickle, procps               -> funcmesh/python:bookworm
#   node    python + iproute2, iptables, conntrack (the container testnet's nodes and
#           router; `funcmesh testnet up --docker` adds the binary)   -> funcmesh/node-base:bookworm
#
# The image name:tag is printed as the last line of stdout; all logging goes to stderr, so
#   image=$(scripts/build-image.sh python | tail -n1)
# works from CI and from the container testnet.
#
# Caching (both layers are keyed by the "recipe hash": sha256 of this script's content plus the
# image's suite, variant, architecture and requested package list):
#   * the image carries LABEL funcmesh.recipe=<hash>; if an image with that name:tag and label
#     exists, nothing is built (a cache hit needs only docker, not root);
#   * the stripped rootfs tarball is kept as $FUNCMESH_IMAGE_CACHE/<image>-<hash>.tar.gz, so a
#     re-import after `docker rmi` does not download anything. Tarballs of older recipes of the
#     same image are deleted when a new one is written.
# --force rebuilds both (fresh debootstrap, fresh import).
#
# Concurrent runs are serialised per image with flock on $FUNCMESH_IMAGE_CACHE/<image>.lock; the
# run that waited finds the cache warm and returns at once.
#
# Environment:
#   FUNCMESH_IMAGE_CACHE    cache/lock directory (default /var/cache/funcmesh/images)
#   FUNCMESH_DEBIAN_MIRROR  Debian mirror (default: the one apt is configured with here,
#                           else http://deb.debian.org/debian)
#   FUNCMESH_IMAGE_VERBOSE  1 = stream debootstrap's output instead of logging it to a file
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
CACHE_DIR="${FUNCMESH_IMAGE_CACHE:-/var/cache/funcmesh/images}"
DEFAULT_MIRROR=http://deb.debian.org/debian
IMAGE_PATH_ENV=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }
usage() { echo "usage: $0 [python|base|node] [--force]" >&2; }

# --- arguments -----------------------------------------------------------------------------
target=python force=0
for arg in "$@"; do
  case "$arg" in
    python | base | node) target="$arg" ;;
    --force | -f) force=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument: $arg" ;;
  esac
done

# --- recipes -------------------------------------------------------------------------------
# required: debootstrap fails without them. optional: dropped (with a warning) if the suite does
# not have them. The recipe hash covers the *requested* lists, so the cache key does not depend on
# what the mirror happened to offer; the installed list is recorded in LABEL funcmesh.packages.
case "$target" in
  base)
    image=funcmesh/base:$SUITE
    required=()
    optional=()
    cmd='["/bin/sh"]'
    ;;
  python)
    image=funcmesh/python:$SUITE
    required=(python3 procps)
    optional=(python3-cloudpickle)
    cmd='["python3"]'
    ;;
  node)
    image=funcmesh/node-base:$SUITE
    required=(python3 procps iproute2 iptables conntrack)
    optional=(python3-cloudpickle)
    cmd='["/bin/sh"]'
    ;;
esac
slug=${image//[\/:]/-}

self="${BASH_SOURCE[0]}"
[ -r "$self" ] || die "cannot read own source ($self) to compute the recipe hash"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
recipe_hash=$(
  {
    cat "$self"
    printf '\n--recipe--\nimage=%s\nsuite=%s\nvariant=%s\narch=%s\nrequired=%s\noptional=%s\ncmd=%s\n' \
      "$image" "$SUITE" "$VARIANT" "$arch" "${required[*]-}" "${optional[*]-}" "$cmd"
  } | sha256sum | cut -d' ' -f1
)
tarball="$CACHE_DIR/$slug-$recipe_hash.tar.gz"
pkgfile="$CACHE_DIR/$slug-$recipe_hash.packages"

command -v docker >/dev/null 2>&1 || die "docker not found"

image_is_current() {
  local label
  label=$(docker image inspect -f '{{ index .Config.Labels "funcmesh.recipe" }}' "$image" 2>/dev/null) || return 1
  [ "$label" = "$recipe_hash" ]
}

# Fast path: no root, no lock needed to see that the image is already there.
if [ "$force" -eq 0 ] && image_is_current; then
  log "$image is up to date (recipe ${recipe_hash:0:12}), nothing to do"
  echo "$image"
  exit 0
fi

# Everything below (debootstrap, chroot, the cache dir under /var/cache) needs root.
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "building $image needs root (debootstrap)"
  log "building $image needs root; re-running under sudo"
  exec sudo --preserve-env=FUNCMESH_IMAGE_CACHE,FUNCMESH_DEBIAN_MIRROR,FUNCMESH_IMAGE_VERBOSE \
    -- bash "$self" "$@"
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/$slug.lock"
if ! flock -n 9; then
  log "another build of $image is running; waiting for its lock"
  flock 9
fi

# Re-check under the lock: a concurrent run may have just built it.
if [ "$force" -eq 0 ] && image_is_current; then
  log "$image is up to date (recipe ${recipe_hash:0:12}), nothing to do"
  echo "$image"
  exit 0
fi

# --- helpers for the build path ------------------------------------------------------------

# The Debian mirror apt here uses for $SUITE: one-line sources.list entries and deb822
# *.sources stanzas (files apt ignores, e.g. *.disabled, are ignored here too).
detect_mirror() {
  local f files=()
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 1
  for f in "${files[@]}"; do
    case "$f" in
      *.sources)
        # deb822: stanzas separated by blank lines; print the first URI of a stanza with
        # Types: deb, Suites containing $SUITE, and not Enabled: no.
        awk -v suite="$SUITE" '
          function flush() {
            if (uri != "" && deb && hassuite && enabled) print uri
            uri = ""; deb = 0; hassuite = 0; enabled = 1
          }
          BEGIN { enabled = 1 }
          /^[ \t]*#/ { next }
          /^[ \t]*$/ { flush(); next }
          {
            key = tolower($1)
            if (key == "types:") { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            else if (key == "uris:") { uri = $2 }
            else if (key == "suites:") { for (i = 2; i <= NF; i++) if ($i == suite) hassuite = 1 }
            else if (key == "enabled:") { enabled = (tolower($2) != "no") }
          }
          END { flush() }' "$f"
        ;;
      *)
        # one-line: deb [options] uri suite component...
        awk -v suite="$SUITE" '
          $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) == suite) print $i
          }' "$f"
        ;;
    esac
  done | grep -v -e '-security' -e '^cdrom:' | sed 's:/*$::' | head -n1 | grep .
}

remove_image_id() { # best effort: an image may still be used by a container
  if [ -n "$1" ]; then docker rmi "$1" >/dev/null 2>&1 || true; fi
}

rootfs=""
cleanup() {
  if [ -n "$rootfs" ] && [ -d "$rootfs" ]; then
    # Never follow mounts out of the rootfs: debootstrap may leave /proc etc. mounted on failure.
    awk -v r="$rootfs" 'index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r |
      while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$rootfs"
  fi
  rm -f "$tarball.tmp.$$" "$pkgfile.tmp.$$"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Writes $tarball and $pkgfile: debootstrap, strip, tar.
build_rootfs() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    # Serialised with the other image's build (apt-get fails rather than waits on its locks).
    (
      flock 8
      if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq debootstrap >/dev/null
      fi
    ) 8>"$CACHE_DIR/apt.lock"
  fi

  local mirror
  mirror="${FUNCMESH_DEBIAN_MIRROR:-$(detect_mirror || true)}"
  mirror="${mirror:-$DEFAULT_MIRROR}"

  # debootstrap fetches with wget, which reads *_proxy from the environment; pass on apt's proxy.
  local http_proxy_apt="" https_proxy_apt=""
  eval "$(apt-config shell http_proxy_apt Acquire::http::Proxy https_proxy_apt Acquire::https::Proxy 2>/dev/null || true)"
  [ -n "$http_proxy_apt" ] && [ -z "${http_proxy:-}" ] && export http_proxy="$http_proxy_apt"
  [ -n "$https_proxy_apt" ] && [ -z "${https_proxy:-}" ] && export https_proxy="$https_proxy_apt"

  rootfs=$(mktemp -d "$CACHE_DIR/rootfs.$slug.XXXXXX")
  local buildlog="$CACHE_DIR/$slug.build.log"
  local packages=("${required[@]}" "${optional[@]}")

  local attempt
  for attempt in 1 2; do
    local args=(--variant="$VARIANT" --arch="$arch")
    [ ${#packages[@]} -gt 0 ] && args+=(--include="$(IFS=,; echo "${packages[*]}")")
    log "debootstrap $SUITE from $mirror${packages[*]:+ with ${packages[*]}} (log: $buildlog)"
    local ok=1
    if [ "${FUNCMESH_IMAGE_VERBOSE:-0}" = 1 ]; then
      debootstrap "${args[@]}" "$SUITE" "$rootfs" "$mirror" 2>&1 | tee "$buildlog" >&2 || ok=0
    else
      debootstrap "${args[@]}" "$SUITE" "$rootfs" "$mirror" >"$buildlog" 2>&1 || ok=0
    fi
    [ "$ok" -eq 1 ] && break

    # An optional package the suite lacks makes debootstrap fail early, while resolving
    # dependencies ("E: Couldn't find these debs: ..."). Drop those and try once more.
    local missing=() p
    if [ "$attempt" -eq 1 ] && [ ${#optional[@]} -gt 0 ]; then
      for p in "${optional[@]}"; do
        if grep -Eq "Couldn't find these debs:.* ${p//[.+]/[&]}( |\$)" "$buildlog"; then
          missing+=("$p")
        fi
      done
    fi
    if [ ${#missing[@]} -eq 0 ]; then
      tail -n 40 "$buildlog" >&2
      die "debootstrap failed (full log: $buildlog)"
    fi
    log "warning: ${missing[*]} not available in Debian $SUITE; building without it"
    local keep=()
    for p in "${packages[@]}"; do
      [[ " ${missing[*]} " == *" $p "* ]] || keep+=("$p")
    done
    packages=("${keep[@]}")
    rm -rf --one-file-system "$rootfs"
    mkdir -p "$rootfs"
  done

  log "stripping rootfs ($(du -sh --one-file-system "$rootfs" | cut -f1) before)"
  (
    cd "$rootfs"
    # Caches, indexes and logs (apt-get update inside a container fetches fresh lists).
    rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/lib/dpkg/*-old \
      var/log/* tmp/* var/tmp/*
    mkdir -p var/lib/apt/lists/partial var/cache/apt/archives/partial
    # Documentation: keep the copyright files, drop the rest.
    find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
    find usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf usr/share/man/* usr/share/info/* usr/share/lintian/* usr/share/linda/*
    find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    # Keep it that way for packages installed later in derived images (as Docker's debian:slim does).
    mkdir -p etc/dpkg/dpkg.cfg.d
    cat >etc/dpkg/dpkg.cfg.d/funcmesh-excludes <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF
    # No services start inside containers.
    printf '#!/bin/sh\nexit 101\n' >usr/sbin/policy-rc.d
    chmod 755 usr/sbin/policy-rc.d
    # Host-specific files debootstrap copied in; docker bind-mounts its own over them.
    : >etc/resolv.conf
    : >etc/hostname
    : >etc/machine-id 2>/dev/null || true
  )
  log "rootfs is $(du -sh --one-file-system "$rootfs" | cut -f1) after stripping"

  # Deterministic-ish tar: sorted, numeric owners; gzip -1 is cheap on 2 cores and ~3x smaller.
  tar --numeric-owner --one-file-system --sort=name --xattrs --xattrs-include='*' \
    -C "$rootfs" -cf - . | gzip -1 >"$tarball.tmp.$$"
  printf '%s\n' "${packages[*]-}" >"$pkgfile.tmp.$$"
  mv -f "$tarball.tmp.$$" "$tarball"
  mv -f "$pkgfile.tmp.$$" "$pkgfile"
  rm -rf --one-file-system "$rootfs"
  rootfs=""

  # Drop tarballs of older recipes of this image.
  local old
  for old in "$CACHE_DIR/$slug"-*.tar.gz "$CACHE_DIR/$slug"-*.packages; do
    [ -e "$old" ] || continue
    case "$old" in "$tarball" | "$pkgfile") continue ;; esac
    rm -f "$old"
  done
}

# --- build ---------------------------------------------------------------------------------
if [ "$force" -eq 1 ] || [ ! -s "$tarball" ] || [ ! -f "$pkgfile" ]; then
  build_rootfs
else
  log "reusing cached rootfs $tarball"
fi

installed=$(tr ' ' ',' <"$pkgfile")
old_id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
log "importing $image ($(du -h "$tarball" | cut -f1) tarball)"
new_id=$(
  docker import \
    --change "ENV PATH=$IMAGE_PATH_ENV" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /' \
    --change "CMD $cmd" \
    --change "LABEL funcmesh.recipe=$recipe_hash" \
    --change "LABEL funcmesh.packages=${installed:-none}" \
    --change "LABEL funcmesh.debian.suite=$SUITE" \
    --message "funcmesh scripts/build-image.sh $target (recipe $recipe_hash)" \
    "$tarball" "$image"
)
[ -n "$old_id" ] && [ "$old_id" != "$new_id" ] && remove_image_id "$old_id"
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec), recipe ${recipe_hash:0:12})"
echo "$image"
