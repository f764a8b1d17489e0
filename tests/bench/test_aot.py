"""speedrun bench aot: every Triton kernel compiled for sm_90 and sm_80 without a GPU (bench/results/aot/aot.md).

Compiling every configuration takes minutes, so the suite checks the committed table: made from today's
kernel sources (a sha256 of kernels/*.py and the tool), every row compiled, within shared memory, without
spills. Editing a kernel makes this fail until the table is remade (`speedrun bench aot`). One compilation
does run here: a deliberately oversized configuration, which the tool must report.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from speedrun.bench import aot

pytest.importorskip("triton", reason="Triton is not installed: no kernels to compile")


def test_the_committed_table_is_current_and_every_kernel_compiles():
    import triton

    meta = aot.read_table()
    assert meta is not None, f"{aot.TABLE} is missing: run `speedrun bench aot` and commit it"
    if meta["triton"] != triton.__version__:
        pytest.skip(f"the table was made with Triton {meta['triton']}, this is {triton.__version__}: "
                    "run `speedrun bench aot` with this Triton")
    assert meta["sources_sha256"] == aot.kernel_sources_hash(), (
        "kernels/ changed since bench/results/aot/aot.md was made: run `speedrun bench aot` and commit the table")
    rows = [aot.Compiled(**r) for r in meta["rows"]]
    assert {r.target for r in rows} == set(aot.TARGETS)
    assert {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "_matmul_epilogue_jit", "_syrk_jit",
            "_ce_fwd_kernel"} <= {r.kernel for r in rows}
    assert {"float16", "bfloat16", "float32"} <= {d for r in rows for d in r.dtype.split("/")}
    bad = [f"{r.kernel} [{r.config}] {r.dtype} {r.target}: {r.status}" for r in rows if aot.failed(r)]
    assert not bad, "\n".join(bad)
    assert all(r.registers and r.shared_bytes is not None and r.spill_bytes is not None for r in rows)
    assert all(r.spill_bytes == 0 for r in rows if aot.recipe_configuration(r))


OVERSIZED = """
import triton
from speedrun.bench import aot
import kernels.newton_schulz as ns
ns._syrk_kernel.configs = [triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=8)]
launch = next(launch for launch in aot.capture() if launch[0].__name__ == "_syrk_jit"
              and launch[2].get("num_stages") == 8 and launch[1][0].dtype.itemsize == 4)
row = aot.compile_launch(*launch, "sm_80")
print(row.shared_bytes, row.status)
"""


def test_an_oversized_configuration_fails():
    """A syrk config with 8 pipeline stages of 64 x 128 fp32 tiles: some 450 KB of shared memory, far past
    sm_80's 163 KB (a small tile, so it compiles in seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", OVERSIZED], cwd=aot.REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    shared, status = out.stdout.split(maxsplit=1)
    assert int(shared) > 300_000 and "shared memory; sm_80 has 166912" in status, out.stdout


FP64_FLOATS = """
from triton._C.libtriton import ir
from triton.compiler import make_backend
from speedrun.bench import aot
checked, bad = set(), []
for fn, args, kwargs, _ in aot.capture():
    target, source, options, row, key = aot.specialise(fn, args, kwargs, "sm_90")
    floats = [name for name, kind in source.signature.items() if kind == "fp32"]
    if not floats or key in checked:
        continue
    checked.add(key)
    for name in floats:
        source.signature[name] = "fp64"
    backend = make_backend(target)
    options = backend.parse_options(options.__dict__)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    try:
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
    except Exception as e:
        bad.append(f"{fn.__name__} [{row.config}]: {str(e).splitlines()[-1]}")
        continue
    fp64_ops = [line.strip() for line in str(module).splitlines() if "f64" in line
                and not line.strip().startswith("tt.func") and "arith.truncf" not in line]
    if fp64_ops:
        bad.append(f"{fn.__name__} [{row.config}]: fp64 arithmetic: {fp64_ops[0][:100]}")
print(len(checked))
print("\\n".join(bad))
"""


def test_kernels_take_inductors_fp64_floats():
    """torch.compile (Inductor, torch 2.11 on the GPU machine) types a Triton kernel's Python float arguments as
    fp64, where Triton's own launcher says fp32. Every kernel must then build the same fp32 arithmetic: cast at
    entry, no fp64 op after it (the H100 run of 2026-11-27 failed to compile the cross-entropy kernel: a
    loop-carried sum turned fp64). Builds each launch's Triton IR with fp64 floats, for sm_90, no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", FP64_FLOATS], cwd=aot.REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    checked, *bad = out.stdout.strip().split("\n")
    assert int(checked) >= 60, out.stdout  # the syrk, cross-entropy, MTP and quantisation kernels' launches
    assert not [b for b in bad if b], "\n".join(bad)
