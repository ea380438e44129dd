#!/bin/bash
# Build the gpu-governor .deb from a clean copy of this source tree.
#
#   packaging/build-deb.sh [OUTPUT_DIR]        (default: ./dist/deb)
#
# Steps: copy the tree's files (tracked and untracked-but-not-ignored, as git
# sees them) into a temporary directory; put packaging/debian there as
# ./debian; download the bundled wheels listed in debian/vendor.txt (pip
# download --require-hashes) unless GG_VENDOR_WHEELHOUSE names a directory
# that has them; stamp the version from pyproject.toml into debian/changelog;
# run dpkg-buildpackage -us -uc -b; run lintian; copy the .deb, .buildinfo and
# .changes to OUTPUT_DIR and print the .deb's path on the last line.
#
# Environment:
#   GG_DEB_VERSION        full Debian version to build (default: pyproject
#                         version, "-1"; PEP 440 pre-releases become ~rc1...)
#   GG_VENDOR_WHEELHOUSE  directory holding the wheels of debian/vendor.txt
#                         (offline builds); default: download from PyPI
#   GG_PIP                pip command for the download (default: python3 -m pip)
#   GG_LINTIAN=0          skip lintian
#   GG_KEEP_BUILD_DIR=1   keep the temporary build tree (its path is printed)
#
# Needs: dpkg-dev, debhelper, dh-python, pybuild-plugin-pyproject,
# python3-all, python3-setuptools, python3-wheel and the runtime Python
# packages (.ci/install-system-deps.sh installs them), and git.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
out=${1:-$top/dist/deb}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Debian's tools and Debian's python3 only: a python3 from pyenv or a venv
# earlier on PATH would build against the wrong interpreter.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

log() { printf 'build-deb: %s\n' "$*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-governor-deb.XXXXXX")
cleanup() {
    if [ "${GG_KEEP_BUILD_DIR:-0}" = 1 ]; then
        log "build tree kept in $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT INT TERM

src="$work/gpu-governor"
mkdir -p "$src"

# 1. A clean copy: only what git tracks or would track (no build/, .venv,
#    egg-info, caches), files deleted in the working tree skipped.
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$top" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
        (cd "$top" && tar --null --no-recursion --files-from=- -cf -) |
        tar -xf - -C "$src"
else
    log "not a git checkout; copying the whole tree"
    cp -a "$top/." "$src/"
    rm -rf "$src/dist" "$src/build" "$src"/*.egg-info
fi
rm -rf "$src/debian"
if [ ! -f "$src/README.md" ]; then
    # pyproject.toml names README.md as the long description; setuptools
    # refuses to build without it.
    log "warning: README.md missing from the tree; building with an empty one"
    : >"$src/README.md"
fi
cp -a "$top/packaging/debian" "$src/debian"

for required in pyproject.toml config/governor.toml systemd/gpu-governor.service docs/install.md; do
    if [ ! -f "$src/$required" ]; then
        log "missing $required in the source tree"
        exit 1
    fi
done

# 2. Bundled wheels.
mkdir -p "$src/debian/vendor"
if [ -n "${GG_VENDOR_WHEELHOUSE:-}" ]; then
    log "taking bundled wheels from $GG_VENDOR_WHEELHOUSE"
    for spec in $(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\) .*/\1-\2/p' "$src/debian/vendor.txt"); do
        name=$(echo "${spec%-*}" | tr '.-' '__')
        version=${spec##*-}
        cp "$GG_VENDOR_WHEELHOUSE/${name}-${version}-"*.whl "$src/debian/vendor/"
    done
else
    log "downloading bundled wheels (debian/vendor.txt)"
    ${GG_PIP:-python3 -m pip} download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$src/debian/vendor.txt" -d "$src/debian/vendor"
fi

# 3. Version: pyproject's, unless GG_DEB_VERSION says otherwise.
upstream=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$src/pyproject.toml")
upstream_deb=$(printf '%s' "$upstream" | sed -E 's/\.?(a|b|rc|dev)([0-9]*)$/~\1\2/')
version=${GG_DEB_VERSION:-$upstream_deb-1}
current=$(cd "$src" && dpkg-parsechangelog -S Version)
if [ "$current" != "$version" ]; then
    log "stamping version $version into debian/changelog (was $current)"
    {
        printf 'gpu-governor (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * Build of upstream version %s.\n\n' "$upstream"
        printf ' -- gpu-governor maintainers <gpu-governor@example.org>  %s\n\n' "$(date -R)"
        cat "$src/debian/changelog"
    } >"$src/debian/changelog.new"
    mv "$src/debian/changelog.new" "$src/debian/changelog"
fi

# 4. Build (binary only, unsigned). SOURCE_DATE_EPOCH from the changelog keeps
#    file times reproducible.
log "dpkg-buildpackage -us -uc -b (version $version)"
(cd "$src" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    log "dpkg-buildpackage failed; full log: $work/build.log"
    GG_KEEP_BUILD_DIR=1
    exit 1
}

deb=$(ls "$work"/gpu-governor_*_all.deb)
changes=$(ls "$work"/gpu-governor_*.changes)

# 5. Lintian: errors fail the build; warnings are printed (docs/install.md
#    explains the ones that remain).
if [ "${GG_LINTIAN:-1}" = 1 ] && command -v lintian >/dev/null 2>&1; then
    log "lintian"
    lintian --display-info --fail-on error "$changes" >&2 || {
        log "lintian reported errors"
        exit 1
    }
fi

cp "$deb" "$changes" "$work"/gpu-governor_*.buildinfo "$out/"
log "built $out/$(basename "$deb")"
echo "$out/$(basename "$deb")"
