"""Audio: TBN spectrogram against a direct numpy computation of the formula, resampling, file loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from extract.audio import (KAISER_BEST_BETA, KAISER_BEST_ROLLOFF, KAISER_BEST_ZEROS, AudioError,
                           audio_from_video, load_wav, resample, tbn_spectrogram, tbn_spectrograms, tbn_window)

MEDIA = Path("/work/shared/data/media")
WAV = MEDIA / "test.wav"  # 16 kHz stereo, 6.557 s
needs_media = pytest.mark.skipif(not WAV.is_file(), reason="shared media not available")


def reference_spectrogram(x24: np.ndarray, centre_s: float) -> np.ndarray:
    """TBN's formula written out with numpy in float64 (REFERENCE.md, "Audio")."""
    sr = 24000
    n = int(round(1.279 * sr))
    if centre_s - 0.639 < 0:
        segment = x24[:n]
    elif centre_s + 0.639 > len(x24) / sr:
        segment = x24[-n:]
    else:
        segment = x24[int(round((centre_s - 0.639) * sr)):int(round((centre_s + 0.639) * sr))]
    n_fft, hop, win = 511, 120, 240
    padded = np.pad(segment.astype(np.float64), n_fft // 2)  # centred frames, constant (zero) padding
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[t * hop:t * hop + n_fft] * window for t in range(n_frames)], axis=1)
    spectrum = np.fft.rfft(frames, axis=0)
    return np.log(np.abs(spectrum) ** 2 + 1e-6)


@pytest.fixture(scope="module")
def wav():
    if not WAV.is_file():
        pytest.skip("shared media not available")
    samples, sr = load_wav(WAV)
    return samples, sr, resample(samples, sr, 24000)


def test_load_wav_is_mono_float32(wav):
    samples, sr, _ = wav
    assert sr == 16000 and samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / sr - 6.557) < 0.01 and np.abs(samples).max() <= 1.0


@pytest.mark.parametrize("where", ["middle", "start", "end"])
def test_spectrogram_matches_formula(wav, where):
    samples, sr, x24 = wav
    duration = len(x24) / 24000
    centre = {"middle": duration / 2, "start": 0.3, "end": duration - 0.2}[where]
    spec = tbn_spectrogram(samples, sr, centre)
    assert spec.shape == (256, 256) and spec.dtype == np.float32
    expected = reference_spectrogram(x24, centre)
    assert expected.shape == (256, 256)
    np.testing.assert_allclose(spec, expected, atol=1e-4, rtol=1e-5)


def test_edge_windows(wav):
    _, _, x24 = wav
    n = round(1.279 * 24000)
    assert n == 30696
    assert np.array_equal(tbn_window(x24, 0.1), x24[:n]) and np.array_equal(tbn_window(x24, 0.6), x24[:n])
    assert np.array_equal(tbn_window(x24, len(x24) / 24000 - 0.3), x24[-n:])
    middle = tbn_window(x24, 2.0)
    assert len(middle) == round(2.639 * 24000) - round(1.361 * 24000)
    assert np.array_equal(middle, x24[round(1.361 * 24000):round(2.639 * 24000)])


def test_at_24k_no_resampling(wav):
    _, _, x24 = wav
    np.testing.assert_array_equal(tbn_spectrogram(x24, 24000, 3.0), tbn_spectrograms(x24, 24000, [1.0, 3.0])[1])
    np.testing.assert_array_equal(resample(x24, 24000, 24000), x24)


def test_every_window_length_gives_256_frames():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(24000 * 4).astype(np.float32) * 0.1
    for centre in np.linspace(0.0, 4.0, 41):
        assert tbn_spectrogram(x, 24000, float(centre)).shape == (256, 256)
    short = tbn_spectrogram(x[:10000], 24000, 0.2)  # recording shorter than 1.279 s: zero-padded at the end
    assert short.shape == (256, 256) and np.isclose(short[:, -1].max(), math.log(1e-6))


def test_resampled_sine_keeps_frequency_and_amplitude():
    sr, f, amplitude = 44100, 1000.0, 0.5
    x = (amplitude * np.sin(2 * np.pi * f * np.arange(sr) / sr)).astype(np.float32)
    y = resample(x, sr, 24000)
    assert y.dtype == np.float32 and len(y) == 24000
    peak_bin = np.argmax(np.abs(np.fft.rfft(y)))  # 1 Hz per bin for 24000 samples
    assert peak_bin == 1000
    core = y[500:-500]
    assert abs(np.abs(core).max() - amplitude) < 0.01 * amplitude
    ideal = amplitude * np.sin(2 * np.pi * f * np.arange(24000) / 24000)
    assert np.abs(y - ideal)[500:-500].max() < 1e-3


def test_resample_matches_direct_sinc_sum():
    """Polyphase result == the band-limited interpolation sum evaluated directly at a few outputs."""
    rng = np.random.default_rng(1)
    for orig, new in ((44100, 24000), (16000, 24000), (48000, 24000)):
        x = rng.standard_normal(3000)
        y = resample(x.astype(np.float32), orig, new)
        assert len(y) == math.ceil(len(x) * new / orig)
        scale = min(1.0, new / orig)
        half = KAISER_BEST_ZEROS / scale
        k = np.arange(len(x))
        for n in (0, 7, len(y) // 2, len(y) - 1):
            t = n * orig / new - k
            inside = np.abs(t) <= half
            window = np.i0(KAISER_BEST_BETA * np.sqrt(np.clip(1 - (t / half) ** 2, 0, None))) / np.i0(KAISER_BEST_BETA)
            h = scale * KAISER_BEST_ROLLOFF * np.sinc(scale * KAISER_BEST_ROLLOFF * t) * window * inside
            assert abs(y[n] - np.dot(x.astype(np.float32), h)) < 1e-4


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 100), np.float32), 16000)
    with pytest.raises(TypeError, match="float"):
        resample(np.zeros(100, np.int16), 16000)
    with pytest.raises(ValueError, match="sample rate"):
        resample(np.zeros(100, np.float32), 0)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: audio file not found"):
        load_wav(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF nonsense")
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        load_wav(bad)


@needs_media
def test_audio_from_video():
    samples, sr = audio_from_video(MEDIA / "test.avi")
    assert sr == 24000 and samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / sr - 6.56) < 0.05
    assert tbn_spectrogram(samples, sr, 3.0).shape == (256, 256)
    with pytest.raises(AudioError, match="test.mp4: cannot decode an audio track"):
        audio_from_video(MEDIA / "test.mp4")  # video without an audio stream
