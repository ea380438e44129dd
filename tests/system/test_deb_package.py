"""The .deb's documentation files: generated man pages and bash completion installed, lintian clean.

Builds the package with packaging/build-deb.sh (which itself fails on a lintian error), or
takes ``GG_DEB``; no container is booted. Needs dpkg-dev, debhelper, dh-python and
lintian (.ci/install-system-deps.sh); without them the tests skip, unless
GG_REQUIRE_SYSTEM_TESTS=1 (CI), where they fail.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_tool

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
PAGES = REPO / "share" / "man" / "man1"
COMPLETION = REPO / "share" / "bash-completion" / "completions" / "gpu-governor"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built package (or GG_DEB)."""
    prebuilt = os.environ.get("GG_DEB")
    if prebuilt:
        yield Path(prebuilt).resolve()
        return
    for tool in ("dpkg-buildpackage", "dh", "pybuild", "lintian"):
        require_tool(tool)
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [str(REPO / "packaging" / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PATH": HOST_PATH},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    yield Path(result.stdout.strip().splitlines()[-1])


def data_members(deb: Path) -> dict[str, bytes]:
    """Regular files of the package's data archive, by path without the leading ``./``."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=120)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        for member in archive.getmembers():
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                files[member.name.removeprefix("./")] = extracted.read()
    return files


def test_installs_every_generated_man_page(deb: Path) -> None:
    """Each page under share/man/man1 is in /usr/share/man/man1, gzipped, with the same text; no other page."""
    files = data_members(deb)
    shipped = {name for name in files if name.startswith("usr/share/man/")}
    assert shipped == {f"usr/share/man/man1/{page.name}.gz" for page in PAGES.glob("*.1")}
    assert len(shipped) >= 9
    for page in PAGES.glob("*.1"):
        assert gzip.decompress(files[f"usr/share/man/man1/{page.name}.gz"]) == page.read_bytes()


def test_installs_the_bash_completion(deb: Path) -> None:
    """The completion is at /usr/share/bash-completion/completions/gpu-governor, where bash-completion loads it."""
    files = data_members(deb)
    assert files["usr/share/bash-completion/completions/gpu-governor"] == COMPLETION.read_bytes()


def test_lintian_has_nothing_to_say_about_them(deb: Path) -> None:
    """lintian (pedantic, info tags shown) reports no tag on the man pages or the completion."""
    changes = sorted(deb.parent.glob("gpu-governor_*.changes"))
    target = changes[0] if changes else deb
    result = subprocess.run(
        [require_tool("lintian"), "--pedantic", "-I", "-E", "--show-overrides", str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PATH": HOST_PATH},
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:", "O:")]
    about_docs = [t for t in tags if "manpage" in t or "usr/share/man" in t or "bash-completion" in t]
    assert about_docs == [], "\n".join(about_docs)
    assert not any(t.startswith(("E:", "W:")) for t in tags), "\n".join(tags)
