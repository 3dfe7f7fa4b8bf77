"""The pieces of one training step, each with its reason: the loss of a pass, the optimiser, per-run gradient
clipping, the state's in-place writes, the K = 1 path without vmap, and the stacked gradients' layout."""

from __future__ import annotations

import functools

import torch


@functools.cache
def fast_optimiser_option() -> dict:
    """``fused=True`` where this torch has fused SGD and Adam kernels for the CPU and CUDA, else ``foreach=True``
    (probed once, at the first training)."""
    try:
        p = torch.zeros(2, requires_grad=True)
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        torch.optim.Adam([p], lr=0.1, fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


def weighted_sum(terms: dict, w: dict) -> torch.Tensor:
    """``sum_t w_t L_t`` over the terms in the order given (a fixed order: the sum rounds the same in every
    process and alone or stacked)."""
    total = 0.0
    for t, value in terms.items():
        total = total + w[t] * value
    return total


def apply_writes(state: dict, writes: dict) -> None:
    """Write the rows a step computed into the state (memory banks), in place: ``state[name][k, idx[k]] =
    rows[k]`` for each run ``k`` of the stack.

    Done by the trainer after all the step's passes (their backward passes read the banks as they were), outside
    vmap: an out-of-place update would copy every bank whole each step (18 ms per step for one 26,000 x 512 bank,
    EPIC-100's target train split).  With a repeated index the last row written wins (``index_put_`` on the
    CPU), the same for a run alone or stacked.

    Shapes: state[name] (K, N, ...), writes[name] = (idx (K, B) int64, rows (K, B, ...))."""
    for name, (idx, rows) in writes.items():
        bank = state[name]
        runs = torch.arange(bank.shape[0], device=bank.device)[:, None]
        bank.index_put_((runs, idx.to(torch.int64)), rows.detach().to(bank.dtype))


def single(fn):
    """The step function for K = 1 without vmap's per-call overhead (one CPU thread, the same step under vmap
    against this: 1.18-1.22x for TA3N-size heads, 1.21x for CIA, 1.28x for source_only on pooled I3D
    features; bench_plain's cases): run 0 of each stacked argument, the coefficients shared, the run axis added
    back to the results."""
    tree = torch.utils._pytree

    def one(p, b, inputs, coeff):
        first = lambda a: tree.tree_map(lambda t: t[0], a)  # noqa: E731
        return tree.tree_map(lambda t: t.unsqueeze(0), fn(first(p), first(b), first(inputs), coeff))
    return one


def optimiser(cfg, params: list):
    """SGD (momentum, Nesterov where set) or Adam; fused where torch has it: one pass over each parameter per
    step (the foreach form makes one per term); an I3D-size stacked K = 8 CPU SGD step takes 7.7 ms against 28 ms.
    The update is element-wise either way, so a stacked run's parameters move as they would alone."""
    fast = fast_optimiser_option()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **fast)


def clip_per_run(leaves: list, max_norm: float, K: int) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each stacked run on its own: every run's gradients scaled by
    ``min(1, max_norm / (||g_k|| + 1e-6))``, its global L2 norm over all parameters (TA3N main.py:661-664)."""
    grads = [p.grad for p in leaves if p.grad is not None]
    # one reduction per gradient, no squared copy (pow + sum made one: 4.4 of a TA3N-size step's 83 ms)
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), dim=1) for g in grads])
    scale = (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
    if K == 1:
        torch._foreach_mul_(grads, scale[0].to(grads[0].dtype))  # one launch for every gradient
        return
    for g in grads:
        g.mul_(scale.view(K, *([1] * (g.dim() - 1))).to(g.dtype))


def gradient_layout(stacked: dict, model: torch.nn.Module, K: int):
    """(leaves, params): the tensors the optimiser updates, and a function giving the model's parameters from them.

    Under vmap a linear layer's weight gradient comes out of the batched matmul as the transpose of a contiguous
    (K, in, out) tensor.  Were the stacked (K, out, in) weight the leaf, autograd would copy every such gradient
    into the weight's layout, a transposing copy of 10 ms of a 50 ms I3D-size K = 8 CPU step per modality; a leaf
    with the gradient's strides but not contiguous makes the fused optimiser copy it instead.  So for K > 1 the
    leaf is the contiguous (K, in, out) tensor and the model gets its transpose, a view: the gradient reaches the
    leaf contiguous, as it is.  K = 1 runs without vmap, where the gradient is already contiguous."""
    if K == 1:
        return stacked, lambda: stacked
    linear = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    leaves = {k: (v.transpose(1, 2).contiguous() if k in linear else v) for k, v in stacked.items()}
    return leaves, lambda: {k: (v.transpose(1, 2) if k in linear else v) for k, v in leaves.items()}
