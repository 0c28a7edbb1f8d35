"""Fault injection, the long part (issue 13; ``python -m pytest -m slow tests/test_faults_slow.py``, a few minutes):
SIGKILLs at random moments (resumed to the bitwise result of an uninterrupted run), kills during ``--overwrite``
(the folder always holds one whole run), a really full disk (a small tmpfs) and two runs started together into one
folder. The counts each part reached are written to ``benchmarks/results/faults.json``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from scalora.cli import main
from scalora.train import checkpoint, loop, rundir
from scalora.train.compare import to_argv
from scalora.train.config import TrainConfig
from scalora.train.models import tiny_model
from scalora.train.runlock import LOCK_NAME

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "faults.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
RESUME_KILLS = 16  # random kills of one run, each followed by --resume
OVERWRITE_KILLS = 8  # kills of an --overwrite run over a finished run, each then finished and compared
FREE_SPACE_KB = (0, 4, 16, 64, 128, 256, 512, 1024, 2048)  # what a full disk leaves for an --overwrite run
CONCURRENT_PAIRS = 6
STEPS = 24


@pytest.fixture(scope="module")
def counts() -> Iterator[dict[str, Any]]:
    """Each test adds its section; the file keeps the sections of tests that did not run this time."""
    found: dict[str, Any] = {}
    yield found
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    environment = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                   "command": "python -m pytest -m slow tests/test_faults_slow.py"}
    RESULTS.write_text(json.dumps({**previous, **found, "environment": environment}, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults-slow")
    model, tokenizer = tiny_model("bert", num_labels=2, hidden=32, layers=2)
    model.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    words = {0: "bad awful poor dull", 1: "good great fine nice"}
    rows = [{"text": f"{words[i % 2]} {i}", "label": i % 2} for i in range(64)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "bert": root / "bert", "cls": root / "cls.jsonl"}


def values(files: dict[str, Path], out: Path, **overrides: Any) -> dict[str, Any]:
    """TrainConfig field values of a ScaLoRA run that checkpoints every step (its base weights change too)."""
    return {"model": str(files["bert"]), "task": None, "train_file": str(files["cls"]), "method": "scalora",
            "steps": STEPS, "save_every": 1, "batch_size": 8, "max_length": 24, "eval_size": 8, "r": 2,
            "tensorboard": False, "progress": False, "output_dir": str(out), **overrides}


def start(vals: dict[str, Any]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scalora", "train", *to_argv(vals), "--threads", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def final_state(out: Path) -> dict[str, Any]:
    folder = out / "checkpoint"
    state = checkpoint.read_state(folder)
    return {"model": load_file(folder / "model.safetensors"), "result": load_file(out / "model" / "model.safetensors"),
            "optimizer": state["optimizer"], "rng": state["rng"]["torch"],
            "losses": [json.loads(line)["loss"] for line in (out / loop.METRICS).read_text().splitlines()]}


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(identical, a, b))
    return a == b


def visible(folder: Path) -> dict[str, bytes]:
    """The run's files (not its working files: .lock, .new-run/, ...)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not str(p.relative_to(folder)).startswith(".")}


def wait_for(proc: subprocess.Popen, ready: Any) -> None:
    while not ready() and proc.poll() is None:
        time.sleep(0.005)


def training_started(out: Path, since: float) -> bool:
    """Has the run written its metrics file (it does so right before its first step) since `since`?"""
    return any(p.is_file() and p.stat().st_mtime >= since for p in (out / loop.METRICS, out / ".new-run" /
                                                                       loop.METRICS))


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> dict[str, Any]:
    """The uninterrupted run (in a subprocess, timed): its final state, how long it loads after taking its lock,
    and how long it trains until its summary is written."""
    out = files["root"] / "reference"
    t0 = time.time()
    proc = start(values(files, out))
    wait_for(proc, lambda: (out / LOCK_NAME).exists())
    t1 = time.time()
    wait_for(proc, lambda: training_started(out, t0))
    t2 = time.time()
    wait_for(proc, lambda: (out / loop.SUMMARY).exists())
    t3 = time.time()
    code, err = finish(proc)
    assert code == 0, err
    return {"state": final_state(out), "loading_s": t2 - t1, "training_s": t3 - t2}


def kill_at_random(vals: dict[str, Any], reference: dict[str, Any], rng: random.Random) -> bool:
    """Start the run `vals` and SIGKILL it at a random moment after it took the folder's lock: a quarter of the
    kills while it loads, the others while it trains. False if it had finished (it may still be exiting)."""
    out, since = Path(vals["output_dir"]), time.time()
    proc = start(vals)
    wait_for(proc, lambda: (out / LOCK_NAME).exists())
    if rng.random() < 0.25:
        delay = rng.uniform(0.0, reference["loading_s"])
    else:
        wait_for(proc, lambda: training_started(out, since))
        delay = rng.uniform(0.0, reference["training_s"])
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=delay)
    if proc.poll() is not None:
        finish(proc)
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    summary = out / loop.SUMMARY
    return (out / LOCK_NAME).exists() or not summary.is_file() or TrainConfig.from_dict(
        json.loads(summary.read_text())["config"]).fingerprint() != TrainConfig(**vals).fingerprint()


def leftovers(out: Path) -> set[str]:
    """Traces of checkpoint writes in progress: temporary folders, and the old checkpoint moved aside."""
    found = {p.name for folder in (out, out / ".new-run") for p in folder.glob(checkpoint.TMP_PREFIX + "*")}
    old = out / "checkpoint.old"
    return found | ({f"checkpoint.old {old.stat().st_ino}"} if old.exists() else set())


def test_random_kills_resume_bitwise(files: dict[str, Path], reference: dict[str, Any], counts: dict[str, Any],
                                     tmp_path: Path) -> None:
    rng = random.Random(13)
    out = tmp_path / "run"
    kills = during_write = taken_over = 0
    while kills < RESUME_KILLS:
        before = leftovers(out)
        if not kill_at_random(values(files, out, resume=checkpoint.find(out) is not None), reference, rng):
            shutil.rmtree(out)  # it finished before the kill: start over, the kills must land inside a run
            continue
        kills += 1
        during_write += bool(leftovers(out) - before)
        taken_over += (out / LOCK_NAME).exists()
    code, err = finish(start(values(files, out, resume=checkpoint.find(out) is not None)))
    assert code == 0, err
    assert identical(final_state(out), reference["state"])
    assert not (out / LOCK_NAME).exists() and not any(p.name.startswith(".") for p in out.iterdir())
    counts["random_kills"] = {"kills": kills, "during_a_checkpoint_write": during_write,
                              "stale_locks_taken_over": taken_over, "resumed_bitwise_identical": True,
                              "steps": STEPS, "checkpoint_every": 1,
                              "run_loading_s": round(reference["loading_s"], 2),
                              "run_training_s": round(reference["training_s"], 2)}


def test_kills_during_overwrite_keep_one_whole_run(files: dict[str, Path], reference: dict[str, Any],
                                                   counts: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(31)
    old = tmp_path / "old"
    code, err = finish(start(values(files, old, method="lora", steps=4, save_every=0)))
    assert code == 0, err
    old_files = visible(old)
    new_fingerprint = TrainConfig(**values(files, old)).fingerprint()
    tally = {"kills": 0, "previous_run_kept": 0, "new_run_promoted": 0, "switch_finished_by_next_run": 0,
             "neither": 0, "finished_bitwise_identical": 0}
    while tally["kills"] < OVERWRITE_KILLS:
        out = tmp_path / f"run{tally['kills']}"
        shutil.copytree(old, out)
        if not kill_at_random(values(files, out, overwrite=True), reference, rng):
            shutil.rmtree(out)
            continue
        tally["kills"] += 1
        if any((out / name).exists() for name in (".replaced-partial", ".replaced")):  # killed amid the renames
            tally["switch_finished_by_next_run"] += 1
            rundir.recover(out)  # what the next run in the folder does first
        found = checkpoint.find(out)
        meta = json.loads((found / "trainer_state.json").read_text()) if found else {}
        kept, promoted = visible(out) == old_files, meta.get("fingerprint") == new_fingerprint
        tally["previous_run_kept"] += kept
        tally["new_run_promoted"] += promoted
        tally["neither"] += not (kept or promoted)
        code, err = finish(start(values(files, out, **({"resume": True} if promoted else {"overwrite": True}))))
        assert code == 0, err
        tally["finished_bitwise_identical"] += identical(final_state(out), reference["state"])
        shutil.rmtree(out)
    counts["kills_during_overwrite"] = tally
    assert tally["neither"] == 0 and tally["finished_bitwise_identical"] == OVERWRITE_KILLS


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root (tests/test_faults.py simulates "
                    "ENOSPC by patching instead)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def cli(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip()


def test_full_disk(files: dict[str, Path], counts: dict[str, Any], tmp_path: Path) -> None:
    tally = {"overwrite_runs": 0, "failed_with_one_line": 0, "previous_run_kept": 0, "succeeded": 0,
             "resumed_after_freeing_space": 0}
    with tmpfs(tmp_path / "disk", "8m") as disk:
        old = disk / "old"
        assert cli(["train", *to_argv(values(files, old, method="lora", steps=4, save_every=0))])[0] == 0
        old_files = visible(old)
        for free_kb in FREE_SPACE_KB:
            run = disk / "run"
            shutil.copytree(old, run)
            stat = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free_kb * 1024))
            code, err = cli(["train", *to_argv(values(files, run, overwrite=True, method="full", steps=4,
                                                      save_every=0))])  # its first checkpoint comes last
            tally["overwrite_runs"] += 1
            if code == 0:
                tally["succeeded"] += 1
            else:
                assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
                assert "No space left on device" in err, err
                tally["failed_with_one_line"] += 1
                tally["previous_run_kept"] += visible(run) == old_files and sorted(os.listdir(run)) == sorted(
                    os.listdir(old))
            (disk / "filler").unlink()
            shutil.rmtree(run)

        # a run that fills the disk part-way: room for one checkpoint of full fine-tuning (about 490 KB) but not
        # for the next beside it; its last checkpoint resumes once space is freed
        run = disk / "run"
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 700 * 1024))
        code, err = cli(["train", *to_argv(values(files, run, method="full", steps=STEPS, save_every=1))])
        assert code == 2 and "No space left on device" in err and "--resume continues" in err, err
        (disk / "filler").unlink()
        code, err = cli(["train", *to_argv(values(files, run, method="full", steps=STEPS, save_every=1,
                                                  resume=True))])
        assert code == 0, err
        tally["resumed_after_freeing_space"] += 1
    counts["full_disk"] = {**tally, "tmpfs_size": "8m", "free_space_kb": list(FREE_SPACE_KB)}
    assert tally["failed_with_one_line"] == tally["previous_run_kept"] and tally["failed_with_one_line"] >= 3


def test_concurrent_runs_have_one_writer(files: dict[str, Path], counts: dict[str, Any], tmp_path: Path) -> None:
    tally = {"pairs": 0, "one_succeeded": 0, "loser_saw_lock": 0, "loser_saw_finished_run": 0,
             "consistent_survivor": 0}
    for pair in range(CONCURRENT_PAIRS):
        out = tmp_path / f"run{pair}"
        procs = [start(values(files, out, seed=seed, steps=8, save_every=2)) for seed in (1, 2)]
        results = [finish(p) for p in procs]
        tally["pairs"] += 1
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        tally["one_succeeded"] += 1
        winner = next(i for i, (code, _) in enumerate(results) if code == 0)
        loser_err = results[1 - winner][1].strip()
        assert len(loser_err.splitlines()) == 1 and "Traceback" not in loser_err, loser_err
        if f"in use by another run (process {procs[winner].pid})" in loser_err:
            tally["loser_saw_lock"] += 1
        else:
            assert "already holds a run" in loser_err, loser_err
            tally["loser_saw_finished_run"] += 1
        summary = json.loads((out / loop.SUMMARY).read_text())
        steps = [json.loads(line)["step"] for line in (out / loop.METRICS).read_text().splitlines()]
        ckpt = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
        seed = (1, 2)[winner]
        tally["consistent_survivor"] += (summary["seed"] == seed and steps == list(range(1, 9))
                                         and ckpt["config"]["seed"] == seed)
    counts["concurrent_runs"] = tally
    assert tally["consistent_survivor"] == CONCURRENT_PAIRS
