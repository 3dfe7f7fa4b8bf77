"""Feature-store codec: write and read speed and compression of candidate codecs on ReLU'd float16 maps
(1024x7x7 per window, about half zeros, like Mixed_5c / inception_5b activations)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

CODECS = {
    "blosc-lz4-shuffle": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd-shuffle": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "zstd-3": lambda: zarr.codecs.ZstdCodec(level=3),
    "none": lambda: None,
}


def run(clips: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((clips, 5, 1024, 7, 7), dtype=np.float32), 0).astype(np.float16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CODECS.items():
            path = Path(tmp) / name
            codec = make()
            g = zarr.open_group(str(path), mode="w")
            a = g.create_array("rgb", shape=x.shape, chunks=(16, *x.shape[1:]), dtype="float16",
                               compressors=codec if codec is not None else None)
            t = time.perf_counter()
            a[:] = x
            write = time.perf_counter() - t
            t = time.perf_counter()
            y = zarr.open_group(str(path), mode="r")["rgb"][:]
            read = time.perf_counter() - t
            assert np.array_equal(x, y)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append({"codec": name, "write_MBps": x.nbytes / write / 2**20, "read_MBps": x.nbytes / read / 2**20,
                         "ratio": x.nbytes / size})
            shutil.rmtree(path)
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
