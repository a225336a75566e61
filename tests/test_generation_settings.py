"""Generation settings that cannot work are refused up front, with one clear line naming the setting: wrong types,
NaN / infinite numbers, and a prompt plus max_new_tokens beyond the model's context (checked before any cache is
allocated, so max_new_tokens=10**9 is a ValueError, not an allocator failure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pipeline_helpers import reference

import gemma3n
from gemma3n import generation
from gemma3n.generation import GenerationConfig

BAD_SETTINGS = [
    ({"temperature": math.nan}, r"temperature must be a finite number >= 0, got nan"),
    ({"temperature": math.inf}, r"temperature must be a finite number >= 0, got inf"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": "0.7"}, r"temperature must be a finite number >= 0, got '0.7'"),
    ({"temperature": True}, r"temperature must be a finite number >= 0, got True"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer >= 1, got True"),
    ({"max_new_tokens": 2.0}, r"max_new_tokens must be an integer >= 1, got 2.0"),
    ({"max_new_tokens": "16"}, r"max_new_tokens must be an integer >= 1, got '16'"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
    ({"top_p": math.nan}, r"top_p must be a number in \(0, 1\], got nan"),
    ({"top_p": "0.9"}, r"top_p must be a number in \(0, 1\], got '0.9'"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"top_k": "40"}, r"top_k must be an integer >= 0, got '40'"),
    ({"top_k": 4.0}, r"top_k must be an integer >= 0, got 4.0"),
    ({"top_k": True}, r"top_k must be an integer >= 0, got True"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        GenerationConfig().updated(**settings)


def test_numpy_numbers_are_accepted():
    config = GenerationConfig().updated(max_new_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3))
    assert config.max_new_tokens == 5 and config.top_k == 3


@pytest.fixture(scope="module")
def model():
    return gemma3n.load(reference().path)


def test_prompt_plus_max_new_tokens_beyond_the_context_is_refused_before_the_cache(model, monkeypatch):
    context = model.config.text.max_position_embeddings
    assert context == 32_768  # as published
    ids = torch.tensor([[2, 105, 776, 558, 494]])

    def no_cache(*args, **kwargs):
        raise AssertionError("the cache was allocated before the settings were checked")

    monkeypatch.setattr(generation, "KVCache", no_cache)
    expected = rf"prompt length 5 \+ max_new_tokens {10**9} = {10**9 + 5} tokens exceeds the model's context of "
    with pytest.raises(ValueError, match=expected + rf"{context} tokens .*max_new_tokens <= {context - 5}"):
        model.generate(ids, max_new_tokens=10**9)
    with pytest.raises(ValueError, match=r"max_new_tokens 32764 = 32769 tokens"):
        model.generate(ids, max_new_tokens=context - 4)
    with pytest.raises(ValueError, match=r"temperature must be a finite number"):
        model.generate(ids, max_new_tokens=3, do_sample=True, temperature=math.nan)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1, got True"):
        list(generation.stream_generate(model, ids, max_new_tokens=True))


def test_the_context_bound_is_exact(model, monkeypatch):
    """At prompt + max_new_tokens == context generation runs; one more is refused (a small context set here)."""
    ids = torch.tensor([[2, 105, 776, 558, 494], [0, 2, 105, 776, 558]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    monkeypatch.setattr(model.config.text, "max_position_embeddings", 9)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match=r"prompt length 5 \+ max_new_tokens 5 = 10 tokens exceeds .* of 9 tokens"):
        model.generate(ids, attention_mask=mask, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"the prompt has 9 tokens, but the model's context is 9 tokens"):
        model.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=1)


def test_pipeline_rows_get_the_same_message(model):
    pipe = gemma3n.pipeline("text-generation", model=model)
    chat = [{"role": "user", "content": "Tell me about the garden."}]
    with pytest.raises(ValueError, match=r"max_new_tokens 1000000000 = \d+ tokens exceeds the model's context of"):
        pipe(chat, max_new_tokens=10**9)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got nan"):
        pipe(chat, temperature=math.nan, do_sample=True)


def test_generate_and_forward_accept_the_processors_token_type_ids(model):
    inputs = model.processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert "token_type_ids" in inputs
    inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
    sequences = model.generate(**inputs, max_new_tokens=2)
    assert torch.equal(sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    pieces = list(generation.stream_generate(model, **inputs, max_new_tokens=2))
    assert "".join(pieces) == model.processor.decode(sequences[0, inputs["input_ids"].shape[1] :], True)
    # the forward pass takes the processor's whole output too, with the same logits as without the token types
    logits = model(**inputs).logits
    without = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    assert torch.equal(logits, without)


def test_cuda_graphs_need_a_model_on_cuda(model):
    """Off CUDA the decode steps stay eager by default; asking for CUDA graphs is a clear error, not a crash."""
    from gemma3n.cuda_graphs import cuda_graphs_supported

    assert not cuda_graphs_supported(model)
    ids = torch.tensor([[2, 105, 776]])
    with pytest.raises(ValueError, match="cuda_graphs=True needs a Gemma 3n model with every weight on a CUDA"):
        model.generate(ids, max_new_tokens=2, cuda_graphs=True)
    assert model.generate(ids, max_new_tokens=2, cuda_graphs=False).shape == (1, 5)
