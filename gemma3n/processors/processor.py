"""Gemma processor: conversations / text + images + audio -> the model's input tensors.

    processor = Processor.from_pretrained("path/to/checkpoint")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    # or: processor(text=prompt, images=[image], audio=[waveform], return_tensors="pt")

Each `<image_soft_token>` placeholder in the prompt becomes "\\n\\n<start_of_image>" + image_seq_length soft tokens
+ "<end_of_image>\\n\\n" (audio likewise with <start_of_audio> / <end_of_audio> and audio_seq_length), exactly as
the reference Gemma3nProcessor expands them, before tokenization. Outputs input_ids, attention_mask and
token_type_ids (1 on image, 3 on audio soft tokens) like the reference; padding / truncation follow transformers'
tokenizer rules (see text_settings.py).

Text-only checkpoints (Gemma, Gemma 2: a tokenizer without image / audio tokens and no image / audio settings) give a
text-only processor: the tokenizer and the checkpoint's chat template, input_ids and attention_mask out (as their
reference tokenizer returns), and a one-line error for images or audio.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model_names import resolve_model_name
from .audio import AudioFeatureExtractor, AudioSettings, frames_per_soft_token, longest_clip_samples
from .chat import (
    ChatTemplate,
    chat_media,
    checkpoint_template,
    default_template_text,
    find_template,
    normalize_messages,
)
from .files import ConfigError, get_int, get_section, read_json
from .image import ImageProcessor, ImageSettings
from .text_settings import TextSettings, pad_rows, shifted_position
from .tokenizer import Tokenizer

IMAGE_PROCESSOR_TYPES = ("SiglipImageProcessor", "SiglipImageProcessorFast")
FEATURE_EXTRACTOR_TYPES = ("Gemma3nAudioFeatureExtractor",)
PROCESSOR_CLASSES = ("Gemma3nProcessor",)


class BatchInputs(dict):
    """Model inputs: a dict (input_ids, attention_mask, pixel_values, input_features, input_features_mask, ...)
    with attribute access and `.to(device, dtype)` (dtype applies to floating-point tensors only)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BatchInputs:
        out = BatchInputs()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(
                    device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None
                )
            out[key] = value
        return out


def _check_type(data: dict, key: str, allowed: Sequence[str], source: str) -> None:
    value = data.get(key)
    if value is not None and value not in allowed:
        raise ConfigError(f'{source}: "{key}" is {value!r}; expected one of {", ".join(allowed)}')


def _flatten_images(images: Any) -> tuple[list[Any], list[int] | None]:
    """Images as a flat list plus per-prompt counts when the input was nested per prompt ([[...], [...]])."""
    if images is None:
        return [], None
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:  # a stacked batch of images
        return list(images), None
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(group, (list, tuple)) for group in images):
            return [im for group in images for im in group], [len(group) for group in images]
        return list(images), None
    return [images], None


def _flatten_audio(audio: Any) -> list[Any]:
    """A single clip (1-D samples, path, dict) or a batch (list of clips, or a 2-D array = one mono clip per row)."""
    if audio is None:
        return []
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return list(audio) if audio.ndim == 2 else [audio]
    if isinstance(audio, (list, tuple)):
        if audio and all(isinstance(a, (int, float)) for a in audio):
            return [np.asarray(audio, dtype=np.float32)]  # one clip given as a list of numbers
        return list(audio)
    return [audio]


# The processor-call keywords apply_chat_template passes on when given directly (not in processor_kwargs).
_CALL_ARGUMENTS = frozenset(
    {
        "sampling_rate",
        "padding",
        "truncation",
        "max_length",
        "pad_to_multiple_of",
        "padding_side",
        "add_special_tokens",
        "return_token_type_ids",
        "return_attention_mask",
        "audio_max_length",
        "audio_truncation",
    }
)


class Processor:
    """Tokenizer + chat template + image processor + audio feature extractor for Gemma 3n; tokenizer + chat template
    alone for text-only checkpoints (`text_only`: the tokenizer has no image / audio tokens)."""

    # The audio encoder's log-mel frames per soft token and soft tokens per clip, which bound the longest clip;
    # from_pretrained takes them from the checkpoint's config.json (published: 2 x 2 x 4 = 16 and 188).
    audio_frames_per_token: int = 16
    audio_soft_tokens_per_clip: int | None = None  # None: audio_seq_length

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        feature_extractor: AudioFeatureExtractor | None = None,
        chat_template: ChatTemplate | None = None,
        image_seq_length: int = 256,
        audio_seq_length: int = 188,
        name: str = "processor",
    ):
        self.tokenizer = tokenizer
        self.name = name  # where it was read from, for error messages
        self.text_only = not tokenizer.has_media_tokens
        self.image_seq_length = image_seq_length
        self.audio_seq_length = audio_seq_length
        if self.text_only:
            if image_processor is not None or feature_extractor is not None:
                missing = ", ".join(tokenizer.missing_media_tokens)
                raise ValueError(f"an image processor / audio feature extractor needs a tokenizer with {missing}")
            self.image_processor: ImageProcessor | None = None
            self.feature_extractor: AudioFeatureExtractor | None = None
            self.chat_template: ChatTemplate | None = chat_template  # None: the checkpoint has none
            self.full_image_sequence = self.full_audio_sequence = ""
            return
        self.image_processor = image_processor or ImageProcessor()
        self.feature_extractor = feature_extractor or AudioFeatureExtractor()
        self.chat_template = chat_template or ChatTemplate(default_template_text(), "gemma3n default template")
        t = tokenizer
        self.full_image_sequence = f"\n\n{t.boi_token}{t.image_token * image_seq_length}{t.eoi_token}\n\n"
        self.full_audio_sequence = f"\n\n{t.boa_token}{t.audio_token * audio_seq_length}{t.eoa_token}\n\n"

    # ---- loading --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Read a checkpoint's processor files (``path``: a directory, "tiny-random" or a hub id).

        Tokenizer: tokenizer.json (+ tokenizer_config.json / special_tokens_map.json). Chat template:
        chat_template.jinja, chat_template.json, tokenizer_config.json, else the default in gemma3n/templates.
        Image / audio settings: the `image_processor` / `feature_extractor` sections of processor_config.json,
        or the published layout (one flat preprocessor_config.json with both, beside a processor_config.json
        holding image_seq_length / audio_seq_length). Without any of these files, the published values are used.
        A checkpoint whose tokenizer has no image / audio tokens and that has none of these files (Gemma, Gemma 2)
        gives a text-only processor with the checkpoint's chat template (none if it has none).
        """
        directory = resolve_model_name(path, kind="processor", required_file=None)
        processor_file = directory / "processor_config.json"
        processor_config = read_json(processor_file) if processor_file.is_file() else {}
        psource = processor_file.name
        _check_type(processor_config, "processor_class", PROCESSOR_CLASSES, psource)
        image_section = get_section(processor_config, "image_processor", psource)
        audio_section = get_section(processor_config, "feature_extractor", psource)
        image_source = f"{psource} (image_processor)"
        audio_source = f"{psource} (feature_extractor)"
        preprocessor_file = directory / "preprocessor_config.json"
        if (image_section is None or audio_section is None) and preprocessor_file.is_file():
            flat = read_json(preprocessor_file)
            if image_section is None:
                image_section, image_source = flat, preprocessor_file.name
            if audio_section is None:
                audio_section, audio_source = flat, preprocessor_file.name

        image_settings = ImageSettings()
        if image_section is not None:
            _check_type(image_section, "image_processor_type", IMAGE_PROCESSOR_TYPES, image_source)
            image_settings = ImageSettings.from_dict(image_section, image_source)
        audio_settings = AudioSettings()
        if audio_section is not None:
            _check_type(audio_section, "feature_extractor_type", FEATURE_EXTRACTOR_TYPES, audio_source)
            audio_settings = AudioSettings.from_dict(audio_section, audio_source)

        image_seq_length = get_int(processor_config, "image_seq_length", 256, psource, minimum=1)
        audio_seq_length = get_int(processor_config, "audio_seq_length", 188, psource, minimum=1)
        tokenizer = Tokenizer.from_pretrained(directory)  # after the cheap checks: the slowest part
        if not tokenizer.has_media_tokens:
            media_files = [f.name for f in (processor_file, preprocessor_file) if f.is_file()]
            if media_files:
                raise ConfigError(
                    f"{directory}: {' and '.join(media_files)} describe image / audio input, but the tokenizer has "
                    f"no {', '.join(tokenizer.missing_media_tokens)}"
                )
            found = checkpoint_template(directory)
            return cls(tokenizer, chat_template=ChatTemplate(*found) if found else None, name=str(directory))
        template_text, template_source = find_template(directory)
        processor = cls(
            tokenizer,
            ImageProcessor(image_settings),
            AudioFeatureExtractor(audio_settings),
            ChatTemplate(template_text, template_source),
            image_seq_length=image_seq_length,
            audio_seq_length=audio_seq_length,
            name=str(directory),
        )
        processor._read_audio_limits(directory / "config.json")
        return processor

    def _read_audio_limits(self, config_file: Path) -> None:
        """The audio encoder's time reduction and soft tokens per clip from a checkpoint's config.json, if any."""
        if not config_file.is_file():
            return
        from ..config import Gemma3nConfig

        config = Gemma3nConfig.from_pretrained(config_file)
        if config.audio is not None:
            strides = [stride_t for stride_t, _ in config.audio.sscp_conv_stride_size]
            self.audio_frames_per_token = frames_per_soft_token(strides, config.audio.conf_reduction_factor)
            self.audio_soft_tokens_per_clip = config.audio_soft_tokens_per_image

    @property
    def max_audio_samples(self) -> int:
        """The longest clip (in samples at the extractor's rate) whose soft tokens fit the checkpoint's count."""
        if self.feature_extractor is None:
            self._refuse_media("audio")
        tokens = min(self.audio_seq_length, self.audio_soft_tokens_per_clip or self.audio_seq_length)
        return longest_clip_samples(tokens, self.audio_frames_per_token, self.feature_extractor.settings)

    @property
    def max_audio_seconds(self) -> float:
        """:attr:`max_audio_samples` in seconds (published checkpoints: 30.1 s, above the 30 s truncation)."""
        return self.max_audio_samples / self.feature_extractor.sampling_rate

    def _check_audio_lengths(self, waves: list[torch.Tensor], truncate_at: int | None) -> None:
        """A clip longer than the checkpoint holds (after truncation to ``truncate_at`` samples, rounded up to a
        multiple of 128 as the extractor does) is an error naming the longest clip it accepts."""
        limit, rate = self.max_audio_samples, self.feature_extractor.sampling_rate
        cap = None if truncate_at is None else -(-truncate_at // 128) * 128
        for i, wave in enumerate(waves):
            n = wave.shape[-1] if cap is None else min(wave.shape[-1], cap)
            if n > limit:
                raise ValueError(
                    f"audio {i} is {n / rate:.2f} s long, but this checkpoint takes at most {limit / rate:.3f} s "
                    f"({limit} samples at {rate} Hz) per clip; split longer audio into clips (the "
                    "automatic-speech-recognition pipeline does)"
                )

    # ---- token texts / ids ----------------------------------------------------------------------------------

    @property
    def image_token(self) -> str:
        return self.tokenizer.image_token

    @property
    def audio_token(self) -> str:
        return self.tokenizer.audio_token

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.audio_token_id

    # ---- main call ------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        audio: Any = None,
        *,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        audio_max_length: int | None = 480_000,
        audio_truncation: bool = True,
    ) -> BatchInputs:
        """Tokenize prompts and preprocess their images / audio.

        text: one prompt or a list; each `<image_soft_token>` / `<audio_soft_token>` marks where one image / clip
            goes (in order). images: one image, a flat list, or one list per prompt. audio: one clip or a list
            (arrays/tensors at `sampling_rate`, default 16 kHz; {"array", "sampling_rate"} dicts; file paths).
        Text settings as in transformers' tokenizers: `padding` True / "longest", "max_length" (to `max_length`) or
        False; the default (None) pads a batch to its longest prompt, so that it forms tensors, while still letting
        `max_length` alone truncate as the reference's default (no padding) does. `truncation` True /
        "longest_first" / "only_first" cuts each prompt to `max_length` tokens; `pad_to_multiple_of`
        rounds the padded length up; batches are padded on `padding_side` (default: the tokenizer's, left for
        Gemma). Truncation that cuts into an image's or a clip's soft tokens is an error. Returns input_ids,
        attention_mask and token_type_ids (0 text, 1 image soft token, 3 audio soft token, as the reference;
        `return_attention_mask=False` / `return_token_type_ids=False` leave them out), plus pixel_values and
        input_features / input_features_mask for images / audio. The audio length cap is `audio_max_length`
        samples (the text's `max_length` does not cut audio). return_tensors: "pt", "np" or None (lists).
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        image_list, per_prompt = _flatten_images(images)
        audio_list = _flatten_audio(audio)
        if self.text_only and (image_list or audio_list):
            self._refuse_media("images" if image_list else "audio")
        if text is None:
            if not image_list and not audio_list:
                raise ValueError("provide at least one of text, images or audio")
            if per_prompt is not None:  # one prompt of placeholders per image group, as the reference does
                text = [" ".join([self.image_token] * n) for n in per_prompt]
            else:
                text = [" ".join([self.image_token] * len(image_list) + [self.audio_token] * len(audio_list))]
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("text must be a string or a list of strings")

        if not self.text_only:
            self._check_counts(prompts, image_list, per_prompt, audio_list)
        if return_token_type_ids is None and self.text_only:
            return_token_type_ids = False  # a text-only tokenizer returns input_ids and attention_mask only
        settings = TextSettings.resolve(
            padding, truncation, max_length, pad_to_multiple_of, padding_side, self.tokenizer
        )
        out = BatchInputs(
            self._encode_text(
                prompts,
                settings,
                add_special_tokens,
                return_tensors,
                return_token_type_ids=return_token_type_ids is not False,
                return_attention_mask=return_attention_mask is not False,
            )
        )
        if image_list:
            pixel_values = self.image_processor(image_list)  # [n_images, 3, H, W]
            out["pixel_values"] = pixel_values.numpy() if return_tensors == "np" else pixel_values
        if audio_list:
            waves = self.feature_extractor.prepare(audio_list, sampling_rate)
            self._check_audio_lengths(waves, audio_max_length if audio_truncation else None)
            features, mask = self.feature_extractor(waves, max_length=audio_max_length, truncation=audio_truncation)
            if return_tensors == "np":
                features, mask = features.numpy(), mask.numpy()
            out["input_features"] = features  # [n_audio, frames, 128]
            out["input_features_mask"] = mask  # [n_audio, frames] bool
        return out

    def _refuse_media(self, kind: str) -> None:
        raise ValueError(
            f"{self.name} is a text-only checkpoint (its tokenizer has no image or audio tokens): {kind} cannot be "
            "given; use a Gemma 3n checkpoint for images and audio"
        )

    def _check_counts(
        self, prompts: list[str], images: list[Any], per_prompt: list[int] | None, audio: list[Any]
    ) -> None:
        image_marks = [p.count(self.image_token) for p in prompts]
        audio_marks = sum(p.count(self.audio_token) for p in prompts)
        if per_prompt is not None:
            if len(per_prompt) != len(prompts):
                raise ValueError(f"got image lists for {len(per_prompt)} prompts but {len(prompts)} prompts")
            for i, (marks, n) in enumerate(zip(image_marks, per_prompt, strict=True)):
                if marks != n:
                    raise ValueError(f"prompt {i} has {marks} image placeholders ({self.image_token}) but {n} images")
        elif sum(image_marks) != len(images):
            raise ValueError(
                f"the text has {sum(image_marks)} image placeholders ({self.image_token}) but {len(images)} images "
                "were given"
            )
        if audio_marks != len(audio):
            raise ValueError(
                f"the text has {audio_marks} audio placeholders ({self.audio_token}) but {len(audio)} audio clips "
                "were given"
            )

    def _expand(self, prompt: str) -> tuple[str, list[tuple[int, int]]]:
        """The prompt with each placeholder replaced by its full soft-token run, and the shifts that moves later
        characters by: [(end of the placeholder in the prompt, characters added)], in order."""
        if self.text_only:
            return prompt, []
        runs = {self.image_token: self.full_image_sequence, self.audio_token: self.full_audio_sequence}
        pattern = "|".join(re.escape(token) for token in runs)
        shifts = [(m.end(), len(runs[m.group()]) - len(m.group())) for m in re.finditer(pattern, prompt)]
        return re.sub(pattern, lambda m: runs[m.group()], prompt), shifts

    def _encode_text(
        self,
        prompts: list[str],
        settings: TextSettings,
        add_special_tokens: bool,
        return_tensors: str | None,
        return_token_type_ids: bool = True,
        return_attention_mask: bool = True,
        generation_spans: list[list[tuple[int, int]]] | None = None,
    ) -> dict[str, Any]:
        """Expand placeholders, tokenize (truncating as `settings` say), pad; with `generation_spans` (character spans
        of assistant text per prompt) also the reference's `assistant_masks` (1 on tokens overlapping a span)."""
        expanded = [self._expand(p) for p in prompts]
        encoded = self.tokenizer.encode_batch_with_offsets(
            [text for text, _ in expanded], add_special_tokens=add_special_tokens, max_length=settings.truncate_to
        )
        kinds = {} if self.text_only else {self.image_token_id: 1, self.audio_token_id: 3}
        rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        if generation_spans is not None:
            rows["assistant_masks"] = []
        for i, (ids, offsets) in enumerate(encoded):
            if settings.truncate_to is not None and not self.text_only:
                self._check_soft_tokens_kept(i, prompts[i], ids, settings.truncate_to)
            rows["input_ids"].append(ids)
            rows["attention_mask"].append([1] * len(ids))
            rows["token_type_ids"].append([kinds.get(t, 0) for t in ids])
            if generation_spans is not None:
                shifts = expanded[i][1]
                spans = [(shifted_position(a, shifts), shifted_position(b, shifts)) for a, b in generation_spans[i]]
                rows["assistant_masks"].append(
                    [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]  # token [a, b) overlaps
                )
        rows = pad_rows(rows, settings, self.tokenizer.pad_token_id)
        if not return_token_type_ids:
            del rows["token_type_ids"]
        if not return_attention_mask:
            del rows["attention_mask"]
        if return_tensors is None:
            return rows
        lengths = sorted({len(r) for r in rows["input_ids"]})
        if len(lengths) > 1:
            raise ValueError(
                f"the prompts have different lengths ({', '.join(map(str, lengths))} tokens) and cannot form one "
                "tensor: use padding=True (or padding='max_length' with a max_length that fits them all)"
            )
        tensors = {key: torch.tensor(value, dtype=torch.long).reshape(len(value), -1) for key, value in rows.items()}
        return {k: v.numpy() for k, v in tensors.items()} if return_tensors == "np" else tensors

    def _check_soft_tokens_kept(self, index: int, prompt: str, ids: list[int], max_length: int) -> None:
        for kind, token, token_id, run in (
            ("image", self.image_token, self.image_token_id, self.image_seq_length),
            ("audio", self.audio_token, self.audio_token_id, self.audio_seq_length),
        ):
            expected = prompt.count(token) * run
            kept = ids.count(token_id)
            if kept != expected:
                raise ValueError(
                    f"truncation to max_length={max_length} cut prompt {index} inside its {kind} soft tokens "
                    f"({kept} of {expected} kept): raise max_length or turn truncation off"
                )

    # ---- chat -----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        processor_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render one conversation (list of messages) or a batch (list of conversations).

        Messages are dicts, or objects (dataclasses, ...) with `role` and `content` attributes. tokenize=False: the
        prompt text (or list of texts). tokenize=True: input ids, or with return_dict=True the full model inputs,
        loading the images / audio the messages reference ({"type": "image", "image": PIL | path | url},
        {"type": "image", "url" | "path" | "base64": ...}, {"type": "audio", "audio": array | path | dict},
        {"type": "audio", "url" | "path": ...}). As in the reference, BOS is not added a second time when the
        rendered prompt already starts with it. `tools` (JSON-schema dicts), `documents` (dicts) and keyword
        arguments are template variables, except the processor call's own (padding, truncation, max_length, ...;
        see `__call__`), which go to the call like `processor_kwargs` unless the template reads them.
        `return_assistant_tokens_mask=True` (with tokenize and return_dict) adds `assistant_masks`: 1 on the tokens
        of text the template wraps in `{% generation %}` ... `{% endgeneration %}`.
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("conversation must be a non-empty list of messages (or a list of conversations)")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        if self.text_only:
            for conv in conversations:
                images_here, audio_here = chat_media(conv)
                if images_here or audio_here:
                    self._refuse_media("images" if images_here else "audio")
        template = ChatTemplate(chat_template, "chat_template argument") if chat_template else self.chat_template
        if template is None:
            raise ValueError(
                f'{self.name} has no chat template (no chat_template.jinja, chat_template.json or "chat_template" in '
                "tokenizer_config.json): pass chat_template=, or give plain text"
            )
        template_variables = template.variables
        call_kwargs = dict(processor_kwargs or {})
        variables: dict[str, Any] = dict(self.tokenizer.special_tokens)
        for key, value in kwargs.items():
            if key in _CALL_ARGUMENTS and key not in template_variables:
                call_kwargs[key] = value
            else:
                variables[key] = value
        if return_assistant_tokens_mask:
            if continue_final_message:
                raise ValueError("continue_final_message cannot be combined with return_assistant_tokens_mask")
            if not (tokenize and return_dict):
                raise ValueError("return_assistant_tokens_mask needs tokenize=True and return_dict=True")
            if not template.has_generation_tag:
                warnings.warn(
                    f"return_assistant_tokens_mask=True but the chat template ({template.source}) has no "
                    "{% generation %} block: the masks are all zeros",
                    stacklevel=2,
                )
            rendered = [
                template.render_with_generation_spans(
                    conv, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents, **variables
                )
                for conv in conversations
            ]
            prompts = [text for text, _ in rendered]
            spans: list[list[tuple[int, int]]] | None = [s for _, s in rendered]
        else:
            prompts = [
                template.render(
                    conv,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tools=tools,
                    documents=documents,
                    **variables,
                )
                for conv in conversations
            ]
            spans = None
        if not tokenize:
            return prompts if batched else prompts[0]

        batch_images: list[list[Any]] = []
        audio: list[Any] = []
        for conv in conversations:
            images_here, audio_here = chat_media(conv)
            batch_images.append(images_here)
            audio.extend(audio_here)

        if prompts[0].startswith(self.tokenizer.bos_token):
            call_kwargs.setdefault("add_special_tokens", False)
        if return_tensors is not None:
            call_kwargs["return_tensors"] = return_tensors
        call_kwargs.setdefault("return_tensors", None)
        has_images = any(batch_images)
        out = self(text=prompts, images=batch_images if has_images else None, audio=audio or None, **call_kwargs)
        if spans is not None:
            settings = TextSettings.resolve(
                call_kwargs.get("padding"),
                call_kwargs.get("truncation"),
                call_kwargs.get("max_length"),
                call_kwargs.get("pad_to_multiple_of"),
                call_kwargs.get("padding_side"),
                self.tokenizer,
            )
            text_rows = self._encode_text(
                prompts,
                settings,
                call_kwargs.get("add_special_tokens", True),
                call_kwargs["return_tensors"],
                generation_spans=spans,
            )
            out["assistant_masks"] = text_rows["assistant_masks"]
        return out if return_dict else out["input_ids"]

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        template = None if self.chat_template is None else self.chat_template.source
        if self.text_only:
            return f"Processor({self.tokenizer!r}, text only, chat_template={template!r})"
        s = self.image_processor.settings
        return (
            f"Processor({self.tokenizer!r}, image={s.height}x{s.width}, image_seq_length={self.image_seq_length}, "
            f"audio_seq_length={self.audio_seq_length}, chat_template={template!r})"
        )
