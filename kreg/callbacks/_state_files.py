"""kreg callbacks' state in files: in a backup folder, beside checkpoint
files (`kreg.callbacks.ModelCheckpoint`).

A state is one file, ``<name>.npz``: its numbers (JSON) and its arrays,
written to a temporary file in the same folder and put in place by one
``os.replace``, so an interruption at any point leaves the old complete
state or the new one. ``numbers["epoch"]``, where a callback saves it, is
the state's epoch stamp: the epoch a resumed ``fit`` starts at.
`save_state(..., keep_previous=True)` keeps the state it replaces as
``<name>.previous.npz``, and `resume_state` takes the one whose stamp is
the epoch the ``fit`` resumes at (a backup written just before Keras's own
is one epoch ahead of it). A numbers-only update of a state (`save_json`)
is ``<name>.json``; it names the arrays file it belongs to.

Damaged files are a `ValueError` naming the file and what deleting it
means; missing ones a warning (`resume_state`, `load_state`). Why:
``docs/callbacks.md``.

Under a multi-worker distribution every worker runs the same writes, but
only the chief's reach the folder it is given: the writing functions here
(`save_state`, `save_json`, `delete_state`, `write_folder`) write
`kreg.utils.distribute.worker_path(folder)`, a temporary folder on the
other workers. Reading takes the folder as it is (the chief's files).
"""

import json
import os
import re
import uuid
import warnings
import zipfile

import numpy as np

from kreg.utils.distribute import worker_path

_NUMBERS_KEY = "__kreg_state__"  # the numbers, inside the .npz
_FORMAT = "kreg-state-1"  # in every .json written here

# What each state is for, to say what losing it means.
_OWNERS = {
    "kreg_ema": (
        "kreg.callbacks.EMA",
        "the EMA average restarts from the current weights"),
    "kreg_early_stopping": (
        "kreg.callbacks.EarlyStopping",
        "early stopping starts over from the resumed epoch, with a new wait "
        "counter, best value and best weights"),
    "kreg_retrain_on_full_data": (
        "kreg.callbacks.RetrainOnFullData",
        "phase 2 starts from the weights the resumed fit begins with, and "
        "the logs of the earlier phase-1 epochs are missing"),
    "kreg_fine_tuning": (
        "kreg.callbacks.FineTuning",
        "the base's optimizer state (moments, step count) starts over"),
    "kreg_random_state": (
        "kreg.callbacks.BackupAndRestore",
        "the seeded noise layers (Dropout, GaussianNoise, WeightNoise) draw "
        "their noise from the start of their streams again"),
    "kreg_retrain_phase2_logs": (
        "kreg.callbacks.RetrainOnFullData",
        "the History lacks the logs of the earlier phase-2 epochs"),
}


def _owner(name):
    """``(callback, what is lost without the state)`` for a state name
    (``kreg_early_stopping_2`` is the second EarlyStopping's)."""
    base = re.sub(r"_\d+$", "", name)
    return _OWNERS.get(base, ("a kreg callback", "its state starts over"))


def state_path(folder, name):
    """The file holding the state `name` in `folder`."""
    return os.path.join(folder, name + ".npz")


def _previous_path(folder, name):
    return os.path.join(folder, name + ".previous.npz")


def _json_path(folder, name):
    return os.path.join(folder, name + ".json")


def state_names(folder, base):
    """The names of the states saved as `base`, ``base_2``, ... in
    `folder`."""
    if not os.path.isdir(folder):
        return []
    names = {os.path.splitext(name)[0] for name in os.listdir(folder)}
    return sorted(name for name in names if name == base or (
        name.startswith(base + "_") and name[len(base) + 1:].isdigit()))


def has_state(folder, name):
    """Whether a state `name` (any generation) is in `folder`."""
    return any(os.path.exists(path) for path in (
        state_path(folder, name), _previous_path(folder, name),
        _json_path(folder, name)))


def checkpoint_folder(filepath):
    """Where kreg's callbacks keep their state beside a checkpoint file."""
    return os.fspath(filepath) + ".kreg"


def load_checkpoint_state(filepath, name, owner):
    """``(numbers, arrays)`` saved as `name` beside the checkpoint file
    `filepath` (``resume_from`` of `owner`, a class name); a `ValueError`
    when there is none."""
    folder = checkpoint_folder(filepath)
    loaded = load_state(folder, name)
    if loaded is None:
        raise ValueError(
            "Invalid value received for argument `resume_from`. Expected a "
            f"checkpoint written by kreg.callbacks.ModelCheckpoint with an "
            f"{owner} in its fit; no {owner} state in {folder!r}. Received: "
            f"resume_from={filepath!r}"
        )
    return loaded


# Writing -----------------------------------------------------------------
def _write_atomically(path, write):
    """Calls ``write(file)`` on a new file in `path`'s folder, then puts it
    in place of `path` in one step (``os.replace``)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(
        folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _sync_folder(folder)


def _sync_folder(folder):
    """Makes a rename in `folder` durable (POSIX; elsewhere a no-op)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_state(folder, name, numbers, arrays, keep_previous=False):
    """Writes the state `name` (JSON-serializable `numbers`, a list of
    arrays) to ``name.npz`` in `folder` in one step; with `keep_previous`,
    the state it replaces stays as ``name.previous.npz``."""
    folder = worker_path(folder)
    token = uuid.uuid4().hex
    header = {"numbers": numbers, "num_arrays": len(arrays), "token": token}
    members = {f"a{i:05d}": np.asarray(a) for i, a in enumerate(arrays)}
    members[_NUMBERS_KEY] = np.array(json.dumps(header))
    path = state_path(folder, name)

    def write(file):
        np.savez(file, **members)

    if keep_previous and os.path.exists(path):
        # Until the new state is in place, the old one is the previous.
        os.replace(path, _previous_path(folder, name))
    _write_atomically(path, write)
    if not keep_previous and os.path.exists(_previous_path(folder, name)):
        os.remove(_previous_path(folder, name))
    # A numbers update of the arrays replaced here no longer applies (and
    # would not: it names the replaced file's token).
    if os.path.exists(_json_path(folder, name)):
        os.remove(_json_path(folder, name))


def save_json(folder, name, numbers):
    """Writes `numbers` as ``name.json`` in `folder` (in one step). With a
    state ``name.npz`` there, it is an update of that state's numbers:
    `load_state` returns these numbers with its arrays."""
    folder = worker_path(folder)
    arrays_token = None
    path = state_path(folder, name)
    if os.path.exists(path):
        arrays_token = _read_npz(path, name, header_only=True)["token"]
    content = json.dumps({"format": _FORMAT, "numbers": numbers,
                          "arrays": arrays_token}).encode()
    _write_atomically(_json_path(folder, name), lambda f: f.write(content))


# Reading -----------------------------------------------------------------
def _damaged(path, name, error):
    owner, lost = _owner(name)
    folder = os.path.dirname(path)
    previous = _previous_path(folder, name)
    if path != previous and os.path.exists(previous):
        lost = (f"{previous!r}, one epoch older, is used instead if it "
                f"belongs to the epoch training resumes at, and if not, "
                f"{lost}")
    return ValueError(
        f"The state file {path!r} (of {owner}) cannot be read: "
        f"{type(error).__name__}: {error}. kreg writes its state files in "
        "one step, so it was damaged afterwards (a full disk, a copy cut "
        "short, another program). Training stops here: restore the file, "
        f"or delete it to resume without it; then {lost}."
    )


def _read_npz(path, name, header_only=False):
    """``{"numbers", "arrays", "token"}`` of a state file; numbers and
    token are None for an arrays file without numbers. `header_only`:
    numbers and token only (the arrays are not read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.files if k != _NUMBERS_KEY]
            header = (json.loads(str(data[_NUMBERS_KEY]))
                      if _NUMBERS_KEY in data.files else None)
            order = sorted(keys, key=lambda k: int(k[1:]))
            arrays = [] if header_only else [data[k] for k in order]
        if header is not None and (
                not isinstance(header.get("numbers"), dict)
                or header.get("num_arrays") != len(order)):
            raise ValueError(f"it holds {len(order)} arrays and the "
                             f"header {header!r}")
    except (OSError, ValueError, EOFError, KeyError, TypeError,
            AttributeError, zipfile.BadZipFile) as error:
        raise _damaged(path, name, error) from error
    if header is None:
        return {"numbers": None, "arrays": arrays, "token": None}
    return {"numbers": header["numbers"], "arrays": arrays,
            "token": header["token"]}


def _read_json(path, name):
    """``{"numbers", "arrays"}`` of a .json (a bare dict: numbers that
    belong to the arrays file without numbers)."""
    try:
        with open(path, "rb") as f:
            content = json.loads(f.read().decode())
        if not isinstance(content, dict):
            raise ValueError(f"a {type(content).__name__}, not an object")
    except (OSError, ValueError) as error:
        raise _damaged(path, name, error) from error
    if content.get("format") == _FORMAT:
        return {"numbers": content["numbers"], "arrays": content["arrays"]}
    return {"numbers": content, "arrays": None}


def load_json(folder, name):
    """The numbers saved by `save_json`, or None."""
    path = _json_path(folder, name)
    if not os.path.exists(path):
        return None
    return _read_json(path, name)["numbers"]


def _load_file(folder, name, path):
    """``(numbers, arrays)`` of the state file `path` (with the numbers
    update that belongs to it, if any); None when it is not there."""
    if not os.path.exists(path):
        return None
    state = _read_npz(path, name)
    numbers = state["numbers"]
    json_path = _json_path(folder, name)
    if os.path.exists(json_path):
        update = _read_json(json_path, name)
        if update["arrays"] == state["token"]:
            numbers = update["numbers"]
    if numbers is None:
        owner, lost = _owner(name)
        raise ValueError(
            f"The state file {path!r} (of {owner}) holds arrays but no "
            f"numbers, and {json_path!r} is missing. Training stops here: "
            f"delete it to resume without it; then {lost}.")
    return numbers, state["arrays"]


def load_state(folder, name):
    """Returns the newest ``(numbers, arrays)`` saved as `name` in `folder`
    (by `save_state`, with a `save_json` update), or None. A damaged file
    is a `ValueError`; numbers whose arrays file is missing, a warning."""
    for path in (state_path(folder, name), _previous_path(folder, name)):
        loaded = _load_file(folder, name, path)
        if loaded is not None:
            return loaded
    if os.path.exists(_json_path(folder, name)):
        _read_json(_json_path(folder, name), name)  # damaged: an error
        owner, lost = _owner(name)
        warnings.warn(
            f"The state file {state_path(folder, name)!r} (of {owner}) is "
            f"missing, though its numbers are in "
            f"{_json_path(folder, name)!r}: resuming without it ({lost}).",
            stacklevel=2)
    return None


def _counted(numbers):
    stamp = numbers.get("epoch")
    return None if stamp is None else int(stamp)


def resume_state(folder, name, epoch, use_older=None):
    """The ``(numbers, arrays)`` saved as `name` in `folder` for a ``fit``
    resuming at `epoch`: the generation stamped `epoch`, else None with a
    warning naming the file and saying what happens next.

    `use_older`: what it means to use a state stamped before `epoch` (its
    callback then gets the newest one, with a warning that says so); None:
    such a state is ignored, as one stamped after `epoch`. A state without
    a stamp is returned as it is.
    """
    path = state_path(folder, name)
    owner, lost = _owner(name)
    latest = _load_file(folder, name, path)
    if latest is None and not os.path.exists(_previous_path(folder, name)):
        if os.path.exists(_json_path(folder, name)):
            return load_state(folder, name)  # numbers alone: it warns
        if epoch > 0:
            warnings.warn(
                f"{owner}: training resumes at epoch {epoch}, but its state "
                f"file {path!r} does not exist (it was deleted, or the "
                f"interrupted fit did not save it): {lost}, so the result "
                "may differ from an uninterrupted run's.",
                stacklevel=2)
        return None
    if latest is not None and _counted(latest[0]) in (None, epoch):
        return latest
    previous = _load_file(folder, name, _previous_path(folder, name))
    if previous is not None and _counted(previous[0]) in (None, epoch):
        return previous  # this state was saved, Keras's backup was not
    states = [s for s in (latest, previous) if s is not None]
    older = [s for s in states if _counted(s[0]) < epoch]
    chosen = older[0] if older and use_older is not None else None
    newest = chosen or states[0]
    counted = _counted(newest[0])
    saved = (f"{owner}: its state file {path!r} has counted {counted} "
             f"epochs (it resumes a fit at epoch {counted}), but training "
             f"resumes at epoch {epoch}")
    if chosen is not None:
        missing = (f"epoch {counted} is" if epoch - counted == 1
                   else f"epochs {counted} to {epoch - 1} are")
        warnings.warn(
            f"{saved}: Keras's backup was written after this state (the "
            f"fit was interrupted between the two), so {missing} not "
            f"counted: {use_older}.", stacklevel=2)
        return chosen
    warnings.warn(
        f"{saved}: the state does not belong to that epoch and is ignored: "
        f"{lost}.", stacklevel=2)
    return None


def delete_state(folder, name):
    """Deletes every file of the state `name` in `folder` (generations,
    numbers update, leftovers of an interrupted write)."""
    folder = worker_path(folder)
    paths = [state_path(folder, name), _previous_path(folder, name),
             _json_path(folder, name)]
    if os.path.isdir(folder):
        paths += [os.path.join(folder, entry) for entry in os.listdir(folder)
                  if entry.endswith(".tmp") and entry.startswith(
                      (f".{name}.npz.", f".{name}.json."))]
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def read_folder(folder):
    """The files under `folder` as ``{relative path: bytes}`` (empty if it
    does not exist): kept in memory while another callback deletes the
    folder, written back by `write_folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def write_folder(folder, files):
    """Writes back the files of `read_folder`, each in one step."""
    folder = worker_path(folder)
    for relative, content in files.items():
        _write_atomically(os.path.join(folder, relative),
                          lambda f, content=content: f.write(content))
