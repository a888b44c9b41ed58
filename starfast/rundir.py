"""The run directory: where a job keeps its configuration, trained models and checkpoints.

Layout (every file is written atomically: a temp file in the same folder, then ``os.replace``)::

    RUN/config.json                        what the run is (model, dataset, recipe, counts)
    RUN/sources/seed-0000.safetensors      state_dict (parameters and buffers) of source model 0
    RUN/sources/seed-0000.json             its metadata: model, dataset, seed, recipe, metrics...
    RUN/heldout/seed-1000.safetensors      held-out models, same format
    RUN/extra/<name>/seed-3000.safetensors an extra held-out set trained with its own recipe (e.g. Adam)
    RUN/models.json                        metrics of every finished model
    RUN/star/star-0000.safetensors         the star models (+ .json: sources, settings, metrics)
    RUN/fusion/z0005/star/star-0000.*      fusion stars trained on the first 5 sources
    RUN/checkpoints/<role>/seed-0000.pt    in-progress training state (removed once finished)
    RUN/checkpoints/<star set>/star-0000.pt  in-progress star training
    RUN/results/                           the evaluation's results.json, table.md, curves.png
    RUN/results/partial.json               curves of an evaluation in progress (removed once written)
    RUN/results/.pending/                  results being published as a unit (see publish; experiment folders too)
    RUN/stars/<name>/star-0000.*           an experiment's star set, named by its settings (z0010-e90-...)
    RUN/experiments/NAME/                  an experiment's results.json, table.md, figure.png (complete runs only)
    RUN/experiments/NAME/incomplete/       the same of the last run in which a cell failed
    RUN/experiments/curves/<key>.json      every barrier curve an experiment measured here (reused)
    RUN/variants/<slug>/                   a run directory of its own (another model or recipe of a sweep)
    RUN/.lock                              held by the one process working here (pid and command)

A model is *finished* when both its ``.safetensors`` and its ``.json`` exist (the JSON is written
last, so a crash between the two leaves an unfinished model that is trained again from its
checkpoint). Source seeds are ``0 .. N-1``, held-out seeds ``1000 .. 1000+H-1`` and the seeds of
every extra held-out set ``3000 .. 3000+E-1`` (:func:`source_seeds`, :func:`heldout_seeds`,
:func:`extra_seeds`; stars start from seeds 2000..), so no two kinds of model share a seed. An
extra set's role is ``extra/<name>`` (:func:`extra_role`); its models are stored like the others.

:class:`RunDir` is the only code that knows this layout; the pipeline (:mod:`starfast.pipeline`)
fills it, the algorithms below never see it (they get tensors and a checkpoint path). The file
formats themselves are :mod:`starfast.files`'.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from starfast.flat import ParamSpace
from starfast.files import TEMP_PATTERN, StoredFileError, load_state_dict, read_json, save_state_dict, write_json
from starfast import data
from starfast.models import ModelSpec, canonical_arch, describe_change

PathLike = Union[str, os.PathLike]

ROLES = ("sources", "heldout")
HELDOUT_SEED_START = 1000
EXTRA_SEED_START = 3000
EXTRA_FOLDER = "extra"
# Extra set names that would make an evaluation kind ("star_<name>", "<name>_<name>") ambiguous.
RESERVED_SET_NAMES = ("sources", "source", "heldout", "regular", "star")
CONFIG_IDENTITY = ("model", "dataset", "recipe")
DIGEST_KEY = "weights_sha256"  # in a model's or star's JSON: the checksum of its weights file
LOCK_NAME = ".lock"
PENDING_NAME, COMPLETE_NAME = ".pending", "complete.json"  # <folder>/.pending: outputs being published
MAIN_STARS = "star"  # the main job's star set; fusion stars of N sources are "fusion/zNNNN/star"


def fusion_star_set(num_sources: int) -> str:
    return f"fusion/z{num_sources:04d}/star"


def experiment_star_set(name: str) -> str:
    """The folder of an experiment's star set ``name`` (a name that spells out its settings)."""
    return f"stars/{name}"
# config.json key -> the CLI flag that sets it, for mismatch messages
_FLAG_OF = {"model.arch": "--arch", "model.kwargs": "--arch-kw", "dataset": "--dataset"}


class RunDirError(StoredFileError):
    """A run-directory file is corrupt, missing, or belongs to a different configuration."""


def source_seeds(count: int) -> List[int]:
    """Seeds of the ``count`` source models: ``0 .. count-1``."""
    if not 0 <= count <= HELDOUT_SEED_START:
        raise ValueError(f"--sources must be in [0, {HELDOUT_SEED_START}] (held-out seeds start at {HELDOUT_SEED_START}), got {count}")
    return list(range(count))


def heldout_seeds(count: int) -> List[int]:
    """Seeds of the ``count`` held-out models: ``1000 .. 1000+count-1`` (disjoint from sources)."""
    if count < 0:
        raise ValueError(f"--heldout must be >= 0, got {count}")
    return list(range(HELDOUT_SEED_START, HELDOUT_SEED_START + count))


def extra_seeds(count: int) -> List[int]:
    """Seeds of the ``count`` models of an extra held-out set: ``3000 .. 3000+count-1``."""
    if not 0 <= count <= 1000:
        raise ValueError(f"an --extra-heldout set holds 0..1000 models, got {count}")
    return list(range(EXTRA_SEED_START, EXTRA_SEED_START + count))


def extra_role(name: str) -> str:
    """The role (``extra/<name>``) of the extra held-out set ``name``, the name checked: lowercase
    letters, digits and ``-``, starting with a letter, not one of :data:`RESERVED_SET_NAMES`."""
    if not _is_set_name(name):
        raise ValueError(f"--extra-heldout set name {name!r} must be lowercase letters, digits and '-', starting with a "
                         f"letter, and not one of {', '.join(RESERVED_SET_NAMES)} (e.g. adam)")
    return f"{EXTRA_FOLDER}/{name}"


def _is_set_name(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z0-9-]*", name)) and name not in RESERVED_SET_NAMES


# -- the directory --------------------------------------------------------------------------------


def _normalised(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float spellings) compare as stored."""
    return json.loads(json.dumps(value))


def _first_difference(stored: Any, wanted: Any, where: str) -> Optional[Tuple[str, Any, Any]]:
    if isinstance(stored, dict) and isinstance(wanted, dict) and where != "model.kwargs":
        for key in sorted(set(stored) | set(wanted)):
            found = _first_difference(stored.get(key), wanted.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    return None if stored == wanted else (where, stored, wanted)


def _flag_for(key: str) -> str:
    if key in _FLAG_OF:
        return _FLAG_OF[key]
    if key.startswith("recipe."):
        return "--" + key.split(".", 1)[1].replace("_", "-")
    return "the dataset's shape (--dataset)" if key.startswith("model.") else key


class RunDir:
    """A run directory (see the module docstring for the layout)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    @property
    def results_folder(self) -> Path:
        """``RUN/results``: the evaluation's and the applications' outputs."""
        return self.path / "results"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def read_config(self) -> Optional[Dict[str, Any]]:
        """The stored config, or ``None`` for a new run directory."""
        if not self.config_path.exists():
            return None
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path} holds a JSON {type(config).__name__}, not the object starfast writes; "
                              "delete it to start the run directory afresh")
        return config

    def check_config(self, config: Mapping[str, Any], identity: Sequence[str] = CONFIG_IDENTITY) -> Dict[str, Any]:
        """Raise :class:`RunDirError` if the stored config differs from ``config`` on ``identity`` keys
        (unless the directory holds no finished model or star and no checkpoint: every attempt with
        the old settings failed, so the new ones replace them).

        Returns the stored config updated with ``config`` (non-identity keys, such as the number
        of source models, may change between invocations). Writes nothing.
        """
        wanted = _normalised(dict(config))
        stored = self.read_config()
        if stored is None or not self.holds_work():  # nothing here was made with the old settings
            return wanted
        for key in identity:
            if key not in wanted:
                continue
            difference = _first_difference(stored.get(key), wanted[key], key)
            if difference:
                where, old, new = difference
                if where.startswith("model.source"):  # a user architecture whose file or spec changed
                    change = describe_change(wanted["model"]["arch"], stored["model"]["source"], wanted["model"]["source"])
                    raise RunDirError(f"run directory {self.path} was made before this change: {change}; use another "
                                      "--run-dir, or restore the file")
                raise RunDirError(
                    f"run directory {self.path} was created with {where} = {json.dumps(old)} but this run asks for "
                    f"{json.dumps(new)} ({_flag_for(where)}); use another --run-dir, or the same settings as before"
                )
        return {**stored, **wanted}

    def prepare(self, config: Mapping[str, Any], identity: Sequence[str] = CONFIG_IDENTITY) -> Dict[str, Any]:
        """:meth:`check_config`, then write the merged config; returns it."""
        merged = self.check_config(config, identity)
        if merged != self.read_config():
            write_json(self.config_path, merged)
        return merged

    def model_spec(self) -> ModelSpec:
        config = self.read_config()
        if config is None:
            raise RunDirError(f"{self.config_path} is missing; train the models first (python -m starfast.train --stage models)")
        try:
            spec = ModelSpec.from_dict(config["model"])
            canonical_arch(spec.arch)  # an unknown architecture is this file's fault, not the code's
            return spec
        except (KeyError, TypeError, ValueError) as error:
            raise RunDirError(f"{self.config_path} has no valid 'model' entry ({type(error).__name__}: {error}); delete it "
                              "and run python -m starfast.train again with the settings of this run") from None

    def dataset_name(self) -> str:
        """The dataset ``config.json`` names (a known one, or :class:`RunDirError`)."""
        config = self.read_config()
        if config is None:
            raise RunDirError(f"{self.config_path} is missing; train the models first (python -m starfast.train --stage models)")
        try:
            return data.canonical_name(config["dataset"])
        except (KeyError, TypeError, ValueError) as error:
            raise RunDirError(f"{self.config_path} has no valid 'dataset' entry ({error}); restore it, or delete it and run "
                              "python -m starfast.train again with the settings of this run") from None

    def holds_work(self) -> bool:
        """Whether anything was trained here: a finished model or star, or a checkpoint."""
        checkpoints = self.path / "checkpoints"
        return (any(self.finished_seeds(role) for role in (*ROLES, *self.extra_roles())) or bool(self.finished_stars())
                or (checkpoints.is_dir() and any(path.is_file() for path in checkpoints.rglob("*"))))

    # -- one process at a time ----------------------------------------------------------------

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run directory's lock (an advisory ``flock`` on ``RUN/.lock``) while the block
        runs; a second process stops at once with a message naming the holder's pid and command.
        Inside the lock, temporary files left by killed writes are removed."""
        lock = self.path / LOCK_NAME
        if self.path.is_symlink() and not self.path.exists():
            raise RunDirError(f"the run directory {self.path} is a symbolic link to {os.readlink(self.path)}, which does not "
                              "exist; create that folder, or use another --run-dir")
        if lock.is_dir():
            raise RunDirError(f"{lock} is a folder, not starfast's lock file; remove it (rmdir {lock})")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except OSError as error:
            raise RunDirError(f"cannot write to the run directory {self.path} ({error.strerror}: {error.filename}); use a "
                              "writable --run-dir") from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "a process that has not written its name yet"
                raise RunDirError(f"{self.path} is in use by another starfast process ({holder}); wait for it to "
                                  "finish, or use another --run-dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}: {command}\n")
            handle.flush()
            self._remove_leftovers()
            yield
        finally:
            handle.close()  # closing releases the lock

    def _remove_leftovers(self) -> None:
        """Delete the temporary files of writes that a killed process never finished, and finish
        (or drop) a publication of outputs that was interrupted (see :meth:`publish`)."""
        nested = {lock.parent for lock in self.path.rglob(LOCK_NAME) if lock.parent != self.path}  # run dirs of their own
        for path in self.path.rglob(TEMP_PATTERN):
            if path.is_file() and nested.isdisjoint(path.parents):
                path.unlink()
        for pending in list(self.path.rglob(PENDING_NAME)):
            if not pending.is_dir() or not nested.isdisjoint(pending.parents):
                continue
            if (pending / COMPLETE_NAME).exists():
                self._move_into_place(pending)
            else:
                shutil.rmtree(pending)

    # -- experiments --------------------------------------------------------------------------

    def experiment_folder(self, name: str) -> Path:
        """``RUN/experiments/NAME``: an experiment's outputs."""
        return self.path / "experiments" / name

    @property
    def curves_folder(self) -> Path:
        """``RUN/experiments/curves``: one JSON per barrier curve measured by an experiment."""
        return self.path / "experiments" / "curves"

    def variant(self, slug: str) -> "RunDir":
        """``RUN/variants/<slug>``: the run directory of another model or recipe of a sweep (its own
        lock and config; the enclosing run leaves its files alone)."""
        return RunDir(self.path / "variants" / slug)

    # -- results ------------------------------------------------------------------------------

    def publish(self, folder: Path, write: Callable[[Path], Sequence[str]], owned: Sequence[str] = ()) -> Path:
        """Outputs written as a unit into ``folder`` (``RUN/results``, an experiment's folder):
        ``write(pending)`` writes its files into ``folder/.pending`` and returns their names, the
        pending folder is marked complete, then the files are moved into ``folder`` (the first
        name, e.g. ``results.json``, last) and the ``owned`` names this unit did not write this time
        (e.g. a figure with nothing to draw) are removed. A process killed before the mark leaves
        no trace of the new outputs; one killed after it has the move finished by the next process
        that takes the lock, so files of two runs never stand side by side. Returns ``folder``."""
        pending = folder / PENDING_NAME
        if pending.exists():
            shutil.rmtree(pending)
        names = list(write(pending))
        write_json(pending / COMPLETE_NAME, {"files": names, "stale": [name for name in owned if name not in names]})
        self._move_into_place(pending)
        return folder

    @staticmethod
    def _move_into_place(pending: Path) -> None:
        marked, folder = read_json(pending / COMPLETE_NAME), pending.parent
        for name in marked.get("stale", []):
            (folder / name).unlink(missing_ok=True)
        names = marked["files"]
        for name in [*names[1:], names[0]]:
            if (pending / name).exists():
                os.replace(pending / name, folder / name)
        shutil.rmtree(pending)

    # -- models -------------------------------------------------------------------------------

    def model_path(self, role: str, seed: int) -> Path:
        """``RUN/<role>/seed-XXXX.safetensors``; its metadata is the same path with ``.json``."""
        if role not in ROLES and not (role.startswith(f"{EXTRA_FOLDER}/") and _is_set_name(role.split("/", 1)[1])):
            raise ValueError(f"role must be one of {ROLES} or extra/<name>, got {role!r}")
        return self.path / role / f"seed-{seed:04d}.safetensors"

    def checkpoint_path(self, *parts: str) -> Path:
        """``RUN/checkpoints/<parts...>`` (in-progress training state of any stage)."""
        return self.path.joinpath("checkpoints", *parts)

    def model_checkpoint_path(self, role: str, seed: int) -> Path:
        return self.checkpoint_path(role, f"seed-{seed:04d}.pt")

    def is_finished(self, role: str, seed: int) -> bool:
        path = self.model_path(role, seed)
        return path.exists() and path.with_suffix(".json").exists()

    def extra_roles(self) -> List[str]:
        """The roles of the extra held-out sets stored here (``extra/<name>``, sorted by name)."""
        folder = self.path / EXTRA_FOLDER
        names = sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
        return [extra_role(name) for name in names if _is_set_name(name)]

    def finished_seeds(self, role: str) -> List[int]:
        folder = self.path / role
        if not folder.is_dir():
            return []
        seeds = (int(path.stem.split("-", 1)[1]) for path in folder.glob("seed-*.json") if path.stem.split("-", 1)[1].isdigit())
        return sorted(seed for seed in seeds if self.is_finished(role, seed))

    def save_model(self, role: str, seed: int, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
        """Write the weights, then the metadata JSON (which marks the model finished)."""
        path = self.model_path(role, seed)
        digest = save_state_dict(path, state_dict, {"role": role, "seed": str(seed), "arch": str(metadata.get("model", {}).get("arch", ""))})
        write_json(path.with_suffix(".json"), {**metadata, DIGEST_KEY: digest})
        return path

    @property
    def models_summary_path(self) -> Path:
        """``RUN/models.json``: the metrics of every finished model."""
        return self.path / "models.json"

    # -- stars --------------------------------------------------------------------------------

    def star_path(self, star_seed: int, star_set: str = MAIN_STARS) -> Path:
        """``RUN/<star_set>/star-SSSS.safetensors``; its metadata is the same path with ``.json``."""
        return self.path / star_set / f"star-{star_seed:04d}.safetensors"

    def star_checkpoint_path(self, star_seed: int, star_set: str = MAIN_STARS) -> Path:
        return self.checkpoint_path(*star_set.split("/"), f"star-{star_seed:04d}.pt")

    def finished_stars(self, star_set: str = MAIN_STARS) -> List[int]:
        """Seeds of the stars of ``star_set`` whose metadata JSON (written last) exists."""
        folder = self.path / star_set
        if not folder.is_dir():
            return []
        seeds = (path.stem.split("-", 1)[1] for path in folder.glob("star-*.json"))
        return sorted(int(seed) for seed in seeds if seed.isdigit() and self.star_path(int(seed), star_set).exists())

    def save_star(self, star_seed: int, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                  star_set: str = MAIN_STARS) -> Path:
        """Write the star's weights, then its metadata JSON (with the weights' checksum; it marks the
        star finished)."""
        path = self.star_path(star_seed, star_set)
        digest = save_state_dict(path, state_dict, {"role": "star", "seed": str(star_seed), "set": star_set})
        write_json(path.with_suffix(".json"), {**metadata, DIGEST_KEY: digest})
        return path

    def load_star(self, star_seed: int, star_set: str = MAIN_STARS,
                  device: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """``(state_dict, metadata)`` of a finished star, its checksum verified."""
        metadata = self.read_star_metadata(star_seed, star_set)
        path = self.star_path(star_seed, star_set)
        self._check_identity(path, metadata, {"star_seed": star_seed})
        return _verified_load(path, metadata, device, {"role": "star", "seed": str(star_seed), "set": star_set}), metadata

    def read_star_metadata(self, star_seed: int, star_set: str = MAIN_STARS) -> Dict[str, Any]:
        return read_json(self.star_path(star_seed, star_set).with_suffix(".json"))

    # -- models -------------------------------------------------------------------------------

    def read_metadata(self, role: str, seed: int) -> Dict[str, Any]:
        """The JSON stored beside a model (``RUN/<role>/seed-XXXX.json``)."""
        return read_json(self.model_path(role, seed).with_suffix(".json"))

    def load_model(self, role: str, seed: int, device: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """``(state_dict, metadata)`` of a finished model; corrupt files raise :class:`RunDirError`."""
        path = self.model_path(role, seed)
        if not self.is_finished(role, seed):
            raise RunDirError(f"{path} (with its .json) does not exist; train it with python -m starfast.train --stage models")
        metadata = self.read_metadata(role, seed)
        self._check_identity(path, metadata, {"role": role, "seed": seed})
        return _verified_load(path, metadata, device, {"role": role, "seed": str(seed)}), metadata

    def _check_identity(self, path: Path, metadata: Mapping[str, Any], place: Mapping[str, Any]) -> None:
        """Refuse a model whose sidecar says it is another model than its place (``place``: the role
        and seed its path implies), or was made for another model or dataset than ``config.json``
        says (a file copied in from elsewhere, or a hand-edited config). Keys a sidecar lacks
        (written by an older starfast) are not checked."""
        sidecar = path.with_suffix(".json")
        for key, value in place.items():
            if key in metadata and metadata[key] != value:
                raise RunDirError(f"{sidecar} records {key} {metadata[key]!r} but lies where {key} {value!r} belongs (a "
                                  "file copied or renamed from elsewhere); put it back, or delete it and its weights")
        config = self.read_config() or {}
        for key in ("model", "dataset"):
            if key in metadata and key in config and _normalised(metadata[key]) != _normalised(config[key]):
                raise RunDirError(
                    f"{sidecar} was made for {key} {json.dumps(metadata[key])} but {self.config_path} says "
                    f"{json.dumps(config[key])}; if config.json was edited, restore it (or use another --run-dir); "
                    "if the model came from another run, delete it and its .json to train it again"
                )

    def build_model(self, role: str, seed: int, device: Union[str, torch.device] = "cpu") -> nn.Module:
        """The stored model as a module (built from config.json's spec, weights and buffers loaded)."""
        spec = self.model_spec()
        state_dict, _ = self.load_model(role, seed, device)
        path = self.model_path(role, seed)
        module = spec.build().to(device)
        try:
            module.load_state_dict(state_dict)
        except RuntimeError as error:
            raise RunDirError(f"{path} does not fit architecture {spec.arch} ({error}); delete it (and its .json) to train it again") from error
        return module


def checked_row(path: Path, state: Mapping[str, torch.Tensor], space: ParamSpace) -> torch.Tensor:
    """The stored state dict ``state`` (read from ``path``) as a row of ``space``; a file of other
    shapes or with NaN/infinite weights raises :class:`RunDirError` naming it."""
    try:
        row = space.flatten(state)
    except (ValueError, KeyError) as error:
        raise RunDirError(f"{path} does not fit this run's architecture ({error}); delete it (and its .json) to train it "
                          "again") from None
    if not bool(torch.isfinite(row).all()):
        raise RunDirError(f"{path} holds NaN or infinite weights; delete it (and its .json) to train it again")
    return row


def _verified_load(path: Path, metadata: Mapping[str, Any], device, header: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """The weights at ``path``, checked against the checksum in ``metadata`` (files written before
    checksums were recorded load with a warning) and against ``header``: what the file's own
    metadata must say (its role and seed)."""
    digest = metadata.get(DIGEST_KEY)
    if digest is None:
        warnings.warn(f"{path.with_suffix('.json')} records no checksum (written by an older starfast): its weights "
                      "cannot be verified", RuntimeWarning, stacklevel=3)
    return load_state_dict(path, device, digest=digest, expected=header)
