"""Argument types shared by the command lines (speedrun, speedrun bench, speedrun reproduce, leaderboard.py):
argparse ``type=`` callables that turn a bad value into argparse's one-line usage error."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = _int(text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def seed(text: str) -> int:
    value = non_negative_int(text)
    if value >= 2**63:  # what torch.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
