"""torch.compile traces the model with the Triton kernel set into one graph (the trainer's fullgraph=True).

On a GPU this is what the first training step does. On the CPU the kernels cannot run, but dynamo can
still trace them: a child process (without TRITON_INTERPRET, whose kernels dynamo would not recognise)
tells dynamo and our launchers that Triton is usable, traces the model's forward, in which dynamo also
traces every autograd.Function's backward, with fullgraph=True, and stops before anything runs. A graph
break anywhere (a kernel launch dynamo cannot trace, a host read) fails the trace with dynamo's own
message. This caught torch 2.11 failing on the MLP's autotuner (kernels/mlp.py).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import kernels
from speedrun import REPO_ROOT
from speedrun.bench.aot import gpu_path

pytestmark = pytest.mark.skipif("triton" not in kernels.variants("mlp"), reason="triton is not installed")


class Traced(Exception):
    """Raised by the trace-only backend instead of running the graph."""


def trace_model(preset: str, dtype_name: str, fp8: bool, training: bool, stage_change: bool = False) -> dict:
    """In the child process: trace ``preset``'s model at a small size with the triton set; {"graphs",
    "triton_launches"} or {"error"}. ``stage_change`` (record89-tiny): trace at the last step of a stage, then
    call again at the next stage's first step (new windows, attention scale and YaRN frequencies, the same
    number of MTP weights), which must reuse the graph."""
    import torch
    import torch.utils._triton

    torch.utils._triton.has_triton = lambda: True  # dynamo's test for "Triton kernels can be traced here"
    import speedrun.model
    import speedrun.model89
    from speedrun import schedule
    from speedrun.config import get_preset, sub3min_tiny
    from speedrun.model import GPT, TRAINING_OPS

    speedrun.model.supports_fp8 = lambda: fp8
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced()
        return run

    g = torch.Generator().manual_seed(0)
    if preset == "record89-tiny":  # its FP8 MLP and lm_head when fp8 (the GPU's bf16 path)
        cfg = get_preset(preset)
        model_cfg = dataclasses.replace(cfg.model, fp8_lm_head=fp8)
        model = speedrun.model89.GPT89(model_cfg, kernels.resolve("triton", speedrun.model89.TRAINING_OPS),
                                       dtype=getattr(torch, dtype_name)).train(training)
        first = STAGE_CHANGE - 1 if stage_change else 0
        for step in range(first + 1):
            model.set_plan(schedule.plan(cfg, step))
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
            if stage_change:
                try:
                    compiled(*args, **kwargs)
                except Traced:
                    model.set_plan(schedule.plan(cfg, STAGE_CHANGE))
            compiled(*args, **kwargs)
    except Traced:
        launches = sum(1 for gm in graphs[0].modules() if isinstance(gm, torch.fx.GraphModule)
                       for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target))
        return {"graphs": len(graphs), "triton_launches": launches}
    except Exception as e:  # the trace failed: dynamo's message names the break
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": "the compiled model ran instead of stopping at the trace-only backend"}


STAGE_CHANGE = 294  # record89-tiny's last stage starts here: windows (320, 704) -> (384, 832), YaRN; 1 MTP weight
CASES = [  # (preset, dtype, fp8, training, stage_change)
    ("sub3min-tiny", "float32", False, True, False),
    ("sub3min-tiny", "bfloat16", True, True, False),  # the race: bf16 with the FP8 lm_head of an H100
    ("sub3min-tiny", "bfloat16", True, False, False),  # validation (eval mode)
    ("record89-tiny", "float32", False, True, False),
    ("record89-tiny", "bfloat16", True, True, False),  # record #89 on an H100: FP8 MLP and lm_head
    ("record89-tiny", "float32", False, True, True),  # a schedule change is not a recompile
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
    result = traces[case]
    assert "error" not in result, result["error"][:3000]
    assert result["graphs"] == 1  # with stage_change: the second call reused the first call's graph
    # every kernel launch of the forward and the backward is in the graph (none was inlined or skipped)
    assert result["triton_launches"] >= 10


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    results = []
    for case in CASES:
        import torch

        torch._dynamo.reset()
        results.append(trace_model(*case))
    print(json.dumps(results))
