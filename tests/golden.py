"""Access to ../shared/reference/golden/record89-tiny: tensors computed by record #89's own code at a tiny size
(see its README). Tests get a ``Golden`` through the ``golden89`` fixture (tests/conftest.py), which skips
when ../shared is absent."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import torch

from speedrun.config import RunConfig, Stage, get_preset

GOLDEN89 = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "golden" / "record89-tiny"


class Golden:
    """One golden folder: ``config``, ``steps_json`` (dicts) and ``tensors(name)`` (a .pt file, cached)."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())

    @functools.cached_property
    def steps_json(self) -> dict:
        return json.loads((self.folder / "steps.json").read_text())

    @functools.cache  # noqa: B019 - one Golden per session
    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return torch.load(self.folder / f"{name}.pt", weights_only=True)

    def tensor(self, file: str, key: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """``key`` from ``file``, with row-sparse entries (``key::rows`` / ``key::values``) expanded onto ``like``
        (the init value in steps.pt, zeros in grads.pt)."""
        d = self.tensors(file)
        if key + "::rows" not in d:
            return d[key].contiguous()
        out = like.clone()
        out[d[key + "::rows"]] = d[key + "::values"]
        return out

    def run_config(self) -> RunConfig:
        """The record89 preset at the golden folder's tiny sizes (stages, block size, validation batch)."""
        c = self.config
        stages = tuple(Stage(duration=s["duration"], batch_tokens=s["batch_size"], max_doc_len=s["train_max_seq_len"],
                             windows=tuple(s["window_sizes_blocks"]), lr_mul=s["lr_mul"],
                             mtp_start=tuple(s["mtp_weights_start"]), mtp_end=tuple(s["mtp_weights_end"]))
                       for s in c["training_stages_tiny"])
        base = get_preset("record89")
        schedule = dataclasses.replace(base.schedule, stages=stages, scheduled_steps=c["num_scheduled_iterations"],
                                       extension_steps=c["num_extension_iterations"],
                                       val_batch_tokens=c["val_batch_size"])
        model = dataclasses.replace(base.model, attn_block_size=c["block_size"], dim=c["model_dim"],
                                    n_head=c["num_heads"], head_dim=c["head_dim"], mlp_hidden=c["mlp_hidden"],
                                    bigram_vocab_size=c["bigram_vocab_size"], bigram_dim=c["bigram_dim"],
                                    fp8_lm_head=False)  # the golden run's "FP8 off" (patch R0)
        return dataclasses.replace(base, model=model, schedule=schedule)


def golden_name(label: str) -> str:
    """The record's state-dict name of one of our record-89 parameter labels."""
    return label + ".weight" if label in ("embed", "lm_head", "smear_gate", "skip_gate", "bigram_embed") else label


def load_model89(golden: Golden, state: str = "init", cfg=None):
    """speedrun.model89.GPT89 at the golden's tiny size in fp32 (torch ops), holding ``state``: "init" or
    "after_k" (k = 1, 2, 3) of steps.pt."""
    import kernels
    from speedrun.model89 import GPT89

    cfg = cfg or golden.run_config()
    model = GPT89(cfg.model, kernels.resolve("torch"), dtype=torch.float32)
    with torch.no_grad():
        for label, p in model.named_parameters():
            init = golden.tensor("init", golden_name(label))
            value = init if state == "init" else golden.tensor("steps", f"{state}/{golden_name(label)}", init)
            p.copy_(value)
        model.bigram_sign_table.copy_(golden.tensor("init", "bigram_sign_table"))
    return model
