"""Record #89's optimizer: NorMuon on the three weight banks, Adam on everything else (spec recipe-frontier.md
sections 3.1-3.6). One object steps every parameter of the model, found by its label (the model's name for
it without ".weight": "qk_bank", "embed", "lm_head", ...).

A step (``step(plan)`` with the step's speedrun.schedule.StepPlan):

1. Reductions, in PARAM_TABLE order: NorMuon gradients every step; Adam gradients only on Adam steps
   (odd steps), otherwise they stay in ``.grad`` and the next backward adds to them, so every Adam update
   sees the sum of two steps' gradients. While embed is tied to lm_head, an Adam step first adds
   embed.grad^T into lm_head.grad (bf16) and embed is not reduced. Gradients are averaged over ranks.
2. Updates, in WORK_ORDER (each reads only its own gradient and state, so the order does not change the
   math): NorMuon per matrix (speedrun/optim/normuon.py), Adam per element (speedrun/optim/adam.py).
3. While tied, after an Adam step: embed <- lm_head^T. Then the gradients just used are cleared.
4. At the plan's untie step (921), after its update: embed's Adam moments and step count <- lm_head's
   (transposed), and embed is trained on its own from the next step on.

Learning rates: every parameter's lr is its optimizer's base lr x the schedule's multiplier (plan.lr_mul)
x its table lr_mul. NorMuon also multiplies by sqrt(max(1, R / C)) of its matrices and by 2 for the MLP's
output projections (odd matrices of mlp_bank); its decay coefficient is weight_decay x base lr x schedule
(x wd_mul). Adam's decay per update is lr^2 x weight_decay x wd_mul.

Across W processes (speedrun.dist): a bank's matrices are split into W contiguous chunks; the gradients are
reduce-scattered (AVG), each process updates its own matrices (and alone holds their NorMuon state), and the
new weights are all-gathered. Adam parameters marked ``shard`` whose first dim W divides are split the same
way along dim 0; the rest are all-reduced and updated on every process. Each matrix and element is updated
by the same arithmetic wherever it runs, so W processes compute what one process computes from the same
averaged gradients (the record's sparse bigram exchange is a dense reduce-scatter here: the same sum).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from speedrun.config import RunConfig
from speedrun.optim.adam import adam_update, new_adam_state
from speedrun.optim.normuon import new_normuon_state, normuon_update


@dataclass(frozen=True)
class ParamSpec:
    optim: str  # "normuon" or "adam"
    betas: tuple[float, float] | None = None  # Adam
    lr_mul: float = 1.0
    wd_mul: float = 1.0
    shard: bool = False  # Adam: split along dim 0 across processes (when the world size divides it)


_NORMUON = ParamSpec("normuon")
# The record's table (T:1887-1932), in its reduction order.
PARAM_TABLE = {
    "qk_bank": _NORMUON,
    "vo_bank": _NORMUON,
    "mlp_bank": _NORMUON,
    "scalars": ParamSpec("adam", (0.9, 0.99), lr_mul=5.0, wd_mul=0.0),
    "smear_gate": ParamSpec("adam", (0.9, 0.99), lr_mul=0.01, wd_mul=0.0),
    "skip_gate": ParamSpec("adam", (0.9, 0.99), lr_mul=0.05, wd_mul=0.0),
    "attn_gate_bank": ParamSpec("adam", (0.9, 0.99)),
    "ve_gate_bank": ParamSpec("adam", (0.9, 0.99)),
    "lm_head": ParamSpec("adam", (0.5, 0.95), wd_mul=150.0, shard=True),
    "bigram_embed": ParamSpec("adam", (0.75, 0.95), lr_mul=75.0, wd_mul=5.0, shard=True),
    "post_lambdas": ParamSpec("adam", (0.9, 0.95), wd_mul=0.0),
    "x0_lambdas": ParamSpec("adam", (0.9, 0.95), wd_mul=0.0),
    "bigram_lambdas": ParamSpec("adam", (0.9, 0.95), wd_mul=0.0),
    "resid_lambdas": ParamSpec("adam", (0.9, 0.95), lr_mul=5.0, wd_mul=0.0),
    "xsa_alphas": ParamSpec("adam", (0.9, 0.95), wd_mul=0.0),
    "value_embeds": ParamSpec("adam", (0.75, 0.95), lr_mul=75.0, wd_mul=5.0, shard=True),
    "embed": ParamSpec("adam", (0.5, 0.95), wd_mul=150.0, shard=True),
    "mudd_w1": ParamSpec("adam", (0.9, 0.99), lr_mul=0.25),
    "mudd_w2": ParamSpec("adam", (0.9, 0.99), lr_mul=0.25),
    "mudd_b2": ParamSpec("adam", (0.9, 0.99), lr_mul=0.25, wd_mul=0.0),
}
# Small parameters first, the banks (Polar Express) last; lm_head before embed (embed copies it while tied).
WORK_ORDER = ("scalars", "smear_gate", "skip_gate", "attn_gate_bank", "ve_gate_bank", "mudd_b2", "xsa_alphas",
              "post_lambdas", "x0_lambdas", "bigram_lambdas", "resid_lambdas", "mudd_w2", "value_embeds",
              "bigram_embed", "mudd_w1", "lm_head", "embed", "qk_bank", "vo_bank", "mlp_bank")
# mlp_bank holds (layer, fc | proj) matrices: the output projections (odd flat index) get twice the lr.
PER_MATRIX_LR = {"mlp_bank": (1.0, 2.0)}


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NorMuonAdam:
    """Record #89's optimizer over ``params`` (label -> parameter, the labels of PARAM_TABLE exactly).

    ``polar_express`` is ``ops["polar_express"]`` from ``kernels.resolve(variant)``. NorMuon sees a bank
    parameter as (n, R, C): its last two dims are a matrix, the others are flattened. ``cfg.optim`` holds
    the base lrs, decays, beta2, the Polar Express coefficients and ns_dtype (its compute dtype).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: RunConfig, polar_express):
        missing, extra = set(PARAM_TABLE) - set(params), set(params) - set(PARAM_TABLE)
        if missing or extra:
            raise ValueError(f"record #89's optimizer needs exactly the labels of its table; missing "
                             f"{sorted(missing)}, unknown {sorted(extra)}")
        if not callable(polar_express):
            raise TypeError("polar_express must be ops['polar_express'] from kernels.resolve()")
        self.params, self.cfg, self.polar_express = dict(params), cfg.optim, polar_express
        self.ns_dtype = getattr(torch, cfg.optim.ns_dtype)
        self.rank, self.world_size = _rank_and_world_size()
        self.tied = True  # embed is lm_head^T until the plan's untie step
        self.state: dict[str, dict] = {}
        self._lr_factors: dict[str, torch.Tensor] = {}  # (own matrices, 1, 1): the per-matrix lr factor
        for label, p in self.params.items():
            if PARAM_TABLE[label].optim == "normuon":
                self.state[label] = new_normuon_state(self._own_matrices_shape(label), p.dtype, p.device)
                pattern = PER_MATRIX_LR.get(label, (1.0,))
                factors = [pattern[i % len(pattern)] for i in self._own_matrices(label)]
                self._lr_factors[label] = torch.tensor(factors, dtype=torch.float32, device=p.device).view(-1, 1, 1)
            else:
                self.state[label] = new_adam_state(self._adam_slice(label, p))

    # ---- layout across processes ----

    def _bank(self, label: str) -> torch.Tensor:
        p = self.params[label]
        return p.data.view(-1, *p.shape[-2:])

    def _matrices_per_rank(self, label: str) -> int:
        return math.ceil(self._bank(label).size(0) / self.world_size)

    def _own_matrices(self, label: str) -> range:
        n, chunk = self._bank(label).size(0), self._matrices_per_rank(label)
        return range(min(n, self.rank * chunk), min(n, (self.rank + 1) * chunk))

    def _own_matrices_shape(self, label: str) -> tuple[int, int, int]:
        return (len(self._own_matrices(label)), *self._bank(label).shape[1:])

    def _sharded(self, label: str) -> bool:
        p = self.params[label]
        return PARAM_TABLE[label].shard and self.world_size > 1 and p.size(0) % self.world_size == 0

    def _adam_slice(self, label: str, p: torch.Tensor) -> torch.Tensor:
        if not self._sharded(label):
            return p.data
        rows = p.size(0) // self.world_size
        return p.data[self.rank * rows:(self.rank + 1) * rows]

    # ---- the step ----

    @torch.no_grad()
    def step(self, plan) -> None:
        """Update every parameter from its ``.grad`` as step ``plan.step`` does (see the module docstring)."""
        do_adam, embed, lm_head = plan.adam_step, self.params["embed"], self.params["lm_head"]
        pending = {}
        for label, spec in PARAM_TABLE.items():
            p = self.params[label]
            if (spec.optim == "adam" and not do_adam) or p.grad is None:
                continue
            if label == "lm_head" and do_adam and self.tied and embed.grad is not None:
                p.grad.add_(embed.grad.T)
            if label == "embed" and self.tied:
                continue
            pending[label] = self._launch_reduce(label)
        gathers = []
        for label in WORK_ORDER:
            if label not in pending:
                continue
            work, grad = pending[label]
            if work is not None:
                work.wait()
            gathers.append(self._update(label, grad, plan))
        for gather in gathers:
            if gather is not None:
                gather()
        if do_adam and self.tied:
            embed.data.copy_(lm_head.data.T)
        for label, p in self.params.items():
            if PARAM_TABLE[label].optim == "normuon" or do_adam:
                p.grad = None
        if plan.untie:
            self.untie()

    def _launch_reduce(self, label: str):
        """(async work or None, this process's averaged gradient: its matrices, its rows, or all)."""
        grad = self.params[label].grad
        if self.world_size == 1:
            return None, (grad.view(-1, *grad.shape[-2:]) if PARAM_TABLE[label].optim == "normuon" else grad)
        if PARAM_TABLE[label].optim == "normuon":
            bank = grad.view(-1, *grad.shape[-2:])
            chunk = self._matrices_per_rank(label)
            padded = chunk * self.world_size
            if padded != bank.size(0):
                bank = torch.cat([bank, bank.new_zeros(padded - bank.size(0), *bank.shape[1:])])
            out = bank.new_empty(chunk, *bank.shape[1:])
            work = dist.reduce_scatter_tensor(out, bank.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
            return work, out[:len(self._own_matrices(label))]
        if self._sharded(label):
            out = grad.new_empty(grad.size(0) // self.world_size, *grad.shape[1:])
            return dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True), out
        return dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True), grad

    def _update(self, label: str, grad: torch.Tensor, plan):
        """Update this process's part of ``label``; returns a function that finishes its all-gather, or None."""
        spec, p, o = PARAM_TABLE[label], self.params[label], self.cfg
        if spec.optim == "adam":
            lr = o.adam_lr * plan.lr_mul * spec.lr_mul
            part = self._adam_slice(label, p)
            adam_update(part, grad, self.state[label], lr, spec.betas, o.adam_eps,
                        lr * lr * o.adam_weight_decay * spec.wd_mul)
            return self._gather(p.data, part) if self._sharded(label) else None
        bank = self._bank(label)
        own = self._own_matrices(label)
        base_lr = o.normuon_lr * plan.lr_mul
        lr_mul = max(1.0, bank.size(-2) / bank.size(-1)) ** 0.5 * spec.lr_mul
        # the per-matrix factors are 1 or 2, so factor * fp32(lr_mul * base_lr) is exactly fp32 of the product
        lrs = self._lr_factors[label] * (lr_mul * base_lr)
        if len(own):
            normuon_update(bank[own.start:own.stop], grad, self.state[label], lrs,
                           spec.wd_mul * o.normuon_weight_decay * base_lr, plan.momentum, o.normuon_beta2,
                           self.polar_express, o.polar_express_coeffs, self.ns_dtype)
        if self.world_size == 1:
            return None
        chunk = self._matrices_per_rank(label)
        if chunk * self.world_size == bank.size(0):
            return self._gather(bank, bank[own.start:own.stop])
        padded = bank.new_zeros(chunk * self.world_size, *bank.shape[1:])
        padded[self.rank * chunk:self.rank * chunk + len(own)] = bank[own.start:own.stop]
        gather = self._gather(padded, padded[self.rank * chunk:(self.rank + 1) * chunk])

        def finish():
            gather()
            bank.copy_(padded[:bank.size(0)])

        return finish

    @staticmethod
    def _gather(full: torch.Tensor, part: torch.Tensor):
        """Start the all-gather of every process's ``part`` into ``full``; returns its wait. ``part`` may be a
        view into ``full``: it is copied first."""
        work = dist.all_gather_into_tensor(full, part.clone(), async_op=True)
        return work.wait

    # ---- tie, state ----

    def untie(self) -> None:
        """embed takes lm_head's Adam moments (transposed) and step count, and trains on its own from now on."""
        lm, em = self.state["lm_head"], self.state["embed"]
        em["step"] = lm["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            full = lm[key]
            if self._sharded("lm_head"):
                full = full.new_empty(self.params["lm_head"].shape)
                dist.all_gather_into_tensor(full, lm[key].contiguous())
            rows = em[key].size(0)
            first = self.rank * rows if self._sharded("embed") else 0
            em[key].copy_(full.T[first:first + rows])
        self.tied = False

    def reset(self) -> None:
        """Back to the state before step 0 for what the model's restore does not cover: NorMuon's momentum,
        second moments and mantissas zeroed, embed tied again (the warm-up restore, spec 3.7)."""
        for label, state in self.state.items():
            if PARAM_TABLE[label].optim == "normuon":
                for key in ("momentum", "second_moment", "mantissa"):
                    if state[key] is not None:
                        state[key].zero_()
        self.tied = True

    def state_dict(self) -> dict:
        """A deep copy of every state tensor and step count, and the tie."""
        return {"tied": self.tied, "state": copy.deepcopy(self.state)}

    def load_state_dict(self, saved: dict) -> None:
        if set(saved.get("state", {})) != set(self.state):
            raise ValueError("state_dict from another optimizer: its labels differ")
        self.tied = bool(saved["tied"])
        for label, state in saved["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.state[label][key].copy_(value)
                else:
                    self.state[label][key] = value
