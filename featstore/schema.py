"""The store's schema: its version, arrays, codecs and attributes (README, "Feature store").

Every producer of a store (extraction, the importer, the synthetic stores of tests and benchmarks, the version
converter) describes it with one :class:`StoreAttrs`; :meth:`featstore.store.FeatureStore.create` adds what it
knows itself (version, clip count, chunking, modalities and their window shapes, package version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import zarr

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODALITIES = ("rgb", "flow", "audio")
CLIP_ARRAYS = {
    "id": str, "video_id": str, "verb_class": "int32", "noun_class": "int32",
    "start_frame": "int64", "stop_frame": "int64", "done": "bool", "error": str,
}
DEFAULT_CHUNK_BYTES = 8 << 20  # aim for ~8 MiB (uncompressed) chunks of the feature arrays
LOCK_FILE = "done/write.lock"  # inside an array folder, where Zarr's group listing does not look


def default_codec():
    """Zstandard level 3: in bench/bench_store.py on ReLU'd float16 maps it stores 1.7x smaller than raw and reads
    at ~85% of the uncompressed speed, while Blosc-LZ4 + shuffle barely compresses (1.09x) for 7% faster reads."""
    return zarr.codecs.ZstdCodec(level=3)


def default_compressors() -> tuple:
    """Zstandard, then a CRC32C checksum of the compressed bytes: a corrupt chunk fails to decode."""
    return (default_codec(), zarr.codecs.Crc32cCodec())


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("adapt-epic")
    except Exception:  # noqa: BLE001 - running from a checkout without installing
        return "0+unknown"


def chunk_clips_for(window_shapes: dict[str, tuple[int, ...]], target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Clips per chunk so that the largest modality's chunk is about ``target_bytes`` of float16."""
    per_clip = max(int(np.prod(s)) * 2 for s in window_shapes.values())
    return int(max(1, min(1024, target_bytes // per_clip)))



@dataclass(kw_only=True)
class StoreAttrs:
    """What a producer says about the features it stores (the group attributes besides the layout's own).

    The readers use ``backbone``, the class counts, ``checkpoints``, ``sampling`` and ``preprocessing`` (stores
    that differ in them do not train together: :func:`featstore.store.check_compatible`) and ``manifest_sha256``
    (which clips, in which order).  The others record how the store was made; ``None`` leaves a key out."""

    backbone: str
    checkpoints: dict = field(default_factory=dict)        # modality -> sha256 of its weights (None: random)
    checkpoint_layouts: dict | None = None                 # modality -> the layout its checkpoint was read as
    sampling: dict = field(default_factory=dict)            # windows / segments and how clips were sampled
    preprocessing: dict = field(default_factory=dict)       # resize, crop, normalisation, flow scaling, audio
    precision: str | None = None                           # fp32 | bf16 | fp16 (extraction)
    manifest_name: str | None = None
    manifest_path: str | None = None
    manifest_sha256: str
    dataset: str | None = None
    domain: str | None = None
    verb_classes: int
    noun_classes: int = 0
    imported_from: dict | None = None                      # {file, sha256} of imported features
    split_kind: str | None = None                          # train | test
    created: str | None = None                             # ISO time (left out of comparisons)
    extra: dict = field(default_factory=dict)              # a producer's own keys, stored as they are

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in d.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreAttrs":
        """The producer's attributes of an existing store (its layout keys left out)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in own},
                   extra={k: v for k, v in d.items() if k not in own and k not in LAYOUT_KEYS})


# the keys FeatureStore.create writes itself
LAYOUT_KEYS = ("schema_version", "num_clips", "chunk_clips", "modalities", "window_shapes", "package_version",
               "failed", "num_done")
