"""The trainer's rules: timing (with an injected clock), statuses, run logs, distributed equivalence."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import speedrun.train as train_mod
from speedrun import REPO_ROOT, dist
from speedrun.cli import build_parser
from speedrun.data.synth import generate_synth
from speedrun.records.runlog import code_hash, parse_text_log

SEQ_LEN = 64
VAL_TOKENS = 1024


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synth(out, seed=1, train_tokens=300_000, val_tokens=VAL_TOKENS)
    return out


def make_run(synth_dir, *extra):
    """(cfg, env, data_dir, target, track) for the tiny preset on the test's small synthetic data."""
    args = build_parser().parse_args(["train", "--preset", "sub3min-tiny", "--data", str(synth_dir), "--seq-len",
                                      str(SEQ_LEN), "--val-tokens", str(VAL_TOKENS), *extra])
    cfg = train_mod.resolve_config(args, cuda=False)
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg, data_dir, manifest = train_mod.prepare_data(cfg, env)
    target = train_mod.get_track(cfg.track).target(manifest["val_optimal_loss"])
    return cfg, env, data_dir, target, cfg.track


class FakeClock:
    """Time moves only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_timing_excludes_warmup_and_validation(synth_dir, tmp_path, monkeypatch):
    cfg, env, data_dir, target, track = make_run(synth_dir, "--steps", "6", "--val-every", "2")
    clock = FakeClock()
    real_evaluate, real_set_schedules = train_mod.evaluate, train_mod.set_schedules

    def slow_evaluate(*a, **k):  # validation costs 100 s, which must never be counted
        clock.now += 100.0
        return real_evaluate(*a, **k)

    def one_second_step(*a, **k):  # every optimizer step (warm-up ones too) costs 1 s
        clock.now += 1.0
        return real_set_schedules(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", slow_evaluate)
    monkeypatch.setattr(train_mod, "set_schedules", one_second_step)
    result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, clock=clock, echo=False)
    facts = json.loads(result.json_path.read_text())
    assert cfg.train.warmup_steps > 0
    assert [p["step"] for p in facts["val_curve"]] == [0, 2, 4, 6]
    assert [p["train_time_ms"] for p in facts["val_curve"]] == [0, 2000, 4000, 6000]
    assert facts["train_time_ms"] == 6000
    text = result.log_path.read_text()
    assert "step:6/6 val_loss:" in text and "train_time:6000ms step_avg:1000.00ms" in text
    assert re.search(r"^step:3/6 train_time:3000ms step_avg:1000.00ms$", text, re.M)


def test_warmup_restores_initial_state(synth_dir, tmp_path):
    """A run with warm-up steps (``--warmup-steps``) sees exactly what a run without them sees."""
    losses = []
    for warmup in (0, 2):
        cfg, env, data_dir, target, track = make_run(synth_dir, "--steps", "3", "--val-every", "3", "--warmup-steps",
                                                     str(warmup))
        assert cfg.train.warmup_steps == warmup
        result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, echo=False)
        losses.append(json.loads(result.json_path.read_text())["train_losses"])
    assert losses[0] == losses[1]


def test_run_log_is_complete_and_code_hash_matches(synth_dir, tmp_path):
    cfg, env, data_dir, target, track = make_run(synth_dir, "--steps", "2", "--val-every", "1")
    result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, echo=False)
    facts = json.loads(result.json_path.read_text())
    text = result.log_path.read_text()
    assert facts["status"] in ("success", "not_converged")
    assert facts["run_id"] == result.run_id and facts["schema_version"] == 1
    for key in ("python", "torch", "triton", "world_size", "git"):
        assert key in facts["env"]
    assert facts["config"]["preset"] == "sub3min-tiny" and facts["tokens_seen"] == 2 * 8 * SEQ_LEN
    # The snapshot sections hold the exact files; their hashes and the code hash recompute.
    log = parse_text_log(text, keep_sources=True)
    hashes = log.code_files
    for path, source in log.sources.items():
        assert hashlib.sha256(source.encode()).hexdigest() == hashes[path]
        assert (REPO_ROOT / path).read_text() == source
    assert log.code_mismatches == []
    assert {"speedrun/train.py", "speedrun/model.py", "kernels/attention.py"} <= set(hashes)
    assert hashes == facts["code"]["files"]
    assert code_hash(hashes) == facts["code"]["code_sha256"]
    assert str(REPO_ROOT) not in text, "a log must not reveal where the clone lives"
    assert "====== summary ======" in text


def test_nan_loss_is_diverged_and_names_the_step(synth_dir, tmp_path, monkeypatch):
    cfg, env, data_dir, target, track = make_run(synth_dir, "--steps", "8", "--val-every", "100")
    real_set_schedules = train_mod.set_schedules
    calls = {"n": 0}

    def poison_weights_at_step_3(optimizers, step, c):
        calls["n"] += 1
        if calls["n"] > cfg.train.warmup_steps and step == 3:  # in the timed loop, not the warm-up
            for opt in optimizers:
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.data.fill_(float("nan"))
        return real_set_schedules(optimizers, step, c)

    monkeypatch.setattr(train_mod, "set_schedules", poison_weights_at_step_3)
    result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, echo=False)
    def strict(constant):  # NaN / Infinity are not JSON: most parsers reject them
        raise AssertionError(f"the run log's JSON holds {constant}")

    facts = json.loads(result.json_path.read_text(), parse_constant=strict)
    assert result.status == facts["status"] == "diverged"
    # weights poisoned during training step 3's update: training step 4's loss is NaN, the step the log calls
    # "step:5" (the line after training step s is step:s+1)
    assert facts["diverged_at_step"] == 5
    assert facts["final_val_loss"] is None and facts["train_losses"][-1] is None  # written as null
    text = result.log_path.read_text()
    assert "DIVERGED: non-finite loss at step 5" in text and "\nstep:5/8 train_time:" in text
    json.loads(text.rsplit("====== summary ======\n", 1)[1], parse_constant=strict)


def test_sigterm_aborts_after_the_current_step(synth_dir, tmp_path, monkeypatch):
    cfg, env, data_dir, target, track = make_run(synth_dir, "--steps", "50", "--val-every", "100")
    real_set_schedules = train_mod.set_schedules
    calls = {"n": 0}

    def signal_at_step_2(optimizers, step, c):
        calls["n"] += 1
        if calls["n"] == cfg.train.warmup_steps + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_set_schedules(optimizers, step, c)

    monkeypatch.setattr(train_mod, "set_schedules", signal_at_step_2)
    result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, echo=False)
    facts = json.loads(result.json_path.read_text())
    assert facts["status"] == "aborted" and facts["final_val_loss"] is None
    assert "ABORTED by signal after step" in result.log_path.read_text()
    assert 3 <= facts["steps_done"] <= 4  # the signalled step finishes; the stop is read one step later
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_cli_run_writes_logs_and_exit_code(synth_dir, tmp_path):
    from speedrun.cli import main

    rc = main(["train", "--preset", "sub3min-tiny", "--data", str(synth_dir), "--seq-len", str(SEQ_LEN),
               "--val-tokens", str(VAL_TOKENS), "--steps", "2", "--log-dir", str(tmp_path), "--quiet",
               "--save-checkpoint", str(tmp_path / "ck.pt")])
    logs = list(tmp_path.glob("*.json"))
    assert len(logs) == 1
    facts = json.loads(logs[0].read_text())
    assert rc == (0 if facts["status"] == "success" else 1)
    assert (tmp_path / "ck.pt").is_file()
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["run_id"] == facts["run_id"]


def test_sample_from_a_checkpoint(synth_dir, tmp_path, capsys):
    from speedrun.cli import main

    main(["train", "--preset", "sub3min-tiny", "--data", str(synth_dir), "--seq-len", str(SEQ_LEN), "--val-tokens",
          str(VAL_TOKENS), "--steps", "1", "--log-dir", str(tmp_path), "--quiet", "--save-checkpoint",
          str(tmp_path / "ck.pt")])
    # outside the repository the log is named by its absolute path, one the user can open
    log = next(tmp_path.resolve().glob("*.txt"))
    assert f"log: {log}  (machine-readable: {log.with_suffix('.json')})" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "ck.pt"), "--prompt", "5 17 99",
                 "--max-new-tokens", "6", "--seed", "1"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[:3] == ["5", "17", "99"] and 3 < len(ids) <= 9
    assert all(0 <= int(t) < 2047 for t in ids)  # the synthetic vocabulary, end-of-text never printed
    assert main(["sample", "--checkpoint", str(tmp_path / "ck.pt"), "--prompt", "hello"]) == 1
    assert "space-separated token ids" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["sample", "--checkpoint", str(tmp_path / "bad.pt")]) == 1
    assert "not a speedrun checkpoint" in capsys.readouterr().err


def test_sample_from_a_record89_checkpoint(tmp_path, capsys):
    """Record #89's model samples as it validated: its rotary (YaRN at every stage change), attention scale and
    windows are not in its weights, so loading replays the trainer's set_plan calls to the checkpoint's step;
    the next-token scores are the logits the validation loss is the cross-entropy of."""
    import torch.nn.functional as F

    import kernels
    from speedrun import schedule
    from speedrun.cli import main
    from speedrun.config import get_preset
    from speedrun.data.packed import bigram_hash
    from speedrun.model89 import GPT89
    from speedrun.sample import load_checkpoint, next_token_logits

    cfg = get_preset("record89-tiny")
    torch.manual_seed(0)
    model = GPT89(cfg.model, kernels.resolve("torch"), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero weights (the record starts some at 0): every part shapes the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    plans = schedule.full_plan(cfg)
    for plan in plans:  # as the trainer calls it: every step in order, then the final validation's plan
        model.set_plan(plan)
    train_mod.save_model_checkpoint(tmp_path / "ck.pt", model, cfg, "r89", cfg.train.num_steps)

    ids = torch.randint(0, cfg.model.vocab_size, (300,), generator=g, dtype=torch.int32)
    ids[0] = cfg.model.eot_token
    targets = torch.randint(0, cfg.model.vocab_size, (300,), generator=g)
    args = (ids, targets, torch.tensor([0, 300], dtype=torch.int32),
            torch.from_numpy(bigram_hash(ids.numpy(), cfg.model.bigram_vocab_size)))
    loaded, loaded_cfg, step = load_checkpoint(tmp_path / "ck.pt")
    assert step == cfg.train.num_steps and loaded_cfg == cfg and not loaded.training
    with torch.no_grad():
        want = model.eval()(*args)
        assert torch.equal(loaded(*args), want)
        scores = next_token_logits(loaded, loaded_cfg, step, ids.tolist())
    assert scores.shape == (cfg.model.vocab_size,)
    assert F.cross_entropy(scores[None], targets[-1:]).item() == pytest.approx(want[-1].item(), rel=1e-6)
    # the replay matters: the final plan alone leaves the rotary and the attention scale of step 0
    fresh = GPT89(cfg.model, kernels.resolve("torch"), dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.attn_scale = plans[-1].attn_scale  # (what set_plan checks)
    fresh.set_plan(plans[-1])
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(*args), want, rtol=1e-3)

    assert main(["sample", "--checkpoint", str(tmp_path / "ck.pt"), "--prompt", "5 17 99", "--max-new-tokens", "4",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:3] == ["5", "17", "99"] and 3 < len(out) <= 7 and all(0 <= int(t) < 2047 for t in out)


def _train_args(synth_dir, log_dir, seqs_per_forward) -> list[str]:
    return ["-m", "speedrun.cli", "train", "--preset", "sub3min-tiny", "--data", str(synth_dir),
            "--seq-len", str(SEQ_LEN), "--val-tokens", str(VAL_TOKENS), "--steps", "4", "--val-every", "2",
            "--log-dir", str(log_dir), "--quiet", "--seqs-per-forward", str(seqs_per_forward)]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _run_log(out, log_dir) -> dict:
    assert out.returncode in (0, 1), out.stdout + out.stderr
    (log,) = list(log_dir.glob("*.json"))
    return json.loads(log.read_text())


def _torchrun(nproc, train_args, log_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train_args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    return _run_log(out, log_dir)


def _torchrun_two_nodes(train_args, log_dir):
    """Two torchrun "nodes" of one process each on this machine: the README's multi-node command, with the
    c10d rendezvous on 127.0.0.1 (gloo between the processes)."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=speedrun-test", *train_args],
                              cwd=REPO_ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outs = []
    for node in nodes:
        stdout, _ = node.communicate(timeout=300)
        outs.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, ""))
    assert outs[1].returncode in (0, 1), outs[1].stdout
    return _run_log(outs[0], log_dir)


def test_two_processes_equal_one_process_with_accumulation(synth_dir, tmp_path):
    """Two gloo processes = one process accumulating over the same 8 sequences.

    With 4 sequences per forward both runs do the same two forwards and average the same two gradients
    (once by accumulation, once by all-reduce), which is exact in floating point: the losses agree to
    1e-6 (in fact bit for bit). With 1 sequence per forward the 8 gradients are summed in another order;
    the ~1e-7 rounding differences are then amplified by Muon's Newton-Schulz iteration, whose slope at
    small singular values is a^5 ~ 500, so the runs drift apart by 1e-4..1e-3 relative within four steps
    (measured), which is why this test fixes the grouping.
    """
    seqs_per_forward, rel = 4, 1e-6
    one = _torchrun(1, _train_args(synth_dir, tmp_path / "one", seqs_per_forward), tmp_path / "one")
    two = _torchrun(2, _train_args(synth_dir, tmp_path / "two", seqs_per_forward), tmp_path / "two")
    assert two["env"]["world_size"] == 2 and one["env"]["world_size"] == 1
    assert len(one["train_losses"]) == len(two["train_losses"]) == 4
    for a, b in zip(one["train_losses"], two["train_losses"], strict=True):
        assert a == pytest.approx(b, rel=rel, abs=rel)
    for a, b in zip(one["val_curve"], two["val_curve"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=rel, abs=rel)


def test_record89_on_two_nodes_equals_one_process(tmp_path):
    """The default race across machines, as the README's multi-node command runs it (two torchrun "nodes" of
    one gloo process each, here on one machine): record89-tiny's warm-up and a step, each process taking every
    other of a step's 8 packed sequences, with the optimizer's reductions and the validation's mean over ranks,
    equal one process accumulating over all 8. The gradients are summed in another order (one per sequence,
    then the all-reduce), so the losses agree to rounding (2e-7 relative, measured), not bit for bit."""
    generate_synth(tmp_path / "synth", seed=1, train_tokens=300_000, val_tokens=16_384)
    runs = []
    for nproc in (1, 2):
        log_dir = tmp_path / f"logs{nproc}"
        train_args = ["-m", "speedrun.cli", "train", "--preset", "record89-tiny", "--data", str(tmp_path / "synth"),
                      "--val-tokens", "16384", "--steps", "1", "--val-every", "1", "--log-dir", str(log_dir), "--quiet"]
        runs.append(_torchrun(1, train_args, log_dir) if nproc == 1 else _torchrun_two_nodes(train_args, log_dir))
    one, two = runs
    assert (one["env"]["world_size"], two["env"]["world_size"]) == (1, 2) and len(one["train_losses"]) == 1
    assert one["train_losses"] == pytest.approx(two["train_losses"], rel=1e-5)
    assert [p["step"] for p in one["val_curve"]] == [p["step"] for p in two["val_curve"]] == [0, 1]
    assert [p["val_loss"] for p in one["val_curve"]] == pytest.approx([p["val_loss"] for p in two["val_curve"]],
                                                                      rel=1e-5)


def test_an_absolute_data_path_inside_the_clone_is_logged_relative_to_it(synth_dir, tmp_path, monkeypatch):
    import speedrun.runlog

    cfg, env, data_dir, target, track = make_run(synth_dir.resolve(), "--steps", "1", "--val-every", "1")
    assert cfg.data.data_dir == str(synth_dir.resolve())  # what the user typed: absolute
    # outside the clone (where the test's data is): kept absolute, so the run can be reproduced here
    assert speedrun.runlog.repo_or_absolute_path(synth_dir) == str(synth_dir.resolve())
    monkeypatch.setattr(speedrun.runlog, "REPO_ROOT", synth_dir.parent)  # as if the data were in the clone
    result = train_mod.train(cfg, env, data_dir, target, track, log_dir=tmp_path, echo=False)
    facts = json.loads(result.json_path.read_text())
    assert facts["config"]["data"]["data_dir"] == synth_dir.name == facts["data"]["dir"]
    assert str(synth_dir.parent) not in result.log_path.read_text()


def test_a_compiled_model_compiles_every_shape_it_meets(monkeypatch):
    """Past dynamo's recompile limit (8 by default) a model runs eagerly from then on or, compiled whole as a
    Triton run's is (fullgraph=True), fails. Record #89's model meets several versions of itself (each stage's
    batch and MTP weights, train and eval; with the torch set, whose graph splits, each layer's attention and MLP
    are frames of their own: record89-tiny hit the limit within 3 steps) and the record raises the limit to 64
    (kernels.common.RECOMPILE_LIMIT): a model called at 12 shapes is compiled 12 times (dynamo's own tracing, a
    backend that only counts)."""
    import dataclasses

    import torch._dynamo

    from speedrun.config import get_preset

    class Doubler(torch.nn.Module):  # its own code object: no other test's compiled entries
        def forward(self, x):
            return 2 * x

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(model, backend=counting_backend, **options))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # dynamo's default (restored afterwards)
    cfg = get_preset("record89-tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True, kernels="triton"))
    model = train_mod.compile_model(Doubler(), cfg)
    try:
        for rows in range(1, 13):
            assert torch.equal(model(torch.ones(rows, 3)), torch.full((rows, 3), 2.0))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 12
