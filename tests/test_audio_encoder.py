"""Parity of gemma3n.encoders.audio.AudioEncoder with transformers' Gemma3nAudioEncoder.

Tolerances held (fp32, relative error ||ours - ref|| / ||ref||):
  * encoder output vs reference: <= 1e-5 (measured ~5e-7), max-abs <= 1e-4 on O(1) outputs; masks identical.
  * clip alone vs the same clip in a padded batch: <= 1e-5 on every output step whose receptive field stays inside
    the clip. The last step(s) of a clip whose sub-sampling convolution window runs past the clip's end differ, in
    the reference too (batched: the window sees padding frames and the first conv block's output on them; alone: the
    explicit zero padding) - checked below, on the reference itself, so the documented deviation is real.
  * bf16 weights and activations vs the fp32 reference: <= 2e-2. bf16 keeps 8 mantissa bits (unit round-off 2^-9 ~
    2e-3); a few dozen roundings through 3 residual blocks give ~1e-2, and the reference run in bf16 lands in the same
    place (asserted: ours is no worse than 1.5x the reference's own bf16 error).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from audio_helpers import ALTERNATE, PREFIX, PUBLISHED_LIKE, load_encoder, log_mel_like, reference, relative_error

LENGTHS = [300, 120, 35]  # 3 s, 1.2 s and 0.35 s at 100 frames per second
FP32_REL = 1e-5
FP32_ABS = 1e-4
BF16_REL = 2e-2


def _reference_run(tower, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = tower(feats, ~mask)  # the reference takes True = padding
    return out.last_hidden_state, ~out.audio_mel_mask


def _clean_steps(config, length: int) -> int:
    """Leading output steps of a clip of ``length`` frames whose inputs all lie inside the clip."""
    field, stride = 1, 1
    for (kernel_t, _), (stride_t, _) in zip(config.sscp_conv_kernel_size, config.sscp_conv_stride_size, strict=True):
        field += (kernel_t - 1) * stride
        stride *= stride_t
    clean_sub = max(0, (length - field) // stride + 1)
    # each attention layer lets the look-ahead pull the contamination back by context_right steps
    clean_sub -= config.conf_num_hidden_layers * config.conf_attention_context_right
    return max(0, math.ceil(clean_sub / config.conf_reduction_factor))


@pytest.fixture(scope="module")
def published():
    torch.manual_seed(0)
    tower, path = reference(PUBLISHED_LIKE)
    return tower, path, load_encoder(path)


def test_state_dict_keys_match_checkpoint(published):
    from safetensors import safe_open

    _, path, encoder = published
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k[len(PREFIX) :]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(PREFIX)}
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert sorted(ours) == sorted(shapes)
    assert ours == shapes


def test_builds_on_meta_and_loads_everything(published):
    _, path, _ = published
    encoder = load_encoder(path)
    assert list(encoder.buffers()) == []  # nothing derived is stored: no buffer can stay behind on meta
    assert all(not p.is_meta for p in encoder.parameters())
    feats, mask = log_mel_like([40], 128)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
    assert out.shape == (1, 3, 96) and valid.all() and torch.isfinite(out).all()


def test_fp32_parity_mixed_batch(published):
    tower, _, encoder = published
    feats, mask = log_mel_like(LENGTHS, 128)
    ref, ref_valid = _reference_run(tower, feats, mask)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
    err = relative_error(out, ref)
    print(f"\naudio fp32 mixed batch {LENGTHS}: rel {err:.2e}, max-abs {(out - ref).abs().max():.2e}")
    assert out.shape == ref.shape == (3, 19, 96)
    assert torch.equal(valid, ref_valid)
    assert valid.sum(1).tolist() == [19, 8, 3]
    assert err <= FP32_REL
    assert (out - ref).abs().max() <= FP32_ABS
    assert (out[~valid] == 0).all()


def test_fp32_parity_very_short_clips(published):
    """Clips shorter than one attention chunk, down to a single frame."""
    tower, _, encoder = published
    feats, mask = log_mel_like([13, 4, 1], 128, seed=3)
    ref, ref_valid = _reference_run(tower, feats, mask)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
    assert torch.equal(valid, ref_valid) and valid.sum(1).tolist() == [1, 1, 1]
    assert relative_error(out, ref) <= FP32_REL


def test_batched_equals_alone_except_where_the_reference_differs(published):
    tower, _, encoder = published
    feats, mask = log_mel_like(LENGTHS, 128)
    ref_batch, _ = _reference_run(tower, feats, mask)
    with torch.no_grad():
        batch, valid = encoder(feats, mask)
    saw_reference_deviation = False
    for i, length in enumerate(LENGTHS):
        ref_alone, _ = _reference_run(tower, feats[i : i + 1, :length], mask[i : i + 1, :length])
        with torch.no_grad():
            alone, alone_valid = encoder(feats[i : i + 1, :length], mask[i : i + 1, :length])
        steps = int(valid[i].sum())
        assert alone.shape[1] == steps and alone_valid.all()
        assert relative_error(alone, ref_alone) <= FP32_REL  # alone: parity with the reference alone
        clean = _clean_steps(encoder.config, length)
        err = relative_error(batch[i, :clean], alone[0, :clean])
        print(f"\nclip {length} frames: {clean}/{steps} steps clean, batched vs alone rel {err:.2e}")
        assert err <= FP32_REL
        if clean < steps:  # the boundary steps: the reference differs there as much as we do
            ref_gap = (ref_batch[i, clean:steps] - ref_alone[0, clean:]).abs().max()
            our_gap = (batch[i, clean:steps] - alone[0, clean:]).abs().max()
            print(f"  steps {clean}..{steps - 1}: batched vs alone max-abs ours {our_gap:.3f}, ref {ref_gap:.3f}")
            assert torch.allclose(our_gap, ref_gap, rtol=1e-3, atol=1e-4)
            saw_reference_deviation |= bool(ref_gap > 1e-2)
    assert saw_reference_deviation  # the 0.35 s clip's last step (frames 32..38 reach past its 35 frames)


def test_bf16_close_to_fp32_reference(published):
    tower, path, _ = published
    feats, mask = log_mel_like(LENGTHS, 128)
    ref, _ = _reference_run(tower, feats, mask)
    encoder = load_encoder(path, dtype=torch.bfloat16)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
        ref_bf16 = copy.deepcopy(tower).to(torch.bfloat16)(feats.bfloat16(), ~mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    err, ref_err = relative_error(out, ref), relative_error(ref_bf16, ref)
    print(f"\naudio bf16 vs fp32 reference: ours {err:.2e}, reference-in-bf16 {ref_err:.2e}")
    assert err <= BF16_REL
    assert err <= 1.5 * ref_err
    assert (out[~valid] == 0).all()


def test_alternate_config_parity():
    """Different chunk / context (with look-ahead) / conv kernels / strides / reduction / mel bins, and clamps that
    bite: proves nothing is tied to the published sizes."""
    torch.manual_seed(0)
    tower, path = reference(ALTERNATE)
    encoder = load_encoder(path)
    feats, mask = log_mel_like(LENGTHS, 64, seed=1)
    ref, ref_valid = _reference_run(tower, feats, mask)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
        unclipped, _ = load_encoder(path, gradient_clipping=1e10)(feats, mask)
    err = relative_error(out, ref)
    print(f"\naudio fp32 alternate config: rel {err:.2e}, max-abs {(out - ref).abs().max():.2e}")
    assert torch.equal(valid, ref_valid)
    assert err <= FP32_REL and (out - ref).abs().max() <= FP32_ABS
    assert relative_error(unclipped, ref) > 1e-2  # gradient_clipping=2 really changes the result
    for i, length in enumerate(LENGTHS):
        with torch.no_grad():
            alone, _ = encoder(feats[i : i + 1, :length], mask[i : i + 1, :length])
        clean = _clean_steps(encoder.config, length)
        assert 0 < clean < int(valid[i].sum())  # look-ahead: two boundary steps per clip here
        assert relative_error(out[i, :clean], alone[0, :clean]) <= FP32_REL


def test_longer_than_30_seconds_is_accepted(published):
    """The reference has no maximum length (the processor truncates at 30 s); neither do we."""
    tower, _, encoder = published
    feats, mask = log_mel_like([3100], 128, seed=2)
    ref, ref_valid = _reference_run(tower, feats, mask)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
    assert out.shape == (1, 194, 96) and torch.equal(valid, ref_valid)
    assert relative_error(out, ref) <= FP32_REL


def test_encode_traces_as_one_graph(published):
    """``encode`` has no host sync and no data-dependent shape: dynamo captures it whole (the speed path)."""
    _, _, encoder = published
    feats, mask = log_mel_like([60, 25], 128)
    compiled = torch.compile(encoder.encode, backend="eager", fullgraph=True)
    with torch.no_grad():
        out, valid = compiled(feats, mask)
        expected, expected_valid = encoder(feats, mask)
    assert torch.equal(valid, expected_valid) and relative_error(out, expected) <= 1e-6


def test_compiled_fp32_parity_mixed_batch(published):
    """``enable_compile()``: inductor with frozen weights, fused elementwise kernels; the reference's tolerance."""
    tower, path, _ = published
    # batches of 2 (as the pipelines fix the batch): the 3 clips run as 2 + (1 filled up with a copy of itself),
    # one compiled shape; clips do not interact, so the filler changes nothing but the kernels' blocking (rounding)
    encoder = load_encoder(path).enable_compile(batch_size=2)
    feats, mask = log_mel_like(LENGTHS, 128)
    ref, ref_valid = _reference_run(tower, feats, mask)
    with torch.no_grad():
        out, valid = encoder(feats, mask)
    assert torch.equal(valid, ref_valid)
    assert relative_error(out, ref) <= FP32_REL and (out - ref).abs().max() <= FP32_ABS
    assert (out[~valid] == 0).all()
    with pytest.raises(ValueError, match="no valid frame"):  # the compiled path keeps forward's input checks
        encoder(feats, torch.zeros_like(mask))


@pytest.mark.parametrize(
    "feats, mask, error, pattern",
    [
        (torch.zeros(2, 0, 128), torch.zeros(2, 0, dtype=torch.bool), ValueError, r"empty \(shape \(2, 0, 128\)\)"),
        (torch.zeros(0, 10, 128), torch.zeros(0, 10, dtype=torch.bool), ValueError, r"empty \(shape \(0, 10, 128\)\)"),
        (
            torch.zeros(2, 50, 128),
            torch.tensor([[True] * 50, [False] * 50]),
            ValueError,
            r"\(2, 50\).*no valid frame for clip\(s\) \[1\]",
        ),
        (torch.zeros(2, 50, 80), torch.ones(2, 50, dtype=torch.bool), ValueError, r"80 mel bins.*\(2, 50, 80\).*128"),
        (torch.zeros(50, 128), torch.ones(50, dtype=torch.bool), ValueError, r"shape \(50, 128\)"),
        (torch.zeros(2, 50, 128), torch.ones(2, 49, dtype=torch.bool), ValueError, r"\(2, 50\).*got \(2, 49\)"),
        (torch.zeros(2, 50, 128), torch.ones(2, 50, dtype=torch.int64), TypeError, r"bool.*torch.int64"),
        (torch.zeros(2, 50, 128, dtype=torch.int64), torch.ones(2, 50, dtype=torch.bool), TypeError, "floating"),
    ],
    ids=["no-frames", "no-clips", "all-masked", "wrong-bins", "2d", "mask-shape", "mask-dtype", "int-features"],
)
def test_bad_inputs_raise_clear_errors(published, feats, mask, error, pattern):
    _, _, encoder = published
    with pytest.raises(error, match=pattern):
        encoder(feats, mask)
