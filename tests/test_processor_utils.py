"""Shared helpers for the processor tests (no tests here): the tiny processor files, the reference processor
loaded from them with transformers, our processor, and the published Gemma 3n chat template."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from gemma3n.processors import Processor, write_tiny_processor_files

TEST_IMAGE_SIZE = (64, 64)

# The chat template published with the Gemma 3n checkpoints (google/gemma-3n-E4B-it, chat_template.jinja), the
# reference for rendering parity. Copied verbatim as test data; gemma3n ships its own template text.
PUBLISHED_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'audio' -%}\n"
    "                {{ '<audio_soft_token>' }}\n"
    "            {%- elif item['type'] == 'image' -%}\n"
    "                {{ '<image_soft_token>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@functools.cache
def tiny_dir(image_size: tuple[int, int] = TEST_IMAGE_SIZE, published_template: bool = True) -> Path:
    """Tiny processor files (published layout). By default the published template replaces ours in
    chat_template.jinja so that the reference processor renders with the real Gemma 3n template."""
    directory = Path(tempfile.mkdtemp(prefix="gemma3n_tiny_processor_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    write_tiny_processor_files(directory, image_size=image_size)
    if published_template:
        (directory / "chat_template.jinja").write_text(PUBLISHED_TEMPLATE, encoding="utf-8")
    return directory


def tiny_dir_with_changed_json(tmp_path: Path, filename: str, change: dict, drop: tuple[str, ...] = ()) -> Path:
    """A copy of tiny_dir() in tmp_path whose JSON file `filename` gets `change` merged in and `drop` keys removed."""
    directory = tmp_path / "proc"
    shutil.copytree(tiny_dir(), directory)
    config = json.loads((directory / filename).read_text())
    config.update(change)
    for key in drop:
        config.pop(key)
    (directory / filename).write_text(json.dumps(config))
    return directory


@functools.cache
def reference_processor(image_size: tuple[int, int] = TEST_IMAGE_SIZE):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_dir(image_size)))


@functools.cache
def our_processor(image_size: tuple[int, int] = TEST_IMAGE_SIZE) -> Processor:
    return Processor.from_pretrained(tiny_dir(image_size))
