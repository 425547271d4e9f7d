"""Compression recipes: each makes a loadable model whose outputs differ where they should."""

from __future__ import annotations

import pytest
import torch

from kit.errors import CompkitError
from kit.recipes import apply_torch_recipe, check_recipe, model_footprint
from kit.study import RecipeSpec


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=300,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "recipe",
    [
        RecipeSpec(name="bf16"),
        RecipeSpec(name="int8_dynamic"),
        RecipeSpec(name="int8_weight_only"),
        RecipeSpec(name="prune_magnitude", params={"sparsity": 0.5}),
    ],
)
def test_recipe_changes_outputs_but_keeps_them_close(recipe):
    base = logits(tiny_llama(), IDS)
    out = logits(apply_torch_recipe(tiny_llama(), recipe), IDS)
    diff = (out - base).abs().max().item()
    assert diff > 1e-4, "a compression recipe that changes nothing is a bug"
    assert torch.isfinite(out).all()
    assert out.argmax(-1).eq(base.argmax(-1)).float().mean() > (
        0.3 if recipe.name == "prune_magnitude" else 0.8
    )


def test_zero_sparsity_pruning_changes_nothing():
    base = logits(tiny_llama(), IDS)
    out = logits(
        apply_torch_recipe(
            tiny_llama(), RecipeSpec(name="prune_magnitude", params={"sparsity": 0.0})
        ),
        IDS,
    )
    assert torch.equal(base, out)


def test_pruning_is_permanent_and_hits_the_sparsity():
    model = apply_torch_recipe(
        tiny_llama(), RecipeSpec(name="prune_magnitude", params={"sparsity": 0.5})
    )
    linears = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    assert linears
    for m in linears:
        assert not hasattr(m, "weight_orig") and not hasattr(
            m, "weight_mask"
        )  # prune.remove applied
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (model.lm_head.weight != 0).all()  # skipped by default
    glob = apply_torch_recipe(
        tiny_llama(),
        RecipeSpec(name="prune_magnitude", params={"sparsity": 0.3, "scope": "global"}),
    )
    zeros = sum(
        int((m.weight == 0).sum())
        for n, m in glob.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )
    total = sum(
        m.weight.numel()
        for n, m in glob.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )
    assert zeros / total == pytest.approx(0.3, abs=0.01)


def test_footprints_shrink():
    fp32 = model_footprint(tiny_llama())["size_bytes"]
    assert (
        model_footprint(apply_torch_recipe(tiny_llama(), RecipeSpec(name="bf16")))["size_bytes"]
        == fp32 // 2
    )
    int8 = model_footprint(apply_torch_recipe(tiny_llama(), RecipeSpec(name="int8_dynamic")))
    assert int8["size_bytes"] < 0.5 * fp32
    assert int8["parameters"] == model_footprint(tiny_llama())["parameters"]


def test_recipe_errors_list_valid_choices():
    with pytest.raises(CompkitError, match=r"unknown recipe 'awq'; available: \['bf16'"):
        check_recipe(RecipeSpec(name="awq"), runtime="transformers")
    with pytest.raises(CompkitError, match="unknown parameter"):
        check_recipe(RecipeSpec(name="bf16", params={"bits": 4}), runtime="transformers")
    with pytest.raises(CompkitError, match="makes a model for runtime 'llamacpp'"):
        check_recipe(
            RecipeSpec(name="gguf_requant", params={"type": "Q4_0"}), runtime="transformers"
        )
    with pytest.raises(CompkitError, match="sparsity must be in"):
        apply_torch_recipe(
            tiny_llama(), RecipeSpec(name="prune_magnitude", params={"sparsity": 1.5})
        )


def test_model_without_linear_layers_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    )  # Conv1D layers
    # its only nn.Linear is lm_head, which pruning skips by default: nothing would change
    with pytest.raises(CompkitError, match=r"no nn\.Linear layers"):
        apply_torch_recipe(gpt2, RecipeSpec(name="prune_magnitude", params={"sparsity": 0.5}))


@pytest.mark.slow
def test_gguf_requantization_makes_a_smaller_loadable_model(tmp_path):
    import llama_cpp

    from kit.models import builtin_gguf_path
    from kit.recipes import gguf_requantize

    source = builtin_gguf_path("smollm2-135m-instruct")
    target = gguf_requantize(source, tmp_path / "q2k.gguf", type="Q2_K")
    assert target.stat().st_size < source.stat().st_size
    assert not list(tmp_path.glob(".*tmp*"))
    prompt = "The capital of France is"
    outs = {}
    for name, path in (("q4_1", source), ("q2_k", target)):
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, logits_all=False)
        res = llm.create_completion(prompt, max_tokens=12, temperature=0.0)
        outs[name] = res["choices"][0]["text"]
        del llm
    assert outs["q2_k"].strip(), "requantized model must still generate"
    assert gguf_requantize(source, target, type="Q2_K") == target  # reused, not redone
    with pytest.raises(CompkitError, match="unknown type 'Q9_X'"):
        gguf_requantize(source, tmp_path / "x.gguf", type="Q9_X")
