"""Adam as record #89 runs it (spec recipe-frontier.md section 3.3), one parameter (or shard) at a time.

    m <- b1 m + (1 - b1) g;    v <- b2 v + (1 - b2) g^2                  fp32 state, starting at 0
    U = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)         eps is added to the uncorrected sqrt(v)
    U <- U + [U P > 0] P * wd                                           cautious decay: strict >, none where U = 0
    P <- P - U                                                          in fp32, rounded to P's dtype (bf16: RNE)

t counts this parameter's updates (record #89 updates its Adam parameters on odd steps only, with the
sum of two steps' gradients: speedrun/optim/record89.py). ``wd`` is the decay coefficient per update,
lr**2 * weight_decay * wd_mul in the record. Scalars reach the tensors as fp32, as the record's 0-d fp32
tensors do.
"""

from __future__ import annotations

import torch


def new_adam_state(like: torch.Tensor) -> dict:
    """Zero moments (fp32, ``like``'s shape and device) and a step count of 0."""
    exp_avg = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return {"step": 0, "exp_avg": exp_avg, "exp_avg_sq": torch.zeros_like(exp_avg)}


@torch.no_grad()
def adam_update(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float],
                eps: float, wd: float) -> None:
    """One update of ``p`` in place (any float dtype) from ``grad`` (same shape, any float dtype)."""
    beta1, beta2 = betas
    state["step"] += 1
    t = state["step"]
    step_size = lr * ((1 - beta2**t) ** 0.5 / (1 - beta1**t))
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    decay = (update * p) > 0
    update.addcmul_(p, decay, value=wd)
    p.sub_(update)
