"""MultimodalEmbedder against transformers' Gemma3nMultimodalEmbedder (vision and audio)."""

from __future__ import annotations

import copy

import pytest
import torch
from vision_helpers import load_embedder, one_thread_fixture, read_tensors, ref_fixture, rel_err  # noqa: F401 - fixtures

from gemma3n.config import Gemma3nConfig
from gemma3n.encoders.embedder import MultimodalEmbedder

FP32_REL_TOL = 1e-5
MODALITIES = ("vision", "audio")


def _ref_embedder(ref, modality: str):
    return getattr(ref.model.model, f"embed_{modality}")


def _hard_ids(ref, modality: str) -> torch.Tensor:
    """Wrapper/placeholder tokens of the modality plus both ends of its vocabulary range."""
    c = ref.config
    if modality == "vision":
        section, special = c.vision_config, [c.eoi_token_id, c.image_token_id]
    else:
        section, special = c.audio_config, [c.eoa_token_id, c.audio_token_id]
    offset, size = section.vocab_offset, section.vocab_size
    return torch.tensor([[offset, *special, offset + size // 2], [offset + size - 1] * 4])


@pytest.mark.parametrize("modality", MODALITIES)
def test_keys_match_checkpoint(ref, modality):
    config = Gemma3nConfig.from_pretrained(ref.path)
    with torch.device("meta"):
        embedder = MultimodalEmbedder.from_config(getattr(config, modality), config.text)
    assert set(embedder.state_dict()) == set(read_tensors(ref.path, f"model.embed_{modality}."))


@pytest.mark.parametrize("modality", MODALITIES)
def test_hard_tokens_match_reference(ref, modality):
    ours = load_embedder(ref.path, modality)
    ids = _hard_ids(ref, modality)
    with torch.no_grad():
        expected = _ref_embedder(ref, modality)(input_ids=ids)
        got = ours.embed_hard(ids)
        unchecked = ours.embed_hard(ids, check=False)
    assert got.shape == expected.shape == (2, 4, ref.config.text_config.hidden_size)
    assert rel_err(got, expected) <= FP32_REL_TOL  # measured 0.0
    assert torch.equal(got, unchecked)
    assert ours.in_vocab(ids).all()


@pytest.mark.parametrize("modality", MODALITIES)
def test_soft_features_match_reference(ref, modality):
    ours = load_embedder(ref.path, modality)
    width = getattr(ref.config, f"{modality}_config").hidden_size
    features = 3.0 * torch.randn(2, 5, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _ref_embedder(ref, modality)(inputs_embeds=features)
        got = ours.embed_soft(features)
    assert rel_err(got, expected) <= FP32_REL_TOL  # measured 0.0
    assert (got - expected).abs().max() <= FP32_REL_TOL * expected.abs().max()


def test_bf16_matches_reference_bf16(ref):
    ours = load_embedder(ref.path, "vision").to(torch.bfloat16)
    theirs = copy.deepcopy(_ref_embedder(ref, "vision")).to(torch.bfloat16)
    features = torch.randn(2, 5, ours.multimodal_hidden, generator=torch.Generator().manual_seed(4))
    ids = _hard_ids(ref, "vision")
    with torch.no_grad():
        for got, expected in (
            (ours.embed_soft(features.bfloat16()), theirs(inputs_embeds=features.bfloat16())),
            (ours.embed_hard(ids), theirs(input_ids=ids)),
        ):
            assert got.dtype == torch.bfloat16
            # Same ops in the same dtype: bit-equal is expected; allow one bf16 ulp (2^-8) of slack.
            assert rel_err(got, expected) <= 2**-8


def test_vocab_boundaries_and_errors(ref):
    vision = load_embedder(ref.path, "vision")
    offset, size = vision.vocab_offset, vision.vocab_size
    edges = torch.tensor([offset - 1, offset, offset + size - 1, offset + size])
    assert vision.in_vocab(edges).tolist() == [False, True, True, False]
    # boi (255999) is a text token: the vision embedder must refuse it, naming the id and its range.
    boi = ref.config.boi_token_id
    with pytest.raises(ValueError, match=rf"token id {boi} .* \[{offset}, {offset + size}\)"):
        vision.embed_hard(torch.tensor([[offset, boi]]))
    with pytest.raises(ValueError, match=rf"token id {offset + size} "):
        vision.embed_hard(torch.tensor([offset + size]))
    with pytest.raises(TypeError, match="integer tensor"):
        vision.embed_hard(torch.tensor([float(offset)]))
    with pytest.raises(ValueError, match=r"width 2048, got shape \(2, 7\)"):
        vision.embed_soft(torch.zeros(2, 7))
