"""The table of optimizer configurations that parity tests are parametrized over.

Each :class:`OptimizerCase` holds keyword arguments in adamkit's names (those of
:class:`adamkit.numpy.Adam`: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``,
``maximize``, ``bias_correction``, ``decoupled_weight_decay``) plus, in ``skips``, every target
that cannot run it with the reason.  Targets are free-form names such as ``"torch"``
(``torch.optim``), an ``impl=`` name (``"numba"``) or a state format (``"bf16"``).  Tests select
with :func:`cases_for` or ask :meth:`OptimizerCase.skip_reason`; the exceptions live here, not in
``if`` statements in the tests.

Together the cases cover each option on and off, the interactions that have broken fast paths
(AMSGrad with decay and maximize, ``beta1 = 0``, ``eps = 0``) and both lr regimes, while staying
small enough that a test looping 200 steps over every case runs in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adamkit.core.config import AdamHyperParams, check_betas

__all__ = ["CASES", "NO_TORCH_BIAS_CORRECTION", "OptimizerCase", "cases_for"]

NO_TORCH_BIAS_CORRECTION = "torch.optim has no bias_correction=False"


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration: ``id`` (a pytest id), ``description``, ``kwargs``, ``skips``."""

    id: str
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    skips: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "skips", MappingProxyType(dict(self.skips)))

    def hyperparams(self, **overrides: Any) -> AdamHyperParams:
        """The case as validated :class:`AdamHyperParams`, with ``overrides`` (adamkit names)."""
        kwargs = {**self.kwargs, **overrides}
        beta1, beta2 = check_betas(kwargs.pop("betas", (0.9, 0.999)))
        return AdamHyperParams(beta1=beta1, beta2=beta2, **kwargs)

    def torch_optimizer(self) -> tuple[str, dict[str, Any]]:
        """``(class name in torch.optim, kwargs)`` for the equivalent torch optimizer.

        Decoupled weight decay maps to ``AdamW`` (with ``weight_decay`` given explicitly, since
        the defaults differ).  Raises ``ValueError`` for cases that ``skips["torch"]``.
        """
        if "torch" in self.skips:
            raise ValueError(f"case {self.id!r} has no torch equivalent: {self.skips['torch']}")
        hp = self.hyperparams()
        kwargs = {
            "lr": hp.lr,
            "betas": (hp.beta1, hp.beta2),
            "eps": hp.eps,
            "weight_decay": hp.weight_decay,
            "amsgrad": hp.amsgrad,
            "maximize": hp.maximize,
        }
        return ("AdamW" if hp.decoupled_weight_decay else "Adam"), kwargs

    def skip_reason(self, target: str) -> str | None:
        """Why ``target`` cannot run this case, or ``None`` if it can."""
        return self.skips.get(target)


def cases_for(target: str, cases: Iterable[OptimizerCase] | None = None) -> list[OptimizerCase]:
    """The cases (default :data:`CASES`) that ``target`` supports."""
    return [case for case in (CASES if cases is None else cases) if target not in case.skips]


def _case(id: str, description: str, skips: Mapping[str, str] | None = None, **kwargs: Any):
    return OptimizerCase(id, description, kwargs, skips or {})


CASES: tuple[OptimizerCase, ...] = (
    _case("default", "torch's defaults"),
    _case("lr-large", "a large step", lr=0.1),
    _case("betas-low", "short averages", lr=1e-2, betas=(0.5, 0.9)),
    _case("beta1-zero", "no momentum (RMSProp-like)", lr=1e-2, betas=(0.0, 0.99)),
    _case("eps-large", "eps dominating small second moments", lr=1e-2, eps=1e-3),
    _case("eps-zero", "eps = 0 (plain division)", lr=1e-2, eps=0.0),
    _case("l2", "coupled L2 weight decay (Adam)", lr=1e-2, weight_decay=0.1),
    _case("adamw", "decoupled weight decay (AdamW)", weight_decay=0.1, decoupled_weight_decay=True),
    _case(
        "adamw-strong",
        "AdamW with a large lr * weight_decay",
        lr=0.05,
        weight_decay=0.5,
        decoupled_weight_decay=True,
    ),
    _case("amsgrad", "AMSGrad", lr=1e-2, amsgrad=True),
    _case("amsgrad-l2", "AMSGrad with coupled decay", lr=1e-2, amsgrad=True, weight_decay=0.05),
    _case(
        "amsgrad-adamw-maximize",
        "AMSGrad, decoupled decay and maximize together",
        lr=1e-2,
        betas=(0.8, 0.99),
        amsgrad=True,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        maximize=True,
    ),
    _case("maximize", "gradient ascent", lr=1e-2, maximize=True),
    _case("maximize-l2", "ascent with coupled decay", lr=1e-2, maximize=True, weight_decay=0.1),
    _case(
        "no-bias-correction",
        "bias correction off",
        {"torch": NO_TORCH_BIAS_CORRECTION},
        lr=1e-2,
        bias_correction=False,
    ),
    _case(
        "no-bias-correction-amsgrad-adamw",
        "bias correction off with AMSGrad and decoupled decay",
        {"torch": NO_TORCH_BIAS_CORRECTION},
        lr=1e-2,
        amsgrad=True,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
)
