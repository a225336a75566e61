"""Gemma and Gemma 2 against the reference: transformers builds random models of all three heads, writes them with
``save_pretrained``; gemma3n loads them and must give the same logits, pooled scores, greedy tokens and parameter
counts.

Tolerance: fp32 logits within 1e-5 of the reference, relative to the largest reference logit. Both sides run the same
fp32 ops in the same order (embedding scale, rsqrt norms with 1 + w, RoPE tables from float32 angles, q k^T * scale,
tanh soft-cap, float32 softmax, gated tanh-GELU); the only differences are the summation order inside matrix products
(our grouped-head products and few-row paths use other shapes than the reference's repeated heads), each a few fp32
ulps (~1e-7 relative), over 4 layers: far below 1e-5 on any CPU kernel path.

Compared are the real (non-padding) positions: a padding query attends to nothing in the reference and to itself in
gemma3n, and neither output is used.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from family_helpers import MODEL_CLASSES, family_config

import gemma3n
from gemma3n.config import ConfigError
from gemma3n.gemma_config import GemmaConfig
from gemma3n.heads import CausalLM, SequenceClassifier, TokenClassifier

REL_TOL = 1e-5
WINDOW = 8  # Gemma 2's sliding window in the small models; prompts are longer
HEADS = {"causal": CausalLM, "sequence": SequenceClassifier, "token": TokenClassifier}


def reference_model(family: str, head: str, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A small random transformers model (fp32, eager attention so Gemma 2's soft-cap is computed): the shared test
    config (tests/family_helpers.py) at 4 layers, hidden 64 and three labels, transformers' own init, random norms."""
    shape = dict(vocab_size=160, hidden_size=64, num_hidden_layers=4, id2label={0: "O", 1: "B-X", 2: "I-X"})
    if family == "gemma2":
        shape.update(sliding_window=WINDOW, query_pre_attn_scalar=24)
    cfg = family_config(family, head, **{**shape, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family, head])(cfg).eval()
    with torch.no_grad():  # norms are initialised at zero (weight 1 + 0): randomise them so they matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model


def saved(tmp_path, family: str, head: str, **overrides):
    model = reference_model(family, head, **overrides)
    path = tmp_path / f"{family}-{head}"
    model.save_pretrained(path)
    return path, model


def padded_batch(length: int = 20, vocab: int = 160, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts longer than the window: row 1 left-padded by 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    ids[1, :5] = pad
    return ids, (ids != pad).long()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
@pytest.mark.parametrize("head", ["causal", "sequence", "token"])
def test_logits_match_the_reference_on_a_left_padded_batch_longer_than_the_window(tmp_path, family, head):
    path, ref = saved(tmp_path, family, head)
    model = gemma3n.load(path, dtype="float32")
    assert isinstance(model, HEADS[head])
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert got.shape == expected.shape
    if got.dim() == 3:  # per-token outputs: the real positions
        got, expected = got[mask.bool()], expected[mask.bool()]
    assert rel_err(got, expected) < REL_TOL


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_sequence_classifier_pools_the_last_real_token_with_left_and_right_padding(tmp_path, family):
    path, ref = saved(tmp_path, family, "sequence")
    model = gemma3n.load(path, dtype="float32")
    ids, _ = padded_batch()
    right = torch.cat([ids[1:, 5:], torch.zeros(1, 5, dtype=torch.long)], dim=1)  # row 1, padded on the right
    batch = torch.cat([ids, right])
    with torch.no_grad():
        expected = ref(input_ids=batch, attention_mask=(batch != 0).long()).logits
        got = model(batch, attention_mask=(batch != 0).long()).logits
    assert rel_err(got, expected) < REL_TOL
    assert model.config.id2label == {0: "O", 1: "B-X", 2: "I-X"}


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_greedy_generation_equals_the_reference_past_the_window(tmp_path, family):
    path, ref = saved(tmp_path, family, "causal")
    model = gemma3n.load(path, dtype="float32")
    ids, mask = padded_batch(length=12)
    expected = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(got, expected)  # 12 + 24 positions: three times Gemma 2's window of 8


def test_compiled_decoding_gives_the_eager_tokens_for_gemma2(tmp_path):
    """The soft-capped attention path through torch.compile: fp32, so tokens must be identical."""
    path, _ = saved(tmp_path, "gemma2", "causal")
    model = gemma3n.load(path, dtype="float32")
    ids, mask = padded_batch(length=12)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], compile=True)
    assert torch.equal(eager, compiled)


def test_streaming_yields_the_generated_tokens(tmp_path):
    path, _ = saved(tmp_path, "gemma2", "causal")
    model = gemma3n.load(path, dtype="float32")
    ids = torch.tensor([[2, 40, 41, 42]])
    seen = []

    class Collect:
        def put(self, tokens):
            seen.append(tokens.clone())

        def end(self):
            seen.append(None)

    out = model.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=Collect())
    assert torch.equal(seen[0], ids) and seen[-1] is None
    assert torch.equal(torch.cat([t[:, None] for t in seen[1:-1]], dim=1), out[:, 4:])


def test_untied_lm_head_is_used(tmp_path):
    path, ref = saved(tmp_path, "gemma", "causal", tie_word_embeddings=False)
    model = gemma3n.load(path, dtype="float32")
    assert model.model.lm_head is not None
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = model(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(got, expected) < REL_TOL


PUBLISHED_SPELLING = {
    # as the published files write them: rope_theta, torch_dtype, no layer_types; Gemma's "gelu" means tanh
    "gemma": {"hidden_act": "gelu", "hidden_activation": None, "rope_theta": 10000.0, "rope_scaling": None},
    "gemma2": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 10000.0,
        "cache_implementation": "hybrid",
        "sliding_window_size": WINDOW,
    },
}


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_the_published_config_spelling_loads_with_the_same_logits(tmp_path, family):
    path, ref = saved(tmp_path, family, "causal")
    file = path / "config.json"
    data = json.loads(file.read_text())
    for key in ("rope_parameters", "dtype", "layer_types", "hidden_activation", "hidden_act"):
        data.pop(key, None)
    data.update(PUBLISHED_SPELLING[family], torch_dtype="float32")
    if family == "gemma2":
        data.pop("sliding_window")  # the older key alone must give the same window
    file.write_text(json.dumps(data))
    model = gemma3n.load(path, dtype="float32")
    assert model.config.gelu_tanh and model.config.rope_base == 10000.0
    if family == "gemma2":
        assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
        assert model.config.sliding_window == WINDOW
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = model(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(got, expected) < REL_TOL


# Published text configs (google/gemma-2b, gemma-7b, gemma-2-2b, gemma-2-9b, gemma-2-27b): the shape fields.
_GEMMA = dict(model_type="gemma", vocab_size=256000, head_dim=256, max_position_embeddings=8192, hidden_act="gelu")
_GEMMA2 = dict(
    model_type="gemma2",
    vocab_size=256000,
    max_position_embeddings=8192,
    sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh",
)
PUBLISHED = {
    "gemma-2b": dict(
        _GEMMA,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
    ),
    "gemma-7b": dict(
        _GEMMA,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
    "gemma-2-2b": dict(
        _GEMMA2,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma-2-9b": dict(
        _GEMMA2,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma-2-27b": dict(
        _GEMMA2,
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes_build_on_the_meta_device_with_the_reference_parameter_counts(name):
    data = PUBLISHED[name]
    family = data["model_type"]
    ref_config = getattr(transformers, "Gemma2Config" if family == "gemma2" else "GemmaConfig")(
        **{k: v for k, v in data.items() if k != "model_type"}
    )
    ref_class = getattr(transformers, "Gemma2ForCausalLM" if family == "gemma2" else "GemmaForCausalLM")
    with torch.device("meta"):
        ours = CausalLM(GemmaConfig.from_dict(data))
        ref = ref_class(ref_config)
    count = sum(p.numel() for p in ours.parameters())
    ref_count = sum(p.numel() for p in ref.parameters())  # the tied head is one tensor in both
    assert count == ref_count
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in ref.named_parameters()}


def test_quantized_gemma2_stays_close_to_float(tmp_path):
    """int8 weight-only (per output channel, round to nearest): each weight is off by at most half a step,
    max|w| / 254 of its row, i.e. at most 0.4% relative per product; through 4 layers and the head the logits must stay
    within a few percent of the float model's (checked at 5%), and the greedy first token must be the same."""
    path, _ = saved(tmp_path, "gemma2", "causal")
    ids, mask = padded_batch()
    base = gemma3n.load(path, dtype="float32")
    quant = gemma3n.load(path, dtype="float32", quantize="int8")
    assert quant.model.lm_head is not None  # the tied head got its own quantized copy
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits[mask.bool()]
        got = quant(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(got, expected) < 0.05
    int4 = gemma3n.load(path, dtype="float32", quantize="int4")
    assert int4.generate(ids[:1], max_new_tokens=4, eos_token_id=[]).shape == (1, 24)


def test_classifier_quantization_leaves_the_score_head_in_float(tmp_path):
    path, _ = saved(tmp_path, "gemma", "sequence")
    model = gemma3n.load(path, dtype="float32", quantize="int8")
    assert model.model.lm_head is None and isinstance(model.score, torch.nn.Linear)


def test_errors_name_the_problem(tmp_path):
    path, _ = saved(tmp_path, "gemma2", "causal")
    model = gemma3n.load(path, dtype="float32")
    with pytest.raises(ValueError, match="pixel_values given, but this gemma2 model is text only"):
        model(torch.tensor([[2, 5]]), pixel_values=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="matformer= applies to Gemma 3n checkpoints"):
        gemma3n.load(path, matformer="E2B")
    data = json.loads((path / "config.json").read_text())
    data["architectures"] = ["Gemma2ForQuestionAnswering"]
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="architecture 'Gemma2ForQuestionAnswering' is not one this package loads"):
        gemma3n.load(path)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        GemmaConfig.from_dict(dict(PUBLISHED["gemma-2b"], num_key_value_heads=3))


def test_sequence_classifier_without_pad_id_refuses_a_batch(tmp_path):
    path, _ = saved(tmp_path, "gemma", "sequence", pad_token_id=None)
    model = gemma3n.load(path, dtype="float32")
    with pytest.raises(ValueError, match="no pad_token_id"):
        model(torch.tensor([[2, 5, 6], [2, 7, 8]]))
    assert model(torch.tensor([[2, 5, 6]])).logits.shape == (1, 3)


@pytest.mark.parametrize("kv_heads", [1, 4], ids=["multi-query", "multi-head"])
def test_multi_query_and_multi_head_attention_match_the_reference(tmp_path, kv_heads):
    """Gemma 2B has one key/value head for 8 query heads, Gemma 7B one per query head; head_dim is read from the
    config, independent of hidden / heads (24 here against 64 / 4 = 16)."""
    path, ref = saved(tmp_path, "gemma", "causal", num_key_value_heads=kv_heads, head_dim=24)
    model = gemma3n.load(path, dtype="float32")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = model(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(got, expected) < REL_TOL
    expected = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), expected)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_packed_bf16_weights_give_the_dense_logits(tmp_path, family, monkeypatch):
    """The family's decoders pack like Gemma 3n's (gemma3n/text_model/packed_weights.py): every layer product and the
    tied head go through oneDNN-packed copies. Same model up to summation order: the logits agree to a few bf16
    roundings (2e-2 relative, as in test_packed_weights)."""
    from gemma3n.text_model import packed_weights

    monkeypatch.setattr(packed_weights, "MIN_PACKED_ELEMENTS", 0)  # the test model's weights are all small
    path, _ = saved(tmp_path, family, "causal")
    model = gemma3n.load(path, dtype="bfloat16")
    ids, mask = padded_batch()
    with torch.inference_mode():
        dense = model(ids, attention_mask=mask).logits[mask.bool()].float()
        decoder = packed_weights.decoder_of(model)
        assert decoder is model.model and packed_weights.pack_decoder(decoder) >= 7 * decoder.config.num_hidden_layers
        assert decoder.packed_head
        packed = model(ids, attention_mask=mask).logits[mask.bool()].float()
    assert rel_err(packed, dense) < 2e-2
