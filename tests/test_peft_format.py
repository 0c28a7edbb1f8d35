"""Adapters on disk: PEFT's format both ways, round trips, atomic saves, bad files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tiny import tiny_bert, tiny_gpt2, tiny_llama, token_batch

import scalora.peft_format as peft_format
from scalora import AdapterFileError, LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
from scalora.peft_format import CONFIG_NAME, WEIGHTS_NAME


def _randomise(model: torch.nn.Module, seed: int = 5, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


CASES = [
    (tiny_gpt2, 97, {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"]}),
    (tiny_llama, 101, {"target_modules": "all-linear", "use_rslora": True}),
    (tiny_llama, 101, {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
                       "alpha_pattern": {"q_proj": 3}}),
    (tiny_bert, 103, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "use_rslora": True}),
]


@pytest.mark.parametrize("builder,vocab,kwargs", CASES)
def test_scalora_adapter_loads_in_peft(tmp_path, builder, vocab, kwargs) -> None:
    ids = token_batch(vocab)
    model = apply_lora(builder(), LoraConfig(r=4, lora_alpha=8, **kwargs))
    _randomise(model)
    ours = _logits(model, ids)
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(builder(), tmp_path).eval()
    assert (_logits(peft_model, ids) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("builder,vocab,kwargs", CASES)
def test_peft_adapter_loads_in_scalora(tmp_path, builder, vocab, kwargs) -> None:
    ids = token_batch(vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(builder(), PeftLoraConfig(r=4, lora_alpha=8, **kwargs)).eval()
    _randomise(peft_model)
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(builder(), tmp_path).eval()
    assert (_logits(model, ids) - expected).abs().max() <= 1e-5


def test_minilm_interop_both_ways(tmp_path, minilm_path) -> None:
    from transformers import AutoModelForSequenceClassification

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)  # the classification head is new: seed it the same for both sides
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()

    ids = token_batch(1000, batch=2, length=12)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    model = apply_lora(fresh(), LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=True,
                                           modules_to_save=["classifier"]))
    _randomise(model, std=0.02)  # the size of a trained adapter (≈ 0.02 · 0.02 · r · s per weight entry)
    ours = _logits(model, ids)
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    assert (_logits(peft_model, ids) - ours).abs().max() <= 1e-5

    _randomise(peft_model, seed=9, std=0.02)
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    back = load_adapter(fresh(), tmp_path / "peft").eval()
    assert (_logits(back, ids) - expected).abs().max() <= 1e-5


def test_file_layout_and_config_fields(tmp_path) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["use_rslora"] is True and config["target_modules"] == ["q_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 4


def test_round_trip_with_alpha_vectors(tmp_path) -> None:
    ids = token_batch(101)
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", alpha_vector=True))
    _randomise(model)
    expected = _logits(model, ids)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["scalora"] == {"alpha_vector": True}
    loaded = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected)
    # Loading into a model that already has matching adapters overwrites them.
    again = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", alpha_vector=True))
    torch.testing.assert_close(_logits(load_adapter(again, tmp_path), ids), expected)


def test_peft_ignores_alpha_vectors(tmp_path) -> None:
    """What PEFT does with an α-LoRA file (documented): it loads the factors and drops the vectors."""
    ids = token_batch(101)
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alpha_vector=True))
    _randomise(model)
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.alpha_vector.fill_(1.0)
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_names_key_and_leaves_model_untouched(tmp_path) -> None:
    save_adapter(apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])), tmp_path / "r4")
    target = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"shape mismatch for 'base_model\.model\.model\.layers\.0\.self_attn"
                                               r"\.q_proj\.lora_A\.weight': the file has \(4, 32\), the model needs "
                                               r"\(2, 32\)"):
        load_adapter(target, tmp_path / "r4")
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_for_other_model_is_refused_untouched(tmp_path) -> None:
    save_adapter(apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"])), tmp_path)
    plain = tiny_llama()
    names_before = [n for n, _ in plain.named_modules()]
    with pytest.raises(AdapterFileError, match="does not fit the model"):
        load_adapter(plain, tmp_path)
    assert [n for n, _ in plain.named_modules()] == names_before


def test_unexpected_key_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    save_adapter(apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight'"):
        load_adapter(tiny_llama(), tmp_path)


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), tmp_path)
    save_adapter(apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFileError, match="cannot be read.*corrupt"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is missing"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch) -> None:
    ids = token_batch(101)
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    _randomise(model)
    save_adapter(model, tmp_path)
    good = _logits(load_adapter(tiny_llama(), tmp_path), ids)

    def crash(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    _randomise(model, seed=11)
    monkeypatch.setattr(peft_format, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left
    torch.testing.assert_close(_logits(load_adapter(tiny_llama(), tmp_path), ids), good)
