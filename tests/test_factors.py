"""ScaLoRA, ReLoRA and the rank tools on PEFT's own LoRA layers: the same run as on scalora's layers, step for step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model as peft_get_peft_model
from tiny import tiny_gpt2, tiny_llama, token_batch
from torch import nn

from scalora import ConfigError, LoraConfig, ReLoRA, ScaLoRA, apply_lora, get_peft_model, lora_factors, merge
from scalora.factors import PeftFactors, ScaloraFactors
from scalora.rank import effective_rank, snapshot_base_weights, update_ranks

STEPS = 4
CASES = {
    # GPT-2's Conv1D (stored (in, out)), with dropout on the adapters' input
    "gpt2-conv1d-dropout": (tiny_gpt2, 97, {"target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.1}),
    # an embedding table, rsLoRA's scale, modules_to_save (PEFT trains a copy of lm_head, scalora the module)
    "llama-embedding-rslora-modules-to-save": (tiny_llama, 101, {
        "target_modules": ["embed_tokens", "q_proj", "v_proj", "down_proj"], "use_rslora": True,
        "modules_to_save": ["lm_head"]}),
}


def _peft(builder, kwargs: dict, *, second_adapter: bool = False) -> nn.Module:
    """PEFT's LoRA on a float64 `builder()`; with `second_adapter`, a second adapter is added and made active."""
    config = PeftLoraConfig(r=4, lora_alpha=8, fan_in_fan_out=builder is tiny_gpt2, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_get_peft_model(builder().double(), config)
        if second_adapter:
            model.add_adapter("second", config)
            model.set_adapter("second")
    return model.train()


def _pair(builder, kwargs: dict, *, second_adapter: bool = False) -> tuple[nn.Module, nn.Module]:
    """The same model with scalora's layers and with PEFT's, float64, starting from the same (nonzero) factors."""
    ours = apply_lora(builder().double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)).train()
    theirs = _peft(builder, kwargs, second_adapter=second_adapter)
    ours_factors, their_factors = lora_factors(ours), lora_factors(theirs)
    assert [name for name, _ in ours_factors] == [name for name, _ in their_factors]
    assert all(isinstance(f, PeftFactors) for _, f in their_factors)
    with torch.no_grad():
        for (_, a), (_, b) in zip(ours_factors, their_factors, strict=True):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    return ours, theirs


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, vocab: int, step: int) -> None:
    ids = token_batch(vocab, batch=4, length=12, seed=step)
    torch.manual_seed(100 + step)  # the same dropout masks in both models
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _max_difference(ours: nn.Module, theirs: nn.Module) -> float:
    """Largest |difference| of base weights and factors over the layers, and of lm_head (PEFT's trained copy)."""
    worst = 0.0
    for (_, a), (_, b) in zip(lora_factors(ours), lora_factors(theirs), strict=True):
        for x, y in ((a.base_weight_oi(), b.base_weight_oi()), (a.lora_A, b.lora_A), (a.lora_B, b.lora_B)):
            worst = max(worst, float((x - y).detach().abs().max()))
    if hasattr(theirs.base_model.model, "lm_head") and hasattr(theirs.base_model.model.lm_head, "modules_to_save"):
        copy = theirs.base_model.model.lm_head.modules_to_save[theirs.active_adapter].weight
        worst = max(worst, float((ours.lm_head.weight - copy).detach().abs().max()))
    return worst


@pytest.mark.parametrize("case", list(CASES))
def test_scalora_on_peft_layers_matches_scalora_layers_step_for_step(case: str) -> None:
    builder, vocab, kwargs = CASES[case]
    ours, theirs = _pair(builder, kwargs)
    before = snapshot_base_weights(theirs)
    opt_ours = ScaLoRA(ours, torch.optim.AdamW(_trainable(ours), lr=1e-2))
    opt_theirs = ScaLoRA(theirs, torch.optim.AdamW(_trainable(theirs), lr=1e-2))
    for step in range(STEPS):
        _step(ours, opt_ours, vocab, step)
        _step(theirs, opt_theirs, vocab, step)
        assert opt_theirs.last_stats.layers == len(lora_factors(theirs)) and opt_theirs.last_stats.identity < 1.0
        assert _max_difference(ours, theirs) <= 1e-12, f"step {step}"
    # ScaLoRA really merged into PEFT's base weights, and the update left rank r
    assert max(info.rank for info in update_ranks(theirs, before).values()) > 4

    # PEFT's own merge_and_unload gives the trained model, equal to scalora's merge
    ids = token_batch(vocab, seed=99)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        trained = theirs(ids).logits
        merged = theirs.merge_and_unload()
        assert (merged(ids).logits - trained).abs().max() <= 1e-10
        assert (merge(ours)(ids).logits - trained).abs().max() <= 1e-10


def test_active_adapter_of_a_multi_adapter_model() -> None:
    builder, vocab, kwargs = CASES["llama-embedding-rslora-modules-to-save"]
    ours = apply_lora(builder().double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)).train()
    theirs = _peft(builder, kwargs, second_adapter=True)
    factors = lora_factors(theirs)
    assert {f.adapter for _, f in factors} == {"second"}
    idle = [PeftFactors(f.module, "default").lora_A.detach().clone() for _, f in factors]
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora_factors(ours), factors, strict=True):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    opt_ours = ScaLoRA(ours, torch.optim.AdamW(_trainable(ours), lr=1e-2))
    opt_theirs = ScaLoRA(theirs, torch.optim.AdamW(_trainable(theirs), lr=1e-2))
    for step in range(STEPS):
        _step(ours, opt_ours, vocab, step)
        _step(theirs, opt_theirs, vocab, step)
        assert _max_difference(ours, theirs) <= 1e-12, f"step {step}"
    assert all(torch.equal(w, PeftFactors(f.module, "default").lora_A) for w, (_, f) in zip(idle, factors, strict=True))


def test_relora_on_peft_layers_matches_scalora_layers() -> None:
    builder, vocab, kwargs = CASES["gpt2-conv1d-dropout"]
    ours, theirs = _pair(builder, kwargs)
    opt_ours = ReLoRA(ours, torch.optim.AdamW(_trainable(ours), lr=1e-2), reset_every=2)
    opt_theirs = ReLoRA(theirs, torch.optim.AdamW(_trainable(theirs), lr=1e-2), reset_every=2)
    for step in range(STEPS):
        _step(ours, opt_ours, vocab, step)
        _step(theirs, opt_theirs, vocab, step)
    assert opt_theirs.resets == 2
    # after a reset the factors are re-drawn (randomly in both, so compare the merged bases and the reset's shape)
    for (_, a), (_, b) in zip(lora_factors(ours), lora_factors(theirs), strict=True):
        assert float((a.base_weight_oi() - b.base_weight_oi()).abs().max()) <= 1e-12
        assert not b.lora_B.any() if not b.embedding else not b.lora_A.any()


def test_half_precision_peft_base_folds() -> None:
    """bf16 PEFT bases: stochastically rounded folds with no buffer by default; compensate=True keeps one."""
    model = peft_get_peft_model(tiny_llama().to(torch.bfloat16), PeftLoraConfig(r=4, target_modules=["q_proj"]))
    before = [f.base_weight_oi().clone() for _, f in lora_factors(model)]
    optimizer = ScaLoRA(model, torch.optim.AdamW(_trainable(model), lr=1e-2))
    for step in range(3):
        _step(model, optimizer, 101, step)
    assert all(f.base_compensation is None for _, f in lora_factors(model))
    assert any(not torch.equal(w, f.base_weight_oi()) for w, (_, f) in zip(before, lora_factors(model), strict=True))

    model = peft_get_peft_model(tiny_llama().to(torch.bfloat16), PeftLoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = ScaLoRA(model, torch.optim.AdamW(_trainable(model), lr=1e-2), compensate=True)
    _step(model, optimizer, 101, 0)
    _step(model, optimizer, 101, 1)
    compensations = [f.base_compensation for _, f in lora_factors(model)]
    assert all(c is not None and c.dtype == torch.bfloat16 for c in compensations)
    assert any(bool(c.any()) for c in compensations)
    assert not any("base_compensation" in key for key in model.state_dict())  # outside PEFT's state dict


def test_int8_compensation_of_peft_bases_resumes_from_the_optimizer_state() -> None:
    """compensate='int8' keeps an int8 buffer on each PEFT layer; the optimiser state carries it (PEFT's files hold
    no base weights) and a resumed run continues bit for bit; a state saved under another compensation is refused."""
    def build(compensate):
        torch.manual_seed(0)
        model = peft_get_peft_model(tiny_llama().to(torch.bfloat16), PeftLoraConfig(r=4, target_modules=["q_proj"]))
        return model, ScaLoRA(model, torch.optim.AdamW(_trainable(model), lr=1e-2), compensate=compensate)

    model, optimizer = build("int8")
    for step in range(2):
        _step(model, optimizer, 101, step)
    compensations = [f.base_compensation.clone() for _, f in lora_factors(model)]
    assert all(c.dtype == torch.int8 for c in compensations)
    assert any(bool(c.any()) for c in compensations)
    state = copy.deepcopy(optimizer.state_dict())
    adapter = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" in k})
    _step(model, optimizer, 101, 2)

    resumed, again = build("int8")
    resumed.load_state_dict(adapter, strict=False)
    again.load_state_dict(state)
    assert all(torch.equal(a.base_compensation, b) for (_, a), b in zip(lora_factors(resumed), compensations,
                                                                         strict=True))
    _step(resumed, again, 101, 2)
    for (_, a), (_, b) in zip(lora_factors(model), lora_factors(resumed), strict=True):
        assert torch.equal(a.base_weight_oi(), b.base_weight_oi())
        assert torch.equal(a.base_compensation, b.base_compensation)
    with pytest.raises(ConfigError, match="compensate='int8'"):
        build(True)[1].load_state_dict(state)


def test_peft_layers_scalora_cannot_train_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora = peft_get_peft_model(tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
        two = peft_get_peft_model(tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj"]))
        two.add_adapter("b", PeftLoraConfig(r=4, target_modules=["q_proj"]))
        two.base_model.set_adapter(["default", "b"])
    with pytest.raises(ConfigError, match="DoRA or another LoRA variant"):
        ScaLoRA(dora, torch.optim.AdamW(dora.parameters()))
    with pytest.raises(ConfigError, match="2 active adapters"):
        ScaLoRA(two, torch.optim.AdamW(two.parameters()))
    with pytest.raises(ConfigError, match=r"scalora.apply_lora.*peft.get_peft_model"):
        ScaLoRA(tiny_llama(), torch.optim.AdamW(tiny_llama().parameters()))
    tied = _peft(tiny_gpt2, {"target_modules": ["c_attn", "wte"]})  # GPT-2's wte is also its output head
    with pytest.raises(ConfigError, match="'transformer.wte' is shared with another module"):
        ScaLoRA(tied, torch.optim.AdamW(tied.parameters()))


def test_rank_tools_on_peft_layers() -> None:
    model = _peft(tiny_gpt2, {"target_modules": ["c_attn", "wte"]})
    before = snapshot_base_weights(model)
    assert set(before) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)} | {"transformer.wte"}
    assert before["transformer.wte"].shape == (32, 97)  # (out, in): the embedding's dimension by its vocabulary
    with torch.no_grad():
        for _, f in lora_factors(model):
            f.lora_A.normal_()
            f.lora_B.normal_()
    ranks = update_ranks(model, before)
    assert {info.rank for info in ranks.values()} == {4}
    model.merge_adapter()  # merged: the update lives in W0 and the factors no longer count twice
    merged = update_ranks(model, before)
    assert all(merged[name].rank == 4 for name in ranks)
    assert effective_rank(torch.zeros(3, 3)).rank == 0


def test_factors_of_scalora_layers_are_the_layers_own() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    (name, factors), *_ = lora_factors(model)
    assert isinstance(factors, ScaloraFactors) and name == "model.layers.0.self_attn.q_proj"
    assert factors.lora_A is factors.module.lora_A and factors.scaling == factors.module.scaling


def test_get_peft_model_accepts_a_peft_config() -> None:
    config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                            task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), config)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.r == 4 and layer.scaling == pytest.approx(16 / 2) and model.scalora_config.task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="use_dora"):
        get_peft_model(tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    from peft import IA3Config
    with pytest.raises(ConfigError, match="IA3"):
        get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
