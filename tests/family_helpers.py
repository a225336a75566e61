"""Test checkpoints for the Gemma (1) and Gemma 2 text models, written by transformers (the reference).

``save_family_checkpoint(tmp_path, "gemma2", "token")`` builds a small random Gemma 2 token classifier with
transformers (fp32, seeded, eager attention), saves it with ``save_pretrained`` together with a small Gemma
tokenizer (transformers' own ``GemmaTokenizer``, saved the way transformers saves it: tokenizer.json,
tokenizer_config.json, chat_template.jinja) and returns (directory, transformers model).

The tokenizer keeps Gemma's special-token ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, <start_of_turn> 106,
<end_of_turn> 107) in a 512-entry vocabulary: byte-fallback BPE learned from the text below, spaces as "▁".
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
START_OF_TURN_ID = 106
BYTES_START = 108  # <0x00> .. <0xFF>

SEQUENCE_LABELS = ["negative", "neutral", "positive"]
TOKEN_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

# A chat template in the format of the published Gemma / Gemma 2 instruction-tuned checkpoints: BOS, then
# "<start_of_turn>{user|model}\n{content}<end_of_turn>\n" per message; no system role; roles alternate.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TRAINING_TEXT = """
John Smith lives in New York and works in Paris with Mary Jones.
The weather in London is cold today, but Berlin is warm and sunny.
I loved this film: the story was great and the actors were wonderful.
This movie was terrible, boring and far too long; I would not watch it again.
Anna and Peter visited Rome, Madrid and Lisbon during the summer holidays.
What is the capital of France? The capital of France is Paris.
Tell me a short story about a cat who lives in a small house by the sea.
""".strip()


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    room = VOCAB_SIZE - (BYTES_START + 256)
    trainer = trainers.BpeTrainer(vocab_size=room, min_frequency=2, show_progress=False)
    learner.train_from_iterator(TRAINING_TEXT.splitlines() * 3, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), START_OF_TURN_ID):
        vocab[f"<unused{i - len(SPECIAL_TOKENS)}>"] = i
    vocab["<start_of_turn>"] = START_OF_TURN_ID
    vocab["<end_of_turn>"] = START_OF_TURN_ID + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = BYTES_START + b
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        if token not in vocab and len(vocab) < VOCAB_SIZE:
            vocab[token] = len(vocab)
    merges = []
    for merge in learned["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return vocab, merges


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """transformers' GemmaTokenizer over the small vocabulary (BOS added, as published)."""
    from transformers import GemmaTokenizer

    vocab, merges = _vocab_and_merges()
    tokenizer = GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def family_config(family: str, head: str, **overrides: Any) -> Any:
    """A tiny GemmaConfig / Gemma2Config: 3 layers (Gemma 2: sliding, full, sliding with a window of 6), grouped
    heads with head_dim independent of hidden / heads, labels for the classification heads."""
    from transformers import Gemma2Config, GemmaConfig

    settings: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        hidden_activation="gelu_pytorch_tanh",
    )
    if family == "gemma2":
        settings.update(sliding_window=6, query_pre_attn_scalar=16, attn_logit_softcapping=50.0)
        settings.update(final_logit_softcapping=30.0)
    if head == "sequence":
        labels = SEQUENCE_LABELS
    elif head == "token":
        labels = TOKEN_LABELS
    else:
        labels = None
    if labels is not None:
        settings["id2label"] = dict(enumerate(labels))
        settings["label2id"] = {label: i for i, label in enumerate(labels)}
    settings.update(overrides)
    if "id2label" in overrides and "label2id" not in overrides:
        settings["label2id"] = {label: int(i) for i, label in settings["id2label"].items()}
    config_class = {"gemma": GemmaConfig, "gemma2": Gemma2Config}[family]
    return config_class(**settings)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Weights large enough that predictions differ between tokens and labels (the reference init is near zero):
    normal noise times ``scale``, norm weights (used as 1 + w) times 0.2."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(0.2 * noise if "norm" in name else scale * noise)


MODEL_CLASSES = {
    ("gemma", "causal"): "GemmaForCausalLM",
    ("gemma", "sequence"): "GemmaForSequenceClassification",
    ("gemma", "token"): "GemmaForTokenClassification",
    ("gemma2", "causal"): "Gemma2ForCausalLM",
    ("gemma2", "sequence"): "Gemma2ForSequenceClassification",
    ("gemma2", "token"): "Gemma2ForTokenClassification",
}


def save_family_checkpoint(
    tmp_path: str | Path,
    family: str,
    head: str,
    *,
    seed: int = 0,
    weight_scale: float = 0.15,
    **config_overrides: Any,
) -> tuple[Path, torch.nn.Module]:
    """Build a random transformers Gemma / Gemma 2 model with the given head ("causal", "sequence", "token"),
    save it with its tokenizer into ``tmp_path / f"{family}-{head}"`` and return (directory, fp32 eval model).

    ``config_overrides`` change single config settings (``num_labels=1``, ``sliding_window=4``, ...);
    ``weight_scale`` is the standard deviation of the random weights (larger: less repetitive greedy text)."""
    import transformers

    if (family, head) not in MODEL_CLASSES:
        raise ValueError(
            f"unknown family/head {family!r}/{head!r}; families: gemma, gemma2; heads: causal, sequence, token"
        )
    config = family_config(family, head, **config_overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family, head])(config).float().eval()
    _randomize(model, seed, weight_scale)
    directory = Path(tmp_path) / f"{family}-{head}"
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory, model
