"""The one reader of train.py checkpoints: find the one to resume from, check it, read its step, hyper-parameters and
model weights. Imported by training (resume, callbacks, calibration) and by evaluation, so it imports neither.

A checkpoint is either
- one file (`torch.save` of Lightning's checkpoint dict, a zip archive): every strategy but trainer=fsdp; or
- a folder of shards (trainer=fsdp, torch.distributed.checkpoint): every rank's `*.distcp` files, DCP's `.metadata`,
  and `meta.pt` (Lightning's dict without the weights and optimizer state: step, loops, callbacks, hyper-parameters).
Both hold plain containers and tensors only, so they load with `weights_only=True`.
"""

import zipfile
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import compat

CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")
SHARDED_META = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
SHARDED_KEYS = ("state_dict", "global_step", "loops")  # optimizer state: DCP keys optimizer_0, ...
# Model settings that change how the model runs, not what its weights mean: a resume may change them.
RUNTIME_KEYS = {"backend", "flex_kernel_options", "activation_checkpointing", "fp8"}


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir()


def metadata(path: Path) -> dict:
    """Everything but the tensors' data: for one file its pickle (the tensors stay memory-mapped), for shards meta.pt.
    Raises ValueError saying why it is not a loadable training checkpoint."""
    path = Path(path)
    try:
        if is_sharded(path):
            checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
            if not (path / ".metadata").is_file():
                raise FileNotFoundError("no .metadata: the shards were not all written")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch, zip and pickle errors all mean the same here
        raise ValueError(f"truncated, corrupt or not loadable with weights_only: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError("not a training checkpoint (not a dict)")
    missing = [key for key in (SHARDED_KEYS[1:] if is_sharded(path) else CHECKPOINT_KEYS) if key not in checkpoint]
    if missing:
        raise ValueError(f"not a training checkpoint (no {', '.join(missing)})")
    return checkpoint


def saved_step(path: Path) -> int:
    """The global step of a training checkpoint; ValueError if it is not a loadable one."""
    return metadata(path)["global_step"]


def load(path: Path, with_optimizer: bool = False) -> dict:
    """The whole checkpoint as one dict of full (unsharded) CPU tensors, however it was written. The optimizer state
    of shards is left out unless asked for (it is FQN-keyed, not Lightning's list)."""
    path = Path(path)
    checkpoint = metadata(path)
    if not is_sharded(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    keys = {"state_dict"} | ({k for k in dcp_keys(path) if k.startswith("optimizer_")} if with_optimizer else set())
    try:  # DCP reads and joins the shards of every rank, in this one process, with no process group
        return {**checkpoint, **compat.load_dcp_keys(keys, str(path))}
    except Exception as err:
        raise ValueError(f"its shards are unreadable ({str(err).splitlines()[0]})") from None


def dcp_keys(path: Path) -> set[str]:
    """The top-level keys stored in a folder of shards."""
    from torch.distributed.checkpoint import FileSystemReader

    return {fqn.split(".")[0] for fqn in FileSystemReader(str(path)).read_metadata().state_dict_metadata}


def model_weights(checkpoint: dict) -> dict:
    """The model's own weights: the LightningModule's `model.` entries without the prefix."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def config_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """`model.n_layer: checkpoint 4, this run 6` for every setting that differs (runtime settings aside)."""
    keys = sorted((saved.keys() | current.keys()) - RUNTIME_KEYS)
    return [
        f"{prefix}.{key}: checkpoint {saved.get(key)}, this run {current.get(key)}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def check_same_model(path: Path, model: dict) -> None:
    """ValueError naming every model setting in which this run differs from the checkpoint it would resume."""
    saved = metadata(path).get("hyper_parameters", {}).get("model", {})
    differences = config_differences(saved, model)
    if differences:
        raise ValueError(
            f"{path} was trained with another model ({'; '.join(differences)}): resume it with its own config (drop "
            "these overrides), or start a new run with another run=NAME"
        )


def corrupt_part(path: Path) -> str | None:
    """What fails its check when read in full, or None: for one file the first zip record whose CRC does not match
    (a flipped byte anywhere); for shards a shard file that the metadata names and that is missing or short."""
    if not is_sharded(path):
        with zipfile.ZipFile(path) as archive:
            record = archive.testzip()
        return None if record is None else f"record {record} fails its CRC check"
    from torch.distributed.checkpoint import FileSystemReader

    ends: dict[str, int] = {}
    for item in FileSystemReader(str(path)).read_metadata().storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        if not (path / name).is_file() or (path / name).stat().st_size < end:
            return f"shard {name} is missing or shorter than its metadata says"
    return None


def find_resumable(dirpaths: list[str]) -> str | None:
    """The checkpoint of the highest global step in these directories (last.ckpt on a tie), or None if there is
    none: a new run. Only `*.ckpt` names count: a write in progress or cut short has another name. Unreadable
    checkpoints are skipped with a warning that names them; if none is readable, a ValueError says what to do."""
    found = {path for d in dirpaths if Path(d).is_dir() for path in Path(d).glob("*.ckpt")}
    steps, problems = {}, []
    for path in found:
        try:
            steps[path] = saved_step(path)
        except ValueError as err:
            problems.append(f"{path} is unreadable ({err})")
    for path in sorted(steps, key=lambda p: (steps[p], p.name == "last.ckpt"), reverse=True):
        part = corrupt_part(path)  # read in full only for the checkpoint chosen
        if part is None:
            if problems:
                rank_zero_warn(f"resuming from the previous good checkpoint {path}: {'; '.join(problems)}")
            return str(path)
        problems.append(f"{path} is corrupt ({part})")
    if problems:
        raise ValueError(
            f"no readable checkpoint to resume from: {'; '.join(problems)}. Move these files away to start the run "
            "over, or pick another run name (run=NAME)"
        )
    return None
