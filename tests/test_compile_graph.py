"""torch.compile traces the model with the Triton kernel set into one graph (the trainer's fullgraph=True).

On a GPU this is what the first training step does. On the CPU the kernels cannot run, but dynamo can
still trace them: a child process (without TRITON_INTERPRET, whose kernels dynamo would not recognise)
tells dynamo and our launchers that Triton is usable, traces the model's forward, in which dynamo also
traces every autograd.Function's backward, with fullgraph=True, and stops before anything runs. A graph
break anywhere (a kernel launch dynamo cannot trace, a host read) fails the trace with dynamo's own
message. This caught torch 2.11 failing on the MLP's autotuner (kernels/mlp.py). Record #89's model is also
traced through a whole tiny run, every step's plan and shapes, counting the versions dynamo compiles: this
caught a version per step (the MTP weights as Python floats), which a GPU run would have failed on.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import kernels
import kernels.common
from speedrun import REPO_ROOT
from speedrun.bench.aot import gpu_path

pytestmark = pytest.mark.skipif("triton" not in kernels.variants("mlp"), reason="triton is not installed")


class Traced(Exception):
    """Raised by the trace-only backend instead of running the graph."""


def trace_only_backend(fp8: bool):
    """In the child process: make dynamo and our launchers take Triton as usable (and FP8 as supported when
    ``fp8``); returns (graphs, backend): a backend that keeps each graph dynamo compiles in ``graphs`` and
    raises Traced instead of running it."""
    import torch.utils._triton

    import speedrun.model

    torch.utils._triton.has_triton = lambda: True  # dynamo's test for "Triton kernels can be traced here"
    speedrun.model.supports_fp8 = lambda: fp8
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced()
        return run
    return graphs, backend


def triton_launches(graph) -> int:
    """Kernel launches in a traced graph (the forward's, and every autograd.Function backward's dynamo traced)."""
    import torch

    return sum(1 for gm in graph.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target))


def trace_model(preset: str, dtype_name: str, fp8: bool, training: bool) -> dict:
    """In the child process: trace ``preset``'s model at a small size with the triton set; {"graphs",
    "triton_launches"} or {"error"}."""
    import torch

    import speedrun.model89
    from speedrun import schedule
    from speedrun.config import get_preset, sub3min_tiny
    from speedrun.model import GPT, TRAINING_OPS

    graphs, backend = trace_only_backend(fp8)
    g = torch.Generator().manual_seed(0)
    if preset == "record89-tiny":
        cfg = get_preset(preset)
        model_cfg = dataclasses.replace(cfg.model, fp8_lm_head=fp8)
        model = speedrun.model89.GPT89(model_cfg, kernels.resolve("triton", speedrun.model89.TRAINING_OPS),
                                       dtype=getattr(torch, dtype_name)).train(training)
        model.set_plan(schedule.plan(cfg, 0))
        tokens = torch.randint(0, model_cfg.vocab_size - 1, (97,), generator=g)
        args = (tokens[:-1].int(), tokens[1:], torch.tensor([0, 40, 96, 96], dtype=torch.int32),
                torch.randint(0, model_cfg.bigram_vocab_size - 1, (96,), generator=g).int())
        kwargs = {}
    else:
        model_cfg = dataclasses.replace(sub3min_tiny().model, attn_block_size=16)
        model = GPT(model_cfg, kernels.resolve("triton", TRAINING_OPS), dtype=getattr(torch, dtype_name))
        model.train(training)
        args = tuple(torch.randint(0, model_cfg.vocab_size, (2, 2, 96), generator=g))
        kwargs = {"window": tuple(torch.tensor(b, dtype=torch.int32) for b in (2, 1))}  # as the trainer passes it
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    try:
        with gpu_path():  # the launchers' GPU path on CPU tensors (speedrun bench aot's capture does the same)
            compiled(*args, **kwargs)
    except Traced:
        return {"graphs": len(graphs), "triton_launches": triton_launches(graphs[0])}
    except Exception as e:  # the trace failed: dynamo's message names the break
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": "the compiled model ran instead of stopping at the trace-only backend"}


def versions_over_the_run() -> dict:
    """In the child process: record89-tiny's model (the triton set, bf16 with FP8, as on an H100) called as a run
    calls it at every step, with each step's plan and shapes (its validation first where the plan validates,
    then one micro-step), traced only. {"versions": how many versions dynamo compiled, "expected": the distinct
    (mode, tokens, cu_seqlens entries, MTP weights) among those calls, "triton_launches": per version} or
    {"error"}."""
    import torch

    import speedrun.model89
    from speedrun import schedule
    from speedrun.config import get_preset

    versions, backend = trace_only_backend(fp8=True)
    cfg = get_preset("record89-tiny")
    model = speedrun.model89.GPT89(cfg.model, kernels.resolve("triton", speedrun.model89.TRAINING_OPS),
                                   dtype=torch.bfloat16)
    compiled = kernels.common.compile_static(model, backend=backend, fullgraph=True)  # as the trainer compiles
    g = torch.Generator().manual_seed(0)
    val_tokens = cfg.schedule.val_batch_tokens // cfg.data.batch_slots
    calls = set()

    def call(step: int, tokens: int, slots: int, *key):
        calls.add((tokens, slots, *key))
        inputs = torch.randint(0, cfg.model.vocab_size - 1, (tokens + 1,), generator=g)
        cu_seqlens = torch.full((slots,), tokens, dtype=torch.int32)
        cu_seqlens[:2] = torch.tensor([0, tokens // 2])
        bigram = torch.randint(0, cfg.model.bigram_vocab_size - 1, (tokens,), generator=g).int()
        try:
            compiled(inputs[:-1].int(), inputs[1:], cu_seqlens, bigram)
        except Traced:
            pass
        if len(versions) > len(calls):  # stop at the first needless version (not after RECOMPILE_LIMIT of them)
            raise RuntimeError(f"step {step}: version {len(versions)} for {len(calls)} distinct shapes and modes")

    try:
        with gpu_path():
            for step in range(cfg.train.num_steps + 1):
                plan = schedule.plan(cfg, step)
                model.set_plan(plan)
                if plan.validate:
                    model.eval()
                    with torch.no_grad():
                        call(step, val_tokens, schedule.cu_seqlens_slots(val_tokens), "eval")
                    model.train()
                if plan.training:
                    call(step, plan.tokens_per_rank, plan.cu_slots, "train", len(plan.mtp_weights))
    except Exception as e:  # dynamo's message names the break, or a version too many
        return {"error": f"{type(e).__name__}: {e}"}
    return {"versions": len(versions), "expected": len(calls), "triton_launches": list(map(triton_launches, versions))}


CASES = [  # (preset, dtype, fp8, training); record #89 on an H100 (bf16, FP8): versions_over_the_run
    ("sub3min-tiny", "float32", False, True),
    ("sub3min-tiny", "bfloat16", True, True),  # the race: bf16 with the FP8 lm_head of an H100
    ("sub3min-tiny", "bfloat16", True, False),  # validation (eval mode)
    ("record89-tiny", "float32", False, True),
]


@pytest.fixture(scope="module")
def traces() -> list[dict]:
    """Every case traced in one child process (one start-up of torch and dynamo for all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_triton_kernel_set_traces_into_one_graph(traces, case):
    result = traces["cases"][case]
    assert "error" not in result, result["error"][:3000]
    assert result["graphs"] == 1
    # every kernel launch of the forward and the backward is in the graph (none was inlined or skipped)
    assert result["triton_launches"] >= 10


def test_a_run_compiles_one_model_version_per_shape_and_mode(traces):
    """Record #89 on an H100 (bf16, FP8 MLP and lm_head), traced through all of record89-tiny's 300 steps and 7
    validations: one model version per distinct shape, MTP weight count and mode, none per step or per stage
    change (the windows, attention scale, rotary and MTP weights are device tensors; the MTP weights as Python
    floats made a version per step, and a fullgraph model fails past kernels.common.RECOMPILE_LIMIT). Each
    version holds every kernel launch of its forward and backward."""
    from kernels.common import RECOMPILE_LIMIT

    result = traces["versions"]
    assert "error" not in result, result["error"][:3000]
    assert result["versions"] == result["expected"] < RECOMPILE_LIMIT
    assert result["expected"] == 4  # the training batches of stages 0, 1 and 2-3 (the extension), validation
    assert all(n >= 10 for n in result["triton_launches"]), result["triton_launches"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    results = []
    for case in CASES:
        import torch

        torch._dynamo.reset()
        results.append(trace_model(*case))
    torch._dynamo.reset()
    print(json.dumps({"cases": results, "versions": versions_over_the_run()}))
