"""Write a tiny but complete Gemma 3n processor file set, in the published layout, for tests and tiny models.

    python -m gemma3n.processors.tiny_files OUT_DIR [--image-size 64 64]

The tokenizer is a small byte-fallback BPE (a few hundred merges learned from the built-in text below) whose
vocabulary is padded with placeholder tokens to 262,400 ids so that every published special-token id is exact:
pad 0, eos 1, bos 2, unk 3, mask 4, <start_of_turn> 105, <end_of_turn> 106, <start_of_image> 255999,
<start_of_audio> 256000, <end_of_image> 262144, <image_soft_token> 262145, <end_of_audio> 262272,
<audio_soft_token> 262273. Only `tokenizers` and `json` are used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .chat import default_template_text

VOCAB_SIZE = 262_400
BYTE_TOKENS_START = 238  # <0x00> .. <0xFF> occupy 238 .. 493, as in Gemma's vocabulary
LEARNED_START = BYTE_TOKENS_START + 256
NUM_MERGES_TARGET = 400

SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255_999,
    "<start_of_audio>": 256_000,
    "<end_of_image>": 262_144,
    "<image_soft_token>": 262_145,
    "<end_of_audio>": 262_272,
    "<audio_soft_token>": 262_273,
}

MODALITY_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}

# Training text for the tiny BPE: plain English about the things prompts in tests talk about.
TRAINING_TEXT = """
The model looks at a picture and listens to a short sound, then it answers in plain words.
Describe this image in one sentence. What is in the picture? Transcribe the audio clip.
A small red bird sits on a green branch near the old stone wall of the garden.
The weather today is cold and bright; there is snow on the hills and the river is quiet.
Please answer the question about the photo. You are a helpful assistant who keeps answers short.
The cat sleeps on the warm window sill while the dog waits by the door for the morning walk.
Numbers such as 1, 2, 3, 10, 42 and 2025 appear in text, and so do dates, times and prices.
She said hello to the people in the room, and they told her about the trip to the sea.
Speech recognition turns spoken words into written text; translation turns one language into another.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Is there a person in this image? How many apples are on the table? What color is the car?
Listen carefully and write down every word that the speaker says, with correct spelling.
This is a test of the tokenizer. It should split words into pieces and join them back exactly.
Good morning! How are you today? I am fine, thank you. Let us begin with the first question.
""".strip()


def _train_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn symbols and merges on the built-in text with SentencePiece-style pieces ("▁word")."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=NUM_MERGES_TARGET + 100, min_frequency=2, show_progress=False)
    lines = TRAINING_TEXT.splitlines() * 4
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    symbols = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return symbols, merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The full 262,400-entry vocabulary (published special ids exact) and the BPE merges."""
    symbols, merges = _train_bpe()
    id_to_token: dict[int, str] = {i: t for t, i in SPECIAL_IDS.items()}
    for b in range(256):
        id_to_token[BYTE_TOKENS_START + b] = f"<0x{b:02X}>"
    # Newline runs are single tokens in Gemma's vocabulary; keep the two most common ones.
    learned = ["\n", "\n\n"] + [s for s in symbols if s not in SPECIAL_IDS and s not in ("\n", "\n\n")]
    for offset, token in enumerate(learned):
        id_to_token[LEARNED_START + offset] = token
    if LEARNED_START + len(learned) > min(i for i in SPECIAL_IDS.values() if i > LEARNED_START):
        raise RuntimeError("learned vocabulary overlaps the special-token ids")
    vocab = {}
    for i in range(VOCAB_SIZE):
        token = id_to_token.get(i, f"<unused{i}>")
        vocab[token] = i
    return vocab, [("\n", "\n"), *merges]


def build_tokenizer() -> Tokenizer:
    """A Gemma-style tokenizer: byte-fallback BPE, spaces as "▁", BOS added, special tokens not split."""
    vocab, merges = build_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    tok.add_special_tokens(sorted(SPECIAL_IDS, key=SPECIAL_IDS.get))
    return tok


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in sorted(SPECIAL_IDS.items(), key=lambda x: x[1])},
        **MODALITY_TOKENS,
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": dict(MODALITY_TOKENS),
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "Gemma3nProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def preprocessor_config(image_size: tuple[int, int], image_seq_length: int) -> dict:
    """One flat file with the audio feature-extractor and image-processor keys, as published for Gemma 3n."""
    height, width = image_size
    return {
        "crop_size": None,
        "data_format": "channels_first",
        "default_to_square": False,
        "device": None,
        "disable_grouping": None,
        "dither": 0.0,
        "do_center_crop": None,
        "do_convert_rgb": None,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
        "feature_size": 128,
        "fft_length": 1024,
        "fft_overdrive": True,
        "frame_length": 512,
        "hop_length": 160,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessorFast",
        "image_seq_length": image_seq_length,
        "image_std": [0.5, 0.5, 0.5],
        "input_data_format": None,
        "input_scale_factor": 1.0,
        "max_frequency": 7600.0,
        "mel_floor": 1e-05,
        "min_frequency": 125.0,
        "padding_side": "right",
        "padding_value": 0.0,
        "per_bin_mean": None,
        "per_bin_stddev": None,
        "preemphasis": 0.97,
        "preemphasis_htk_flavor": True,
        "processor_class": "Gemma3nProcessor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "return_attention_mask": True,
        "return_tensors": None,
        "sampling_rate": 16000,
        "size": {"height": height, "width": width},
    }


def write_tiny_processor_files(
    directory: str | Path,
    image_size: tuple[int, int] = (768, 768),
    image_seq_length: int = 256,
    audio_seq_length: int = 188,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    preprocessor_config.json and processor_config.json into `directory` (created if needed); returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))

    def dump(name: str, data: dict) -> None:
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("tokenizer_config.json", tokenizer_config())
    special_map: dict = dict(MODALITY_TOKENS)
    for key, token in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"), ("unk_token", "<unk>")):
        special_map[key] = {k: v for k, v in _added_token(token).items() if k != "special"}
    dump("special_tokens_map.json", special_map)
    dump("preprocessor_config.json", preprocessor_config(tuple(image_size), image_seq_length))
    dump(
        "processor_config.json",
        {
            "audio_seq_length": audio_seq_length,
            "image_seq_length": image_seq_length,
            "processor_class": "Gemma3nProcessor",
        },
    )
    (out / "chat_template.jinja").write_text(default_template_text(), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--image-size", type=int, nargs=2, default=(768, 768), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--image-seq-length", type=int, default=256)
    parser.add_argument("--audio-seq-length", type=int, default=188)
    args = parser.parse_args(argv)
    path = write_tiny_processor_files(
        args.directory, tuple(args.image_size), args.image_seq_length, args.audio_seq_length
    )
    print(f"wrote processor files to {path}")


if __name__ == "__main__":
    main()
