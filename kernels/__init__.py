"""The hot ops of the model, each in one file with its Triton kernels and its PyTorch reference.

The seam: every op module defines ``VARIANTS``, a plain dict from variant name to a callable with the
op's signature (documented in the module). ``torch`` is always the reference. The model, the
benchmarks and the tests all pick implementations through ``get(op, variant)``, and the tests iterate
``variants(op)``, so a variant added to an op's ``VARIANTS`` is regression-tested without a new test.
"""

from __future__ import annotations

import importlib

# op name -> module that implements it. Adding an op means adding one line here.
OP_MODULES = {
    "attention": "kernels.attention",
    "mlp": "kernels.mlp",
    "cross_entropy": "kernels.cross_entropy",
    "newton_schulz": "kernels.newton_schulz",
    "polar_express": "kernels.polar_express",
    "varlen_attention": "kernels.varlen_attention",
    "mtp_cross_entropy": "kernels.mtp_cross_entropy",
    "mlp_fp8": "kernels.mlp_fp8",
    "quantize_down": "kernels.quantize_down",
}


def _module(op: str):
    if op not in OP_MODULES:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OP_MODULES)}")
    return importlib.import_module(OP_MODULES[op])


def variants(op: str) -> list[str]:
    """Names of the variants of ``op`` that can run on this machine (``torch`` first)."""
    return list(_module(op).VARIANTS)


def get(op: str, variant: str):
    """The callable implementing ``op`` with ``variant``."""
    table = _module(op).VARIANTS
    if variant not in table:
        raise ValueError(f"op {op!r} has no variant {variant!r}; variants: {', '.join(table)}")
    return table[variant]


def resolve(variant: str, ops=None) -> dict:
    """One implementation per op for a kernel set name (``torch`` or ``triton``), as a model uses them:
    every op of ``ops`` (default: all of OP_MODULES). An op without that variant is an error."""
    return {op: get(op, variant) for op in (OP_MODULES if ops is None else ops)}
