"""Gradient clipping with PyTorch's multi-tensor (`torch._foreach_*`) ops.

The same stages and results as `ClippedOptimizer.clip_gradients` (value,
per-tensor norm, global norm; AGC is not covered), but each stage is one
kernel launch over all gradients instead of one small op per gradient: on
the PyTorch backend the optimizer runs eagerly, and per-op overhead would
make the wrapper cost more than Keras's built-in clipping.
"""

import torch


def supports(grads):
    """Whether the fast path applies: float32 tensors, no `None`."""
    return bool(grads) and all(
        g is not None and g.dtype == torch.float32 for g in grads
    )


@torch.no_grad()
def clip_gradients(grads, clipvalue=None, clipnorm=None, global_clipnorm=None):
    """Returns `(clipped, statistics)` as `ClippedOptimizer.clip_gradients`."""
    norms = torch.stack(torch._foreach_norm(grads))
    total_square = torch.sum(norms * norms)
    norm = torch.sqrt(total_square)
    acted = []
    tensors = grads
    if clipvalue is not None:
        acted.append(torch.stack(torch._foreach_max(torch._foreach_abs(tensors)))
                     .max() > clipvalue)
        tensors = torch._foreach_clamp_min(tensors, -clipvalue)
        torch._foreach_clamp_max_(tensors, clipvalue)
    if clipnorm is not None:
        tensor_norms = norms
        if clipvalue is not None:
            tensor_norms = torch.stack(torch._foreach_norm(tensors))
        over = tensor_norms > clipnorm
        acted.append(over.any())
        factors = torch.where(over, clipnorm / tensor_norms, 1.0)
        tensors = torch._foreach_mul(tensors, list(factors.unbind()))
    if global_clipnorm is not None:
        total = norm
        if clipvalue is not None or clipnorm is not None:
            total = torch.linalg.vector_norm(
                torch.stack(torch._foreach_norm(tensors))
            )
        over = total > global_clipnorm
        acted.append(over)
        tensors = torch._foreach_mul(
            tensors, torch.where(over, global_clipnorm / total, 1.0)
        )
    if acted:
        clipped = torch.stack(acted).any()
    else:
        clipped = torch.zeros((), dtype=torch.bool, device=norm.device)
    statistics = {
        "finite": torch.isfinite(total_square),
        "norm": norm,
        "norms": norms,
        "clipped": clipped,
    }
    return list(tensors), statistics
