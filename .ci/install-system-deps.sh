#!/bin/sh
# Install what the system tests (tests/system, pytest marker `system`) need on a
# Debian 12 machine, as root: building the .deb, linting it, checking the unit,
# debootstrapping a Debian 12 root and booting it with systemd-nspawn; htpasswd
# (apache2-utils) and curl for the web-config acceptance tests; and what the test
# extra's systemd-python (the journal library) needs to build from its sdist:
# libsystemd-dev, pkg-config, gcc and the Python headers.
# Idempotent: packages already installed are left alone, and apt-get update runs
# only when a wanted package is missing. Network: Debian's archive only.
set -eu

PACKAGES="
systemd
systemd-container
debootstrap
dpkg-dev
debhelper
dh-python
python3-all
python3-psutil
python3-regex
python3-structlog
python3-prometheus-client
python3-sdnotify
python3-bcrypt
python3-yaml
apache2-utils
curl
python3-jeepney
dbus-daemon
python3-setuptools
python3-build
python3-installer
python3-wheel
pybuild-plugin-pyproject
python3-pip
lintian
fakeroot
man-db
groff-base
util-linux
procps
iproute2
ca-certificates
libsystemd-dev
pkg-config
gcc
python3-dev
"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: must run as root" >&2
    exit 1
fi

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "install-system-deps.sh: all system-test packages already installed"
    exit 0
fi

echo "install-system-deps.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing
