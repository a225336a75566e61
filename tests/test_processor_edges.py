"""The processor at the reference's edges: text settings (padding, truncation, max_length, pad_to_multiple_of,
token_type_ids, attention masks), assistant-token masks from `{% generation %}`, message objects, tools / documents /
extra template variables, and the conversation checks (unknown part types, missing content) -- all exact against
transformers' Gemma3nProcessor where the reference defines the behaviour."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import pytest
import torch

from gemma3n.pipelines.base import chat_prompt
from gemma3n.processors import ChatTemplate, Processor

try:
    from test_processor_utils import PUBLISHED_TEMPLATE, our_processor, reference_processor, tiny_dir_with_changed_json
except ImportError:  # tests/ used as a package
    from .test_processor_utils import (
        PUBLISHED_TEMPLATE,
        our_processor,
        reference_processor,
        tiny_dir_with_changed_json,
    )

PROMPTS = [
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "A longer prompt: the quick brown fox jumps over the lazy dog, then sleeps until noon.",
    "Middle length, with ünïcödé ✓",
]
IMAGE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))


def as_lists(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else [list(row) for row in value]


def assert_same_text_inputs(ours: dict, reference: dict, return_tensors) -> None:
    assert set(ours) == set(reference), (sorted(ours), sorted(reference))
    for key in ours:
        if return_tensors == "pt":
            assert isinstance(ours[key], torch.Tensor) and ours[key].dtype == reference[key].dtype, key
        elif return_tensors == "np":
            assert isinstance(ours[key], np.ndarray), key
        assert as_lists(ours[key]) == as_lists(reference[key]), key


TEXT_SETTINGS = [
    {"padding": True, "return_tensors": "pt"},
    {"padding": "longest", "return_tensors": "np"},
    {"padding": False, "return_tensors": None},
    {"padding": "max_length", "max_length": 40, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 37, "pad_to_multiple_of": 8, "return_tensors": "pt"},
    {"padding": True, "pad_to_multiple_of": 16, "return_tensors": "pt"},
    {"truncation": True, "max_length": 7, "return_tensors": None},
    {"truncation": "longest_first", "max_length": 9, "padding": True, "return_tensors": "pt"},
    {
        "truncation": "only_first",
        "max_length": 8,
        "padding": "max_length",
        "pad_to_multiple_of": 4,
        "return_tensors": None,
    },
    {"max_length": 6, "return_tensors": None},  # max_length alone truncates, as the reference's default
    {"max_length": 9, "return_tensors": "pt"},  # ... and the default padding makes the rows one tensor
    {"truncation": True, "padding": True, "return_tensors": "pt"},  # no limit (model_max_length is 1e30)
    {"padding": "max_length", "return_tensors": None},  # nothing to pad to: unpadded, as the reference
    {"truncation": False, "padding": True, "max_length": 5, "return_tensors": "pt"},  # max_length ignored
    {"return_attention_mask": False, "padding": True, "return_tensors": "pt"},
    {"return_token_type_ids": True, "padding": True, "return_tensors": "pt"},
    {"padding": True, "padding_side": "right", "return_tensors": "pt"},
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # the reference warns about some of these combinations
@pytest.mark.parametrize("settings", TEXT_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_text_settings_match_reference(settings):
    ours = our_processor()(text=PROMPTS, **settings)
    if settings.get("return_tensors", "pt") is None and settings.get("padding") in (False, "max_length"):
        # Unpadded rows of different lengths: the reference fails on the batch (it builds its token types from a
        # ragged array), so it gives its rows one prompt at a time.
        rows = [reference_processor()(text=[p], **settings) for p in PROMPTS]
        reference = {key: [row[key][0] for row in rows] for key in rows[0]}
    else:
        reference = reference_processor()(text=PROMPTS, **settings)
    assert_same_text_inputs(ours, reference, settings.get("return_tensors", "pt"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncation_side_and_model_max_length_from_the_tokenizer_config(tmp_path):
    from transformers import AutoProcessor

    change = {"truncation_side": "left", "model_max_length": 12}
    directory = tiny_dir_with_changed_json(tmp_path, "tokenizer_config.json", change)
    reference, ours = AutoProcessor.from_pretrained(str(directory)), Processor.from_pretrained(directory)
    assert ours.tokenizer.truncation_side == "left" and ours.tokenizer.model_max_length == 12
    short = ["Hello", "Hi there, friend"]
    for text, settings in (
        (PROMPTS, {"truncation": True, "padding": True}),  # cut to model_max_length, keeping the end
        (short, {"padding": "max_length"}),  # padded to model_max_length
        (PROMPTS, {"truncation": True, "max_length": 5, "padding": "max_length"}),
    ):
        assert_same_text_inputs(
            ours(text=text, return_tensors=None, **settings), reference(text=text, **settings), None
        )
    assert ours(text=short, padding="max_length")["input_ids"].shape == (2, 12)


def test_token_type_ids_mark_soft_tokens_and_can_be_left_out():
    text = ["Look <image_soft_token> and", "hear <audio_soft_token>"]
    audio = [np.zeros(4000, np.float32)]
    kwargs = {"padding": True, "return_tensors": "pt"}
    reference = reference_processor()(text=text, images=[[IMAGE], []], audio=audio, **kwargs)
    ours = our_processor()(text=text, images=[[IMAGE], []], audio=audio, **kwargs)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[key], reference[key]), key
    assert ours["token_type_ids"][0].tolist().count(1) == 256 and ours["token_type_ids"][1].tolist().count(3) == 188
    # The reference returns token_type_ids even when asked not to; an explicit False leaves them out here.
    assert "token_type_ids" not in our_processor()(
        text=text, images=[[IMAGE], []], audio=audio, return_token_type_ids=False
    )


def test_truncation_into_soft_tokens_is_an_error():
    prompt = "Describe <image_soft_token> please"
    with pytest.raises(ValueError, match="image"):
        reference_processor()(text=prompt, images=[IMAGE], truncation=True, max_length=20)
    with pytest.raises(ValueError, match=r"max_length=20 cut prompt 0 inside its image soft tokens \(15 of 256 kept\)"):
        our_processor()(text=prompt, images=[IMAGE], truncation=True, max_length=20)
    # The reference cuts audio soft tokens silently (and its max_length also cuts the audio samples); gemma3n refuses.
    with pytest.raises(ValueError, match="audio soft tokens"):
        our_processor()(text="Hear <audio_soft_token>", audio=[np.zeros(4000, np.float32)], max_length=30)
    fits = our_processor()(text=prompt, images=[IMAGE], truncation=True, max_length=300)
    assert torch.equal(fits["input_ids"], our_processor()(text=prompt, images=[IMAGE])["input_ids"])
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        our_processor()(text=PROMPTS, truncation=True, max_length=10, padding=True, pad_to_multiple_of=4)
    with pytest.raises(ValueError, match="padding must be"):
        our_processor()(text=PROMPTS, padding="everything")
    with pytest.raises(ValueError, match="truncation must be"):
        our_processor()(text=PROMPTS, truncation="middle")
    with pytest.raises(ValueError, match="different lengths"):
        our_processor()(text=PROMPTS, padding=False, return_tensors="pt")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": [{"type": "text", "text": "Why did the chicken cross the road?"}]},
]
SHORT = [{"role": "user", "content": "Short"}, {"role": "assistant", "content": "Ok."}]

# The published template with each assistant turn's text inside {% generation %} ... {% endgeneration %}.
GENERATION_TEMPLATE = PUBLISHED_TEMPLATE.replace(
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n",
    "    {%- if message['content'] is string -%}\n"
    "        {%- if role == 'model' -%}{% generation %}{{ message['content'] | trim }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] | trim }}{%- endif -%}\n",
).replace(
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n",
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {%- if role == 'model' -%}{% generation %}{{ item['text'] | trim }}{% endgeneration %}"
    "{%- else -%}{{ item['text'] | trim }}{%- endif -%}\n",
)


@pytest.mark.parametrize("return_tensors", ["pt", None])
def test_assistant_masks_match_reference(return_tensors):
    assert GENERATION_TEMPLATE.count("{% generation %}") == 2
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    kwargs.update(chat_template=GENERATION_TEMPLATE, return_tensors=return_tensors)
    batch = [CONVERSATION, SHORT]
    reference = reference_processor().apply_chat_template(batch, processor_kwargs={"padding": True}, **kwargs)
    ours = our_processor().apply_chat_template(batch, **kwargs)
    assert_same_text_inputs(ours, reference, return_tensors)
    tokenizer = our_processor().tokenizer
    ids, masks = as_lists(ours["input_ids"]), as_lists(ours["assistant_masks"])
    assert tokenizer.decode([t for t, m in zip(ids[0], masks[0], strict=True) if m]) == (
        "Hi! How can I help?Why did the chicken cross the road?"
    )
    assert tokenizer.decode([t for t, m in zip(ids[1], masks[1], strict=True) if m]) == "Ok."
    # One conversation (not a batch) gives one row, as in the reference.
    single = our_processor().apply_chat_template(SHORT, **kwargs)
    reference_single = reference_processor().apply_chat_template(SHORT, **kwargs)
    assert as_lists(single["assistant_masks"]) == as_lists(reference_single["assistant_masks"])


def test_assistant_masks_after_an_image_cover_the_answer():
    """Placeholders expand before tokenization; the masks follow the expansion. (The reference maps the spans of
    the unexpanded prompt onto the expanded tokens, so its masks after an image miss the answer: all zero here.)"""
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A picture of noise."},
    ]
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True, "return_tensors": "pt"}
    ours = our_processor().apply_chat_template(conversation, chat_template=GENERATION_TEMPLATE, **kwargs)
    answer = ours["input_ids"][0][ours["assistant_masks"][0].bool()]
    assert our_processor().decode(answer) == "A picture of noise."
    # A template without the tag gives all-zero masks, with a warning (as the reference).
    with pytest.warns(UserWarning, match="no {% generation %} block"):
        plain = our_processor().apply_chat_template(conversation, **kwargs)
    assert int(plain["assistant_masks"].sum()) == 0
    with pytest.raises(ValueError, match="return_dict"):
        our_processor().apply_chat_template(conversation, return_assistant_tokens_mask=True, tokenize=True)


def test_generation_blocks_in_loops_and_macros_render_and_give_spans():
    template = ChatTemplate(
        "{% macro say(m) %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endmacro %}"
        "{% for m in messages %}{{ m.role }}:{% if m.role == 'assistant' %}{{ say(m) }}{% else %}{{ m.content }}"
        "{% endif %};{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}]
    assert template.render(messages) == "user:a;assistant:[bc];"
    text, spans = template.render_with_generation_spans(messages)
    assert text == "user:a;assistant:[bc];" and [text[s:e] for s, e in spans] == ["[bc]"]


@dataclass
class Message:
    role: str
    content: object


class PlainMessage:
    def __init__(self, role: str, content: object):
        self.role, self.content = role, content


def test_message_objects_render_like_dicts():
    dicts = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    expected = reference_processor().tokenizer.apply_chat_template(dicts, tokenize=False)
    for kind in (Message, PlainMessage):
        objects = [kind(m["role"], m["content"]) for m in dicts]
        # The reference tokenizer reads message objects' attributes in the template.
        assert reference_processor().tokenizer.apply_chat_template(objects, tokenize=False) == expected
        assert our_processor().apply_chat_template(objects) == expected
        ids = our_processor().apply_chat_template(objects, tokenize=True)
        assert ids == reference_processor().apply_chat_template(dicts, tokenize=True)
    with_image = [Message("user", [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What?"}])]
    out = our_processor().apply_chat_template(with_image, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["pixel_values"].shape[0] == 1


TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools is none %}no tools{% else %}{{ tools | tojson }}{% endif %}|"
    "{% if documents is none %}no documents{% else %}{% for d in documents %}{{ d.title }}: {{ d.text }};"
    "{% endfor %}{% endif %}|{{ today | default('no date') }}|{{ messages[0]['content'] }}"
)


def test_tools_documents_and_extra_variables_reach_the_template():
    messages = [{"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    documents = [{"title": "Doc", "text": "Sunny <&>"}]
    for kwargs in ({}, {"tools": tools, "documents": documents, "today": "26 Jun 2026"}):
        expected = reference_processor().apply_chat_template(messages, chat_template=TOOLS_TEMPLATE, **kwargs)
        assert our_processor().apply_chat_template(messages, chat_template=TOOLS_TEMPLATE, **kwargs) == expected
    assert expected.startswith('<bos>[{"type": "function"') and "Doc: Sunny <&>;" in expected
    # Keyword arguments the template does not read but the processor call takes go to the call (as the reference).
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "pt", "truncation": True, "max_length": 4}
    reference = reference_processor().apply_chat_template(messages, **kwargs)
    ours = our_processor().apply_chat_template(messages, **kwargs)
    assert torch.equal(ours["input_ids"], reference["input_ids"]) and ours["input_ids"].shape == (1, 4)
    with pytest.raises(TypeError, match=r"tools\[0\] must be a JSON-schema dict"):
        our_processor().apply_chat_template(messages, tools=["get_weather"])
    with pytest.raises(TypeError, match=r"documents\[0\] must be a dict"):
        our_processor().apply_chat_template(messages, documents=["text"])


BAD_CONVERSATIONS = {
    "video part": (
        [{"role": "user", "content": [{"type": "text", "text": "Watch"}, {"type": "video", "url": "clip.mp4"}]}],
        r"message 0, part 1 has unsupported type 'video'; supported types: text, image, audio",
    ),
    "unknown part": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "foo", "foo": 1}]},
        ],
        r"message 2, part 0 has unsupported type 'foo'; supported types: text, image, audio",
    ),
    "part without type": (
        [{"role": "user", "content": [{"text": "no type here"}]}],
        r"message 0, part 0 has no 'type'; supported types: text, image, audio",
    ),
    "message without content": ([{"role": "user"}], r"message 0 \('user'\) has no 'content'"),
    "text part without text": (
        [{"role": "user", "content": [{"type": "text"}]}],
        r"message 0, part 0: a text part needs a 'text' string",
    ),
    "part that is a string": (
        [{"role": "user", "content": ["just a string"]}],
        r"message 0, part 0: a content part must be a dict",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONVERSATIONS))
def test_inputs_are_never_dropped_silently(name):
    """Gemma 3n takes text, image and audio parts (its processor has no video input); anything else is an error
    naming the message and part, whether rendering, tokenizing or building a pipeline prompt."""
    messages, message = BAD_CONVERSATIONS[name]
    processor = our_processor()
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(messages, add_generation_prompt=True)
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match=message):
        chat_prompt(processor, messages)
