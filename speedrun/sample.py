"""``speedrun sample``: generate text from a checkpoint written by ``speedrun train --save-checkpoint``.

The checkpoint holds the run's config and weights (plain tensors and primitives), so it loads with
``torch.load(weights_only=True)``. Models trained on GPT-2 tokens use the GPT-2 tokenizer for the
prompt and the output; a model trained on the synthetic language has no text tokenizer, so its prompt
is read as space-separated token ids and its output is printed as ids.

Record #89's model keeps part of its state outside its weights: the rotary frequencies and attention scale
that YaRN changed at each stage, and the windows. The trainer got there by calling ``set_plan`` step by step;
loading replays those calls up to the checkpoint's step, so the model samples as it validated. Its next-token
scores are the softcapped logits its validation loss is the cross-entropy of.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import kernels
from speedrun import schedule
from speedrun.config import RunConfig, window_blocks
from speedrun.data.packed import bigram_hash
from speedrun.model import GPT
from speedrun.model89 import GPT89


def load_failure(error: Exception) -> str:
    """Why torch.load failed, in one line: its messages go on for lines of advice about weights_only and
    miniz; what failed is the unpickler's own reason, or else the message's first sentence."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    return " ".join(text.split()).split(". ", 1)[0][:200]


def load_checkpoint(path) -> tuple[GPT | GPT89, RunConfig, int]:
    """(the model in eval mode, fp32 on the CPU with the reference ops; its config; the step it was saved at)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # (torch warns about a foreign pickle's protocol before it fails)
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say what it is, not a pickle traceback
        raise SystemExit(f"{path}: not a speedrun checkpoint ({type(e).__name__}: {load_failure(e)})") from None
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise SystemExit(f"{path}: not a speedrun checkpoint (expected 'config' and 'model' entries)")
    try:
        cfg = RunConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SystemExit(f"{path}: not a speedrun checkpoint (its config is not a run config: "
                         f"{type(e).__name__}: {e})") from None
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.train.num_steps:
        raise SystemExit(f"{path}: not a speedrun checkpoint (its step {step!r} is not one of its run's "
                         f"0..{cfg.train.num_steps})")
    model = (GPT89 if cfg.model.arch == "record89" else GPT)(cfg.model, kernels.resolve("torch"), dtype=torch.float32)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # missing, extra or misshapen weights
        raise SystemExit(f"{path}: its weights do not fit its config ({' '.join(str(e).split())[:300]})") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SystemExit(f"{path}: the weights hold NaN or infinite values ({', '.join(bad[:3])}): "
                         "a diverged model cannot be sampled")
    if isinstance(model, GPT89):  # the trainer's set_plan calls up to this step (see the module docstring)
        for s in range(step + 1):
            model.set_plan(schedule.plan(cfg, s))
    return model.eval(), cfg, step


def context_limit(cfg: RunConfig, step: int) -> int:
    """The longest document the model trained on at ``step``: its sequence length, or record #89's document cut."""
    return schedule.plan(cfg, step).max_doc_len or cfg.data.seq_len


def next_token_logits(model: GPT | GPT89, cfg: RunConfig, step: int, ids: list[int]) -> torch.Tensor:
    """The scores (vocab_size,) fp32 of the token after ``ids``, one document, as the model at ``step`` sees it."""
    if isinstance(model, GPT89):
        inputs = torch.tensor(ids, dtype=torch.int32)
        bigram = torch.from_numpy(bigram_hash(inputs.numpy(), cfg.model.bigram_vocab_size))
        hidden = model.final_hidden(inputs, torch.tensor([0, len(ids)], dtype=torch.int32), bigram)
        return model.logits(hidden[-1:])[0, :cfg.model.vocab_size]
    window = window_blocks(step, cfg)
    return model(torch.tensor(ids, dtype=torch.int64)[None], window=window)[0, -1, :cfg.model.vocab_size]


@torch.no_grad()
def generate(model: GPT | GPT89, cfg: RunConfig, step: int, prompt_ids: list[int], max_new_tokens: int,
             temperature: float, top_k: int, generator: torch.Generator) -> list[int]:
    """Sample continuation ids (recomputing the whole context each token: simple, and fine at this size)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = [cfg.model.eot_token] + list(prompt_ids)  # every document starts with end-of-text
    max_context = context_limit(cfg, step)
    out = []
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, cfg, step, ids[-max_context:]) / temperature
        if top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if token == cfg.model.eot_token:
            break
        ids.append(token)
        out.append(token)
    return out


def sample_command(args) -> int:
    model, cfg, step = load_checkpoint(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    if cfg.model.vocab_size == 50257:
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        prompt_ids = enc.encode_ordinary(args.prompt)
        new = generate(model, cfg, step, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, generator)
        print(args.prompt + enc.decode(new))
    else:
        try:
            prompt_ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise SystemExit(f"this model was trained on a {cfg.model.vocab_size}-token synthetic vocabulary: "
                             "give the prompt as space-separated token ids") from None
        bad = [t for t in prompt_ids if not 0 <= t < cfg.model.vocab_size]
        if bad:
            raise SystemExit(f"prompt token ids {bad} are outside the vocabulary [0, {cfg.model.vocab_size})")
        new = generate(model, cfg, step, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, generator)
        print(" ".join(map(str, prompt_ids + new)))
    return 0
