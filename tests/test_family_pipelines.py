"""Gemma and Gemma 2 through the user-facing layer: the text-only processor, the text-classification,
token-classification and text-generation pipelines, and ``gemma3n generate``, compared with transformers' own
pipelines on the same checkpoints (written by transformers, see family_helpers.py).

Tolerance: scores within 1e-5 (absolute, or relative above 1: the "none" function returns raw logits). The models
are 3-layer fp32 with hidden size 48, so the logits differ from the reference's by a few float32 roundings of sums
over at most 96 terms (about 1e-6 relative on any x86 kernel path), and softmax / sigmoid do not enlarge an
absolute error. Labels must be equal: each test first checks that the reference's best two scores are at least 1e-4
apart for every token / text compared, so a rounding difference cannot flip a label.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from family_helpers import CHAT_TEMPLATE, save_family_checkpoint

import gemma3n
from gemma3n import cli
from gemma3n.processors import ConfigError, Processor

FAMILIES = ["gemma", "gemma2"]
TOLERANCE = 1e-5
MARGIN = 1e-4

TEXTS = [
    "John Smith lives in New York.",
    "I loved this film",
    "Boring and far too long; I would not watch it again.",
    "x",
    "Anna and Peter visited Rome, Madrid and Lisbon during the summer holidays.",
]
CHAT = [{"role": "user", "content": "Tell me a short story about a cat."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(family, head, **overrides) -> (path, transformers model), built once per module."""
    built: dict[tuple, tuple] = {}

    def get(family: str, head: str, **overrides):
        key = (family, head, json.dumps(overrides, sort_keys=True))
        if key not in built:
            root = tmp_path_factory.mktemp(f"{family}-{head}")
            built[key] = save_family_checkpoint(root, family, head, **overrides)
        return built[key]

    return get


def reference_pipeline(task: str, path, model, **settings):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return transformers.pipeline(task, model=model, tokenizer=tokenizer, **settings)


def assert_close(ours, theirs, where: str = "output") -> None:
    """Same structure, keys, labels, words and offsets; floats within TOLERANCE."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), f"{where}: {ours} != {theirs}"
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{where}: {ours} != {theirs}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(theirs, str) or isinstance(theirs, (int,)) and not hasattr(theirs, "dtype"):
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"
    else:  # float or numpy float32
        assert isinstance(ours, float), f"{where}: {ours!r} is not a float"
        assert abs(ours - float(theirs)) <= TOLERANCE * max(1.0, abs(float(theirs))), f"{where}: {ours} vs {theirs}"


def assert_clear_margins(logits: torch.Tensor) -> None:
    """Every row's best two probabilities are MARGIN apart in the reference (labels cannot flip by rounding)."""
    top = torch.softmax(logits.double(), dim=-1).topk(2, dim=-1).values
    assert (top[..., 0] - top[..., 1]).min() > MARGIN


def reference_logits(path, model, texts):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts]


def load(path):
    return gemma3n.load(path, device="cpu", dtype=torch.float32)


# ---- processor -------------------------------------------------------------------------------------------------


def test_text_only_processor(checkpoint, tmp_path):
    import transformers

    path, _ = checkpoint("gemma2", "causal")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    processor = Processor.from_pretrained(path)
    assert processor.text_only and processor.tokenizer.image_token_id is None
    for text in [*TEXTS, "Hello <start_of_turn> world", ""]:
        ours = processor(text, return_tensors=None)
        assert ours == {k: [v] for k, v in theirs(text).items()}  # input_ids and attention_mask, no token types
        (encoding,) = processor.tokenizer.encode_with_offsets([text])
        reference = theirs(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        assert encoding.offsets == reference["offset_mapping"]
        assert encoding.special_mask == reference["special_tokens_mask"]
    prompt = processor.apply_chat_template(CHAT, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = processor.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert ids == [theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]]

    with pytest.raises(ValueError, match="text-only checkpoint.*images cannot be given"):
        processor("Describe <image_soft_token>", images=[torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="text-only checkpoint.*audio cannot be given"):
        processor("Hi", audio=[torch.zeros(1600)])
    image_chat = [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match="text-only checkpoint"):
        processor.apply_chat_template(image_chat, add_generation_prompt=True)

    # The published layout: the template inside tokenizer_config.json; without any template, a clear error.
    published = tmp_path / "published"
    shutil.copytree(path, published)
    (published / "chat_template.jinja").unlink()
    config = json.loads((published / "tokenizer_config.json").read_text())
    (published / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    assert Processor.from_pretrained(published).apply_chat_template(CHAT, add_generation_prompt=True) == prompt
    (published / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        Processor.from_pretrained(published).apply_chat_template(CHAT)
    (published / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="preprocessor_config.json describe image / audio input.*<image_soft_token>"):
        Processor.from_pretrained(published)


# ---- text classification ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_classification_matches_transformers(checkpoint, family):
    for overrides, default in (({}, "softmax"), ({"num_labels": 1, "id2label": {0: "score"}}, "sigmoid")):
        path, model = checkpoint(family, "sequence", **overrides)
        if default == "softmax":
            assert_clear_margins(torch.stack(reference_logits(path, model, TEXTS)))
        ours = gemma3n.pipeline("text-classification", model=load(path))
        assert ours.default_function() == default
        theirs = reference_pipeline("text-classification", path, model)
        pair = {"text": TEXTS[0], "text_pair": TEXTS[1]}
        for inputs in (TEXTS[0], TEXTS, pair):
            for settings in ({}, {"top_k": None}, {"top_k": 2}, {"top_k": 1, "function_to_apply": "none"}):
                assert_close(
                    ours(inputs, **settings), theirs(inputs, **settings), f"{family} {inputs!r:.20} {settings}"
                )
        # top_k at construction keeps the reference's shapes too (a single string then gives [[...]]).
        assert_close(
            gemma3n.pipeline("text-classification", model=ours.model, top_k=None)(TEXTS[0]),
            reference_pipeline("text-classification", path, model, top_k=None)(TEXTS[0]),
        )


# ---- token classification --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classification_matches_transformers(checkpoint, family):
    path, model = checkpoint(family, "token")
    for logits in reference_logits(path, model, TEXTS):
        assert_clear_margins(logits[1:])  # the BOS is skipped
    ours = gemma3n.pipeline("token-classification", model=load(path))
    theirs = reference_pipeline("token-classification", path, model)
    for settings in ({}, {"aggregation_strategy": "simple"}, {"aggregation_strategy": "simple", "ignore_labels": []}):
        assert_close(ours(TEXTS, **settings), theirs(TEXTS, **settings), f"{family} {settings}")
        assert_close(ours(TEXTS[0], **settings), theirs(TEXTS[0], **settings), f"{family} {settings}")
    for strategy in ("first", "average", "max"):  # one label per word; Gemma's words are guessed from spaces
        with pytest.warns(UserWarning, match="guessed from spaces"):
            words = ours(TEXTS, aggregation_strategy=strategy, ignore_labels=[])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the reference's own "fallback heuristic" warning
            assert_close(words, theirs(TEXTS, aggregation_strategy=strategy, ignore_labels=[]), f"{family} {strategy}")
    tokens = ours(TEXTS, ignore_labels=[])
    groups = ours(TEXTS, aggregation_strategy="simple", ignore_labels=[])
    assert sum(map(len, groups)) < sum(map(len, tokens))  # "simple" did join tokens
    assert {e["entity"] for text in tokens for e in text} >= {"O", "B-PER", "I-PER"}  # the labels vary


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_equal_one_at_a_time(checkpoint, family):
    """Padded batches (either side; the sequence head pools at the last non-pad token) give the unbatched results."""
    for task, head, settings in (
        ("text-classification", "sequence", {"top_k": None}),
        ("token-classification", "token", {"aggregation_strategy": "simple"}),
    ):
        path, _ = checkpoint(family, head)
        pipe = gemma3n.pipeline(task, model=load(path), **settings)
        alone = pipe(TEXTS)
        for side in ("left", "right"):
            assert_close(pipe(TEXTS, batch_size=3, padding_side=side), alone, f"{task} {side}")


# ---- text generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_generation_matches_transformers(checkpoint, family):
    """Greedy, past Gemma 2's window of 6 tokens; plain text (also a left-padded batch of two) and a chat."""
    path, model = checkpoint(family, "causal", weight_scale=0.5)
    ours = gemma3n.pipeline("text-generation", model=load(path))
    theirs = reference_pipeline("text-generation", path, model)
    settings = {"max_new_tokens": 8, "do_sample": False}
    for inputs in ("The weather in London is", CHAT):
        assert ours(inputs, **settings) == theirs(inputs, **settings)
    prompts = ["The weather in London is", "Tell me a short story about"]
    assert ours(prompts, batch_size=2, **settings) == theirs(prompts, **settings)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_task_and_head_mismatch(checkpoint):
    sequence, _ = checkpoint("gemma2", "sequence")
    causal, _ = checkpoint("gemma", "causal")
    with pytest.raises(ValueError, match=r"token-classification.*Gemma2ForSequenceClassification"):
        gemma3n.pipeline("token-classification", model=str(sequence), device="cpu")
    with pytest.raises(ValueError, match=r"text-generation.*Gemma2ForSequenceClassification"):
        gemma3n.pipeline("text-generation", model=load(sequence))
    with pytest.raises(ValueError, match=r"image-text-to-text.*GemmaForCausalLM"):
        gemma3n.pipeline("image-text-to-text", model=load(causal))
    with pytest.raises(ValueError, match="function_to_apply must be one of"):
        gemma3n.pipeline("text-classification", model=load(sequence))("hi", function_to_apply="tanh")


# ---- command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_generate(checkpoint, family, capsys, tmp_path):
    path, _ = checkpoint(family, "causal", weight_scale=0.5)  # the generation test's checkpoint
    question = "Tell me a short story about a cat."
    assert cli.main(["generate", "--model", str(path), "--device", "cpu", "--max-new-tokens", "6", question]) == 0
    printed = capsys.readouterr().out
    pipe = gemma3n.pipeline("text-generation", model=load(path), max_new_tokens=6, return_full_text=False)
    assert printed == pipe([{"role": "user", "content": question}])[0]["generated_text"] + "\n"

    image = tmp_path / "cat.png"
    image.write_bytes(b"not read: the model is checked first")
    for argv in (["--image", str(image)], ["--audio", str(image)]):
        assert cli.main(["generate", "--model", str(path), "--device", "cpu", *argv, "What is it?"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert f"{argv[0]} need a Gemma 3n checkpoint" in captured.err and "text-only" in captured.err
    assert cli.main(["generate", "--model", str(path), "--device", "cpu", "--system", "Be brief.", "hi"]) == 2
    assert "System role not supported" in capsys.readouterr().err  # the checkpoint's template refuses it
    sequence, _ = checkpoint(family, "sequence")
    assert cli.main(["generate", "--model", str(sequence), "--device", "cpu", "hi"]) == 2
    assert "text-classification checkpoint" in capsys.readouterr().err
