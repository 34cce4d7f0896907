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
