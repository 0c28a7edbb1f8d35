"""The adapter core: the layer formula, scales, α-LoRA, merge/unmerge, freezing, config validation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

from scalora import (
    ConfigError,
    LoraConfig,
    LoraLayer,
    apply_lora,
    disable_adapters,
    lora_layers,
    lora_scaling,
    merge,
    print_trainable_parameters,
    targetable_modules,
    trainable_parameters,
    unmerge,
)
from scalora.layers import Conv1D, Embedding, Linear


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter (and α vector) non-trivial values so formulas are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if layer.alpha_vector is not None:
                layer.alpha_vector.copy_(1 + 0.5 * torch.randn(layer.alpha_vector.shape, generator=g))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("alpha_vector", [False, True])
def test_linear_forward_matches_formula(use_rslora: bool, alpha_vector: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = apply_lora(Wrapper(base), LoraConfig(r=4, lora_alpha=6, target_modules=["inner"],
                                                 use_rslora=use_rslora, alpha_vector=alpha_vector))
    _perturb(model)
    layer = model.inner
    s = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(5, 12)
    a = layer.alpha_vector.detach() if alpha_vector else torch.ones(9)
    expected = a * (x @ w0.T + b0) + s * (x @ layer.lora_A.detach().T) @ layer.lora_B.detach().T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_scale_conventions() -> None:
    assert lora_scaling(16, 32, use_rslora=False) == 2.0
    assert lora_scaling(16, 32, use_rslora=True) == 8.0
    cfg = LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules=["q"], rank_pattern={"v": 4})
    assert cfg.scaling_for("layer.0.q") == pytest.approx(2.0)
    assert cfg.rank_for("layer.0.v") == 4 and cfg.scaling_for("layer.0.v") == pytest.approx(8.0)


def test_conv1d_and_embedding_forward_match_formula() -> None:
    model = tiny_gpt2()
    attn = model.transformer.h[0].attn.c_attn
    wte = model.transformer.wte
    w_attn, b_attn, w_emb = attn.weight.detach().clone(), attn.bias.detach().clone(), wte.weight.detach().clone()
    apply_lora(model, LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "wte"]))
    _perturb(model)
    lora_attn, lora_wte = model.transformer.h[0].attn.c_attn, model.transformer.wte
    assert isinstance(lora_attn, Conv1D) and isinstance(lora_wte, Embedding)
    assert lora_attn.lora_A.shape == (3, 32) and lora_attn.lora_B.shape == (96, 3)
    s = 5 / 3
    x = torch.randn(2, 4, 32)
    expected = x @ w_attn + b_attn + s * x @ lora_attn.lora_A.detach().T @ lora_attn.lora_B.detach().T
    torch.testing.assert_close(lora_attn(x), expected, rtol=1e-5, atol=1e-6)
    ids = token_batch(97)
    delta_emb = s * (lora_wte.lora_B.detach() @ lora_wte.lora_A.detach()).T  # (vocab, dim)
    torch.testing.assert_close(lora_wte(ids), (w_emb + delta_emb)[ids], rtol=1e-5, atol=1e-6)


def test_default_init_is_the_base_model() -> None:
    ids = token_batch(101)
    ref = tiny_llama()
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", alpha_vector=True))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    for _, layer in lora_layers(model):
        assert torch.all(layer.lora_B == 0) and torch.all(layer.alpha_vector == 1)
        assert layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize("builder,vocab", [(tiny_gpt2, 97), (tiny_llama, 101)])
@pytest.mark.parametrize("alpha_vector", [False, True])
def test_merge_unmerge_equivalence(builder, vocab: int, alpha_vector: bool) -> None:
    ids = token_batch(vocab)
    pristine = builder()
    model = apply_lora(builder(), LoraConfig(r=4, target_modules="all-linear", alpha_vector=alpha_vector,
                                             use_rslora=True))
    _perturb(model)
    adapted = model(ids).logits
    merge(model, unload=False)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, pristine(ids).logits, rtol=1e-4, atol=1e-4)
    plain = merge(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not hasattr(plain, "scalora_config")
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert set(plain.state_dict()) == set(pristine.state_dict())


def test_alpha_lora_merge_scales_rows_and_bias() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = apply_lora(Wrapper(base), LoraConfig(r=2, target_modules=["inner"], alpha_vector=True))
    _perturb(model)
    layer = model.inner
    a, delta = layer.alpha_vector.detach().clone(), layer.delta_weight().detach()
    merge(model)
    torch.testing.assert_close(model.inner.weight, a[:, None] * w0 + delta)
    torch.testing.assert_close(model.inner.bias, a * b0)


def test_freezing_and_trainable_summary(capsys) -> None:
    model = tiny_bert()
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoraConfig(r=4, target_modules=["query", "value"], alpha_vector=True,
                                 modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    for n in trainable:
        assert n.endswith(("lora_A", "lora_B", "alpha_vector")) or n.startswith("classifier."), n
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert not any("base_layer" in n for n in trainable)
    n_lora = 2 * 2 * (4 * 32 + 32 * 4 + 32)  # 2 layers × (query, value) × (A, B, α)
    n_head = 32 * 2 + 2
    assert trainable_parameters(model) == (n_lora + n_head, total_before + n_lora)
    print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert f"trainable params: {n_lora + n_head:,d}" in out and "trainable%" in out


def test_all_linear_skips_output_heads() -> None:
    model = apply_lora(tiny_bert(), LoraConfig(r=2, target_modules="all-linear"))
    names = {n for n, _ in lora_layers(model)}
    assert "classifier" not in names and "bert.embeddings.word_embeddings" not in names
    assert "bert.encoder.layer.0.attention.self.query" in names and "bert.encoder.layer.1.output.dense" in names
    gpt = apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules="all-linear"))
    gpt_names = {n for n, _ in lora_layers(gpt)}
    assert "lm_head" not in gpt_names and "transformer.h.0.mlp.c_fc" in gpt_names


def test_regex_targets_and_exclusions() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=r".*\.(q|v)_proj",
                                                exclude_modules=["layers.1.self_attn.v_proj"]))
    names = sorted(n for n, _ in lora_layers(model))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_patterns() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"layers.1.self_attn.q_proj": 1})
    model = apply_lora(tiny_llama(), config)
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 0.25


def test_gradients_flow_only_to_adapters() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", alpha_vector=True))
    ids = token_batch(101)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_B.grad.abs().sum() > 0 and layer.alpha_vector.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
        ({"lora_alpha": -1.0}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights must be"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    base = {"r": 4, "target_modules": ["q"]}
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{**base, **kwargs})


def test_config_unknown_keys_and_round_trip() -> None:
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"], use_rslora=True, alpha_vector=True)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown LoraConfig field\(s\) \['rank'\]"):
        LoraConfig.from_dict({**cfg.to_dict(), "rank": 3})
    with pytest.raises(ConfigError, match="use_dora=True"):
        LoraConfig.from_peft_dict({**cfg.to_peft_dict(), "use_dora": True})


def test_rank_too_large_for_layer() -> None:
    with pytest.raises(ConfigError, match=r"r=40 is larger than module 'model.layers.0.self_attn.k_proj' allows"):
        apply_lora(tiny_llama(), LoraConfig(r=40, target_modules=["k_proj"]))


def test_no_matching_module_lists_candidates() -> None:
    with pytest.raises(ConfigError, match=r"matches no module.*model\.layers\.0\.self_attn\.q_proj"):
        apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["query"]))


def test_unsupported_layer_type() -> None:
    with pytest.raises(ConfigError, match=r"'model.norm' is a LlamaRMSNorm; scalora adapts nn.Linear"):
        apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["norm"]))


def test_apply_twice_is_refused() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(r=2, target_modules=["v_proj"]))


def test_targetable_modules_and_layer_classes() -> None:
    names = targetable_modules(tiny_gpt2())
    assert "transformer.h.0.attn.c_attn" in names and "transformer.wte" in names
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear)
    assert isinstance(model.model.embed_tokens, Embedding)


def test_dropout_is_applied_in_training_only() -> None:
    torch.manual_seed(0)
    model = apply_lora(Wrapper(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["inner"], lora_dropout=0.5,
                                                            init_lora_weights=False))
    x = torch.randn(4, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
