"""The run folder: what a run leaves in ``--output-dir``, and how a new run replaces an old one without losing it.

A run that starts where files of an earlier run lie (``--overwrite``) writes into ``<output_dir>/.new-run`` until
it has finished, or, with ``--save-every``, until its first checkpoint is complete and on disk. Only then does
`RunFolder.promote` move the earlier run's files into ``.replaced`` and the new ones into place; from then on the
run writes into the folder itself. So a failure or a kill before that moment leaves the earlier run as it was, and
one after it leaves the new run, resumable.
`recover` (run at the start of every run, under the folder's lock) finishes a promotion that a kill interrupted
and removes what such a kill left half written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from scalora.errors import ConfigError
from scalora.train import checkpoint

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
#: everything a run writes (besides ``adapter-rank<k>/``); a new run replaces all of them together
OUTPUTS = (checkpoint.NAME, checkpoint.NAME + ".old", METRICS, SUMMARY, "model", "adapter", "tensorboard")
STAGING = ".new-run"
_REPLACING = ".replaced-partial"  # the earlier run's files being moved aside (renamed to _REPLACED when all are)
_REPLACED = ".replaced"


def outputs(folder: Path) -> list[Path]:
    """The files and folders of the run in `folder` that exist."""
    return [folder / name for name in OUTPUTS if (folder / name).exists()] + sorted(folder.glob("adapter-rank*"))


def check_location(output_dir: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output folder that cannot be one, or that holds an input of the run (`inputs`: option → path),
    before anything is written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir.")
    for parent in output_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--output-dir {output_dir} lies inside {parent}, which is a file; choose another "
                              f"--output-dir.")
    out = output_dir.resolve()
    for option, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        used = Path(value).resolve()
        if used == out or out in used.parents:
            raise ConfigError(f"{option} {value} lies inside --output-dir {output_dir}, whose files runs replace; "
                              f"keep the model and data outside the run folder, or choose another --output-dir.")


def recover(output_dir: Path) -> None:
    """Finish a promotion a kill interrupted; remove a staged run that was never promoted and the temporary folders
    of interrupted writes."""
    replacing, replaced, staging = output_dir / _REPLACING, output_dir / _REPLACED, output_dir / STAGING
    if replacing.is_dir():  # the new run is complete (promotion starts after its checkpoint): carry on
        _move(outputs(output_dir), replacing)
        os.replace(replacing, replaced)
    if replaced.is_dir():
        _move(list(staging.iterdir()) if staging.is_dir() else [], output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    for folder in (output_dir, staging):
        for stale in [*folder.glob(checkpoint.TMP_PREFIX + "*"), *folder.glob(".model-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class RunFolder:
    """Where the run writes now (`current`: `final`, or the staging folder until `promote`) and the step of its
    last durable checkpoint (`step`, None before the first)."""

    final: Path
    current: Path
    step: int | None = None

    @classmethod
    def start(cls, output_dir: Path, *, replace: bool, step: int | None = None) -> RunFolder:
        """Start writing a run in `output_dir`; with `replace`, beside the earlier run's files (see the module)."""
        current = output_dir / STAGING if replace else output_dir
        current.mkdir(parents=True, exist_ok=True)
        return cls(output_dir, current, step)

    @property
    def staged(self) -> bool:
        return self.current != self.final

    def kept(self) -> str:
        """What a failure at this moment leaves in the folder, in a sentence."""
        if self.staged:
            return f"The previous run in {self.final} is kept as it was."
        if self.step is not None:
            return f"This run's checkpoint of step {self.step} is kept: --resume continues from it."
        return "This run wrote no checkpoint (see --save-every)."

    def promote(self) -> None:
        """Replace the earlier run by this one (called once a checkpoint of it is durable: its first one, or the last
        one with the results); a no-op when not staged."""
        if not self.staged:
            return
        replacing = self.final / _REPLACING
        replacing.mkdir(exist_ok=True)
        _move(outputs(self.final), replacing)
        os.replace(replacing, self.final / _REPLACED)
        checkpoint.fsync_dir(self.final)
        self.current = self.final
        recover(self.final)
        checkpoint.fsync_dir(self.final)

    def discard(self) -> None:
        """Remove a staged run that failed before its promotion began (the earlier run stays as it was); a promotion
        that began is finished by the next run's `recover` instead."""
        if self.staged and not any((self.final / name).exists() for name in (_REPLACING, _REPLACED)):
            shutil.rmtree(self.current, ignore_errors=True)


def _move(paths: list[Path], into: Path) -> None:
    for path in paths:
        os.replace(path, into / path.name)
