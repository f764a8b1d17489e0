"""``speedrun bench train``: how fast is a training step, and where does the time go.

For each kernel set (``--kernels torch,triton``, side by side in one process) the preset's model and
optimizers are built, compiled (when enabled) and warmed up, then ``--steps`` optimizer steps are timed
one by one (each ends with a device synchronise): median step time with p20/p80, tokens/s, MFU (model
FLOPs per token x tokens/s / the GPU's dense bf16 peak from speedrun.train's table; not computed on a CPU),
peak memory. Then ``--profile-steps`` more steps run under ``torch.profiler`` and the ops with the most
self time (device time on a GPU, CPU time on a CPU) are listed with their share.

The tokens are synthetic (uniform random ids with an end-of-text token every ~1024 tokens on average,
generated on the device): step time does not depend on what the tokens say, and the GPU machines have no
FineWeb. The output says so. The step is the trainer's own (speedrun.train.optimizer_step) at the window
of the schedule's last step (the longest).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import kernels
import kernels.common
from speedrun import dist
from speedrun.bench.cli import add_common_arguments
from speedrun.bench.measure import (
    bench_device,
    device_name,
    results_dir,
    timing_from_samples,
    versions,
)
from speedrun.config import RunConfig, get_preset, preset_names, window_blocks
from speedrun.data.shards import atomic_write_text, write_shard
from speedrun.model import GPT, TRAINING_OPS, flops_per_token
from speedrun.optim import build_optimizers
from speedrun.runlog import repo_or_absolute_path, utc_now
from speedrun.train import compile_model, device_sync, optimizer_step, peak_tflops

TOP_OPS = 12


def synthetic_pairs(cfg: RunConfig, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batch_slots`` (inputs, targets) pairs of ``seq_len`` random tokens on ``device``."""
    g = torch.Generator().manual_seed(seed)
    m, T = cfg.model, cfg.data.seq_len
    tokens = torch.randint(0, m.vocab_size, (cfg.data.batch_slots, T + 1), generator=g)
    eot = torch.rand(tokens.shape, generator=g) < 1 / 1024
    tokens = torch.where(eot, m.eot_token, tokens)
    tokens[:, 0] = m.eot_token  # every sequence starts a document, as the loader's do
    return [(row[:-1].to(device), row[1:].to(device)) for row in tokens]


def synthetic_shard(path, cfg: RunConfig, tokens: int, seed: int) -> None:
    """A train shard of ``tokens`` random ids, a document start (eot) every ~1024 tokens on average."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (tokens,), generator=g)
    ids[torch.rand(tokens, generator=g) < 1 / 1024] = cfg.model.eot_token
    ids[0] = cfg.model.eot_token
    write_shard(path, ids.numpy().astype("uint16"))


def staged_step(cfg: RunConfig, device: torch.device, calls: int, seed: int, workdir: Path):
    """(one_step, tokens per step, FLOPs per step or None) for a staged recipe (record #89): its race on
    synthetic shards, every step at the plan of the last training step (the largest batch and windows)."""
    from speedrun import schedule
    from speedrun.data.packed import PackedTrainLoader
    from speedrun.train import make_race

    step_at = cfg.train.num_steps - 1
    plan = schedule.plan(cfg, step_at)
    # no validation here: the smallest validation set the race accepts (one validation batch)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_tokens=cfg.schedule.val_batch_tokens))
    # documents are cut to the stage's length, so a step reads more than its batch; the loader prefetches 2
    synthetic_shard(workdir / "bench_train_000001.bin", cfg, 3 * (calls + 3) * plan.batch_tokens + 4096, seed)
    synthetic_shard(workdir / "bench_val_000000.bin", cfg, cfg.data.val_tokens + 1, seed + 1)
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    race = make_race(cfg, env, workdir)
    race.train_loader.close()
    race.train_loader = PackedTrainLoader(workdir, lambda _: plan, cfg.data.batch_slots, 1, 0, cfg.model.eot_token,
                                          cfg.model.bigram_vocab_size, device, prefetch=True)
    for s in range(step_at + 1):  # the model's rotary and windows as at the last step
        race.raw_model.set_plan(schedule.plan(cfg, s))
    return (lambda: race.train_step(step_at)), plan.batch_tokens, race.step_flops(step_at)


EXPLAIN_TOKENS = 8192  # the tokens per sequence graph_breaks traces (see bench_kernel_set)


def bench_kernel_set(cfg: RunConfig, device: torch.device, steps: int, warmup: int, profile_steps: int,
                     log=print) -> dict:
    """Time ``steps`` optimizer steps of ``cfg`` (its kernel set, compile flag) after ``warmup`` untimed ones."""
    settings = (kernels.common.interpreter_settings_for_model_runs(device) if cfg.train.kernels == "triton"
                else contextlib.nullcontext())
    with settings, tempfile.TemporaryDirectory() as workdir:
        if cfg.schedule is not None:
            one_step, tokens_per_step, step_flops = staged_step(cfg, device, warmup + steps + profile_steps,
                                                                cfg.train.seed, Path(workdir))
            return _time_steps(cfg, device, one_step, tokens_per_step, step_flops, steps, warmup, profile_steps, log)
        torch.manual_seed(cfg.train.seed)
        ops = kernels.resolve(cfg.train.kernels, TRAINING_OPS)
        raw_model = GPT(cfg.model, ops, dtype=getattr(torch, cfg.train.dtype)).to(device)
        optimizers = build_optimizers(raw_model, cfg, ops)
        model = compile_model(raw_model, cfg)
        pairs = synthetic_pairs(cfg, device, cfg.train.seed)
        per_forward = min(cfg.data.seqs_per_forward, len(pairs))
        long_blocks, short_blocks = window_blocks(cfg.train.num_steps, cfg)
        window = tuple(torch.tensor(b, dtype=torch.int32, device=device) for b in (long_blocks, short_blocks))
        step_at = cfg.train.num_steps - 1  # schedules at the last step; the weights change, the shapes do not

        def one_step():
            optimizer_step(model, raw_model, optimizers, cfg, pairs, per_forward, window, step_at)

        breaks = None
        if cfg.train.compile:
            # explain runs the forward eagerly, keeping what the backward needs: traced on the first
            # EXPLAIN_TOKENS tokens (the same code path), since the torch set's dense reference attention at
            # the recipe's 65,536 took all of an H100's memory (bench/results/2026-11-27_1547_nvidia-h100-80gb-hbm3)
            inputs, targets = (torch.stack([p[i][:EXPLAIN_TOKENS] for p in pairs[:per_forward]]) for i in (0, 1))
            breaks = graph_breaks(raw_model, inputs, targets, window=window)
            log(f"  {cfg.train.kernels}: {len(breaks)} graph break(s)" + "".join(f"\n    {b}" for b in breaks))
            if breaks and cfg.train.kernels != "torch":  # compile_model's fullgraph=True would fail: not timed
                return dict(kernels=cfg.train.kernels, compile=True, graph_breaks=breaks, median_ms=None,
                            tokens_per_step=cfg.data.tokens_per_step, breakdown=[])
        fpt = flops_per_token(cfg.model, cfg.data.seq_len, long_blocks * cfg.model.attn_block_size)
        row = _time_steps(cfg, device, one_step, cfg.data.tokens_per_step, fpt * cfg.data.tokens_per_step, steps,
                          warmup, profile_steps, log)
        return dict(row, graph_breaks=breaks)


def graph_breaks(model: torch.nn.Module, *args, **kwargs) -> list[str]:
    """What splits torch.compile's graph of ``model(*args, **kwargs)`` (the forward, and the backward of
    every autograd.Function in it): one line per graph break, ``file:line: reason``. torch._dynamo.explain
    traces and runs the forward once, eagerly."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    torch._dynamo.reset()
    lines = []
    for b in explanation.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{repo_or_absolute_path(Path(frame.filename))}:{frame.lineno}: " if frame else ""
        lines.append(where + " ".join(str(b.reason).split())[:300])
    return lines


def _time_steps(cfg: RunConfig, device: torch.device, one_step, tokens_per_step: int, step_flops, steps: int,
                warmup: int, profile_steps: int, log) -> dict:
    """Warm up, time ``steps`` calls of ``one_step`` (each synchronised), profile; the result row."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    device_sync(device)
    log(f"  {cfg.train.kernels}: warm-up ({warmup} steps, compile included) {time.perf_counter() - t0:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        device_sync(device)
        samples.append(1000 * (time.perf_counter() - t0))
    timing = timing_from_samples(samples)
    breakdown = profile(one_step, device, profile_steps) if profile_steps else []
    tokens_per_s = tokens_per_step / (timing.median_ms / 1000)
    peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process RSS so far, KiB on Linux
    return dict(kernels=cfg.train.kernels, compile=cfg.train.compile, steps=steps, median_ms=timing.median_ms,
                p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, tokens_per_step=tokens_per_step,
                tokens_per_s=tokens_per_s,
                mfu=step_flops / (timing.median_ms / 1000) / (peak * 1e12) if peak and step_flops else None,
                peak_mem_mib=peak_mem, breakdown=breakdown)


def profile(one_step, device: torch.device, steps: int) -> list[dict]:
    """The ops with the most self time over ``steps`` steps: name, calls, total ms, share of the total."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        device_sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(op=e.key, calls=e.count, total_ms=getattr(e, attr) / 1000, share=getattr(e, attr) / total)
            for e in events[:TOP_OPS]]


def report(results: list[dict], cfg: RunConfig, device: torch.device) -> str:
    """Markdown: the comparison table, then each kernel set's profile breakdown."""
    v = versions()
    lines = [f"# bench train: preset {cfg.preset} on {device_name(device)}",
             "",
             f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}; {utc_now()}. Synthetic tokens "
             f"(random ids; step time does not depend on them). {results[0]['tokens_per_step']:,} tokens per step "
             f"on 1 device, batch and windows of the schedule's last step.",
             ""]
    if device.type == "cpu":
        lines += ["CPU run: the triton set runs under the Triton interpreter, so its time means nothing; "
                  "MFU is not computed on a CPU; peak memory is the process's peak RSS so far.", ""]
    lines += ["| kernels | compile | graph breaks | step median (ms) | p20-p80 (ms) | tokens/s | MFU | "
              "peak memory (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        breaks = "-" if r.get("graph_breaks") is None else len(r["graph_breaks"])
        if r["median_ms"] is None:
            lines.append(f"| {r['kernels']} | {r['compile']} | {breaks} | not timed | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['kernels']} | {r['compile']} | {breaks} | {r['median_ms']:.1f} | "
                     f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_mem_mib']:,.0f} |")
    if len(results) == 2 and None not in (results[0]["median_ms"], results[1]["median_ms"]):
        a, b = results
        lines += ["", f"{b['kernels']} vs {a['kernels']}: step time ratio {b['median_ms'] / a['median_ms']:.3f}"]
    for r in results:
        if r.get("graph_breaks"):
            verdict = ("FAILED: the trainer compiles this set with fullgraph=True" if r["kernels"] != "torch"
                       else "by design: the reference ops read the window on the host")
            lines += ["", f"Graph breaks, kernels {r['kernels']} ({verdict}):", "",
                      *[f"- `{b}`" for b in r["graph_breaks"]]]
    for r in results:
        if r["breakdown"]:
            lines += ["", f"## where the time goes: kernels {r['kernels']} (self time, top {TOP_OPS})", "",
                      "| op | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{e['op'][:80]}` | {e['calls']} | {e['total_ms']:.2f} | {100 * e['share']:.1f}% |"
                      for e in r["breakdown"]]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from speedrun.args import non_negative_int, positive_int

    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="default: sub3min on GPU, sub3min-tiny on CPU (presets with Triton kernels for every op)")
    p.add_argument("--kernels", default="torch,triton", help="kernel sets, comma-separated (default: torch,triton)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first (default: 3 / 1)")
    p.add_argument("--profile-steps", type=non_negative_int, default=2, help="profiled steps (0: no profile)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="override the preset's sequence length")
    add_common_arguments(p, with_compile=True)


def train_command(args) -> int:
    device = bench_device(args.device)
    sets = [s.strip() for s in args.kernels.split(",") if s.strip()]
    if not sets or any(s not in ("torch", "triton") for s in sets) or len(set(sets)) != len(sets):
        raise SystemExit(f"--kernels must list torch and/or triton once each, got {args.kernels!r}")
    if "triton" in sets and "triton" not in kernels.variants("attention"):
        raise SystemExit("--kernels triton: Triton is not installed")
    gpu = device.type == "cuda"
    cfg = get_preset(args.preset or ("sub3min" if gpu else "sub3min-tiny"))
    if args.seq_len is not None:
        if cfg.schedule is not None:
            raise SystemExit(f"--seq-len does not apply to preset {cfg.preset}: its stages set the sequence lengths")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=args.seq_len))
    if cfg.data.seq_len % cfg.model.attn_block_size and cfg.model.arch == "recipe":
        raise SystemExit(f"--seq-len must be a multiple of the attention block ({cfg.model.attn_block_size})")
    steps = args.steps or (10 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    compile_ = gpu if args.compile is None else args.compile
    out_dir = results_dir(device, args.out)
    print(f"bench train: preset {cfg.preset}, kernels {', '.join(sets)}, {steps} timed steps on "
          f"{device_name(device)}; synthetic tokens")
    results = []
    for k in sets:
        cfg_k = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kernels=k, compile=compile_))
        results.append(bench_kernel_set(copy.deepcopy(cfg_k), device, steps, warmup, args.profile_steps))
        if gpu:
            torch.cuda.empty_cache()
    text = report(results, cfg, device)
    print(text)
    atomic_write_text(out_dir / "train.md", text)
    print(f"wrote {repo_or_absolute_path(out_dir / 'train.md')}")
    broken = [r["kernels"] for r in results if r["kernels"] != "torch" and r.get("graph_breaks")]
    if broken:
        print(f"bench train: graph breaks in kernel set(s) {', '.join(broken)}, which the trainer compiles with "
              "fullgraph=True (train.md lists them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="speedrun bench train")
    add_arguments(parser)
    sys.exit(train_command(parser.parse_args()))
