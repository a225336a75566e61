"""Text side: chat templates, tokenization, padding and decoding vs transformers' Gemma3nProcessor (exact)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gemma3n.processors import ChatTemplate, ChatTemplateError, ConfigError, Processor, Tokenizer
from gemma3n.processors.chat import default_template_text

try:
    from test_processor_utils import (
        PUBLISHED_TEMPLATE,
        our_processor,
        reference_processor,
        tiny_dir,
        tiny_dir_with_changed_json,
    )
except ImportError:  # tests/ used as a package
    from .test_processor_utils import (
        PUBLISHED_TEMPLATE,
        our_processor,
        reference_processor,
        tiny_dir,
        tiny_dir_with_changed_json,
    )

CONVERSATIONS = {
    "plain strings": [
        {"role": "user", "content": "  Hello there!  "},
        {"role": "assistant", "content": "Hi.\n"},
        {"role": "user", "content": "How are you?"},
    ],
    "system string": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Describe the weather."},
    ],
    "system parts and mixed media": [
        {"role": "system", "content": [{"type": "text", "text": " Be helpful. "}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "unused.png"},
                {"type": "text", "text": "\n What is this?  "},
                {"type": "audio", "audio": "unused.wav"},
                {"type": "image", "image": "unused.jpg"},
                {"type": "text", "text": "Answer briefly."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat. "}]},
        {"role": "user", "content": [{"type": "audio", "path": "x.wav"}, {"type": "text", "text": "And this?"}]},
    ],
    "single user turn": [{"role": "user", "content": [{"type": "text", "text": "One, two, three."}]}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_prompts_match_reference(name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = reference_processor().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    # Our renderer with the published template (read from chat_template.jinja) ...
    assert our_processor().apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # ... and gemma3n's own default template produce the same text.
    ours = ChatTemplate(default_template_text())
    rendered = ours.render(messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>")
    assert rendered == expected
    assert expected.startswith("<bos><start_of_turn>user\n")
    assert expected.endswith("<start_of_turn>model\n") == add_generation_prompt


def test_default_template_is_used_when_the_checkpoint_has_none(tmp_path):
    directory = tmp_path / "proc"
    shutil.copytree(tiny_dir(), directory)
    (directory / "chat_template.jinja").unlink()
    processor = Processor.from_pretrained(directory)
    assert "(default)" in processor.chat_template.source
    messages = CONVERSATIONS["system parts and mixed media"]
    expected = reference_processor().apply_chat_template(messages, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    # A template stored in tokenizer_config.json is found too.
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}custom:{{ messages[0]['content'] }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    processor = Processor.from_pretrained(directory)
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos>custom:hi"


@pytest.mark.parametrize("template", ["published", "default"])
def test_template_errors(template):
    text = PUBLISHED_TEMPLATE if template == "published" else default_template_text()
    chat = ChatTemplate(text, template)
    with pytest.raises(ChatTemplateError, match="alternate"):
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], bos_token="<bos>")
    with pytest.raises(ChatTemplateError, match="alternate"):
        chat.render([{"role": "assistant", "content": "a"}], bos_token="<bos>")
    with pytest.raises(ChatTemplateError):
        chat.render([{"role": "user", "content": None}], bos_token="<bos>")
    assert issubclass(ChatTemplateError, ValueError)


def test_templates_run_sandboxed():
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="rendering failed"):
        ChatTemplate(hostile, "hostile").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ChatTemplate("{% for %}", "broken")
    # The chat-template conventions are available: tojson without HTML escaping, loop controls, trim_blocks.
    text = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}\n"
    rendered = ChatTemplate(text).render([{"role": "user", "content": "<&>"}, {"role": "user", "content": "y"}])
    assert rendered == '{"role": "user", "content": "<&>"}'


def test_continue_final_message_matches_reference():
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    expected = reference_processor().apply_chat_template(messages, continue_final_message=True)
    assert our_processor().apply_chat_template(messages, continue_final_message=True) == expected
    assert expected.endswith("<start_of_turn>model\nOne, two,")


def test_batch_ids_and_masks_match_reference_left_padded():
    prompts = [
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "A much longer prompt: the quick brown fox jumps over the lazy dog, then sleeps. 1234 ünïcödé ✓",
        "",
    ]
    reference = reference_processor()(text=prompts, padding=True, return_tensors="pt")
    ours = our_processor()(text=prompts)
    assert reference_processor().tokenizer.padding_side == ours_padding_side() == "left"
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours[key], reference[key]), key
    assert ours["input_ids"][0, 0] == 0 and ours["attention_mask"][0, 0] == 0  # left padding
    # Right padding on request, as the reference tokenizer does when configured so.
    ref_tok = reference_processor().tokenizer
    ref_tok.padding_side = "right"
    try:
        reference_right = ref_tok(prompts, padding=True, return_tensors="pt")
    finally:
        ref_tok.padding_side = "left"
    ours_right = our_processor()(text=prompts, padding_side="right")
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours_right[key], reference_right[key]), key
    # Unpadded lists and numpy arrays.
    listed = our_processor()(text=prompts, padding=False, return_tensors=None)
    assert listed["input_ids"] == reference_processor().tokenizer(prompts)["input_ids"]
    arrays = our_processor()(text=prompts[:1], return_tensors="np")
    assert isinstance(arrays["input_ids"], np.ndarray)


def ours_padding_side() -> str:
    return our_processor().tokenizer.padding_side


def test_chat_template_tokenized_matches_reference_without_double_bos():
    messages = CONVERSATIONS["plain strings"]
    reference = reference_processor().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = our_processor().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    assert ours["input_ids"][0, :2].tolist() == [2, 105]  # one <bos>, then <start_of_turn>
    ids = our_processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == reference_processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_special_token_ids_are_the_published_ones():
    tokenizer = our_processor().tokenizer
    reference = reference_processor().tokenizer
    published = {
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "start_of_turn_token_id": 105,
        "end_of_turn_token_id": 106,
        "boi_token_id": 255999,
        "boa_token_id": 256000,
        "eoi_token_id": 262144,
        "image_token_id": 262145,
        "eoa_token_id": 262272,
        "audio_token_id": 262273,
    }
    for name, value in published.items():
        assert getattr(tokenizer, name) == value, name
    for name in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token"):
        assert getattr(tokenizer, name) == getattr(reference, name)
        assert tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) == reference.convert_tokens_to_ids(
            getattr(reference, name)
        )
    assert tokenizer.vocab_size == len(reference) == 262400
    assert our_processor().image_token_id == 262145 and our_processor().audio_token_id == 262273


def test_decode_matches_reference():
    text = "<start_of_turn>user\nThe cat sat.  Ünïcode ✓ <image_soft_token><end_of_turn>\n"
    reference = reference_processor().tokenizer
    ids = reference(text)["input_ids"]
    ours = our_processor()
    assert ours.tokenizer.encode(text) == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    batch = torch.tensor([ids, ids[::-1]])
    assert ours.batch_decode(batch, skip_special_tokens=True) == reference.batch_decode(batch, skip_special_tokens=True)
    assert ours.decode(torch.tensor(ids)) == reference.decode(ids)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"add_bos_token": "yes"}, r'tokenizer_config.json: "add_bos_token" must be a boolean'),
        ({"image_token": "<not_in_vocab>"}, r"image_token='<not_in_vocab>' is not in the tokenizer vocabulary"),
        ({"padding_side": "middle"}, r'tokenizer_config.json: "padding_side" must be "left" or "right"'),
        ({"boi_token": 5}, r'"boi_token" must be a token string'),
    ],
)
def test_bad_tokenizer_config_names_key_and_file(tmp_path, change, message):
    change = {**change, "an_unknown_key": [1, 2, 3]}
    directory = tiny_dir_with_changed_json(tmp_path, "tokenizer_config.json", change, drop=("extra_special_tokens",))
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(directory)
    assert info.match(message)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="processor directory not found"):
        Processor.from_pretrained(tmp_path / "nowhere")
