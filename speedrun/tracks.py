"""Tracks: the one table that fixes what a record on each track means.

A track fixes the target validation loss, the number of validation tokens, the data and the hardware
class. The trainer stamps the track into every run log; the leaderboard validates runs against this
same table. A target is either a fixed number (the real speedrun's 3.28) or a fixed margin above the
data's Bayes-optimal loss, which the synthetic data generator computes exactly and writes into its
manifest (the CPU track): either way no target is ever typed into a log or a record by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Track:
    name: str
    description: str
    data: str  # "fineweb10B": the published GPT-2-tokenized FineWeb shards; "synth": speedrun data synth
    val_tokens: int
    hardware: str  # human-readable hardware class
    gpu_count: int  # processes/GPUs a record run must use (0 = CPU only)
    gpu_model: str | None  # substring the GPU name must contain (None = any / CPU)
    target_val_loss: float | None = None  # a fixed target ...
    target_margin_over_floor: float | None = None  # ... or a margin above the data's optimal loss

    def target(self, data_floor: float | None = None) -> float:
        """The target validation loss; ``data_floor`` is the data's Bayes-optimal loss (synthetic data)."""
        if self.target_val_loss is not None:
            return self.target_val_loss
        if data_floor is None:
            raise ValueError(f"track {self.name!r} sets its target above the data's optimal loss, "
                             "but the data's manifest gives none (generate it with `speedrun data synth`)")
        return round(data_floor + self.target_margin_over_floor, 4)


TRACKS: dict[str, Track] = {
    t.name: t
    for t in (
        Track(
            name="8xH100-3.28",
            description="GPT-2 (124M) on FineWeb to 3.28 val loss, 8x H100",
            data="fineweb10B",
            val_tokens=10_485_760,
            hardware="8x NVIDIA H100",
            gpu_count=8,
            gpu_model="H100",
            target_val_loss=3.28,
        ),
        Track(
            name="tiny-cpu",
            description="the -tiny presets on the synthetic language, CPU",
            data="synth",
            val_tokens=131_072,
            hardware="CPU",
            gpu_count=0,
            gpu_model=None,
            target_margin_over_floor=0.15,
        ),
    )
}


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise ValueError(f"unknown track {name!r}; known tracks: {', '.join(TRACKS)}")
    return TRACKS[name]
