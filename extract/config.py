"""Extraction settings: everything that decides what the features are.

The whole :class:`ExtractConfig` (minus paths and run-time choices such as the device) is written into the
store's attributes (``sampling`` and ``preprocessing``), and the trainer refuses to mix stores whose settings differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# Default EPIC-Kitchens layouts (REFERENCE.md, "EPIC-Kitchens frame layout"); every layout is a setting.
RGB_LAYOUT = "{root}/{participant}/rgb_frames/{video}/frame_{frame:010d}.jpg"
FLOW_LAYOUT = "{root}/{participant}/flow_frames/{video}/{uv}/frame_{frame:010d}.jpg"
VIDEO_LAYOUT = "{root}/{participant}/videos/{video}.MP4"
AUDIO_LAYOUT = "{root}/{participant}/audio/{video}.wav"


@dataclass
class ExtractConfig:
    backbone: str = "i3d"                      # "i3d" | "tbn"
    modalities: tuple[str, ...] = ("rgb", "flow")
    data_root: Path = Path("data")
    rgb_layout: str = RGB_LAYOUT
    flow_layout: str = FLOW_LAYOUT
    video_layout: str = VIDEO_LAYOUT
    audio_layout: str = AUDIO_LAYOUT
    rgb_source: str = "frames"                 # "frames" (JPEG folders) | "video" (decord)
    flow_source: str = "frames"                # "frames" (EPIC u/v JPEGs) | "tvl1" (computed from RGB, OpenCV)
    audio_source: str = "wav"                  # "wav" | "video" (the video's audio track)
    split_kind: str = "test"                   # "train" | "test": decides the number of windows (I3D)
    # I3D windows (MM-SADA): 16 frames at stride 2; test 5 equidistant windows; train K windows
    frames_per_window: int = 16
    frame_stride: int = 2
    test_windows: int = 5
    train_windows: int = 5
    # window centres (extract/sampling.py): "linspace": linspace(start, stop, W+2)[1:-1] (REFERENCE.md) |
    # "mmsada_code": the released MM-SADA code's range, shrunk by half a window at each end
    window_centres: str = "linspace"
    # TBN: TSN segments per clip, flow stack length
    segments: int = 25
    stored_segments: int = 0                   # keep N of the segments (their groups' centres; 0 = all)
    flow_stack: int = 5
    audio_map: str = "pooled"                  # "pooled" (1024) | "spatial" (1024x8x8)
    # flow frames: EPIC-55 stride 2 bound 25; EPIC-100 extension videos stride 1 bound 8 ("auto" picks per video)
    flow_stride: str = "auto"                  # "auto" | "1" | "2"
    flow_bound: str = "auto"                   # "auto" | a number
    flow_index_rule: str = "mmsada"            # "mmsada": int(n/2) | "ceil": ceil(n/2) | "tbn": floor((n-1)/2)+1
    flow_scaling: str = "exact"                # "exact": d = jpeg*2b/255-b, clip 20, /20 | "naive": jpeg/255*2-1
    resize: int = 256                          # shorter side
    crop: int = 224                            # centre crop
    audio_rate: int = 24000
    seed: int = 0

    def settings(self) -> dict:
        """The part of the configuration that defines the features (goes into the store's attributes)."""
        d = asdict(self)
        for k in ("data_root", "rgb_layout", "flow_layout", "video_layout", "audio_layout"):
            d.pop(k)
        d["modalities"] = list(self.modalities)
        return d

    def sampling(self) -> dict:
        keys = ("backbone", "split_kind", "frames_per_window", "frame_stride", "segments", "flow_stack",
                "stored_segments",
                "flow_index_rule", "flow_stride", "seed", "window_centres")
        s = {k: v for k, v in self.settings().items() if k in keys}
        s["windows"] = self.num_windows()
        if self.backbone == "tbn" and self.stored_segments and self.stored_segments < self.segments:
            s["stored_segments"] = self.stored_segment_indices()
        else:
            s.pop("stored_segments", None)
        return s

    def preprocessing(self) -> dict:
        keys = ("rgb_source", "flow_source", "audio_source", "audio_map", "flow_bound", "flow_scaling", "resize",
                "crop", "audio_rate")
        return {k: v for k, v in self.settings().items() if k in keys}

    def stored_segment_indices(self) -> list[int]:
        """The TSN segments a store keeps: all, or with ``stored_segments = N`` the centres of N equal groups
        (N = 5 of 25: 2, 7, 12, 17, 22, the segments TA3N trains and tests on)."""
        s, n = int(self.segments), int(self.stored_segments or self.segments)
        if n >= s:
            return list(range(s))
        b = [s * i / n for i in range(n + 1)]
        return [int((b[i] + b[i + 1]) / 2) for i in range(n)]

    def num_windows(self) -> int:
        if self.backbone == "tbn":
            return len(self.stored_segment_indices())
        return self.train_windows if self.split_kind == "train" else self.test_windows


@dataclass
class DemoConfig:
    """Settings for the demo dataset and its extraction, small enough for two CPU cores in a couple of minutes."""

    root: Path = Path("demo/data")
    kitchens: tuple[str, ...] = ("K1", "K2", "K3")
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(
        frames_per_window=8, frame_stride=2, train_windows=3, test_windows=3, resize=112, crop=96))
