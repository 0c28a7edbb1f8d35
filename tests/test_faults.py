"""Fault injection, the fast part (issue 13): bad input, failures mid-run, full disks, a second writer, tampered
and non-finite files. Every user-facing case ends in one line on stderr, exit status 2 and no traceback, and a
run that fails never costs the run that was in its folder before."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tiny import write_jsonl
from torch import nn

from scalora import LoraConfig, ReLoRA, apply_lora, load_adapter, lora_layers, merge, save_adapter, unmerge
from scalora.cli import main
from scalora.errors import AdapterFileError, ConfigError
from scalora.finite import NonFiniteError
from scalora.train import checkpoint, loop, statefile
from scalora.train.config import TrainConfig
from scalora.train.models import tiny_model
from scalora.train.runlock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier and its data, and a finished LoRA run of it with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("faults")
    model, tokenizer = tiny_model("bert", num_labels=2, hidden=32, layers=2)
    model.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    words = {0: "bad awful poor dull", 1: "good great fine nice"}
    cls = write_jsonl(root / "cls.jsonl", [{"text": f"{words[i % 2]} {i}", "label": i % 2} for i in range(48)])
    out = {"root": root, "bert": root / "bert", "cls": cls, "run": root / "old-run"}
    assert main(train_args(out, out["run"], "--save-every", "2")) == 0
    return out


def train_args(files: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return ["train", "--model", str(files["bert"]), "--train-file", str(files["cls"]), "--steps", str(STEPS),
            "--batch-size", "8", "--max-length", "24", "--eval-size", "8", "--r", "2", "--no-tensorboard",
            "--no-progress", "--output-dir", str(out), *extra]


def config(files: dict[str, Path], out: Path, **overrides: Any) -> TrainConfig:
    """The TrainConfig of `train_args` (for library-level calls)."""
    values: dict[str, Any] = dict(model=str(files["bert"]), task=None, train_file=str(files["cls"]), steps=STEPS,
                                  batch_size=8, max_length=24, eval_size=8, r=2, tensorboard=False, progress=False,
                                  output_dir=str(out))
    return TrainConfig(**{**values, **overrides})


def user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI; it must end in one line `error: ...` on stderr, exit status 2 and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def old_run(files: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the finished run, and every file of it (path → bytes) to compare with afterwards."""
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    return run, snapshot(run)


def snapshot(folder: Path, hidden: bool = True) -> dict[str, bytes]:
    """Every file under `folder` (path → bytes); with ``hidden=False`` without the run's working files (.lock,
    .new-run/, ...)."""
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return {name: p.read_bytes() for name, p in files.items() if hidden or not name.startswith(".")}


# ---------------------------------------------------------------------------------------------------------
# Nothing is deleted until its replacement is complete.


@pytest.mark.parametrize(("case", "extra", "message"), [
    ("diverges at run time", ["--lr", "1e30"], "NaN or infinite"),
    ("infinite learning rate", ["--lr", "inf"], "lr must be a finite number > 0"),
    ("export rank too large", ["--export-rank", "100000"], "--export-rank 100000 exceeds"),
    ("sequences too long for the model", ["--max-length", "100000"], "longer than the model allows (512"),
])
def test_a_failed_overwrite_keeps_the_previous_run(case: str, extra: list[str], message: str,
                                                   files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run, before = old_run(files, tmp_path)
    err = user_error(capsys, train_args(files, run, "--overwrite", *extra))
    assert message in err
    assert snapshot(run) == before, case
    if case == "diverges at run time":
        assert "previous run" in err and "kept" in err and "--resume" not in err
    assert main(["eval", "--run", str(run), "--json"]) == 0  # still loadable


def test_overwrite_replaces_the_run_only_after_its_first_checkpoint(files: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run, before = old_run(files, tmp_path)
    seen: list[tuple[int, bool]] = []
    original = checkpoint.save

    def save(folder: Path, *args: Any, **kwargs: Any) -> Path:
        seen.append((args[1], snapshot(run, hidden=False) == before))  # (step, is the old run there, untouched?)
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    result = loop.train(config(files, run, method="scalora", save_every=2, overwrite=True), log=lambda _: None)
    assert seen == [(2, True), (4, False)]
    assert result.summary["method"] == "scalora" and (run / "model").is_dir() and not (run / "adapter").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.jsonl", "model", "summary.json"]


@pytest.mark.parametrize("where", ["weights", "training state", "results"])
def test_full_disk_during_overwrite_keeps_the_previous_run(where: str, files: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """ENOSPC as safetensors (the weights) and as the OS (the training state, the adapter after the last
    checkpoint) report it."""
    run, before = old_run(files, tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        if where == "weights":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(28, "No space left on device")

    module, name = {"weights": (checkpoint, "save_file"), "training state": (statefile, "save_file"),
                    "results": (loop, "save_adapter")}[where]
    monkeypatch.setattr(module, name, full)
    err = user_error(capsys, train_args(files, run, "--overwrite", "--method", "rslora"))
    assert "No space left on device" in err and "previous run" in err
    assert snapshot(run) == before


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (skips where this machine does not allow mounting one)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system of `disk` until `leave` bytes are free."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_real_full_disk_keeps_the_previous_run(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        run = disk / "run"
        shutil.copytree(files["run"], run)
        before = snapshot(run)
        fill(disk, leave=128 * 1024)  # room for the log rows, not for full fine-tuning's first checkpoint
        err = user_error(capsys, train_args(files, run, "--overwrite", "--method", "full"))
        assert "No space left on device" in err
        assert snapshot(run) == before


def test_inputs_inside_the_output_folder_are_refused(files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, _ = old_run(files, tmp_path)
    loop.train(config(files, tmp_path / "full", method="full", steps=1), log=lambda _: None)
    shutil.copytree(tmp_path / "full" / "model", run / "model")
    before = snapshot(run)
    err = user_error(capsys, [*train_args(files, run, "--overwrite"), "--model", str(run / "model")])
    assert "--model" in err and "lies inside --output-dir" in err
    shutil.copy(files["cls"], run / "data.jsonl")
    err = user_error(capsys, [*train_args(files, run, "--overwrite"), "--train-file", str(run / "data.jsonl")])
    assert "--train-file" in err
    assert snapshot(run) == {**before, "data.jsonl": files["cls"].read_bytes()}


# ---------------------------------------------------------------------------------------------------------
# One writer per run folder.

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from scalora.train.runlock import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_writer_is_refused_and_a_dead_owners_lock_is_taken_over(files: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    run, before = old_run(files, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = user_error(capsys, train_args(files, run, "--overwrite"))
        assert f"in use by another run (process {holder.pid})" in err
        err = user_error(capsys, train_args(files, run, "--resume"))
        assert f"process {holder.pid}" in err
        assert snapshot(run) == {**before, LOCK_NAME: (run / LOCK_NAME).read_bytes()}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (run / LOCK_NAME).is_file()  # a killed owner cannot remove its lock file
    assert main(train_args(files, run, "--resume")) == 0
    assert f"taking over from process {holder.pid}" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()


def test_a_failed_run_in_a_new_folder_leaves_no_folder(files: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new" / "run"
    user_error(capsys, [*train_args(files, out), "--train-file", str(tmp_path / "typo.jsonl")])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# No pickles from disk.


class WritesAFile:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.path)!r}, 'w').write('code ran')",)


def interrupted_run(files: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> None:
    """Train `out` to its checkpoint of step 2 and stop there (as Ctrl-C during step 3 would)."""
    original, calls = loop.train_step, {"n": 0}

    def step(*args: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(files, out, save_every=2, **overrides), log=lambda _: None)
    monkeypatch.undo()


def test_a_crafted_training_state_is_refused_and_runs_no_code(files: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    run, marker = tmp_path / "run", tmp_path / "marker"
    interrupted_run(files, run, monkeypatch)
    folder = run / "checkpoint"
    (folder / checkpoint.STATE).unlink()
    torch.save({"optimizer": WritesAFile(marker)}, folder / "training_state.pt")  # as older checkpoints were
    torch.load(folder / "training_state.pt", weights_only=False)  # the file is armed: unpickling it runs code
    assert marker.read_text() == "code ran"
    marker.unlink()
    err = user_error(capsys, train_args(files, run, "--resume", "--save-every", "2"))
    assert "cannot be read safely" in err and "--overwrite" in err
    assert not marker.exists()

    # the structure stored beside the tensors names no code either: anything but its own tags is refused
    statefile.save({"optimizer": {}}, folder / checkpoint.STATE)
    (folder / "training_state.pt").unlink()
    with open(folder / checkpoint.STATE, "r+b") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace(b'{\\"dict\\"', b'{\\"exec\\"'))
    err = user_error(capsys, train_args(files, run, "--resume", "--save-every", "2"))
    assert "cannot be read" in err and "unexpected entry" in err


def test_a_checkpoint_written_before_safetensors_state_still_resumes(files: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reference = loop.train(config(files, tmp_path / "reference", method="scalora", save_every=2),
                           log=lambda _: None)
    run = tmp_path / "run"
    interrupted_run(files, run, monkeypatch, method="scalora")
    folder = run / "checkpoint"
    torch.save(checkpoint.read_state(folder), folder / "training_state.pt")  # the format of older checkpoints
    (folder / checkpoint.STATE).unlink()
    resumed = loop.train(config(files, run, method="scalora", save_every=2, resume=True), log=lambda _: None)
    assert resumed.summary["eval"] == reference.summary["eval"]
    ref, new = load_file(tmp_path / "reference" / "model" / "model.safetensors"), load_file(run / "model" /
                                                                                           "model.safetensors")
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_training_state_round_trips_types_exactly(tmp_path: Path) -> None:
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}, "groups": [{"betas": (0.9, 0.999),
             "params": [0, 1], "lr": 1e-3, "name": None, "flag": True}], "rng": (3, tuple(range(5)), None),
             "nan": float("nan")}
    statefile.save(state, tmp_path / "s.safetensors")
    back = statefile.load(tmp_path / "s.safetensors")
    assert set(back) == {0, "groups", "rng", "nan"} and back["rng"] == (3, (0, 1, 2, 3, 4), None)
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert torch.equal(back[0]["exp_avg"], torch.ones(2, 3)) and back[0]["step"].item() == 3.0
    with pytest.raises(TypeError, match="cannot hold a"):
        statefile.save({"model": nn.Linear(1, 1)}, tmp_path / "t.safetensors")


# ---------------------------------------------------------------------------------------------------------
# Finite or refuse.


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def adapted(dtype: torch.dtype = torch.float32, alpha_vector: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = apply_lora(Wrapper(nn.Linear(4, 3).to(dtype)),
                       LoraConfig(r=2, target_modules=["inner"], alpha_vector=alpha_vector, init_lora_weights=False))
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for key, value in before.items():  # bitwise, NaN included
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["NaN factor", "fp16 overflow", "infinite α"])
def test_merge_refuses_a_non_finite_result_and_leaves_the_weights(case: str) -> None:
    model = adapted(torch.float16 if case == "fp16 overflow" else torch.float32, alpha_vector=case == "infinite α")
    layer = model.inner
    with torch.no_grad():
        if case == "NaN factor":
            layer.lora_B[0, 0] = float("nan")
        elif case == "fp16 overflow":  # 60 000 + 10 000 is finite in float32 but not in float16 (max 65 504)
            layer.base_layer.weight.fill_(60000.0)
            layer.lora_A.fill_(1.0)
            layer.lora_B.fill_(10000.0 / (2 * layer.scaling))
        else:
            layer.alpha_vector[1] = float("inf")
    before = weights(model)
    with pytest.raises(NonFiniteError, match=r"layer 'inner'.*nothing was changed"):
        merge(model)
    assert_same(model, before)
    assert not layer.merged and isinstance(model.inner, type(layer))
    with pytest.raises(NonFiniteError, match="this layer"):
        layer.merge()
    assert_same(model, before)


def test_unmerge_refuses_an_overflow_and_leaves_the_weights() -> None:
    model = adapted(torch.float16)
    merge(model, unload=False)
    layer = model.inner
    with torch.no_grad():  # the factors changed since the merge: subtracting them now overflows float16
        layer.base_layer.weight.fill_(-60000.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0 / (2 * layer.scaling))
    before = weights(model)
    with pytest.raises(NonFiniteError, match="unmerging"):
        unmerge(model)
    assert_same(model, before)
    assert layer.merged


def test_relora_merge_refuses_a_non_finite_result() -> None:
    model = adapted()
    optimizer = ReLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-3), reset_every=1)
    with torch.no_grad():
        model.inner.lora_A[0, 0] = float("inf")
    before = weights(model)
    with pytest.raises(NonFiniteError, match="layer 'inner'"):
        optimizer.reset()
    assert_same(model, before)


def test_load_adapter_refuses_non_finite_tensors_unless_asked(tmp_path: Path) -> None:
    save_adapter(adapted(), tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path)
    target = apply_lora(Wrapper(nn.Linear(4, 3)), LoraConfig(r=2, target_modules=["inner"]))
    before = weights(target)
    with pytest.raises(AdapterFileError, match=rf"{key}.*NaN or inf.*allow_nonfinite=True"):
        load_adapter(target, tmp_path / "adapter")
    assert_same(target, before)
    load_adapter(target, tmp_path / "adapter", allow_nonfinite=True)
    assert torch.isinf(target.inner.lora_B[0, 0])


@pytest.mark.parametrize("case", ["NaN base weight", "wrong shape"])
def test_a_damaged_checkpoint_is_refused(case: str, files: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    interrupted_run(files, run, monkeypatch, method="scalora")
    path = run / "checkpoint" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("base_layer.weight"))
    if case == "NaN base weight":
        tensors[key][0, 0] = float("nan")
    else:
        tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path)
    err = user_error(capsys, train_args(files, run, "--resume", "--save-every", "2", "--method", "scalora"))
    assert key in err and ("NaN or inf" if case == "NaN base weight" else "has shape") in err
    if case == "NaN base weight":
        cfg = config(files, run, method="scalora", save_every=2, resume=True)
        assert checkpoint.load(run, cfg, allow_nonfinite=True).step == 2


# ---------------------------------------------------------------------------------------------------------
# Readers that tolerate a torn tail.


def test_a_torn_last_metrics_line_is_dropped_and_reported(files: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    interrupted_run(files, run, monkeypatch)
    metrics = run / loop.METRICS
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 0.69')  # a kill in the middle of writing step 3's row
    assert main(train_args(files, run, "--resume", "--save-every", "2")) == 0
    assert "dropped line 3, which a crash left half written" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]

    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    err = user_error(capsys, train_args(files, run, "--resume"))
    assert "line 2 is not a JSON object" in err


# ---------------------------------------------------------------------------------------------------------
# One line, exit 2, no traceback, nothing written.


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """A folder this process cannot write (a read-only tmpfs for root, whom permissions do not stop)."""
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with tmpfs(path, "ro,size=1m") as folder:
        yield folder


def test_output_folders_that_cannot_be_one(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a-file").write_text("x")
    err = user_error(capsys, train_args(files, tmp_path / "a-file"))
    assert "is a file, not a folder" in err
    err = user_error(capsys, train_args(files, tmp_path / "a-file" / "run"))
    assert "lies inside" in err and "which is a file" in err
    err = user_error(capsys, train_args(files, ""))
    assert "output_dir must be a non-empty string" in err
    with read_only(tmp_path / "ro") as folder:
        err = user_error(capsys, train_args(files, folder / "run"))
        assert "cannot use" in err and ("Read-only file system" in err or "Permission denied" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ro"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--weight-decay", "-1"], "weight_decay must be a finite number ≥ 0, got -1"),
    (["--seed", str(2**70)], "seed must be a whole number ≥ 0 (at most 4294967295)"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--lora-dropout", "nan"], "lora_dropout must be a finite number in [0, 1)"),
    (["--steps", str(2**40)], "steps must be a positive integer (at most 2147483647)"),
])
def test_option_out_of_range_writes_nothing(extra: list[str], message: str, files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    err = user_error(capsys, train_args(files, tmp_path / "run", *extra))
    assert message in err
    assert not (tmp_path / "run").exists()


#: one bad value per TrainConfig field: a wrong type or a value out of range
BAD_VALUES: dict[str, Any] = {
    "model": "", "task": 3, "method": "lorra", "train_file": "", "eval_file": [], "train_size": 0, "eval_size": -1,
    "max_length": 2**31, "max_new_tokens": 1.5, "r": True, "lora_alpha": float("inf"), "lora_dropout": 1.0,
    "target_modules": [], "lr": -1e-3, "weight_decay": "0.1", "batch_size": 0, "grad_accum": None, "steps": -5,
    "warmup_steps": -1, "schedule": "step", "max_grad_norm": float("nan"), "seed": 2**70, "scalora_rule": "paperr",
    "scalora_c": 0, "scalora_auto_c": "auto", "scalora_factor_norm": 0.0, "scalora_tau": -1.0, "scalora_interval": 0,
    "scalora_mode": "row", "scalora_transfer_moments": 1,
    "alpha_lr": 0.0, "alpha_every": 0, "alpha_holdout": "many", "relora_every": 0, "relora_prune": 1.5,
    "relora_warmup": 0, "eval_every": -1, "eval_limit": 0, "eval_batch_size": 0, "log_every": 0, "save_every": 1.0,
    "rank_layers": -1, "output_dir": " ", "resume": "yes", "overwrite": 0, "export_rank": 0, "progress": None,
    "tensorboard": "no",
}


def test_every_option_is_checked() -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(BAD_VALUES) == sorted(names), "give every TrainConfig field a bad value here"
    for name, value in BAD_VALUES.items():
        with pytest.raises(ConfigError, match=name):
            TrainConfig(**{name: value})


@pytest.mark.parametrize(("case", "rows", "message"), [
    ("label of 1e9", [{"text": f"t{i}", "label": 10**9 if i == 1 else i % 2} for i in range(20)],
     "is not a class id"),
    ("100 000-deep JSON", None, "nested too deeply"),
])
def test_data_that_would_exhaust_memory_or_the_stack(case: str, rows: list[Any] | None, message: str,
                                                     files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.jsonl"
    if rows is None:
        data.write_text('{"text": "a", "label": 0}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 1}\n')
    else:
        write_jsonl(data, rows)
    err = user_error(capsys, [*train_args(files, tmp_path / "run"), "--train-file", str(data)])
    assert message in err and "line 2" in err


def test_eval_labels_the_training_file_lacks(files: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    err = user_error(capsys, [*train_args(files, tmp_path / "run"), "--eval-file", str(ev)])
    assert "eval.jsonl line 2: label 2 does not occur in the training data" in err


def test_truncated_model_file_for_eval(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    shutil.copytree(files["bert"], model)
    weights_file = model / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    err = user_error(capsys, ["eval", "--model", str(model), "--train-file", str(files["cls"])])
    assert "could not load the model folder" in err


@pytest.mark.parametrize(("call", "message"), [
    (lambda: LoraConfig(target_modules=123), "target_modules must be a list of module names or a regex"),
    (lambda: LoraConfig(target_modules=["q"], rank_pattern=[("q", 4)]), "rank_pattern must be a dict"),
    (lambda: LoraConfig(target_modules=["q"], alpha_pattern={"q": float("nan")}), "alpha_pattern"),
    (lambda: apply_lora(None, LoraConfig(target_modules=["q"])), "expected a torch.nn.Module"),
    (lambda: apply_lora(nn.Linear(2, 2), {"r": 2}), "config must be a scalora.LoraConfig"),
    (lambda: merge("model"), "expected a torch.nn.Module"),
])
def test_library_calls_with_wrong_types(call: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()


def test_adapter_files_that_do_not_fit(tmp_path: Path) -> None:
    source = adapted()
    source.scalora_config = dataclasses.replace(source.scalora_config, lora_alpha=32)
    save_adapter(source, tmp_path / "adapter")
    target = adapted()  # lora_alpha 8: loading only the factors would scale them by another s
    before = weights(target)
    with pytest.raises(AdapterFileError, match=r"scales layer 'inner' by 16 \(lora_alpha=32.*scales by 4"):
        load_adapter(target, tmp_path / "adapter")
    assert_same(target, before)
    fresh = Wrapper(nn.Linear(4, 3))
    load_adapter(fresh, tmp_path / "adapter")  # a model without adapters takes the file's config
    assert next(layer for _, layer in lora_layers(fresh)).scaling == 16

    (tmp_path / "adapter" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="holds a JSON list, not an adapter config"):
        load_adapter(Wrapper(nn.Linear(4, 3)), tmp_path / "adapter")
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        load_adapter(None, tmp_path / "adapter")


def test_interrupt_during_overwrite_says_the_previous_run_is_kept(files: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    run, before = old_run(files, tmp_path)
    original = loop.train_step

    def interrupted(*args: Any) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", interrupted)
    assert main(train_args(files, run, "--overwrite", "--method", "rslora")) == 130
    err = capsys.readouterr().err
    assert "before this run's first checkpoint" in err and "previous run" in err and "--resume" not in err
    assert snapshot(run) == before
    monkeypatch.setattr(loop, "train_step", original)


def test_kill_during_promotion_is_finished_by_the_next_run(files: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between moving the old run aside and moving the new one in: the next start completes the swap."""
    run, _ = old_run(files, tmp_path)
    calls = {"n": 0}
    original = os.replace

    def crash_after_two(src: Any, dst: Any) -> None:
        original(src, dst)
        if ".replaced-partial" in str(dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(os, "replace", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(files, run, method="rslora", save_every=2, overwrite=True), log=lambda _: None)
    monkeypatch.undo()
    assert (run / ".replaced-partial").is_dir()
    cfg = config(files, run, method="rslora", save_every=2, resume=True)
    result = loop.train(cfg, log=lambda _: None)  # recovers the swap, then resumes the new run's checkpoint
    assert result.summary["method"] == "rslora" and not (run / ".replaced-partial").exists()
    assert not (run / ".replaced").exists() and not (run / ".new-run").exists()
    assert [json.loads(line)["step"] for line in (run / loop.METRICS).read_text().splitlines()] == [1, 2, 3, 4]


def test_too_deep_json_in_a_run_folder(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = old_run(files, tmp_path)
    (run / loop.SUMMARY).write_text("[" * 100_000 + "]" * 100_000)
    (run / "checkpoint" / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    err = user_error(capsys, ["eval", "--run", str(run)])
    assert "has not finished" in err
    err = user_error(capsys, train_args(files, run, "--resume"))
    assert "cannot be read" in err
