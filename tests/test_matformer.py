"""MatFormer slicing: in-memory slices, written checkpoints and transformers agree; impossible slices are named.

The source is a small E4B-like checkpoint written by transformers (10 layers in E4B's sliding/full pattern, the last 4
KV-shared, FFN 512 wide). Logits of the in-memory slice and of the written checkpoint loaded by gemma3n must be
identical (same tensors, same code). Against transformers (fp32) the bound is 1e-5 relative, the suite's parity bound:
both sides run the same fp32 operations in possibly different order and blocking, so per-element rounding differences
of a few ulps (~1e-7 relative) grow through 10 layers to ~1e-6 at most; 1e-5 leaves margin for any x86 kernel path.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import randomize, rel_err, text_config, use_dequantized_weights

import gemma3n
from gemma3n.config import Gemma3nConfig
from gemma3n.matformer import (
    PRESETS,
    MatformerError,
    get_preset,
    plan_slice,
    slice_tensors,
    sliced_config,
    text_prefix,
)
from gemma3n.matformer_cli import preset_table
from gemma3n.matformer_export import write_sliced_checkpoint
from gemma3n.model import Gemma3n
from gemma3n.presets import preset_config_dict

TOL = 1e-5
LAYER_TYPES_10 = (["sliding_attention"] * 4 + ["full_attention"]) * 2
# layers 0-5 own their keys/values; 6, 7, 8 (sliding) read layer 5, layer 9 (full) reads layer 4
SMALL_E4B = dict(
    num_hidden_layers=10,
    layer_types=LAYER_TYPES_10,
    num_kv_shared_layers=4,
    intermediate_size=[512] * 10,
    activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 8,
)

SLICES = {
    "width-only": {"ffn_dims": [256, 512, 128, 256, 384, 128, 256, 512, 256, 128]},
    "skip-only": {"skip_layers": [1, 6, 7]},
    "mixed": {"ffn_dims": [256, 256, 512, 128, 256, 256, 256], "skip_layers": [2, 6, 7]},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(transformers reference model, checkpoint dir) of the small E4B-like model, saved in shards."""
    from transformers import Gemma3nForCausalLM

    directory = tmp_path_factory.mktemp("small_e4b")
    torch.manual_seed(0)
    ref = randomize(Gemma3nForCausalLM(text_config(**SMALL_E4B)), seed=3)
    ref.save_pretrained(directory, max_shard_size="300KB")
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 1}))
    return ref, directory


def _ids() -> torch.Tensor:
    return torch.randint(3, 280, (2, 9), generator=torch.Generator().manual_seed(1))


def _reference_slice(ref, spec: dict):
    """The slice built independently with transformers' own modules: a model of the sliced shape whose weights are
    copied from the kept layers of ``ref`` (narrowed matrices, per-layer blocks picked by layer)."""
    from transformers import Gemma3nForCausalLM

    cfg = ref.config
    n, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    kept = [i for i in range(n) if i not in spec.get("skip_layers", [])]
    dims = spec.get("ffn_dims", [cfg.intermediate_size[i] for i in kept])
    first_shared = n - cfg.num_kv_shared_layers
    new_cfg = text_config(
        **{
            **SMALL_E4B,
            "num_hidden_layers": len(kept),
            "intermediate_size": list(dims),
            "layer_types": [cfg.layer_types[i] for i in kept],
            "activation_sparsity_pattern": [cfg.activation_sparsity_pattern[i] for i in kept],
            "num_kv_shared_layers": sum(i >= first_shared for i in kept),
        }
    )
    out = Gemma3nForCausalLM(new_cfg).eval()
    src, dst = ref.model, out.model
    with torch.no_grad():
        for name in [
            "embed_tokens",
            "per_layer_projection_norm",
            "norm",
            "altup_projections",
            "altup_unembed_projections",
        ]:
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
        table = src.embed_tokens_per_layer.weight.view(-1, n, P)[:, kept].reshape(-1, len(kept) * P)
        dst.embed_tokens_per_layer.weight.copy_(table)
        proj = src.per_layer_model_projection.weight.view(n, P, -1)[kept].reshape(len(kept) * P, -1)
        dst.per_layer_model_projection.weight.copy_(proj)
        for new, (old, width) in enumerate(zip(kept, dims, strict=True)):
            state = src.layers[old].state_dict()
            for key in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                state[key] = state[key][:width]
            state["mlp.down_proj.weight"] = state["mlp.down_proj.weight"][:, :width]
            wanted = dst.layers[new].state_dict()
            dst.layers[new].load_state_dict({k: v for k, v in state.items() if k in wanted})
    return out


@pytest.mark.parametrize("case", list(SLICES))
def test_slice_in_memory_written_and_transformers_agree(tmp_path, source, case):
    from transformers import Gemma3nForCausalLM

    ref, directory = source
    spec = SLICES[case]
    ids = _ids()
    in_memory = gemma3n.load(directory, dtype="float32", matformer=spec)
    out = write_sliced_checkpoint(directory, tmp_path / "slice", spec, max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "generation_config.json").read_text() == (directory / "generation_config.json").read_text()
    written = gemma3n.load(out, dtype="float32")
    assert written.config.text == in_memory.config.text
    with torch.no_grad():
        ours = in_memory(ids).logits
        assert torch.equal(written(ids).logits, ours)
        theirs = Gemma3nForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        independent = _reference_slice(ref, spec)(ids).logits
    assert rel_err(ours, theirs) < TOL
    assert rel_err(ours, independent) < TOL
    kept = 10 - len(spec.get("skip_layers", []))
    assert theirs.shape == ours.shape and in_memory.config.text.num_hidden_layers == kept
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == kept


def test_narrow_block_equals_zeroed_tail_of_the_wide_block(source):
    """MatFormer nesting, checked without our slicing code: in a layer without activation sparsity, keeping the first
    w units is the full model with gate rows w.. zeroed (gelu(0) = 0 switches those units off)."""
    ref, directory = source
    ids = _ids()
    dims = [512] * 10
    dims[3], dims[8] = 128, 256
    with torch.no_grad():
        ours = gemma3n.load(directory, dtype="float32", matformer={"ffn_dims": dims})(ids).logits
        zeroed = gemma3n.load(directory, dtype="float32")
        for layer, width in ((3, 128), (8, 256)):
            zeroed.language_model.layers[layer].mlp.gate_proj.weight[width:] = 0
        assert rel_err(ours, zeroed(ids).logits) < TOL


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_applies_to_the_slice(source, mode):
    """``matformer=`` with ``quantize=``: the slice is cut first, then exactly its tensors are quantized.

    Checked in three steps. (1) Every quantized layer has the sliced shape (kept layers only, narrowed FFNs) and holds
    bit for bit the quantization of the sliced fp32 weight, which for the FFNs is the first rows / columns of the
    original kept layer (transformers' model). (2) The quantized slice computes the sliced fp32 model with those
    dequantized weights: 1e-5 relative, the suite's fp32 bound (only the order of the products differs). (3) Its logits
    are near the unquantized slice's. int8 rounds each weight of a row to a step ``s = max|row| / 127``: an error
    uniform in +-s/2 (rms ``s / sqrt(12)``) and independent between weights, so one product ``W x`` moves by
    ``s / (sqrt(12) sigma)`` relative, 0.55-0.7% for these Gaussian rows of 64-512 weights (``max|row|`` ~ 2.4-3
    sigma). The slice runs 53 quantized products (attention and FFN of 7 layers, AltUp projections, the head);
    independent errors add in quadrature, ~sqrt(53) x 0.65% ~ 5%. Bound: 15% (a factor 3 for amplification by later
    layers; measured 3.7%), and above 1e-3 (quantization did change the weights). int4 (a step of (max - min) / 15
    per 64 weights, ~13x int8's) is past the small-error regime on this random model (which amplifies weight noise far
    more than a trained one), so it gets no absolute bound; its error must exceed 3x int8's (13x while the error stays
    linear in the step).
    """
    from torch import nn

    from gemma3n.quantize import Int4Linear, Int8Linear, quantize_weight

    ref, directory = source
    spec = SLICES["mixed"]
    kept = [i for i in range(10) if i not in spec["skip_layers"]]
    quantized = gemma3n.load(directory, dtype="float32", matformer=spec, quantize=mode)
    sliced = gemma3n.load(directory, dtype="float32", matformer=spec)
    kind = Int8Linear if mode == "int8" else Int4Linear
    q_text, f_text = quantized.language_model, sliced.language_model
    assert len(q_text.layers) == len(kept)

    # (1) shapes and contents: the quantization of the sliced weights, nothing else
    linears = {name: m for name, m in f_text.named_modules() if isinstance(m, nn.Linear) and min(m.weight.shape) >= 16}
    done = {name: m for name, m in q_text.named_modules() if isinstance(m, kind)}
    assert set(done) == set(linears) | {"lm_head"}
    sources = {name: m.weight for name, m in linears.items()} | {"lm_head": f_text.embed_tokens.weight}
    for name, module in done.items():
        assert (module.out_features, module.in_features) == tuple(sources[name].shape), name
        expected = quantize_weight(sources[name], mode, dtype=torch.float32).dequantized()
        assert torch.equal(module.dequantized(), expected), name
    for new, (old, width) in enumerate(zip(kept, spec["ffn_dims"], strict=True)):
        mlp, original = f_text.layers[new].mlp, ref.model.layers[old].mlp
        assert done[f"layers.{new}.mlp.gate_proj"].out_features == width
        assert done[f"layers.{new}.mlp.down_proj"].in_features == width
        assert torch.equal(mlp.gate_proj.weight, original.gate_proj.weight[:width])
        assert torch.equal(mlp.up_proj.weight, original.up_proj.weight[:width])
        assert torch.equal(mlp.down_proj.weight, original.down_proj.weight[:, :width])

    # (2) the forward pass uses exactly those weights
    dequantized = gemma3n.load(directory, dtype="float32", matformer=spec)
    use_dequantized_weights(dequantized.language_model, done)
    ids = _ids()
    with torch.no_grad():
        got = quantized(ids).logits
        assert rel_err(got, dequantized(ids).logits) <= TOL
        error = rel_err(got, sliced(ids).logits)

    # (3) near the unquantized slice
    if mode == "int8":
        assert 1e-3 < error < 0.15
    else:
        int8 = gemma3n.load(directory, dtype="float32", matformer=spec, quantize="int8")
        with torch.no_grad():
            assert error > 3 * rel_err(int8(ids).logits, sliced(ids).logits)


def test_multimodal_checkpoint_slice_keeps_towers_and_files(tmp_path):
    from gemma3n.tiny_random import build_tiny_random

    source = build_tiny_random(tmp_path / "tiny")  # 4 layers: S F S F, layers 2-3 KV-shared, FFN 128
    spec = {"ffn_dims": 128, "skip_layers": [2]}
    out = write_sliced_checkpoint(source, tmp_path / "slice", spec)
    copied = {p.name for p in source.iterdir()} - {"model.safetensors"}
    assert copied <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3 and config["text_config"]["num_kv_shared_layers"] == 1
    assert config["vision_config"] == json.loads((source / "config.json").read_text())["vision_config"]
    ids = torch.tensor([[2, 105, 2364, 107, 818, 1234, 106]])
    in_memory = gemma3n.load(source, dtype="float32", matformer=spec)
    written = gemma3n.load(out, dtype="float32")
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, written(ids).logits)
    assert in_memory.has_vision and in_memory.has_audio
    assert written.processor is not None


def test_impossible_slices_name_the_problem(source):
    _, directory = source
    text = Gemma3nConfig.from_pretrained(directory).text
    cases = {
        "layer 3: FFN width 1024 must lie in 1..512": {"ffn_dims": [512, 512, 512, 1024] + [512] * 6},
        "layer 0: FFN width 200 is not a multiple of 128": {"ffn_dims": 200},
        "layer 5 (sliding_attention) cannot be skipped: KV-shared layer(s) [6, 7, 8]": {"skip_layers": [5]},
        "layer 4 (full_attention) cannot be skipped: KV-shared layer(s) [9]": {"skip_layers": [4, 6]},
        "ffn_dims lists 10 widths but 8 layers are kept": {"ffn_dims": [256] * 10, "skip_layers": [8, 9]},
        "skip_layers [10] out of range": {"skip_layers": [10]},
        "skip_layers lists layer(s) [6] more than once": {"skip_layers": [6, 6]},
        "unknown key(s) ['layers']": {"layers": [1]},
        "unknown MatFormer preset 'E9B'": "E9B",
    }
    for message, spec in cases.items():
        with pytest.raises(MatformerError, match=re.escape(message)):
            plan_slice(text, spec)
    # a source may go when all its readers go too: layer 4's only reader is layer 9
    assert plan_slice(text, {"skip_layers": [4, 9]}).num_kv_shared_layers == 3
    with pytest.raises(MatformerError, match="layer 5"):
        gemma3n.load(directory, matformer={"skip_layers": [5]})


def test_slice_command_and_errors(tmp_path, source, capsys):
    from gemma3n.cli import main

    _, directory = source
    assert main(["slice", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS) and "20,21,22,23,24" in listing
    out = tmp_path / "cli-slice"
    assert (
        main(["slice", "--model", str(directory), "--ffn-dims", "256", "--skip-layers", "6,7", "--output", str(out)])
        == 0
    )
    assert gemma3n.load(out).config.text.intermediate_size == [256] * 8
    assert main(["slice", "--model", str(directory), "--skip-layers", "5", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gemma3n slice: error: matformer: layer 5") and not (tmp_path / "x").exists()
    assert main(["slice", "--model", str(directory), "--preset", "E2B", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["slice", "--model", str(directory), "--output", str(tmp_path / "y")]) == 2
    assert "nothing to slice" in capsys.readouterr().err


def _meta_tensors(config: Gemma3nConfig) -> dict[str, torch.Tensor]:
    """Published-name meta tensors of a full model (as a checkpoint would hold them)."""
    with torch.device("meta"):
        model = Gemma3n(config)
    return {"model." + name: t for name, t in model.state_dict().items()}


def test_e2b_recipe_on_e4b_gives_the_published_e2b():
    from transformers import Gemma3nConfig as RefConfig
    from transformers import Gemma3nForConditionalGeneration

    e4b = Gemma3nConfig.from_dict(preset_config_dict("e4b"))
    e2b_data = preset_config_dict("e2b")
    e2b = Gemma3nConfig.from_dict(e2b_data)
    plan = plan_slice(e4b.text, "E2B")
    sliced = sliced_config(e4b, plan)
    for field in dataclasses.fields(e2b.text):
        assert getattr(sliced.text, field.name) == getattr(e2b.text, field.name), field.name
    assert plan.kept == (*range(20), *range(25, 35))

    tensors = slice_tensors(_meta_tensors(e4b), plan, text_prefix(e4b))
    expected = _meta_tensors(e2b)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}

    with torch.device("meta"):
        ours = Gemma3n(sliced)
        ref = Gemma3nForConditionalGeneration(RefConfig(**e2b_data)).model
    for part in ["language_model", "vision_tower", "audio_tower", "embed_vision", "embed_audio"]:
        count = sum(p.numel() for p in getattr(ours, part).parameters())
        assert count == sum(p.numel() for p in getattr(ref, part).parameters()), part


def test_presets_at_e4b_shape():
    rows = {row["name"]: row for row in preset_table()}
    assert rows["E4B"]["layers"] == 35 and rows["E2B"]["layers"] == 30 and rows["E1.96B"]["layers"] == 30
    e1_96 = get_preset("e1.96b").spec
    assert (
        e1_96.skip_layers == (20, 21, 22, 23, 24)
        and e1_96.ffn_dims[4] == 16384
        and sum(e1_96.ffn_dims) == (29 * 8192 + 16384)
    )
    assert get_preset("Config for E2.54B (layer-level)").spec.ffn_dims == tuple(
        16384 if i in (4, 20, 21, 22, 23, 24) else 8192 for i in range(35)
    )
    # our count leaves out the keys/values KV-shared layers store but never use; Google's figure is within 0.06B
    for row in rows.values():
        assert abs(row["effective_params"] / 1e9 - row["published_effective_params_b"]) < 0.06, row
    assert rows["E2B"]["effective_params"] < rows["E1.96B"]["effective_params"] < rows["E2.54B"]["effective_params"]
