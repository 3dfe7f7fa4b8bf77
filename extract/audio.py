"""Audio input of TBN's audio stream: waveform loading, resampling to 24 kHz and the 256x256 log spectrogram.

Sources of the facts implemented here:

* Spectrogram: E. Kazakos et al., "EPIC-Fusion: Audio-Visual Temporal Binding for Egocentric Action
  Recognition", ICCV 2019, implementation details (1.279 s of audio around each sampled frame, 24 kHz, STFT
  with a 10 ms window and 5 ms hop, log spectrogram of 256x256) and its code
  (ekazakos/temporal-binding-network, ``dataset.py``): window selection with a 0.639 s half-width and
  ``round(1.279 sr)`` samples at the edges;
  STFT ``n_fft=511, hop=120, win_length=240``, periodic Hann window centred in the FFT frame, centred frames
  with constant (zero) padding (librosa ``stft(pad_mode="constant")`` semantics), ``log(|S|^2 + 1e-6)``,
  frequency x time, no normalisation.  Summarised in ``shared/REFERENCE.md``.
* Resampling: band-limited (sinc) interpolation, J. O. Smith, "Digital Audio Resampling Home Page" (CCRMA),
  with the filter design of resampy's ``kaiser_best`` (B. McFee, resampy): Kaiser-windowed sinc, 64
  zero-crossing span, rolloff 0.9475937167399596, beta 14.769656459379492, cut-off scaled by the
  down-sampling ratio.  Unlike resampy (which interpolates a tabulated filter) the filter is evaluated
  exactly (float64) for each of the ``L`` phases of the rational ratio ``L/M = new/orig`` and applied as a
  polyphase filter bank with ``torch.nn.functional.conv1d`` in float32 (accumulation error ~1e-6 of full
  scale, below 16-bit PCM quantisation).

Frame count: a window has 30671..30673 samples (middle) or ``round(1.279 * 24000) = 30696`` (edges); with
centred STFT framing ``1 + (n + 2*255 - 511) // 120`` these all give exactly 256 frames.  Segments shorter
than 30696 samples are zero-padded at the end to 30696 before the STFT: for windows taken from recordings of
at least 1.279 s this changes no value (the centred constant padding puts zeros there anyway) and it defines
the result for shorter recordings.  The output is then always 256 x 256.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from featstore.errors import UserError

TBN_SAMPLE_RATE = 24000
TBN_HALF_WINDOW_S = 0.639
TBN_WINDOW_S = 1.279
N_FFT = 511
HOP_LENGTH = 120  # 5 ms at 24 kHz
WIN_LENGTH = 240  # 10 ms at 24 kHz
LOG_EPS = 1e-6
SPEC_SIZE = 256  # frequency bins (N_FFT // 2 + 1) and time frames

# resampy "kaiser_best" filter design.
KAISER_BEST_ZEROS = 64
KAISER_BEST_ROLLOFF = 0.9475937167399596
KAISER_BEST_BETA = 14.769656459379492

_CHUNK_ROWS = 1 << 16  # output samples per phase and conv1d call (bounds memory on long recordings)


class AudioError(UserError, RuntimeError):
    """Audio that cannot be read or used; the message names the file."""


# --------------------------------------------------------------------------------------------- loading


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile; return ``(samples float32 mono, sample_rate)``.

    Channels are averaged; samples are in [-1, 1] for integer PCM files (soundfile's float conversion).
    """
    import soundfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...
        raise AudioError(f"{path}: cannot read audio: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio file has no samples")
    return data.mean(axis=1, dtype=np.float32), int(sr)


def audio_from_video(path: str | os.PathLike, sample_rate: int = TBN_SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Decode the audio track of a video with ``decord.AudioReader`` (mono); return ``(samples, sr)``.

    decord is asked for ``sample_rate`` directly (FFmpeg's resampler, as TBN's preprocessing used
    ``ffmpeg -ar 24000``); the native rate cannot be queried through decord's Python API (it reports -1).
    """
    import decord

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: video file not found")
    try:
        reader = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=int(sample_rate), mono=True)
        samples = reader[:].asnumpy()
    except Exception as e:  # decord raises DECORDError / RuntimeError, e.g. "Can't find audio stream"
        reason = " ".join(str(e).split())
        reason = reason.split(": ", 1)[-1] if "audio_reader.cc" in reason else reason
        raise AudioError(f"{path}: cannot decode an audio track with decord: {reason}") from e
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise AudioError(f"{path}: audio track has no samples")
    return samples, int(sample_rate)


# ------------------------------------------------------------------------------------------ resampling


def _as_waveform(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D array), got shape {x.shape}; average the channels")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected a float waveform, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError("empty waveform")
    return x


def _rate(sr: float) -> int:
    if sr <= 0 or abs(sr - round(sr)) > 1e-6:
        raise ValueError(f"sample rate must be a positive integer number of Hz, got {sr}")
    return int(round(sr))


def sinc_filter_bank(orig_sr: int, new_sr: int) -> tuple[torch.Tensor, int, int, int]:
    """Polyphase Kaiser-windowed sinc filters (``kaiser_best`` design) for ``orig_sr -> new_sr``.

    With ``L/M = new_sr/orig_sr`` in lowest terms, output sample ``n = q*L + p`` lies at input time
    ``t_n = q*M + p*M/L`` and ``y[n] = sum_j x[q*M + j] h(p*M/L - j)``, where
    ``h(t) = s*r*sinc(s*r*t) * kaiser(t / (Z/s))``, ``s = min(1, L/M)``, ``r`` the rolloff and ``Z`` the
    zero-crossing span.  Returns ``(weights (L, K) float64, L, M, W)`` with taps ``j = -W .. K-W-1``.
    """
    ratio = Fraction(new_sr, orig_sr)
    up, down = ratio.numerator, ratio.denominator
    scale = min(1.0, up / down)
    half_width = KAISER_BEST_ZEROS / scale  # in input samples
    w = math.ceil(half_width)
    j = torch.arange(-w, w + down, dtype=torch.float64)
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = phase - j[None, :]
    cutoff = scale * KAISER_BEST_ROLLOFF
    inside = (t.abs() <= half_width).to(torch.float64)
    arg = (1.0 - (t / half_width).clamp(-1.0, 1.0) ** 2).clamp(min=0.0).sqrt()
    window = torch.special.i0(KAISER_BEST_BETA * arg) / torch.special.i0(torch.tensor(KAISER_BEST_BETA,
                                                                                      dtype=torch.float64))
    weights = cutoff * torch.sinc(cutoff * t) * window * inside
    return weights, up, down, w


def resample(samples: np.ndarray, orig_sr: int, new_sr: int = TBN_SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a mono waveform; returns float32 of length ``ceil(len * new_sr / orig_sr)``.

    Identity (a float32 view/copy) when the rates are equal.  See the module docstring for the filter.
    """
    x = _as_waveform(samples)
    orig_sr, new_sr = _rate(orig_sr), _rate(new_sr)
    if orig_sr == new_sr:
        return x.astype(np.float32, copy=False)
    weights, up, down, w = sinc_filter_bank(orig_sr, new_sr)
    taps = weights.shape[-1]
    n_out = -(-x.size * up // down)
    rows = -(-n_out // up)  # output samples per phase
    # Polyphase on the input side too: with k = ceil(K/M), x_pad[q*M + i*M + m] is input phase m at q + i, so
    # every output phase is a stride-1 convolution over the M input phases (one conv1d, M in, L out channels).
    k = -(-taps // down)
    bank = F.pad(weights, (0, k * down - taps)).view(up, k, down).permute(0, 2, 1).to(torch.float32)
    total = (rows - 1 + k) * down
    padded = F.pad(torch.from_numpy(x.astype(np.float32)), (w, max(0, total - w - x.size)))[:total]
    phases = padded.view(-1, down).T  # (M, rows - 1 + k)
    out = torch.empty(up, rows, dtype=torch.float32)
    for r0 in range(0, rows, _CHUNK_ROWS):
        r1 = min(rows, r0 + _CHUNK_ROWS)
        out[:, r0:r1] = F.conv1d(phases[None, :, r0:r1 - 1 + k], bank)[0]
    # Interleave phases: y[q*L + p] = out[p, q].
    return out.T.reshape(-1)[:n_out].numpy()


# ----------------------------------------------------------------------------------------- spectrogram


def tbn_window(samples: np.ndarray, centre_s: float, sample_rate: int = TBN_SAMPLE_RATE) -> np.ndarray:
    """The 1.279 s of audio TBN uses for a frame at ``centre_s`` seconds (samples already at ``sample_rate``).

    If ``centre_s - 0.639 < 0``: the first ``round(1.279 sr)`` samples; if ``centre_s + 0.639`` is past the
    end: the last ``round(1.279 sr)``; otherwise ``[round((c - 0.639) sr), round((c + 0.639) sr))``.
    Rounding is Python's ``round`` (half to even), as in TBN's code.
    """
    x = _as_waveform(samples)
    sr = _rate(sample_rate)
    n_edge = int(round(TBN_WINDOW_S * sr))
    duration = x.size / float(sr)
    left_s, right_s = centre_s - TBN_HALF_WINDOW_S, centre_s + TBN_HALF_WINDOW_S
    if left_s < 0:
        return x[:n_edge]
    if right_s > duration:
        return x[-n_edge:]
    return x[int(round(left_s * sr)):int(round(right_s * sr))]


def log_spectrogram(segment: np.ndarray) -> np.ndarray:
    """``log(|STFT|^2 + 1e-6)`` of a 24 kHz segment, frequency x time, float32 (computed in float64).

    The STFT is ``torch.stft(n_fft=511, hop_length=120, win_length=240, periodic Hann, center=True,
    pad_mode="constant")``, computed as a matrix product: each 511-sample frame is zero outside the 240 taps of
    its centred window, so its 256 DFT bins are the 240 windowed samples times a (240, 256) cosine and sine
    matrix.  Starting the DFT at the window rather than at the frame multiplies every bin by a unit phase
    factor, which the power does not see.  About 2.5x faster than the FFT of the mostly-zero 511-point frames
    (511 = 7 x 73 is an awkward FFT size); ``tests/test_audio.py`` checks it against numpy's ``rfft`` of the
    formula.
    """
    x = torch.from_numpy(np.asarray(segment, dtype=np.float64))
    padded = F.pad(x[None, None], (N_FFT // 2, N_FFT // 2))[0, 0]  # centred frames, constant (zero) padding
    frames = 1 + (padded.numel() - N_FFT) // HOP_LENGTH
    left = (N_FFT - WIN_LENGTH) // 2  # the window's first tap inside its frame
    taps = padded[left:left + (frames - 1) * HOP_LENGTH + WIN_LENGTH].unfold(0, WIN_LENGTH, HOP_LENGTH)
    z = taps @ _dft_matrix()                                          # (frames, 2 * bins): real, imaginary
    bins = N_FFT // 2 + 1
    power = z[:, :bins] ** 2 + z[:, bins:] ** 2
    return torch.log(power + LOG_EPS).T.numpy().astype(np.float32)


_DFT: list = []


def _dft_matrix() -> torch.Tensor:
    """(240, 2 * 256) float64: ``w[j] cos(2 pi k j / 511)`` and ``-w[j] sin(2 pi k j / 511)``, w the periodic
    Hann window of 240 taps."""
    if not _DFT:
        j = np.arange(WIN_LENGTH, dtype=np.float64)
        k = np.arange(N_FFT // 2 + 1, dtype=np.float64)
        window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float64).numpy()
        angle = 2.0 * np.pi * np.outer(j, k) / N_FFT
        _DFT.append(torch.from_numpy(np.concatenate([window[:, None] * np.cos(angle),
                                                     -window[:, None] * np.sin(angle)], axis=1)))
    return _DFT[0]


def tbn_spectrogram(samples: np.ndarray, sample_rate: int, centre_s: float) -> np.ndarray:
    """TBN's 256x256 log spectrogram (frequency x time, float32) for a frame at ``centre_s`` seconds.

    ``samples`` is a mono float waveform at ``sample_rate``; it is resampled to 24 kHz first (identity when
    already 24 kHz).  When computing many frames of one recording, resample once with :func:`resample`
    (or use :func:`tbn_spectrograms`).
    """
    x = resample(samples, sample_rate, TBN_SAMPLE_RATE)
    segment = tbn_window(x, centre_s, TBN_SAMPLE_RATE)
    n_edge = int(round(TBN_WINDOW_S * TBN_SAMPLE_RATE))
    if segment.size < n_edge:  # only changes anything for recordings shorter than 1.279 s (module docstring)
        segment = np.pad(segment, (0, n_edge - segment.size))
    spec = log_spectrogram(segment)
    if spec.shape != (SPEC_SIZE, SPEC_SIZE):  # cannot happen for 30671..30696 samples; keep the contract loud
        raise AssertionError(f"spectrogram shape {spec.shape} for {segment.size} samples")
    return spec


def tbn_spectrograms(samples: np.ndarray, sample_rate: int, centres_s) -> np.ndarray:
    """:func:`tbn_spectrogram` for several centres, resampling once: ``(N, 256, 256)`` float32."""
    x = resample(samples, sample_rate, TBN_SAMPLE_RATE)
    centres = list(np.atleast_1d(np.asarray(centres_s, dtype=np.float64)))
    out = np.empty((len(centres), SPEC_SIZE, SPEC_SIZE), dtype=np.float32)
    for i, c in enumerate(centres):
        out[i] = tbn_spectrogram(x, TBN_SAMPLE_RATE, float(c))
    return out
