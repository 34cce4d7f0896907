"""Shared pieces of the callback tests."""

import contextlib
import os
import tempfile

import keras

from kreg.callbacks import BackupAndRestore


class Interrupt(keras.callbacks.Callback):
    """Raises `RuntimeError("interrupted")` when epoch `epoch` begins."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


class InterruptBatch(keras.callbacks.Callback):
    """Raises `RuntimeError("interrupted")` when batch `batch` begins."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError("interrupted")


class BackupPairing:
    """One of the two ways to resume kreg's callbacks after an interruption,
    in a fresh folder `backup`: ``"keras"`` (Keras's BackupAndRestore, each
    kreg callback given ``backup_dir``) or ``"kreg"`` (kreg's
    BackupAndRestore lending its folder, listed last: order does not
    matter)."""

    def __init__(self, kind, backup):
        self.kind = kind
        self.backup = backup
        self.backup_dir = backup if kind == "keras" else None

    def callbacks(self, *more):
        if self.kind == "kreg":
            return [*more, BackupAndRestore(self.backup)]
        return [keras.callbacks.BackupAndRestore(self.backup), *more]


@contextlib.contextmanager
def backup_pairing(kind):
    with tempfile.TemporaryDirectory() as folder:
        yield BackupPairing(kind, os.path.join(folder, "backup"))
