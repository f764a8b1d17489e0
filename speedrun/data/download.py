"""``speedrun data download``: fetch the published FineWeb GPT-2 shards from the Hugging Face hub.

The dataset repository ``kjj0/fineweb10B-gpt2`` holds FineWeb ``sample-10BT`` tokenized with GPT-2 into
100M-token shards: ``fineweb_val_000000.bin`` and ``fineweb_train_000001.bin`` ... ``_000103.bin``.
``hf_hub_download`` does the transfer (progress bars, resume of interrupted files, and a temp file that
is renamed into place only when complete). Every downloaded file's header is checked, and its size,
sha256 and token count are recorded in the folder's ``manifest.json``, which ``speedrun data verify``
checks later.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from speedrun.data.shards import (
    GPT2_EOT,
    GPT2_VOCAB_SIZE,
    MANIFEST_NAME,
    ShardError,
    manifest_entry,
    read_header,
    read_manifest,
    write_manifest,
)

DEFAULT_REPO_ID = "kjj0/fineweb10B-gpt2"
VAL_SHARD_NAME = "fineweb_val_000000.bin"
# The last train shard the default repository publishes (fineweb_train_000103.bin).
PUBLISHED_TRAIN_SHARDS = 103
# The sub3min recipe runs 1393 steps of 524,288 tokens = 730,333,184 train tokens. A 100M-token
# shard gives 190 steps (the loader moves on when fewer than batch + 1 tokens are left), so the run
# reads train shards 1-8. Two more are a margin for longer or re-tuned runs.
RECIPE_TRAIN_SHARDS = 8
DEFAULT_TRAIN_SHARDS = RECIPE_TRAIN_SHARDS + 2


class HubUnreachableError(RuntimeError):
    """The hub cannot be reached (offline mode, or no network) and some shards are still missing."""


class DownloadError(RuntimeError):
    """A download failed or gave a bad file, or the destination folder cannot take these shards."""


def shard_names(train_shards: int) -> list[str]:
    """The validation shard, then train shards 1..train_shards, as the repository names them."""
    return [VAL_SHARD_NAME] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks huggingface_hub to make no network calls."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _is_connection_problem(error: BaseException | None) -> bool:
    # huggingface_hub reports "no network" differently across versions: LocalEntryNotFoundError (with
    # the transport error as its cause), OfflineModeIsEnabled, or the transport error itself (requests'
    # ConnectionError, httpx's ConnectError / ConnectTimeout), so the whole exception chain is examined.
    transport_names = {"ConnectError", "ConnectTimeout", "ConnectionError", "Timeout", "ReadTimeout"}
    while error is not None:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError,
                              socket.gaierror)):
            return True
        if type(error).__name__ in transport_names:
            return True
        error = error.__cause__ or error.__context__
    return False


def _how_to_get_data(out_dir: Path, missing: list[str], reason: str) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"cannot reach the Hugging Face hub ({reason}); {len(missing)} shard(s) are missing from "
            f"{out_dir}: {shown}.\n"
            "To get the data, do one of these:\n"
            "  - connect this machine to the network (and unset HF_HUB_OFFLINE), then run "
            "`speedrun data download` again; shards already here are kept;\n"
            f"  - copy the shards into {out_dir} from a machine that has them "
            "(then check them with `speedrun data verify`);\n"
            "  - tokenize your own text: `speedrun data tokenize FILE... --out DIR`, and train with --data DIR;\n"
            "  - or train with no download at all: `./run.sh --preset sub3min-tiny` uses generated synthetic data.")


def _check_arguments(train_shards, out_dir, repo_id) -> None:
    if not isinstance(train_shards, int) or isinstance(train_shards, bool) or train_shards < 0:
        raise ValueError(f"train_shards must be a non-negative integer, got {train_shards!r}")
    if repo_id == DEFAULT_REPO_ID and train_shards > PUBLISHED_TRAIN_SHARDS:
        raise ValueError(f"{DEFAULT_REPO_ID} has {PUBLISHED_TRAIN_SHARDS} train shards, "
                         f"{train_shards} were asked for")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or "" in repo_id.split("/"):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")


def _start_manifest(out_dir: Path, repo_id: str) -> dict:
    """The folder's existing manifest with this download's keys, or a new one; refuses mixed folders."""
    try:
        existing = read_manifest(out_dir) or {"files": {}}
    except ValueError as e:
        raise DownloadError(f"{e}; fix or remove it before downloading into {out_dir}") from None
    kind = existing.get("kind", "download")
    if kind != "download":
        raise DownloadError(f"{out_dir} holds shards of kind {kind!r} (see its {MANIFEST_NAME}); "
                            "download into another folder")
    if existing.get("repo_id", repo_id) != repo_id:
        raise DownloadError(f"{out_dir} holds shards from {existing['repo_id']}, not {repo_id}; "
                            "download into another folder")
    return {**existing, "kind": "download", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT,
            "repo_id": repo_id, "files": dict(existing["files"])}


def _local_state(path: Path, manifest: dict, log) -> str:
    """"absent", "valid" (recorded in the manifest, not fetched again) or "invalid" (fetched again)."""
    if not path.exists():
        return "absent"
    try:
        num_tokens = read_header(path)
    except ShardError as e:
        log(f"{path.name}: present but invalid ({e.problem}); downloading it again")
        manifest["files"].pop(path.name, None)
        return "invalid"
    entry = manifest["files"].get(path.name)
    if not (isinstance(entry, dict) and entry.get("tokens") == num_tokens
            and entry.get("bytes") == path.stat().st_size):
        manifest["files"][path.name] = manifest_entry(path)  # a copied-in file: record its checksum
    log(f"{path.name}: already present ({num_tokens:,} tokens), not downloaded again")
    return "valid"


def download_shards(out_dir, train_shards: int = DEFAULT_TRAIN_SHARDS, repo_id: str = DEFAULT_REPO_ID,
                    log=print) -> dict:
    """Fetch the validation shard and train shards 1..train_shards into ``out_dir``; return the manifest.

    Files already present with a valid header are kept. Raises HubUnreachableError (offline, with
    instructions) or DownloadError (bad file, hub error); the manifest records every good shard either way.
    """
    _check_arguments(train_shards, out_dir, repo_id)
    out_dir = Path(out_dir)
    manifest = _start_manifest(out_dir, repo_id)
    states = {name: _local_state(out_dir / name, manifest, log) for name in shard_names(train_shards)}
    missing = [name for name, state in states.items() if state != "valid"]
    if out_dir.is_dir():
        write_manifest(out_dir, manifest)  # keeps the checksums of copied-in files even if we stop below
    if missing and hub_offline():
        raise HubUnreachableError(_how_to_get_data(out_dir, missing, "HF_HUB_OFFLINE is set"))

    bad = []
    for i, name in enumerate(missing):
        log(f"{name}: downloading from {repo_id}")
        try:
            # An invalid local copy must be replaced, even where the hub's own metadata calls it current.
            path = Path(hf_hub_download(repo_id, name, repo_type="dataset", local_dir=out_dir,
                                        force_download=states[name] == "invalid"))
        except Exception as e:  # noqa: BLE001 -- every hub failure becomes a message, not a traceback
            if _is_connection_problem(e):
                raise HubUnreachableError(_how_to_get_data(out_dir, missing[i:], f"{type(e).__name__}: {e}")) from e
            raise DownloadError(f"downloading {name} from dataset {repo_id} failed: {type(e).__name__}: {e}") from e
        try:
            manifest["files"][name] = manifest_entry(path)
        except ShardError as e:
            path.unlink(missing_ok=True)  # a bad shard must never look like data
            manifest["files"].pop(name, None)
            bad.append(f"{name} ({e.problem})")
            log(f"{name}: BAD download, deleted: {e.problem}")
        else:
            log(f"{name}: ok ({manifest['files'][name]['tokens']:,} tokens)")
        write_manifest(out_dir, manifest)  # after every file, so an interruption loses nothing
    if bad:
        raise DownloadError(f"{len(bad)} downloaded file(s) were not valid shards and were deleted: "
                            + "; ".join(bad) + ". Run the download again.")
    return manifest


def download_command(train_shards: int | None, out_dir: str, repo_id: str) -> int:
    """``speedrun data download``: 0 when every asked-for shard is present and valid, else 1."""
    train_shards = DEFAULT_TRAIN_SHARDS if train_shards is None else train_shards
    try:
        manifest = download_shards(out_dir, train_shards, repo_id)
    except (ValueError, HubUnreachableError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the destination folder cannot be written, disk full, ...
        print(f"error: {out_dir}: {e}", file=sys.stderr)
        return 1
    wanted = shard_names(train_shards)
    total = sum(manifest["files"][name]["tokens"] for name in wanted)
    print(f"{len(wanted)} shards ({total:,} tokens) in {out_dir}; checksums in {Path(out_dir) / MANIFEST_NAME}")
    return 0
