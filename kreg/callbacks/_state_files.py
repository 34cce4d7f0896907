"""kreg callbacks' state in files: in a backup folder, atomically enough
for an interruption between epochs, and beside checkpoint files
(`CheckpointWrites`)."""

import json
import os

import numpy as np


def state_names(folder, base):
    """The names of the states saved as `base`, ``base_2``, ... in
    `folder`."""
    if not os.path.isdir(folder):
        return []
    names = {os.path.splitext(name)[0] for name in os.listdir(folder)}
    return sorted(name for name in names if name == base or (
        name.startswith(base + "_") and name[len(base) + 1:].isdigit()))


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


class CheckpointWrites:
    """Writes a callback's state beside each file `kreg.callbacks.
    ModelCheckpoint` saves (it calls `request`). A file saved at the end of
    an epoch the callback has not finished yet (the checkpoint is listed
    before it) gets the state once the callback has (`epoch_finished`).

    ``write(folder, epoch, at_epoch_end)`` writes the state for a file
    saved at `epoch`, at its end or in its middle. One per ``fit``.
    """

    def __init__(self, write):
        self.write = write
        self.finished_epoch = None
        self.waiting = []

    def request(self, folder, epoch, at_epoch_end):
        if at_epoch_end and self.finished_epoch != epoch:
            self.waiting.append(folder)
        else:
            self.write(folder, epoch, at_epoch_end)

    def epoch_finished(self, epoch):
        self.finished_epoch = epoch
        for folder in self.waiting:
            self.write(folder, epoch, True)
        self.waiting = []


def save_state(folder, name, numbers, arrays):
    """Writes ``name.json`` (numbers) and ``name.npz`` (arrays) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    arrays_path = os.path.join(folder, name + ".npz")
    tmp = arrays_path + ".tmp.npz"
    np.savez(tmp, **{f"a{i:05d}": a for i, a in enumerate(arrays)})
    os.replace(tmp, arrays_path)
    save_json(folder, name, {**numbers, "num_arrays": len(arrays)})


def save_json(folder, name, numbers):
    """Writes ``name.json`` in `folder` (replacing it in one step)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(numbers, f)
    os.replace(tmp, path)


def load_json(folder, name):
    """The numbers saved by `save_json`, or None."""
    path = os.path.join(folder, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_state(folder, name):
    """Returns ``(numbers, arrays)`` saved by `save_state`, or None."""
    arrays_path = os.path.join(folder, name + ".npz")
    numbers = load_json(folder, name)
    if numbers is None or not os.path.exists(arrays_path):
        return None
    with np.load(arrays_path) as data:
        arrays = [data[f"a{i:05d}"] for i in range(numbers["num_arrays"])]
    return numbers, arrays


def delete_state(folder, name):
    for suffix in (".json", ".npz"):
        path = os.path.join(folder, name + suffix)
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
    for relative, content in files.items():
        path = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
