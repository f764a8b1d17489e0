"""``speedrun bench aot``: every Triton kernel of every registered variant, compiled ahead of time for the
GPUs we race on, with no GPU: sm_90 (H100) and sm_80 (A100).

1. Capture: each op's Triton variant runs forward and backward on CPU tensors, over the dtypes (fp16, bf16,
   fp32), head dims, sizes and flags its launchers produce, with every kernel launch intercepted instead of
   run: a plain kernel is recorded with its arguments; an autotuned one once per autotune config. Nothing
   executes (the outputs stay uninitialised), so the sizes can be the recipe's.
2. Compile each distinct (kernel, specialisation, config) for each target (kernels with e4m3 operands for
   sm_90 only: FP8 MMAs need sm_89+, the A100 runs the bf16 path) with Triton's own compiler, its
   own argument specialisation (alignment, constants) and the ptxas it ships; ptxas -v then reports the
   registers and spills. Shared memory comes from the compiled kernel's metadata.
3. A row fails when the kernel does not compile, needs more shared memory than the target has, or spills
   registers in a configuration the race uses: bf16 on the H100 (every capture comes from a recipe-width
   launch; autotuned kernels may pick any of their configs). Spills elsewhere (fp16/fp32 test kernels,
   the A100) are listed as such.

The table goes to ``bench/results/aot/aot.md`` (committed) with the sha256 of the kernel sources and the
Triton version it was made from; ``check_cached`` lets the test suite skip the minutes of compiling when
neither has changed since (``--force`` recompiles regardless).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from speedrun import REPO_ROOT

TABLE = REPO_ROOT / "bench" / "results" / "aot" / "aot.md"
TARGETS = {"sm_90": (90, 32, 232448), "sm_80": (80, 32, 166912)}  # capability, threads per warp, max shared bytes


@dataclass
class Compiled:
    kernel: str
    config: str  # the launch's constexprs and options, as compiled
    dtype: str
    target: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    status: str  # "ok", or why not
    recipe: bool = True  # a launch at the recipe's widths made this specialisation


def kernel_sources_hash() -> str:
    """sha256 of every kernel file (kernels/*.py) and of this module: what the table was computed from."""
    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "kernels").glob("*.py")) + [Path(__file__)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. Capture the launches
# ---------------------------------------------------------------------------------------------


_RECIPE = {"on": True}  # whether the launches being driven use the recipe's widths


@contextlib.contextmanager
def _recipe(on: bool):
    previous, _RECIPE["on"] = _RECIPE["on"], on
    try:
        yield
    finally:
        _RECIPE["on"] = previous


@contextlib.contextmanager
def every_config(on_launch):
    """Each kernel launch handed to ``on_launch(launch, fn, args, kwargs)`` in place of running it (``launch()``
    runs it); an autotuned kernel is launched once with each config its pruning keeps, not tuned."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    kernel_classes = (jit.JITFunction, interpreter.InterpretedFunction)  # the GPU's, the CPU interpreter's
    saved = {cls: cls.run for cls in kernel_classes}

    def handing_over(original):
        def run(self, *args, grid, warmup, **kwargs):
            return on_launch(lambda: original(self, *args, grid=grid, warmup=warmup, **kwargs), self, args, kwargs)
        return run

    def each_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))  # the rest come as keywords
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    saved_autotuner = autotuner.Autotuner.run
    for cls in kernel_classes:
        cls.run = handing_over(saved[cls])
    autotuner.Autotuner.run = each_config
    try:
        yield
    finally:
        for cls in kernel_classes:
            cls.run = saved[cls]
        autotuner.Autotuner.run = saved_autotuner


@contextlib.contextmanager
def gpu_path():
    """The launchers' GPU path (autotuned kernels, GPU tile choices) on CPU tensors."""
    import importlib

    import kernels

    modules = [importlib.import_module(name) for name in
               ("kernels.common", "kernels.matmul_tiles", *kernels.OP_MODULES.values())]
    saved = []
    for m in modules:
        for name, value in (("interpreting", lambda: False), ("triton_usable", lambda device: True)):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def drive_ops(device="cpu", only=None) -> None:
    """Forward and backward of every Triton variant over what its launchers can produce (see module doc), on
    ``device``; only the ops named in ``only`` if given."""
    import torch

    import kernels

    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    # Sizes: the recipe's widths (they decide the kernels' K loops and tiles); few tokens (the row count
    # changes nothing compiled, and the launchers' own torch matmuls do run on the CPU).
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    ops = {op: kernels.get(op, "triton") for op in kernels.OP_MODULES
           if "triton" in kernels.variants(op) and (only is None or op in only)}
    for dtype in dtypes:
        if "attention" in ops:
            for D in (64, 128):
                q, k, v = (leaf(1, 256, 6, D, dtype=dtype) for _ in range(3))
                doc_ids = torch.zeros(1, 256, dtype=torch.int32, device=device)
                ops["attention"](q, k, v, doc_ids, 4, 0.12, 128).sum().backward()
        if "varlen_attention" in ops:  # the same kernels with blocks of one token (a specialisation of its own)
            q, k, v = (leaf(256, 6, 128, dtype=dtype) for _ in range(3))
            cu = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)
            ops["varlen_attention"](q, k, v, cu, 64, 0.12).sum().backward()
        if "mlp" in ops:
            for M, dim, hidden in ((64, 768, 3072), (64, 200, 600)):  # K multiples of BLOCK_K, and not
                x, w_fc = leaf(M, dim, dtype=dtype), leaf(hidden, dim, dtype=dtype)
                with _recipe(dim == 768):
                    ops["mlp"](x, w_fc, leaf(dim, hidden, dtype=dtype)).sum().backward()
        if "cross_entropy" in ops:
            z = leaf(64, 50304, dtype=dtype)
            targets = torch.randint(0, 50304, (64,), generator=g).to(device)
            ops["cross_entropy"](z, targets, 30.0, 7.5).backward()
        if "mtp_cross_entropy" in ops and dtype != torch.float16:  # its Triton variant takes fp32 and bf16
            x, w = leaf(64, 768, dtype=dtype), leaf(768, 50304, dtype=dtype)
            targets = torch.randint(0, 50304, (64,), generator=g).to(device)
            for fp8 in (False, True) if dtype == torch.bfloat16 else (False,):  # G in x's dtype, or e5m2
                ops["mtp_cross_entropy"](x, w, targets, (1.0, 0.5, 0.25), fp8=fp8).sum().backward()
        if "mlp_fp8" in ops and dtype == torch.bfloat16:  # record #89's FP8 MLP: bf16 activations only
            from kernels.mlp_fp8 import activation_scale, quantize_up
            from kernels.quantize_down import quantize_down_torch as quantize_down

            w_fc, w_proj = leaf(3072, 768, dtype=dtype), leaf(3072, 768, dtype=dtype)
            up8, up_scale = quantize_up(w_fc.detach())
            down8, down_scale, _ = quantize_down(w_proj.detach(), None, bootstrap=True)
            out, _ = ops["mlp_fp8"](leaf(64, 768, dtype=dtype), w_fc, w_proj, up8, up_scale, down8, down_scale,
                                    activation_scale(torch.tensor(4.0)))
            out.float().sum().backward()
        if "quantize_down" in ops and dtype != torch.float16:  # the bank's down weights: bf16, or fp32 (CPU runs)
            w = torch.randn(2, 2, 96, 768, generator=g).to(device, dtype)[:, 1]  # no K loop: any size compiles alike
            for bootstrap in (True, False):
                ops["quantize_down"](w, torch.ones(2, device=device), bootstrap)
        for op in ("newton_schulz", "polar_express"):
            if op in ops:  # Gram matrices of 768-wide and 200-wide rows (K a multiple of BLOCK_K, and not)
                for shape in ((2, 64, 768), (768, 64), (100, 200)):
                    G = torch.randn(*shape, generator=g).to(device)
                    with torch.no_grad(), _recipe(768 in shape):
                        if op == "newton_schulz":
                            ops[op](G, dtype=dtype)
                        else:
                            ops[op](G, ((1.0, -1.0, 0.5),), dtype=dtype)


def capture() -> list:
    """Every kernel launch of the Triton variants: [(jit function, args, kwargs, recipe widths?), ...]."""
    launches: list = []
    with gpu_path(), every_config(lambda launch, fn, args, kwargs: launches.append((fn, args, kwargs, _RECIPE["on"]))):
        drive_ops()
    return launches


# ---------------------------------------------------------------------------------------------
# 2. Compile
# ---------------------------------------------------------------------------------------------


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself uses for this architecture (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def _describe(fn, args, kwargs, constexprs: dict, options) -> tuple[str, str]:
    """(config text, dtype) of a launch, for the table."""
    names = [p.name for p in fn.params]
    consts = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    config = ", ".join(f"{k}={v}" for k, v in sorted(consts.items())
                       if k not in ("DOT_PRECISION",))
    config += f", warps={options.num_warps}, stages={options.num_stages}"
    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "dtype")})
    return config, "/".join(dtypes)


def specialise(fn, args, kwargs, target_name: str):
    """Triton's own specialisation of a launch for a target: (target, source, options, table row)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cap, warp, _ = TARGETS[target_name]
    target = GPUTarget("cuda", cap, warp)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    config, dtype = _describe(fn, args, kwargs, constexprs, options)
    key = repr((sorted(signature.items()), sorted(constexprs.items()), sorted(map(str, attrs.items()))))
    row = Compiled(fn.__name__, config, dtype, target_name, None, None, None, "ok")
    return target, ASTSource(fn, signature, constexprs, attrs), options, row, key


def compile_launch(fn, args, kwargs, recipe: bool, target_name: str) -> Compiled:
    """Compile one captured launch for one target and check it (registers, spills, shared memory)."""
    target, source, options, row, _ = specialise(fn, args, kwargs, target_name)
    row.recipe = recipe
    return compile_source(target, source, options, row)


def compile_source(target, source, options, row: Compiled) -> Compiled:
    from triton.compiler import compile

    cap, _, max_shared = TARGETS[row.target]
    try:
        kernel = compile(source, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row of the table
        row.status = f"does not compile: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return row
    row.shared_bytes = int(kernel.metadata.shared)
    row.registers, row.spill_bytes = _ptxas_usage(kernel.asm["ptx"], cap)
    if row.shared_bytes > max_shared:
        row.status = f"needs {row.shared_bytes} B of shared memory; {row.target} has {max_shared}"
    elif row.spill_bytes and recipe_configuration(row):
        row.status = f"spills {row.spill_bytes} bytes of registers"
    elif row.spill_bytes:
        row.status = f"ok, but spills {row.spill_bytes} bytes (not the race's configuration)"
    return row


def recipe_configuration(row: Compiled) -> bool:
    """Whether the race can run this compilation: made by a launch at the recipe's widths, in its dtype (bf16),
    for its GPU (the H100, sm_90). The others (fp16 and fp32 kernels for tests and CPU-sized runs, other
    widths, the A100) are checked for compiling and shared memory; their spills are listed, not failures."""
    return row.recipe and row.target == "sm_90" and "bfloat16" in row.dtype.split("/")


def failed(row: Compiled) -> bool:
    return not row.status.startswith("ok")


def _ptxas_usage(ptx: str, capability: int) -> tuple[int | None, int | None]:
    """(registers, spill store + load bytes) as ptxas -v reports them for the PTX."""
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(f"ptxas failed on a kernel Triton compiled: {text.strip()[:300]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs[1]) if regs else None), (sum(spills) if spills else None)


def compile_all(launches: list, log=print) -> list[Compiled]:
    """Each distinct specialisation of the launches, compiled once per target."""
    import torch

    unique = {}
    for fn, args, kwargs, recipe in launches:
        e4m3_dots = any(getattr(a, "dtype", None) == torch.float8_e4m3fn for a in args)
        for target_name in TARGETS:
            if e4m3_dots and TARGETS[target_name][0] < 89:  # FP8 MMAs need sm_89+: the A100 runs the bf16 path
                continue
            target, source, options, row, key = specialise(fn, args, kwargs, target_name)
            key = (fn.__name__, target_name, key)
            if key in unique:
                unique[key][3].recipe |= recipe  # a recipe-width launch anywhere makes it the race's
            else:
                row.recipe = recipe
                unique[key] = (target, source, options, row)
    log(f"{len(unique)} distinct compilations")
    return [compile_source(*item) for item in unique.values()]


# ---------------------------------------------------------------------------------------------
# 3. The table
# ---------------------------------------------------------------------------------------------


def table_text(rows: list[Compiled], sources: str, triton_version: str) -> str:
    bad = [r for r in rows if failed(r)]
    spilling = [r for r in rows if r.spill_bytes and not failed(r)]
    lines = ["# Triton kernels compiled ahead of time (no GPU): sm_90 (H100) and sm_80 (A100)", "",
             f"Made by `speedrun bench aot` with Triton {triton_version}; kernel sources sha256 `{sources}`.",
             f"{len(rows)} compilations, {len(bad)} failing; {len(spilling)} spill registers outside the race's "
             "configuration (bf16 on sm_90). Shared memory limits: sm_90 232,448 B, sm_80 166,912 B per block.",
             "",
             "| kernel | config | dtype | recipe widths | target | registers | spill bytes | shared bytes | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.kernel} | {r.config} | {r.dtype} | {'yes' if r.recipe else 'no'} | {r.target} | {r.registers} "
              f"| {r.spill_bytes} | {r.shared_bytes} | {r.status} |" for r in rows]
    meta = {"sources_sha256": sources, "triton": triton_version, "rows": [asdict(r) for r in rows]}
    return "\n".join(lines) + "\n\n<!-- aot " + json.dumps(meta) + " -->\n"


def read_table(path: Path = TABLE) -> dict | None:
    if not path.is_file():
        return None
    m = re.search(r"<!-- aot (.*) -->", path.read_text())
    return json.loads(m[1]) if m else None


def check_cached() -> dict | None:
    """The committed table's data if it was made from today's kernel sources and Triton version, else None."""
    import triton

    meta = read_table()
    if meta and meta["sources_sha256"] == kernel_sources_hash() and meta["triton"] == triton.__version__:
        return meta
    return None


def run(force: bool = False, out: Path = TABLE, log=print) -> list[Compiled]:
    """Capture, compile, write the table; with a cached table (same sources, same Triton) and no ``force``,
    its rows."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("speedrun bench aot compiles for GPUs: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    if not force and out == TABLE and (meta := check_cached()) is not None:
        log(f"{out.relative_to(REPO_ROOT)} is up to date (same kernel sources, Triton {triton.__version__})")
        return [Compiled(**r) for r in meta["rows"]]
    launches = capture()
    log(f"captured {len(launches)} launches; compiling for {', '.join(TARGETS)}")
    rows = compile_all(launches, log)
    from speedrun.data.shards import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, table_text(rows, kernel_sources_hash(), triton.__version__))
    log(f"wrote {out}: {len(rows)} compilations, {sum(failed(r) for r in rows)} failing")
    return rows


def aot_command(args) -> int:
    bad = [r for r in run(force=args.force) if failed(r)]
    for r in bad:
        print(f"FAILED {r.kernel} [{r.config}] {r.dtype} {r.target}: {r.status}")
    return 1 if bad else 0
