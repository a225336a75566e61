"""Audio: gemma3n's log-mel features vs transformers' Gemma3nAudioFeatureExtractor on the same waveforms.

Tolerance: max |ours - reference| <= 1e-4 on the features (log-mel, values roughly in [-11.6, 5]); masks identical.
The reference feature extractor does not resample; the reference processor's file loading (transformers'
load_audio, librosa backend) averages the channels and resamples with soxr's HQ filter. So for other rates the
reference input is librosa.resample(res_type="soxr_hq") of the channel mean -- what gemma3n does for arrays and
files alike.
"""

from __future__ import annotations

import math
import os
import signal
import warnings

import librosa
import numpy as np
import pytest
import soundfile
import torch

from gemma3n.processors import AudioFeatureExtractor, AudioSettings, ConfigError, Processor

try:
    from test_processor_utils import our_processor, reference_processor, tiny_dir_with_changed_json
except ImportError:  # tests/ used as a package
    from .test_processor_utils import our_processor, reference_processor, tiny_dir_with_changed_json

ATOL = 1e-4
AUDIO = "<audio_soft_token>"


@pytest.fixture(scope="module")
def reference_extractor():
    from transformers import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor()


def reference_features(extractor, clips: list[np.ndarray], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = extractor(clips, return_tensors="pt", **kwargs)
    return out["input_features"], out["input_features_mask"]


def speech_like(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """Band-limited test signal: drifting tones plus low noise; [samples] or [channels, samples] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for _ in range(channels):
        x = 0.01 * rng.standard_normal(t.size)
        for _ in range(3):
            f0 = rng.uniform(100, min(3500, rate / 2 - 200))
            x += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * (f0 + rng.uniform(-30, 30) * t) * t)
        out.append(x)
    out = np.stack(out).astype(np.float32)
    return out[0] if channels == 1 else out


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"
    return err


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("layout", ["mono", "stereo_channels_first", "stereo_channels_last"])
def test_features_match_reference_after_resampling(reference_extractor, rate, layout):
    processor = our_processor()
    clip = speech_like(1.3, rate, seed=rate, channels=1 if layout == "mono" else 2)
    mono = clip if layout == "mono" else clip.mean(axis=0)
    given = clip.T.copy() if layout == "stereo_channels_last" else clip
    expected_wave = librosa.resample(mono, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    ref_features, ref_mask = reference_features(reference_extractor, [expected_wave])

    out = processor(text=f"Listen: {AUDIO}", audio=[{"array": given, "sampling_rate": rate}])
    assert_close(out["input_features"], ref_features)
    assert torch.equal(out["input_features_mask"], ref_mask)
    # The same clip as an array with sampling_rate= (a bare 2-D array would be a batch of mono clips, as in the
    # reference, so a multi-channel clip goes in a list).
    again = processor(text=AUDIO, audio=given if layout == "mono" else [given], sampling_rate=rate)
    assert torch.equal(again["input_features"], out["input_features"])


def test_batch_of_different_lengths_matches_reference(reference_extractor):
    clips = [speech_like(s, 16000, seed=i) for i, s in enumerate((1.0, 2.37, 0.51, 1.61))]
    ref_features, ref_mask = reference_features(reference_extractor, clips)
    extractor = AudioFeatureExtractor()
    features, mask = extractor(extractor.prepare(clips))
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask)
    assert mask.dtype == torch.bool and features.shape[:2] == mask.shape
    assert mask[2].sum() < mask[1].sum()  # shorter clips have padded (False) frames
    # A 2-D array is a batch of equal-length mono clips, as in the reference.
    stacked = np.stack([clips[0], clips[0] * 0.5])
    features2, _ = extractor(extractor.prepare(list(stacked)))
    ref2, _ = reference_features(reference_extractor, stacked)
    assert_close(features2, ref2)


def test_cpu_path_gives_the_reference_magnitudes_on_a_pure_tone(reference_extractor):
    """The CPU path's float64 FFT, rounded to complex64, gives the reference's spectra: on a pure tone (weak bins
    100 dB down) the features stay within 1e-6."""
    tone = np.sin(2 * np.pi * 440 * np.arange(24000) / 16000).astype(np.float32)
    clips = [tone, speech_like(0.8, 16000, seed=31)]
    ref_features, ref_mask = reference_features(reference_extractor, clips)
    extractor = AudioFeatureExtractor()
    features, mask = extractor(extractor.prepare(clips))
    assert_close(features, ref_features, atol=1e-6)
    assert torch.equal(mask, ref_mask)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_in_place_cpu_path_equals_padded_batch_path(reference_extractor, padding_side):
    """__call__ reads clips in place and pads only the chunks at their ends; features(pad_batch(...)) works on a
    padded copy. Both must give the same bits: clips spanning several chunks, one shorter than a chunk, a non-zero
    padding value, padding to max_length and truncation."""
    settings = AudioSettings(padding_side=padding_side, padding_value=0.25)
    extractor = AudioFeatureExtractor(settings)
    clips = extractor.prepare([speech_like(s, 16000, seed=40 + i) for i, s in enumerate((5.3, 0.9, 3.05))])
    for kwargs in ({}, {"padding": "max_length", "max_length": 96_000}, {"max_length": 40_000}):
        features, mask = extractor(clips, **kwargs)
        batch, sample_mask = extractor.pad_batch(clips, **kwargs)
        padded_features, padded_mask = extractor.features(batch, sample_mask)
        assert torch.equal(features, padded_features), kwargs
        assert torch.equal(mask, padded_mask), kwargs
    if padding_side == "right":  # and the reference agrees with the default padding value
        features, mask = AudioFeatureExtractor()(clips, padding="max_length", max_length=96_000)
        ref_features, ref_mask = reference_features(
            reference_extractor, [c.numpy() for c in clips], padding="max_length", max_length=96_000
        )
        assert_close(features, ref_features)
        assert torch.equal(mask, ref_mask)


def test_extractor_is_thread_safe_and_reports_worker_errors(monkeypatch):
    """The extractor's worker threads are shared by concurrent calls: each gets the bits a lone call gets (numpy's
    BLAS stays limited to one thread until the last overlapping call ends, then gets its setting back), and an
    error in a work item reaches the caller without leaving the pool broken."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    import gemma3n.processors.audio_cpu as audio_module

    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    blas_before = blas_threads()

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # helpers even on a 1-CPU machine
    extractor = AudioFeatureExtractor()
    batches = [
        extractor.prepare([speech_like(3.1, 16000, seed=50 + i), speech_like(1.7, 16000, seed=60 + i)])
        for i in range(4)
    ]
    expected = [extractor(batch)[0] for batch in batches]
    with ThreadPoolExecutor(4) as callers:
        results = list(callers.map(lambda batch: extractor(batch)[0], batches))
    assert all(torch.equal(r, e) for r, e in zip(results, expected, strict=True))
    assert blas_threads() == blas_before

    original = audio_module._ChunkBuffers.mel
    calls = []

    def failing(self, x, n, window, out):
        calls.append(n)
        if len(calls) == 3:
            raise RuntimeError("boom in chunk 3")
        return original(self, x, n, window, out)

    monkeypatch.setattr(audio_module._ChunkBuffers, "mel", failing)
    with pytest.raises(RuntimeError, match="boom in chunk 3"):
        extractor(batches[0])
    monkeypatch.setattr(audio_module._ChunkBuffers, "mel", original)
    assert torch.equal(extractor(batches[0])[0], expected[0])
    assert blas_threads() == blas_before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_extractor_works_in_a_forked_child(monkeypatch):
    """DataLoader workers are forked: the child has none of the parent's helper threads, so the extractor must
    start new ones instead of waiting forever on the copied pool."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    extractor = AudioFeatureExtractor()
    clips = extractor.prepare([speech_like(3.1, 16000, seed=70), speech_like(2.0, 16000, seed=71)])
    parent = extractor(clips)[0]  # the parent's helper threads now exist
    pid = os.fork()
    if pid == 0:  # child: report through the exit code, never return into pytest
        code = 1
        try:
            signal.alarm(30)  # a hang ends the child with SIGALRM
            # compared in numpy: torch's own OpenMP ops can hang in a forked child (why DataLoader workers use
            # one torch thread); the extractor itself must not
            code = 0 if np.array_equal(extractor(clips)[0].numpy(), parent.numpy()) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child hung (-14) or got other features (3)"


def test_truncation_at_30_seconds(reference_extractor):
    clip = (0.1 * np.random.default_rng(3).standard_normal(16000 * 31)).astype(np.float32)
    ref_features, ref_mask = reference_features(reference_extractor, [clip])
    extractor = AudioFeatureExtractor()
    features, mask = extractor(extractor.prepare([clip]))
    assert features.shape == (1, (480_000 - 513) // 160 + 1, 128) == ref_features.shape
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask) and bool(mask.all())


def test_sine_440hz_matches_reference_and_definition(reference_extractor):
    """A unit 440 Hz sine (the case used across Gemma 3n feature-extractor tests). transformers' test suite has no
    golden numbers for it (checked: tests/models/gemma3n/test_feature_extraction_gemma3n.py in
    huggingface/transformers, three versions), so the known values here come from the definition: a float64
    evaluation written out below, plus the mel bin whose centre is nearest 440 Hz being the loudest."""
    rate = 16000
    x = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    extractor = AudioFeatureExtractor()
    features, mask = extractor(extractor.prepare([x]))
    ref_features, ref_mask = reference_features(reference_extractor, [x])
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask)

    # float64 evaluation of the definition: HTK pre-emphasis, periodic Hann, |DFT| (1024 points), HTK mel bank.
    x64 = np.concatenate([x.astype(np.float64), np.zeros(-len(x) % 128)])
    n_frames = (len(x64) - 513) // 160 + 1
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(125), mel(7600), 130) / 2595) - 1)
    bins = np.arange(513) * 16000 / 1024
    up = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    down = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    bank = np.clip(np.minimum(up, down), 0, None)  # [513, 128]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    frames = np.stack([x64[160 * f : 160 * f + 513] for f in range(n_frames)])
    emphasized = np.concatenate([frames[:, :1] * 0.03, frames[:, 1:-1] - 0.97 * frames[:, :-2]], axis=1)
    spectrum = np.abs(np.fft.rfft(emphasized * window, n=1024))
    expected = np.log(np.maximum(spectrum @ bank, 1e-5))
    loud = expected > -4  # where float32 rounding is far below the tolerance
    assert loud.sum() > 500
    assert np.abs(features[0].numpy()[loud] - expected[loud]).max() < 1e-4

    centres = edges[1:-1]
    assert int(features[0, 5:-5].mean(0).argmax()) == int(np.argmin(np.abs(centres - 440))) == 17


def test_silence_and_quiet_input_are_finite():
    extractor = AudioFeatureExtractor()
    features, mask = extractor(extractor.prepare([np.zeros(16000, np.float32)]))
    assert torch.isfinite(features).all()
    assert torch.equal(features, torch.full_like(features, math.log(1e-5)))  # the mel floor everywhere
    assert mask.all()


def test_clip_shorter_than_one_frame(reference_extractor):
    # The reference silently returns zero frames; a zero-frame clip cannot feed the audio encoder, so we refuse it.
    short = np.ones(400, np.float32) * 0.1
    assert reference_features(reference_extractor, [short])[0].shape == (1, 0, 128)
    extractor = AudioFeatureExtractor()
    with pytest.raises(ValueError, match="too short: 400 samples.*513 samples"):
        extractor(extractor.prepare([short]))
    # In a batch with a longer clip it is simply padded, as in the reference.
    long = speech_like(0.5, 16000, seed=1)
    features, mask = extractor(extractor.prepare([short, long]))
    ref_features, ref_mask = reference_features(reference_extractor, [short, long])
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask)


def test_bad_samples_and_inputs_are_rejected():
    processor = our_processor()
    bad = np.ones(16000, np.float32)
    bad[100] = np.nan
    bad[200] = np.inf
    with pytest.raises(ValueError, match="audio 0: 2 samples are NaN or infinite"):
        processor(text=AUDIO, audio=[bad])
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer"):
        processor(text=AUDIO, audio=[{"array": np.zeros(16000), "sampling_rate": -5}])
    with pytest.raises(ValueError, match="1 audio placeholders .* but 2 audio clips"):
        processor(text=AUDIO, audio=[np.zeros(16000), np.zeros(16000)])
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        processor(text=AUDIO, audio=[np.zeros((2, 2, 100))])
    with pytest.raises(ValueError, match="empty"):
        processor(text=AUDIO, audio=[np.zeros(0)])


def test_integer_pcm_is_scaled():
    extractor = AudioFeatureExtractor()
    pcm = (speech_like(0.5, 16000, seed=5) * 20000).astype(np.int16)
    as_float = pcm.astype(np.float32) / 32768.0
    (a,) = extractor.prepare([pcm])
    (b,) = extractor.prepare([as_float])
    assert torch.equal(a, b)


def test_audio_files_wav_flac_ogg_mp3(tmp_path, reference_extractor):
    processor = our_processor()
    mono16k = speech_like(1.0, 16000, seed=7)
    soundfile.write(tmp_path / "a.wav", mono16k, 16000, subtype="FLOAT")
    out = processor(text=AUDIO, audio=str(tmp_path / "a.wav"))
    ref_features, ref_mask = reference_features(reference_extractor, [mono16k])
    assert_close(out["input_features"], ref_features)
    assert torch.equal(out["input_features_mask"], ref_mask)

    stereo = speech_like(0.8, 44100, seed=8, channels=2)
    for suffix, rate in (("flac", 44100), ("ogg", 22050), ("mp3", 48000)):
        clip = stereo if rate == 44100 else speech_like(0.8, rate, seed=rate, channels=2)
        path = tmp_path / f"b.{suffix}"
        soundfile.write(path, clip.T, rate)
        decoded, decoded_rate = soundfile.read(path, dtype="float32", always_2d=True)  # [samples, channels]
        from_file = processor(text=AUDIO, audio=[path])
        from_array = processor(text=AUDIO, audio=[{"array": decoded.T, "sampling_rate": decoded_rate}])
        assert torch.allclose(from_file["input_features"], from_array["input_features"], atol=1e-5, rtol=0), suffix
        assert torch.equal(from_file["input_features_mask"], from_array["input_features_mask"])


def test_unreadable_audio_files_name_the_file(tmp_path):
    processor = our_processor()
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        processor(text=AUDIO, audio=str(missing))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(OSError, match="corrupt.wav"):
        processor(text=AUDIO, audio=[str(corrupt)])


def test_undecodable_audio_gives_the_real_reason_and_keeps_stderr_clean(tmp_path, capfd):
    """The reason comes from soundfile (and from librosa's audioread fallback when that runs too); the fallback's
    "PySoundFile failed" and deprecation warnings are not shown."""
    processor = our_processor()
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError, match=r"cannot decode audio file '.*empty\.wav': the file is empty \(0 bytes\)"):
            processor(text=AUDIO, audio=[str(empty)])
        with pytest.raises(OSError, match=r"corrupt\.wav': Format not recognised\. \(audioread fallback: \w+"):
            processor(text=AUDIO, audio=[str(corrupt)])
        with pytest.raises(OSError, match=r"cannot decode audio '<bytes>': Format not recognised"):
            processor(text=AUDIO, audio=[b"not audio at all"])
    assert [str(w.message) for w in caught] == []
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_file_at_44k_matches_the_reference_processor(tmp_path):
    """A 44.1 kHz stereo file: the reference processor loads it with transformers' load_audio (librosa: channel
    mean, then soxr HQ resampling); gemma3n decodes, mixes and resamples the same way, so the 16 kHz waveforms are
    bit-identical and the features differ only by the feature extractor's own rounding (<= 1e-4; about 5e-7
    measured). The bound holds on any CPU: both sides call the same soxr build on the same samples in one process,
    and the feature parity itself is tested above on the same waveform."""
    from transformers.audio_utils import load_audio

    rate = 44_100
    path = tmp_path / "speech44k.wav"
    soundfile.write(path, speech_like(1.7, rate, seed=44, channels=2).T, rate)
    (ours_wave,) = AudioFeatureExtractor().prepare([str(path)])
    reference_wave = load_audio(str(path), sampling_rate=16_000, backend="librosa")
    assert ours_wave.dtype == torch.float32 and np.array_equal(ours_wave.numpy(), reference_wave)
    messages = [{"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "Hi"}]}]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    reference = reference_processor().apply_chat_template(messages, **kwargs)
    ours = our_processor().apply_chat_template(messages, **kwargs)
    assert_close(ours["input_features"], reference["input_features"])
    assert torch.equal(ours["input_features_mask"], reference["input_features_mask"])
    assert torch.equal(ours["input_ids"], reference["input_ids"])


@pytest.mark.parametrize(
    "settings",
    [
        {"preemphasis_htk_flavor": False},
        {"preemphasis": 0.0},
        {"per_bin_mean": "random", "per_bin_stddev": "random"},
        {"mel_floor": 1e-3, "input_scale_factor": 0.5, "min_frequency": 60.0, "max_frequency": 8000.0},
        {"padding_side": "left"},
    ],
)
def test_feature_settings_match_reference(settings):
    from transformers import Gemma3nAudioFeatureExtractor

    rng = np.random.default_rng(11)
    if settings.get("per_bin_mean") == "random":
        settings = {"per_bin_mean": rng.normal(size=128).tolist(), "per_bin_stddev": rng.uniform(0.5, 2, 128).tolist()}
    clips = [speech_like(0.7, 16000, seed=12), speech_like(0.3, 16000, seed=13)]
    reference = Gemma3nAudioFeatureExtractor(**settings)
    ref_features, ref_mask = reference_features(reference, clips)
    ours = AudioFeatureExtractor(AudioSettings.from_dict(settings, "test settings"))
    features, mask = ours(ours.prepare(clips))
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask)


def test_torch_backend_matches_reference_on_pure_tones(reference_extractor):
    # The torch path (used for CUDA tensors) transforms in float64. A float32 FFT would miss the weak mel bins of a
    # pure tone by up to ~0.06; the check below shows that and holds the torch path to the same bound as numpy's.
    rate = 16000
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    clips = [tone, speech_like(0.6, rate, seed=21)]
    ref_features, ref_mask = reference_features(reference_extractor, clips)
    fast = AudioFeatureExtractor(fft_backend="torch")
    features, mask = fast(fast.prepare(clips))
    assert_close(features, ref_features)
    assert torch.equal(mask, ref_mask)

    extractor = AudioFeatureExtractor()
    batch, _ = extractor.pad_batch(extractor.prepare(clips))
    frames = batch.unfold(-1, 513, 160)[:, : ref_features.shape[1]]
    frames = torch.cat([frames[..., :1] * (1 - 0.97), frames[..., 1:-1] - 0.97 * frames[..., :-2]], -1)
    magnitude32 = torch.fft.rfft(frames * extractor.window, n=1024).abs()  # float32 FFT
    log_mel32 = torch.log(torch.clamp_min(magnitude32 @ extractor.mel_filters, 1e-5))
    assert (log_mel32 - ref_features)[ref_mask].abs().max().item() > 10 * ATOL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frame_length": 400}, r'"frame_length" is 400 but the other settings give 512'),
        ({"per_bin_mean": [0.0] * 3}, r'"per_bin_mean" must be a list of 128 numbers'),
        ({"per_bin_stddev": [0.0] * 128}, r'"per_bin_stddev" must be a list of numbers > 0'),
        ({"sampling_rate": "16k"}, r'"sampling_rate" must be an integer'),
        ({"preemphasis_htk_flavor": 1}, r'"preemphasis_htk_flavor" must be a boolean'),
        ({"feature_extractor_type": "WhisperFeatureExtractor"}, r'"feature_extractor_type" is .WhisperFeature'),
        ({"max_frequency": 9000.0}, r'"max_frequency" 9000.0 is above the Nyquist'),
    ],
)
def test_bad_feature_extractor_settings_name_key_and_file(tmp_path, change, message):
    # unknown keys never cause errors
    change = {**change, "some_unknown_key": {"ignored": True}}
    directory = tiny_dir_with_changed_json(tmp_path, "preprocessor_config.json", change)
    with pytest.raises(ConfigError, match="preprocessor_config.json") as info:
        Processor.from_pretrained(directory)
    assert info.match(message)
