"""Muon, the Sub3Min recipe's optimizer for the matrices inside the blocks (spec recipe-sub3min.md section 3).

The trainer's order within a step: forward/backward per micro-step, average the grads over micro-steps
and all-reduce them (AVG) across ranks, ``set_schedules(opts, step, cfg)``, ``opt.step()`` for every
optimizer in the returned order, then ``zero_grad(set_to_none=True)``. So no optimizer here reduces
gradients: they arrive identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The collective was renamed in recent PyTorch; the old name warns there but is the only one in older
# releases. A flat (world_size * numel) output buffer is accepted by both NCCL and Gloo.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, as in the recipe (spec section 3).

    For each matrix W with gradient G and momentum buffer M (fp32, starts at 0):
        M <- mu M + (1 - mu) G;   U = (1 - mu) G + mu M   (Nesterov form)
        X = newton_schulz(U)      (bf16; a (3, d, d) qkv weight is a batch of three d x d matrices)
        W <- W - lr * sqrt(max(1, rows / cols)) * X        (rows, cols: the last two dims; no weight decay)

    Work is split across ranks when torch.distributed is initialised with world size > 1. Parameters are
    grouped by element count (one param group per size); each group is walked in chunks of world_size,
    rank r computes the update of parameter (chunk start + r), and an async all-gather collects the
    chunk's bf16 updates, waited on only after the next chunk's compute has been issued. Every rank then
    applies all of them; a rank with no parameter in a final partial chunk sends a dummy. Because the
    update is bf16 in either case and applied identically, one process computes exactly what W processes
    do. A parameter's momentum buffer lives only on the rank that owns it.

    ``newton_schulz`` is ``ops["newton_schulz"]`` from ``kernels.resolve(variant)``.
    """

    def __init__(self, params, newton_schulz, lr: float = 0.05, momentum: float = 0.95, ns_steps: int = 5,
                 ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                 ns_dtype: torch.dtype = torch.bfloat16):
        params = list(params)
        if not params:
            raise ValueError("params is empty: Muon needs at least one matrix")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors (Muon groups them itself), got {type(p).__name__}")
            if p.dim() < 2:
                raise ValueError(f"params must be >= 2-D matrices, got a parameter of shape {tuple(p.shape)}")
        if not callable(newton_schulz):
            raise TypeError("newton_schulz must be callable: ops['newton_schulz'] from kernels.resolve()")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        by_size: dict[int, list] = {}
        for p in params:
            by_size.setdefault(p.numel(), []).append(p)
        groups = [{"params": group} for group in by_size.values()]
        if ns_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"ns_dtype must be bfloat16, float16 or float32, got {ns_dtype}")
        # ns_dtype is the Newton-Schulz compute dtype and the dtype updates are exchanged in: bf16 in the
        # recipe; the CPU presets use fp32 because bf16 matmuls are slow on CPUs.
        self.ns_dtype = ns_dtype
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, ns_coeffs=tuple(ns_coeffs))
        super().__init__(groups, defaults)
        self.newton_schulz = newton_schulz

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = _rank_and_world_size()
        for group in self.param_groups:
            self._step_group(group, rank, world_size)
        return loss

    def _step_group(self, group: dict, rank: int, world_size: int):
        params = group["params"]
        numel = params[0].numel()
        if any(p.numel() != numel for p in params):
            raise ValueError("every parameter of a Muon param group must have the same number of elements")
        pending = None  # (all-gather handle, gathered buffer, chunk) of the previous chunk
        for start in range(0, len(params), world_size):
            chunk = params[start:start + world_size]
            if start + rank < len(params):
                update = self._orthogonalised_update(params[start + rank], group).flatten()
            else:
                update = torch.zeros(numel, dtype=self.ns_dtype, device=params[0].device)  # dummy
            if world_size == 1:
                self._apply(chunk, update, group)
                continue
            gathered = torch.empty(world_size * numel, dtype=self.ns_dtype, device=update.device)
            handle = _all_gather_into_tensor(gathered, update, async_op=True)
            if pending is not None:
                self._wait_and_apply(*pending, group)
            pending = (handle, gathered, chunk)
        if pending is not None:
            self._wait_and_apply(*pending, group)

    def _orthogonalised_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Momentum step for p, then Newton-Schulz: the bf16 update direction (p's shape)."""
        if p.grad is None:
            raise RuntimeError(f"Muon parameter of shape {tuple(p.shape)} has no gradient; every Muon "
                               "parameter must receive one each step (ranks would desynchronise otherwise)")
        grad = p.grad.float()
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - mu)  # M <- mu M + (1 - mu) G
        nesterov = grad.lerp(buf, mu)  # U = (1 - mu) G + mu M
        update = self.newton_schulz(nesterov, group["ns_steps"], group["ns_coeffs"], dtype=self.ns_dtype)
        return update.to(self.ns_dtype)

    def _wait_and_apply(self, handle, gathered: torch.Tensor, chunk: list, group: dict):
        handle.wait()
        self._apply(chunk, gathered, group)

    @staticmethod
    def _apply(chunk: list, updates: torch.Tensor, group: dict):
        """W <- W - lr * shape factor * X for each parameter of the chunk; updates is (len >= chunk) x numel."""
        updates = updates.view(-1, chunk[0].numel())[:len(chunk)]  # rows past the chunk are dummies
        for p, update in zip(chunk, updates, strict=True):
            shape_factor = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            p.add_(update.view_as(p), alpha=-group["lr"] * shape_factor)
