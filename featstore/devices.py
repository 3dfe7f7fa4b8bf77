"""The one device rule of both stages (``--device``)."""

from __future__ import annotations

from featstore.errors import UserError


def resolve_device(device="auto", local_rank: int = 0):
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` -> ``cuda:<local_rank>`` (torchrun's ranks share a
    machine's GPUs); ``cuda:N`` as given; ``cuda`` without a GPU, or another name, is a :class:`UserError`."""
    import torch

    name = str(device).lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        return torch.device(name)
    if name != "cpu":
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device("cpu")
