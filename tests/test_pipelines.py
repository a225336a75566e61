"""Pipelines: outputs equal to transformers' own pipelines on the same checkpoint (greedy), real batching, generation
settings, streaming, captioning and long-audio transcription."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile
import torch
from pipeline_helpers import SAMPLING_RATE, fewer_audio_tokens, image_chat, make_audio, make_image, reference

import gemma3n
from gemma3n.pipelines.automatic_speech_recognition import DEFAULT_INSTRUCTION, split_into_windows

NEW = 8  # new tokens per answer in the comparisons


@pytest.fixture(scope="module")
def model():
    return gemma3n.load(reference().path)


@pytest.fixture(scope="module")
def hf_pipe():
    import transformers

    return transformers.pipeline("image-text-to-text", model=str(reference().path), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(model):
    return gemma3n.pipeline("image-text-to-text", model=model)


# ---- image-text-to-text against transformers ---------------------------------------------------------------------


def test_chat_matches_transformers(pipe, hf_pipe):
    chat = image_chat(make_image(0))
    ours = pipe(text=chat, max_new_tokens=NEW)
    assert ours == hf_pipe(text=chat, max_new_tokens=NEW)
    assert ours[0]["generated_text"][-1]["role"] == "assistant" and ours[0]["generated_text"][-1]["content"]

    chats = [chat, image_chat(make_image(1, (64, 96)), "What?")]
    ours = pipe(text=chats, max_new_tokens=NEW, return_full_text=False, batch_size=2)  # one padded batch
    assert ours == hf_pipe(text=chats, max_new_tokens=NEW, return_full_text=False)
    assert len(ours) == 2 and all(len(r) == 1 and isinstance(r[0]["generated_text"], str) for r in ours)


def test_images_and_text_match_transformers(pipe, hf_pipe):
    image, other = make_image(0), make_image(1, (64, 96))
    prompt = "<image_soft_token> Describe this."
    assert pipe(images=image, text=prompt, max_new_tokens=NEW) == hf_pipe(images=image, text=prompt, max_new_tokens=NEW)
    texts = [prompt, "<image_soft_token>What"]
    ours = pipe(images=[image, other], text=texts, max_new_tokens=NEW, batch_size=2)
    assert ours == hf_pipe(images=[[image], [other]], text=texts, max_new_tokens=NEW)
    # Without a placeholder, the image goes before the text (transformers would refuse this prompt).
    plain = pipe(images=image, text=" Describe this.", max_new_tokens=NEW)
    assert plain[0]["generated_text"] == " Describe this." + ours[0]["generated_text"][len(prompt) :]


def test_assistant_prefill_matches_transformers(pipe, hf_pipe):
    chat = image_chat(make_image(0)) + [{"role": "assistant", "content": [{"type": "text", "text": "The image shows"}]}]
    ours = pipe(text=chat, max_new_tokens=NEW)
    assert ours == hf_pipe(text=chat, max_new_tokens=NEW)
    assert ours[0]["generated_text"][-1]["content"][0]["text"].startswith("The image shows")


def test_text_generation_matches_transformers(model):
    import transformers

    ours = gemma3n.pipeline("text-generation", model=model)
    theirs = transformers.pipeline("text-generation", model=str(reference().path), device="cpu", dtype=torch.float32)
    for inputs in ("The brown bird", [{"role": "user", "content": "Hi"}], ["a", "the window"]):
        assert ours(inputs, max_new_tokens=6, batch_size=2) == theirs(inputs, max_new_tokens=6)


# ---- batching, settings, streaming ---------------------------------------------------------------------------------


def test_batches_go_through_generate_together(model, monkeypatch):
    chats = [image_chat(make_image(i), q) for i, q in enumerate(["Hi", "Describe the weather here.", "What?"])]
    one_by_one = gemma3n.pipeline("image-text-to-text", model=model, max_new_tokens=5)(text=chats)
    calls = []
    original = type(model).generate

    def spy(self, input_ids, **kwargs):
        calls.append(tuple(input_ids.shape))
        return original(self, input_ids, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    batched = gemma3n.pipeline("image-text-to-text", model=model, max_new_tokens=5, batch_size=2)(text=chats)
    assert [shape[0] for shape in calls] == [2, 1]
    assert batched == one_by_one


def test_generation_settings(model):
    chat = [{"role": "user", "content": "Tell me about the garden."}]
    pipe = gemma3n.pipeline("text-generation", model=model, max_new_tokens=3, return_full_text=False)
    default = pipe(chat, return_tensors=True)[0]["generated_token_ids"]
    longer = pipe(chat, max_new_tokens=7, return_tensors=True)[0]["generated_token_ids"]
    prompt_len = len(model.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)[0])
    assert len(default) - prompt_len <= 3 and len(longer) - prompt_len <= 7 and longer[: len(default)] == default
    assert pipe(chat, generate_kwargs={"max_new_tokens": 7}) == pipe(chat, max_new_tokens=7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe(chat, max_new_tokens=2, generate_kwargs={"max_new_tokens": 3})
    with pytest.raises(TypeError, match="not_a_setting"):
        pipe(chat, not_a_setting=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe(chat, max_new_tokens=0)


def test_streaming_equals_call(pipe, model):
    chat = image_chat(make_image(5), "Describe the colours.")
    pieces = list(pipe.stream(text=chat, max_new_tokens=NEW))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe(text=chat, max_new_tokens=NEW, return_full_text=False)[0]["generated_text"]
    text_pipe = gemma3n.pipeline("text-generation", model=model, max_new_tokens=NEW)
    streamed = "".join(text_pipe.stream("The window"))
    assert streamed == text_pipe("The window", return_full_text=False)[0]["generated_text"]


def test_progress_bar(model, capsys):
    pipe = gemma3n.pipeline("text-generation", model=model, max_new_tokens=2)
    pipe(["a", "b"])
    assert "text-generation" not in capsys.readouterr().err  # not a terminal: no bar by default
    pipe(["a", "b"], progress=True)
    assert "text-generation" in capsys.readouterr().err


def test_input_errors(pipe):
    chat = image_chat(make_image(0))
    with pytest.raises(ValueError, match="inside the messages"):
        pipe(images=make_image(1), text=chat)
    with pytest.raises(ValueError, match="2 <image_soft_token> placeholders for 1 images"):
        pipe(images=make_image(1), text="<image_soft_token><image_soft_token> two?")
    with pytest.raises(ValueError, match="2 text prompts but 3 images"):
        pipe(images=[make_image(1)] * 3, text=["a", "b"])
    with pytest.raises(ValueError, match="unknown task"):
        gemma3n.pipeline("summarization", model=pipe.model)


# ---- image-to-text ------------------------------------------------------------------------------------------------


def test_image_to_text(model, pipe):
    captioner = gemma3n.pipeline("image-to-text", model=model, max_new_tokens=NEW, batch_size=2)
    images = [make_image(6), make_image(7, (90, 60))]
    captions = captioner(images, prompt="Name the colours.")
    answers = pipe(
        text=[image_chat(im, "Name the colours.") for im in images], max_new_tokens=NEW, return_full_text=False
    )
    assert captions == [[{"generated_text": a[0]["generated_text"].strip()}] for a in answers]
    single = captioner(images[0])
    assert isinstance(single, list) and set(single[0]) == {"generated_text"} and single[0]["generated_text"]
    assert single != captions[0]  # the default prompt is a different question


# ---- automatic-speech-recognition ----------------------------------------------------------------------------------


def test_window_split_prefers_quiet_points():
    wave = torch.from_numpy(make_audio(45.0, quiet_at=27.5))
    spans = split_into_windows(wave, SAMPLING_RATE)
    assert len(spans) == 2 and spans[0][0] == 0 and spans[-1][1] == wave.numel() and spans[0][1] == spans[1][0]
    assert abs(spans[0][1] / SAMPLING_RATE - 27.5) < 0.1  # cut inside the silent stretch
    long = split_into_windows(torch.from_numpy(make_audio(95.0)), SAMPLING_RATE)
    assert all(0 < end - start <= 30 * SAMPLING_RATE for start, end in long) and len(long) == 4
    assert all(a[1] == b[0] for a, b in zip(long, long[1:], strict=False)) and long[-1][1] == 95 * SAMPLING_RATE


@pytest.mark.filterwarnings("ignore:the transcript of")  # every window stops at max_new_tokens, on purpose
def test_asr_long_audio_is_split_and_fully_transcribed(model, tmp_path):
    # No end id: every window must produce exactly 4 tokens of text (so an empty window would show).
    asr = gemma3n.pipeline("automatic-speech-recognition", model=model, max_new_tokens=4, eos_token_id=[])
    wave = make_audio(45.0, quiet_at=27.5)
    result = asr(wave, return_timestamps="chunk")
    chunks = result["chunks"]
    assert len(chunks) == 2
    (s0, e0), (s1, e1) = (c["timestamp"] for c in chunks)
    assert s0 == 0.0 and e0 == s1 and e1 == 45.0 and 27.4 < e0 < 27.6
    cut = round(e0 * SAMPLING_RATE)
    alone = [asr(wave[:cut])["text"], asr(wave[cut:])["text"]]
    assert [c["text"] for c in chunks] == alone and all(alone)
    assert result["text"] == " ".join(alone)
    assert asr(wave) == {"text": result["text"]}

    path = tmp_path / "clip.wav"
    soundfile.write(path, wave[:cut], SAMPLING_RATE)
    downsampled = {"raw": wave[:cut:2].copy(), "sampling_rate": SAMPLING_RATE // 2}
    results = asr([str(path), downsampled, wave[:cut]], batch_size=2)
    assert results[0] == results[2] == {"text": alone[0]}
    assert isinstance(results[1]["text"], str) and results[1]["text"]


def test_asr_instruction_and_limits(model, tmp_path):
    asr = gemma3n.pipeline("automatic-speech-recognition", model=model, max_new_tokens=3, eos_token_id=[])
    clip = make_audio(2.0, seed=3)
    with pytest.warns(UserWarning, match=r"the transcript of 0\.00-2\.00 s reached max_new_tokens"):
        asr(clip)
    # An input that names its file (a path, or a dict's "path") is named in the warning too.
    path = tmp_path / "limit clip.wav"
    soundfile.write(path, clip, SAMPLING_RATE)
    with pytest.warns(UserWarning, match=re.escape(f"0.00-2.00 s of {str(path)!r} reached max_new_tokens")):
        asr(str(path))
    labelled = {"array": clip, "sampling_rate": SAMPLING_RATE, "path": "corpus/talk 7.flac"}
    with pytest.warns(UserWarning, match=re.escape("0.00-2.00 s of 'corpus/talk 7.flac' reached")):
        asr(labelled)
    with pytest.raises(ValueError, match="chunk_length_s"):
        asr(clip, chunk_length_s=45)
    with pytest.raises(ValueError, match="empty"):
        asr(np.zeros(0, dtype=np.float32))


def test_longest_clip_is_derived_from_the_checkpoint_and_matches_transformers_encoder(tmp_path):
    """12 soft tokens of 16 frames (two stride-2 convolutions, reduction 4) of 160 samples, plus one frame's length:
    12 x 16 x 160 + 512 = 31232 samples (1.952 s). transformers' own audio encoder agrees at the boundary: that clip
    gives 12 soft tokens, 128 samples more (the next padded length) give 13."""
    import transformers

    small = fewer_audio_tokens(reference().path, tmp_path / "small", 12)
    processor = gemma3n.Processor.from_pretrained(small)
    assert processor.max_audio_samples == 31232
    published = gemma3n.Processor.from_pretrained(reference().path)
    assert published.max_audio_samples == 188 * 16 * 160 + 512 and published.max_audio_seconds > 30.0
    wave = make_audio(2.2, seed=4)
    extractor = transformers.Gemma3nAudioFeatureExtractor()
    tower = reference().model.model.audio_tower
    with torch.no_grad():
        for samples, tokens in ((31232, 12), (31232 + 128, 13)):
            features = extractor([wave[:samples]], return_tensors="pt")
            encoded = tower(features["input_features"], features["input_features_mask"], return_dict=True)
            assert encoded.last_hidden_state.shape[1] == tokens
    processor(text="<audio_soft_token>", audio=[wave[:31232]])  # the longest clip is accepted
    with pytest.raises(ValueError, match=r"audio 0 is 2\.20 s long, but this checkpoint takes at most 1\.952 s"):
        processor(text="<audio_soft_token>", audio=[wave])


@pytest.mark.filterwarnings("ignore:the transcript of")
def test_asr_windows_fit_a_checkpoint_that_holds_less_audio(tmp_path):
    """A 2.2 s clip on a checkpoint with 12 audio soft tokens per clip (1.952 s) is split into two windows, each
    transcribed as transformers transcribes it."""
    import transformers

    small = fewer_audio_tokens(reference().path, tmp_path / "small", 12)
    asr = gemma3n.pipeline("automatic-speech-recognition", model=str(small), device="cpu", max_new_tokens=4)
    assert asr.max_window_s == 31232 / SAMPLING_RATE
    wave = make_audio(2.2, seed=4)
    result = asr(wave, return_timestamps="chunk")
    assert len(result["chunks"]) == 2 and result["chunks"][-1]["timestamp"][1] == 2.2
    assert all(chunk["text"] for chunk in result["chunks"])  # text to compare: 4 tokens, no early end
    hf_model = transformers.Gemma3nForConditionalGeneration.from_pretrained(small, dtype=torch.float32).eval()
    hf_processor = transformers.AutoProcessor.from_pretrained(small)
    for chunk in result["chunks"]:
        start, end = (round(t * SAMPLING_RATE) for t in chunk["timestamp"])
        assert end - start <= 31232
        clip = wave[start:end]
        messages = [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": DEFAULT_INSTRUCTION}],
            }
        ]
        prompt = asr.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = hf_processor(text=prompt, audio=[clip], add_special_tokens=False, return_tensors="pt")
        out = hf_model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = hf_processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert chunk["text"] == expected
    with pytest.raises(ValueError, match=r"chunk_length_s must lie in \(0, 1\.952\]"):
        asr(wave, chunk_length_s=2.0)
