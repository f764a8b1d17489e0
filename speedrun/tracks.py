"""Tracks: the one table that fixes what a record on each track means.

A track fixes the target validation loss, the number of validation tokens, the validation data and the
hardware class. The trainer stamps the track into every run log; the leaderboard validates runs against
this same table. A target is either a fixed number (the real speedrun's 3.28) or a fixed margin above the
Bayes-optimal loss of the track's own validation data (the CPU track: the synthetic language of
``speedrun data synth``'s default seed, whose generator computes that loss exactly). The validation data
is identified by the sha256 of its val shard. Both belong here, not to a data folder's manifest that
anyone can edit: a run on other validation data is not on the track, and a log claiming another target
is rejected. ``tests/test_leaderboard_reproduce.py`` regenerates the CPU track's data and checks both.
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
    target_margin_over_floor: float | None = None  # ... or a margin above the track's data's optimal loss
    data_floor: float | None = None  # the optimal loss of the track's first val_tokens validation targets
    val_data_sha256: str | None = None  # the track's val shard (None: not yet known; runs must then agree)

    def target(self, data_floor: float | None = None) -> float:
        """The target validation loss. ``data_floor``: a margin track's target over other data (a run off the
        track, e.g. a test's small synthetic data); the track's own data by default."""
        if self.target_val_loss is not None:
            return self.target_val_loss
        floor = self.data_floor if data_floor is None else data_floor
        if floor is None:
            raise ValueError(f"track {self.name!r} sets its target above the data's optimal loss, "
                             "but the data's manifest gives none (generate it with `speedrun data synth`)")
        return round(floor + self.target_margin_over_floor, 4)


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
            # `speedrun data synth` (seed 0, generator version 1): its manifest's val_optimal_loss_prefix for
            # 131,072 tokens and the sha256 of synth_val_000000.bin (both recomputed by the test named above)
            data_floor=4.461653401648635,
            val_data_sha256="866d84c8fffccc9cf4ee81e15953879a4c45d380e6b44d238018f4a4ad1fa156",
        ),
    )
}


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise ValueError(f"unknown track {name!r}; known tracks: {', '.join(TRACKS)}")
    return TRACKS[name]
