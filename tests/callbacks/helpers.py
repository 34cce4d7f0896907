"""Shared pieces of the callback tests."""

import keras


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
