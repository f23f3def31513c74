"""``adamkit bench``: optimizer step time of adamkit against torch, NumPy and the bandwidth floor.

Every candidate runs the same Adam step (lr 1e-3, torch's defaults) on the same parameter layout;
parameters and gradients are shared between candidates (each keeps its own moments), so the table
compares the cost of one ``step()`` and nothing else.  Per layout, after ``--warmup`` steps of each
candidate (JIT compilation, lazy state), ``--repeats`` rounds time one step of every candidate,
round-robin with a rotating start so that a burst of machine noise hits all of them alike.  The
table reports medians (and the minimum, the better guide on a machine shared with other work),
Mparam/s, speed relative to ``torch.optim.Adam(fused=True)`` (``>1`` is faster) and the
percentage of the streaming floor (:mod:`adamkit.kernels.streaming`: the same bytes moved with
trivial arithmetic; 100 % is the memory-bandwidth limit).

Layouts (``--layouts``): ``1M``, ``10M``, ``100M`` (transformer-like mixes of large matrices and
small bias/norm vectors), ``tiny10k`` (10,000 tensors of 1 to 256 elements: per-tensor overhead)
and the two models of the training app, ``mlp784`` (784-128-10) and ``digits`` (64-128-10), built
with ``torch.nn``; for those, the ``fwd+bwd`` row times the rest of a training iteration (forward
and backward pass of a batch of 256) to put the step time in proportion.

``adamkit.torch+bwd`` and ``torch.fused+bwd`` get their gradients from a backward pass before
each step (untimed, on parameters of their own): the default guard's gradient check then runs in
that backward (``GuardConfig.check_in_backward``), as it does in training, where the other
``adamkit.torch`` rows, whose gradients are set without autograd, check in ``step()``.

State formats: ``adamkit.torch[bf16]``, ``adamkit.torch[int8]`` (``guard=False``; ``+guard`` with
the default guard), ``adamkit.numpy[...]`` and ``adamkit.kernels[...]`` (the fused kernels without
a front end), against the 8-bit optimizers of ``bitsandbytes`` (``bnb.Adam8bit``) and ``torchao``
(``torchao.AdamW8bit`` with ``weight_decay=0``; its compilation falls in the warm-up), neither a
dependency.  The ``B/param`` column is the optimizer state each candidate holds, measured from its
storage after the warm-up (``state_nbytes()`` for adamkit, the tensors in ``optimizer.state`` for
torch, bitsandbytes and torchao), divided by the number of parameters.

Results go to stdout as a table and, with all timings, to ``--json``.  Candidates that cannot run
here (JAX not installed, a front end missing) are listed with the reason instead of failing.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CANDIDATES", "LAYOUTS", "configure_parser", "layout_shapes", "run"]

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
BASELINE = "torch.fused"
FLOOR = "floor"


class Skip(Exception):
    """Raised by a candidate's setup when it cannot run here; the message says why."""


# ---------------------------------------------------------------- layouts


def _transformer(layers: int, width: int) -> list[tuple[int, ...]]:
    """Per layer: QKV, output and two MLP matrices (12 width^2), biases and norms (13 width)."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]
        shapes += [(width,), (width,), (width,), (width,)]
    return shapes


def _tiny(count: int = 10_000) -> list[tuple[int, ...]]:
    sizes = (1, 3, 8, 16, 32, 64, 100, 128, 256)
    return [(sizes[i % len(sizes)],) for i in range(count)]


_MLP_SIZES = {"mlp784": (784, 128, 10), "digits": (64, 128, 10)}
APP_BATCH = 256


def _mlp(sizes: Sequence[int]) -> Any:
    """The app's MLP: Linear layers with ReLU between them, built with torch.nn."""
    import torch

    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _mlp_shapes(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in _mlp(sizes).parameters()]


LAYOUTS: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "1M": ("4 layers, width 144: matrices + bias/norm vectors", lambda: _transformer(4, 144)),
    "10M": ("8 layers, width 320", lambda: _transformer(8, 320)),
    "100M": ("12 layers, width 832", lambda: _transformer(12, 832)),
    "tiny10k": ("10,000 tensors of 1-256 elements", _tiny),
    "mlp784": ("app MLP 784-128-10 (torch.nn)", lambda: _mlp_shapes(_MLP_SIZES["mlp784"])),
    "digits": ("app digits MLP 64-128-10 (torch.nn)", lambda: _mlp_shapes(_MLP_SIZES["digits"])),
}
DEFAULT_LAYOUTS = ("1M", "10M", "100M", "tiny10k", "mlp784", "digits")
QUICK_LAYOUTS = ("1M", "tiny10k", "mlp784")


def layout_shapes(name: str) -> list[tuple[int, ...]]:
    """The parameter shapes of layout ``name`` (a key of :data:`LAYOUTS`)."""
    return LAYOUTS[name][1]()


# ---------------------------------------------------------------- problem and candidates


@dataclass
class Problem:
    """Parameters and gradients shared by all candidates, as NumPy arrays and torch views."""

    shapes: list[tuple[int, ...]]
    dtype: np.dtype
    layout: str = ""
    params: list[np.ndarray] = field(init=False)
    grads: list[np.ndarray] = field(init=False)
    _torch: tuple[list[Any], list[Any]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(0)
        self.params = [
            rng.standard_normal(s, dtype=np.float32).astype(self.dtype) for s in self.shapes
        ]
        self.grads = [
            rng.standard_normal(s, dtype=np.float32).astype(self.dtype) for s in self.shapes
        ]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.params)

    def zeros(self) -> list[np.ndarray]:
        return [np.zeros_like(p) for p in self.params]

    def torch_params(self) -> list[Any]:
        """Leaf tensors sharing memory with :attr:`params`, ``.grad`` sharing :attr:`grads`."""
        import torch

        if self._torch is None:
            tensors = []
            for p, g in zip(self.params, self.grads, strict=True):
                t = torch.from_numpy(p).requires_grad_(True)
                t.grad = torch.from_numpy(g)
                tensors.append(t)
            self._torch = (tensors, [])
        return self._torch[0]


StepFn = Callable[[], None]


@dataclass(frozen=True)
class Candidate:
    """A named way to run one Adam step; ``setup(problem)`` returns the step or raises Skip."""

    name: str
    description: str
    setup: Callable[[Problem], StepFn]


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not installed ({extra}): {exc}") from None


def _hp() -> Any:
    from adamkit.core.config import AdamHyperParams

    return AdamHyperParams(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS)


def _setup_floor(problem: Problem) -> StepFn:
    _need("numba", "pip install adamkit[fast]")
    from adamkit.kernels.streaming import stream_update_

    m, v = problem.zeros(), problem.zeros()
    return lambda: stream_update_(problem.params, problem.grads, m, v)


def _setup_kernel(problem: Problem) -> StepFn:
    _need("numba", "pip install adamkit[fast]")
    from adamkit.kernels import adam_update_

    hp, n = _hp(), len(problem.params)
    m, v, none, count = problem.zeros(), problem.zeros(), [None] * n, [0]

    def step() -> None:
        count[0] += 1
        adam_update_(problem.params, problem.grads, m, v, none, [count[0]] * n, hp, impl="numba")

    return step


def _setup_adamkit_numpy(problem: Problem) -> StepFn:
    try:
        from adamkit.numpy import Adam
    except ImportError as exc:
        raise Skip(f"adamkit.numpy is not available: {exc}") from None
    opt = Adam(problem.params, lr=LR, betas=(BETA1, BETA2), eps=EPS)
    return lambda: opt.step(problem.grads)


def _adamkit_torch(**options: Any) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        _need("torch", "pip install adamkit[torch]")
        try:
            from adamkit.torch import Adam
        except ImportError as exc:
            raise Skip(f"adamkit.torch is not available: {exc}") from None
        opt = Adam(problem.torch_params(), lr=LR, betas=(BETA1, BETA2), eps=EPS, **options)
        nbytes = getattr(opt, "state_nbytes", None)
        return _with_state_bytes(opt.step, nbytes) if callable(nbytes) else opt.step

    return setup


def _setup_kernel_on_torch(problem: Problem) -> StepFn:
    """What adamkit.torch costs once it routes CPU tensors to the numba kernel: views per step."""
    _need("numba", "pip install adamkit[fast]")
    torch = _need("torch", "pip install adamkit[torch]")
    from adamkit.kernels import adam_update_

    params, hp = problem.torch_params(), _hp()
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    def step() -> None:
        counts = []
        for t in steps:
            t += 1
            counts.append(int(t.item()))
        adam_update_(
            [p.detach().numpy() for p in params],
            [p.grad.numpy() for p in params],
            [x.numpy() for x in m],
            [x.numpy() for x in v],
            [None] * len(params),
            counts,
            hp,
            impl="numba",
        )

    return step


def _after_backward(make: Callable[[list[Any]], Any]) -> Callable[[Problem], StepFn]:
    """The step of ``make(params)`` on parameters of its own (copies of the layout's), whose
    gradients, equal to the layout's, come from a backward pass of ``sum(p * g)`` before every
    step.  The backward runs untimed (the step's ``prepare``), but what it leaves behind counts:
    the caches it filled, torch's thread pool, and work it did for the step (the default guard's
    gradient check, ``GuardConfig.check_in_backward``)."""

    def setup(problem: Problem) -> StepFn:
        torch = _need("torch", "pip install adamkit[torch]")
        params = [torch.from_numpy(p.copy()).requires_grad_(True) for p in problem.params]
        weights = [torch.from_numpy(g) for g in problem.grads]
        opt = make(params)

        def prepare() -> None:
            opt.zero_grad(set_to_none=True)
            terms = [(p * w).sum() for p, w in zip(params, weights, strict=True)]
            torch.stack(terms).sum().backward()

        prepare()
        nbytes = getattr(opt, "state_nbytes", None)  # adamkit's own count, else torch's tensors
        step = _with_state_bytes(opt.step, nbytes if callable(nbytes) else _torch_state_nbytes(opt))
        step.prepare = prepare  # type: ignore[attr-defined]
        step.params = params  # type: ignore[attr-defined]
        return step

    return setup


def _adamkit_torch_after_backward(state: str | None = None) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        try:
            from adamkit.torch import Adam
        except ImportError as exc:
            raise Skip(f"adamkit.torch is not available: {exc}") from None
        return _after_backward(
            lambda ps: Adam(ps, lr=LR, betas=(BETA1, BETA2), eps=EPS, state=state)
        )(problem)

    return setup


def _torch_after_backward(**flags: bool) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        torch = _need("torch", "pip install adamkit[torch]")
        return _after_backward(
            lambda ps: torch.optim.Adam(ps, lr=LR, betas=(BETA1, BETA2), eps=EPS, **flags)
        )(problem)

    return setup


def _torch_optim(**flags: bool) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        torch = _need("torch", "pip install adamkit[torch]")
        opt = torch.optim.Adam(
            problem.torch_params(), lr=LR, betas=(BETA1, BETA2), eps=EPS, **flags
        )
        return _with_state_bytes(opt.step, _torch_state_nbytes(opt))

    return setup


def _setup_textbook(problem: Problem) -> StepFn:
    """Kingma & Ba's formulas as written, a new array per operation."""
    m, v, t = problem.zeros(), problem.zeros(), [0]

    def step() -> None:
        t[0] += 1
        for i, (p, g) in enumerate(zip(problem.params, problem.grads, strict=True)):
            m[i] = BETA1 * m[i] + (1 - BETA1) * g
            v[i] = BETA2 * v[i] + (1 - BETA2) * g * g
            m_hat = m[i] / (1 - BETA1 ** t[0])
            v_hat = v[i] / (1 - BETA2 ** t[0])
            p -= LR * m_hat / (np.sqrt(v_hat) + EPS)

    return step


def _setup_inplace(problem: Problem) -> StepFn:
    """The best plain NumPy can do: in-place ufuncs with ``out=`` and one scratch array each."""
    m, v, scratch, t = problem.zeros(), problem.zeros(), problem.zeros(), [0]

    def step() -> None:
        t[0] += 1
        step_size = -LR / (1 - BETA1 ** t[0])
        inv_bc2 = 1.0 / math.sqrt(1 - BETA2 ** t[0])
        for p, g, mi, vi, s in zip(problem.params, problem.grads, m, v, scratch, strict=True):
            np.multiply(g, 1 - BETA1, out=s)
            mi *= BETA1
            mi += s
            np.multiply(g, g, out=s)
            s *= 1 - BETA2
            vi *= BETA2
            vi += s
            np.sqrt(vi, out=s)
            s *= inv_bc2
            s += EPS
            np.divide(mi, s, out=s)
            s *= step_size
            p += s

    return step


def _setup_optax(problem: Problem) -> StepFn:
    jax = _need("jax", "pip install jax optax")
    optax = _need("optax", "pip install optax")
    jnp = jax.numpy
    tx = optax.adam(LR, b1=BETA1, b2=BETA2, eps=EPS)
    params = [jnp.asarray(p) for p in problem.params]
    grads = [jnp.asarray(g) for g in problem.grads]
    box = [params, tx.init(params)]

    @jax.jit
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def step() -> None:
        box[0], box[1] = update(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    return step


def _tensor_nbytes(value: Any) -> int:
    """Bytes held by a state entry: plain tensors, tensor subclasses (torchao's quantized state:
    their inner tensors) and containers of them; anything else counts 0."""
    import torch

    if isinstance(value, dict):
        return sum(_tensor_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_nbytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def _torch_state_nbytes(opt: Any) -> Callable[[], int]:
    return lambda: sum(_tensor_nbytes(entry) for entry in opt.state.values())


def _with_state_bytes(step: StepFn, nbytes: Callable[[], int]) -> StepFn:
    """``step`` with ``state_nbytes()`` attached: bytes of optimizer state it holds (read after
    the warm-up, when lazily created state exists)."""

    def run() -> None:
        step()

    run.state_nbytes = nbytes  # type: ignore[attr-defined]
    return run


def _adamkit_torch_state(state: str, **options: Any) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        _need("torch", "pip install adamkit[torch]")
        try:
            from adamkit.torch import Adam
        except ImportError as exc:
            raise Skip(f"adamkit.torch is not available: {exc}") from None
        opt = Adam(
            problem.torch_params(), lr=LR, betas=(BETA1, BETA2), eps=EPS, state=state, **options
        )
        return _with_state_bytes(opt.step, opt.state_nbytes)

    return setup


def _adamkit_numpy_state(state: str) -> Callable[[Problem], StepFn]:
    def setup(problem: Problem) -> StepFn:
        try:
            from adamkit.numpy import Adam
        except ImportError as exc:
            raise Skip(f"adamkit.numpy is not available: {exc}") from None
        opt = Adam(problem.params, lr=LR, betas=(BETA1, BETA2), eps=EPS, state=state)
        nbytes = getattr(opt, "state_nbytes", None)
        step = lambda: opt.step(problem.grads)  # noqa: E731
        return _with_state_bytes(step, nbytes) if callable(nbytes) else step

    return setup


def _setup_kernel_stored(state: str) -> Callable[[Problem], StepFn]:
    """adam_update_stored_ (impl='auto') on NumPy arrays, each tensor in the format the
    optimizers give it (kernels.stored.param_format): the kernels without a front end."""

    def setup(problem: Problem) -> StepFn:
        _need("numba", "pip install adamkit[fast]")
        from adamkit.kernels.stored import adam_update_stored_, param_format

        hp, rng, count = _hp(), np.random.default_rng(0), [0]
        groups: dict[str, tuple[Any, list[Any]]] = {}
        for p, g in zip(problem.params, problem.grads, strict=True):
            fmt = param_format(state, p.shape)
            row = (p, g, fmt.zeros(p.shape, role="exp_avg"), fmt.zeros(p.shape, role="exp_avg_sq"))
            groups.setdefault(fmt.name, (fmt, []))[1].append(row)

        def step() -> None:
            count[0] += 1
            for fmt, rows in groups.values():
                ps, gs, ms, vs = (list(c) for c in zip(*rows, strict=True))
                nones, steps = [None] * len(rows), [count[0]] * len(rows)
                adam_update_stored_(fmt, ps, gs, ms, vs, nones, steps, hp, rng=rng)

        def nbytes() -> int:
            return sum(
                fmt.nbytes(st) for fmt, rows in groups.values() for row in rows for st in row[2:]
            )

        return _with_state_bytes(step, nbytes)

    return setup


def _setup_bnb_adam8bit(problem: Problem) -> StepFn:
    _need("torch", "pip install adamkit[torch]")
    bnb = _need("bitsandbytes", "pip install bitsandbytes")
    try:
        opt = bnb.optim.Adam8bit(problem.torch_params(), lr=LR, betas=(BETA1, BETA2), eps=EPS)
        opt.step()  # fails here when this build has no CPU 8-bit optimizer
    except Exception as exc:  # any failure of a third-party optimizer is a skip
        raise Skip(f"bitsandbytes.optim.Adam8bit does not run here: {exc}") from None
    return _with_state_bytes(opt.step, _torch_state_nbytes(opt))


def _setup_torchao_adamw8bit(problem: Problem) -> StepFn:
    _need("torch", "pip install adamkit[torch]")
    _need("torchao", "pip install torchao")
    try:
        from torchao.optim import AdamW8bit

        # weight_decay=0: the same update as Adam; the first step compiles (warm-up, untimed)
        opt = AdamW8bit(
            problem.torch_params(), lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.0
        )
        opt.step()
    except Exception as exc:  # any failure of a third-party optimizer is a skip
        raise Skip(f"torchao.optim.AdamW8bit does not run here: {exc}") from None
    return _with_state_bytes(opt.step, _torch_state_nbytes(opt))


def _setup_fwd_bwd(problem: Problem) -> StepFn:
    """Forward and backward pass of the app's MLP (not an optimizer: the rest of an iteration)."""
    if problem.layout not in _MLP_SIZES:
        raise Skip("only for the app layouts (mlp784, digits)")
    torch = _need("torch", "pip install adamkit[torch]")
    sizes = _MLP_SIZES[problem.layout]
    model = _mlp(sizes).to(getattr(torch, problem.dtype.name))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(APP_BATCH, sizes[0], generator=gen, dtype=model[0].weight.dtype)
    y = torch.randint(0, sizes[-1], (APP_BATCH,), generator=gen)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return step


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate(FLOOR, "streaming floor: same bytes, trivial arithmetic (numba)", _setup_floor),
        Candidate("adamkit.kernels", "adam_update_(impl='numba') on NumPy arrays", _setup_kernel),
        Candidate("adamkit.numpy", "adamkit.numpy.Adam (impl='auto')", _setup_adamkit_numpy),
        Candidate(
            "adamkit.torch", "adamkit.torch.Adam (impl='auto', default guard)", _adamkit_torch()
        ),
        Candidate(
            "adamkit.torch-noguard",
            "adamkit.torch.Adam (impl='auto', guard=False)",
            _adamkit_torch(guard=False),
        ),
        Candidate(
            "kernel-via-torch",
            "adam_update_(impl='numba') on tensor.numpy() views made each step",
            _setup_kernel_on_torch,
        ),
        Candidate(
            "adamkit.torch+bwd",
            "adamkit.torch.Adam (default guard), gradients from an untimed backward before each "
            "step: the guard's check runs in backward",
            _adamkit_torch_after_backward(),
        ),
        Candidate(
            "torch.fused+bwd",
            "torch.optim.Adam(fused=True), gradients from an untimed backward before each step",
            _torch_after_backward(fused=True),
        ),
        Candidate(
            "torch.default+bwd",
            "torch.optim.Adam() (its CPU default: one tensor at a time), gradients from an "
            "untimed backward before each step",
            _torch_after_backward(),
        ),
        Candidate("torch.single", "torch.optim.Adam(foreach=False)", _torch_optim(foreach=False)),
        Candidate("torch.foreach", "torch.optim.Adam(foreach=True)", _torch_optim(foreach=True)),
        Candidate(BASELINE, "torch.optim.Adam(fused=True)", _torch_optim(fused=True)),
        Candidate("numpy.textbook", "textbook NumPy Adam (temporaries)", _setup_textbook),
        Candidate("numpy.inplace", "NumPy ufunc chain with out= (no temporaries)", _setup_inplace),
        Candidate("optax", "optax.adam under jax.jit", _setup_optax),
        Candidate("fwd+bwd", "app layouts: forward + backward, batch 256", _setup_fwd_bwd),
        Candidate(
            "adamkit.torch[bf16]",
            "adamkit.torch.Adam(state='bf16', guard=False): bf16 moments, stochastic rounding",
            _adamkit_torch_state("bf16", guard=False),
        ),
        Candidate(
            "adamkit.torch[int8]",
            "adamkit.torch.Adam(state='int8', guard=False): block-wise 8-bit moments (256)",
            _adamkit_torch_state("int8", guard=False),
        ),
        Candidate(
            "adamkit.torch[bf16]+guard",
            "adamkit.torch.Adam(state='bf16'), default guard",
            _adamkit_torch_state("bf16"),
        ),
        Candidate(
            "adamkit.torch[int8]+guard",
            "adamkit.torch.Adam(state='int8'), default guard",
            _adamkit_torch_state("int8"),
        ),
        Candidate(
            "adamkit.torch[bf16]+bwd",
            "adamkit.torch.Adam(state='bf16'), default guard, gradients from an untimed backward",
            _adamkit_torch_after_backward("bf16"),
        ),
        Candidate(
            "adamkit.torch[int8]+bwd",
            "adamkit.torch.Adam(state='int8'), default guard, gradients from an untimed backward",
            _adamkit_torch_after_backward("int8"),
        ),
        Candidate(
            "adamkit.torch[int8-companded-64]+bwd",
            "adamkit.torch.Adam(state='int8-companded-64'), default guard, gradients from an "
            "untimed backward",
            _adamkit_torch_after_backward("int8-companded-64"),
        ),
        Candidate(
            "adamkit.torch[int8-companded]",
            "adamkit.torch.Adam(state='int8-companded', guard=False): companded, blocks of 32",
            _adamkit_torch_state("int8-companded", guard=False),
        ),
        Candidate(
            "adamkit.numpy[bf16]", "adamkit.numpy.Adam(state='bf16')", _adamkit_numpy_state("bf16")
        ),
        Candidate(
            "adamkit.numpy[int8]", "adamkit.numpy.Adam(state='int8')", _adamkit_numpy_state("int8")
        ),
        Candidate(
            "adamkit.kernels[bf16]",
            "kernels.stored.adam_update_stored_ on NumPy arrays, state 'bf16'",
            _setup_kernel_stored("bf16"),
        ),
        Candidate(
            "adamkit.kernels[int8]",
            "kernels.stored.adam_update_stored_ on NumPy arrays, state 'int8' (small: fp32)",
            _setup_kernel_stored("int8"),
        ),
        Candidate(
            "bnb.Adam8bit",
            "bitsandbytes.optim.Adam8bit (block-wise 8-bit state; not a dependency)",
            _setup_bnb_adam8bit,
        ),
        Candidate(
            "torchao.AdamW8bit",
            "torchao.optim.AdamW8bit(weight_decay=0), 8-bit state, torch.compile; not a dependency",
            _setup_torchao_adamw8bit,
        ),
    )
}
SLOW_CANDIDATES = ("bnb.Adam8bit", "torchao.AdamW8bit")
"""Left out of the default run: on a CPU their steps take seconds at 100M parameters (name them
with ``--candidates``)."""
DEFAULT_CANDIDATES = tuple(name for name in CANDIDATES if name not in SLOW_CANDIDATES)
QUICK_CANDIDATES = (
    FLOOR,
    "adamkit.kernels",
    "adamkit.numpy",
    "adamkit.torch",
    "adamkit.torch-noguard",
    "adamkit.torch+bwd",
    "torch.fused+bwd",
    "torch.foreach",
    BASELINE,
    "numpy.textbook",
)


# ---------------------------------------------------------------- measuring


@dataclass
class Timing:
    layout: str
    candidate: str
    n_params: int
    n_tensors: int
    times: list[float]
    state_nbytes: int | None = None

    @property
    def median(self) -> float:
        return float(np.median(self.times))


def _measure(
    layout: str,
    problem: Problem,
    names: Sequence[str],
    warmup: int,
    repeats: int,
    skipped: dict[str, str],
) -> list[Timing]:
    steps: dict[str, StepFn] = {}
    for name in names:
        try:
            steps[name] = CANDIDATES[name].setup(problem)
            for _ in range(warmup):
                _prepare(steps[name])
                steps[name]()
        except Skip as exc:
            skipped[name] = str(exc)
            steps.pop(name, None)
    order = list(steps)
    times: dict[str, list[float]] = {name: [] for name in order}
    clock = time.perf_counter
    for rep in range(repeats):
        shift = rep % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            fn = steps[name]
            _prepare(fn)
            start = clock()
            fn()
            times[name].append(clock() - start)
    n_params, n_tensors = problem.size, len(problem.params)
    return [
        Timing(layout, name, n_params, n_tensors, times[name], _state_nbytes(steps[name]))
        for name in order
    ]


def _prepare(step: StepFn) -> None:
    # The untimed part of a candidate's round (e.g. the backward pass producing its gradients).
    prepare = getattr(step, "prepare", None)
    if prepare is not None:
        prepare()


def _state_nbytes(step: StepFn) -> int | None:
    """Bytes of optimizer state the candidate holds, measured from its storage (None: unknown)."""
    nbytes = getattr(step, "state_nbytes", None)
    return int(nbytes()) if callable(nbytes) else None


def _summaries(timings: list[Timing]) -> list[dict[str, Any]]:
    rows = []
    by_layout: dict[str, dict[str, Timing]] = {}
    for t in timings:
        by_layout.setdefault(t.layout, {})[t.candidate] = t
    for t in timings:
        base = by_layout[t.layout].get(BASELINE)
        floor = by_layout[t.layout].get(FLOOR)
        q1, q3 = np.percentile(t.times, [25, 75])
        rows.append(
            {
                "layout": t.layout,
                "candidate": t.candidate,
                "n_params": t.n_params,
                "n_tensors": t.n_tensors,
                "median_ms": t.median * 1e3,
                "min_ms": min(t.times) * 1e3,
                "q1_ms": float(q1) * 1e3,
                "q3_ms": float(q3) * 1e3,
                "mparams_per_s": t.n_params / t.median / 1e6,
                "vs_torch_fused": base.median / t.median if base else None,
                "pct_of_floor": 100.0 * floor.median / t.median if floor else None,
                "state_nbytes": t.state_nbytes,
                "state_bytes_per_param": (
                    t.state_nbytes / t.n_params if t.state_nbytes is not None else None
                ),
                "times_ms": [x * 1e3 for x in t.times],
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    width = max([17, *(len(r["candidate"]) for r in rows)])
    head = f"{'layout':<9} {'candidate':<{width}} {'ms/step':>9} {'min ms':>9} {'IQR ms':>15}"
    head += f" {'Mparam/s':>9}"
    head += f" {'x fused':>8} {'% floor':>8} {'B/param':>8}"
    lines = [head, "-" * len(head)]
    layout = None
    for r in rows:
        if layout is not None and r["layout"] != layout:
            lines.append("")
        layout = r["layout"]
        iqr = f"{r['q1_ms']:.3g}-{r['q3_ms']:.3g}"
        lines.append(
            f"{r['layout']:<9} {r['candidate']:<{width}} {r['median_ms']:>9.3f} "
            f"{r['min_ms']:>9.3f} {iqr:>15} "
            f"{r['mparams_per_s']:>9.1f} {fmt(r['vs_torch_fused'], '8.2f')} "
            f"{fmt(r['pct_of_floor'], '8.1f')} {fmt(r['state_bytes_per_param'], '8.2f')}"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    for module in ("torch", "numba", "jax"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        info[module] = mod.__version__
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
        info["numba_threading_layer"] = numba.config.THREADING_LAYER
    except ImportError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------- command line


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in names if x not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from "
                f"{', '.join(choices)}"
            )
        return names

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``adamkit bench`` options to ``parser``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small run: layouts {','.join(QUICK_LAYOUTS)}, candidates "
        f"{','.join(QUICK_CANDIDATES)}, 5 repeats (explicit options still win)",
    )
    parser.add_argument(
        "--layouts",
        type=_csv(tuple(LAYOUTS)),
        help=f"comma-separated, from {','.join(LAYOUTS)} (default: all)",
    )
    parser.add_argument(
        "--candidates",
        type=_csv(tuple(CANDIDATES)),
        help=f"comma-separated, from {','.join(CANDIDATES)} (default: all but "
        f"{', '.join(SLOW_CANDIDATES)})",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per candidate (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for torch and numba alike (default: their defaults, all usable cores)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every timing to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`configure_parser`); return 0."""
    layouts = args.layouts or list(QUICK_LAYOUTS if args.quick else DEFAULT_LAYOUTS)
    names = args.candidates or list(QUICK_CANDIDATES if args.quick else DEFAULT_CANDIDATES)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    if repeats < 1 or args.warmup < 1:
        raise SystemExit("adamkit bench: --repeats and --warmup must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"adamkit bench: --threads must be at least 1, got {args.threads}")
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
        try:
            import numba

            numba.set_num_threads(args.threads)
        except ImportError:
            pass
    dtype = np.dtype(args.dtype)
    load_before = _load()
    skipped: dict[str, str] = {}
    timings: list[Timing] = []
    for layout in layouts:
        problem = Problem(layout_shapes(layout), dtype, layout)
        print(
            f"# {layout}: {problem.size:,} parameters in {len(problem.params):,} tensors "
            f"({LAYOUTS[layout][0]}), {repeats} rounds",
            file=sys.stderr,
            flush=True,
        )
        timings += _measure(layout, problem, names, args.warmup, repeats, skipped)
        del problem
        gc.collect()
    rows = _summaries(timings)
    load_after = _load()
    print(_table(rows))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    notes = []
    if load_before is not None and max(load_before, load_after or 0.0) > 0.5:
        notes.append(
            f"load average {load_before:.2f} before / {load_after:.2f} after: other processes "
            "shared the CPU, so expect noise (medians of interleaved rounds limit its effect)"
        )
    for note in notes:
        print(f"note: {note}")
    if args.json:
        report = {
            "settings": {
                "layouts": layouts,
                "candidates": names,
                "repeats": repeats,
                "warmup": args.warmup,
                "dtype": dtype.name,
                "lr": LR,
                "betas": [BETA1, BETA2],
                "eps": EPS,
            },
            "machine": _machine(),
            "load_average": [load_before, load_after],
            "descriptions": {n: CANDIDATES[n].description for n in names},
            "results": rows,
            "skipped": skipped,
            "notes": notes,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    return 0
