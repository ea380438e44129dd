#!/usr/bin/python3
"""Verify and unpack the bundled wheels into the package's private directory.

Usage: unpack-vendor.py VENDOR_TXT WHEEL_DIR TARGET_DIR

Every requirement line in VENDOR_TXT ("name==version --hash=sha256:HEX") must
match exactly one wheel in WHEEL_DIR with that hash; nothing else may be there.
Only pure-Python wheels without a .data directory are accepted, so unpacking
the archive is a complete install. Top-level files that are not part of the
library (nvidia-ml-py's example.py) are skipped.
"""

from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from pathlib import Path

SKIP_TOP_LEVEL = {"example.py"}
SKIP_METADATA = ("/RECORD", "/top_level.txt")


def requirements(path: Path) -> dict[str, tuple[str, str]]:
    """Map normalised project name to (version, sha256) from a vendor.txt."""
    wanted: dict[str, tuple[str, str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match is None:
            sys.exit(f"{path}: cannot parse {raw!r}")
        name, version, digest = match.groups()
        wanted[re.sub(r"[-_.]+", "_", name).lower()] = (version, digest)
    return wanted


def main(argv: list[str]) -> int:
    vendor_txt, wheel_dir, target = (Path(a) for a in argv[1:4])
    wanted = requirements(vendor_txt)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    found: set[str] = set()
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        key = name.lower()
        if key not in wanted:
            sys.exit(f"{wheel}: not listed in {vendor_txt}")
        want_version, want_digest = wanted[key]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if version != want_version or digest != want_digest:
            sys.exit(f"{wheel}: expected version {want_version} sha256 {want_digest}, got {version} {digest}")
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            info = next(n for n in names if n.endswith(".dist-info/WHEEL"))
            if "Root-Is-Purelib: true" not in archive.read(info).decode():
                sys.exit(f"{wheel}: not a pure-Python wheel")
            if any(".data/" in n.split("/", 1)[0] + "/" for n in names):
                sys.exit(f"{wheel}: has a .data directory; unpacking it would not be a complete install")
            for member in names:
                if member in SKIP_TOP_LEVEL or member.endswith(SKIP_METADATA):
                    continue
                archive.extract(member, target)
        found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        sys.exit(
            f"missing bundled wheels in {wheel_dir}: {', '.join(missing)}; "
            "build with packaging/build-deb.sh, which downloads them"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
