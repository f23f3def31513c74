"""Split a model's parameters into the usual "decay" and "no_decay" groups.

The rule (the one GPT-2/minGPT, timm and most recipes use):

- **decay**: parameters with two or more dimensions (the weight matrices and kernels of
  ``Linear``, ``Conv*``, ``Bilinear``, attention projections, ...);
- **no_decay**: everything else: parameters with fewer than two dimensions (biases, scalars,
  normalisation scales and shifts), and every parameter of a module of a type in ``no_decay``
  (by default normalisation layers and embeddings, whose weights are lookup tables, not
  transformations).

A parameter shared by several modules (weight tying, e.g. an embedding used as the output layer)
is not decayed if any module holding it is of a ``no_decay`` type.  Frozen parameters
(``requires_grad=False``) are left out.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NO_DECAY_MODULES", "param_groups_with_decay"]

NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)


def param_groups_with_decay(
    model: nn.Module,
    weight_decay: float = 1e-2,
    *,
    no_decay: tuple[type[nn.Module], ...] = NO_DECAY_MODULES,
) -> list[dict[str, Any]]:
    """Return ``[decay_group, no_decay_group]`` for ``model`` (see the module docstring's rule).

    Each group is a dict with ``name`` (``"decay"`` / ``"no_decay"``), ``weight_decay``
    (``weight_decay`` / ``0.0``), ``params`` in ``model.named_parameters()`` order and their
    qualified names in ``param_names`` (torch's key), which the optimizer saves in its state dict.
    Both groups are always present (possibly empty) so the group layout does not depend on the
    model.  Raises ``TypeError`` if ``model`` is not an ``nn.Module`` or ``no_decay`` is not a
    tuple of module types; the weight decay value itself is validated by the optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(no_decay, tuple) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in no_decay
    ):
        raise TypeError(f"no_decay must be a tuple of nn.Module subclasses, got {no_decay!r}")
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, no_decay):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    groups = {
        "decay": {"name": "decay", "params": [], "param_names": [], "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "param_names": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = groups["decay" if param.dim() >= 2 and id(param) not in excluded else "no_decay"]
        group["params"].append(param)
        group["param_names"].append(name)
    # `param_names` is given explicitly (not as (name, tensor) pairs) so that an empty group
    # still counts as named for torch's "all groups with or without names" rule.
    return [groups["decay"], groups["no_decay"]]
