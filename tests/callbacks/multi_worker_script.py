"""One worker of the two-worker test
(tests/callbacks/test_multi_worker_processes.py).

``python -m tests.callbacks.multi_worker_script BACKEND INDEX PORT0,PORT1
FOLDER PHASE``: trains a small model for 4 epochs on its half of the data
with kreg's EMA, EarlyStopping and BackupAndRestore (FOLDER/backup, shared
by both workers); PHASE ``interrupt`` stops both workers when epoch 2
begins, ``resume`` runs again. Prints one line ``RESULT {json}``.

- jax: `jax.distributed.initialize` (CPU, gloo collectives),
  `keras.distribution.DataParallel`, `model.fit`.
- tensorflow: `tf.distribute.MultiWorkerMirroredStrategy` (TF_CONFIG) and
  a training loop of `strategy.run` steps driving the callbacks through a
  `keras.callbacks.CallbackList`: Keras's `fit` fails under this strategy
  (keras-team/keras#20585).
"""

import json
import os
import sys

EPOCHS = 4
INTERRUPT_AT = 2


def main(backend, index, ports, folder, phase):
    os.environ["KERAS_BACKEND"] = backend
    if backend == "tensorflow":
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}})
    else:
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{ports[0]}",
            num_processes=len(ports), process_id=index)

    import keras
    import numpy as np

    import kreg
    from kreg.utils import distribute

    backup = os.path.join(folder, "backup")
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    x, y = x[index::2], y[index::2]  # this worker's half

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs, self.losses, self.shared, self.own = [], [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            if phase == "interrupt" and epoch == INTERRUPT_AT:
                raise RuntimeError("interrupted")

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(epoch)
            self.losses.append(float(logs["loss"]))
            for names, path in ((self.shared, backup),
                                (self.own, distribute.worker_path(backup))):
                names.append(sorted(os.listdir(path))
                             if os.path.isdir(path) else [])

    def make_model():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    record = Record()
    ema = kreg.callbacks.EMA(0.9)
    stop = kreg.callbacks.EarlyStopping(monitor="loss", patience=10)
    callbacks = [ema, stop, kreg.callbacks.BackupAndRestore(backup), record]
    error = None
    try:
        if backend == "jax":
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(auto_shard_dataset=False))
            model = make_model()
            model.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0,
                      callbacks=callbacks)
        else:
            model = _tf_loop(make_model, x, y, callbacks, backup)
    except RuntimeError as e:
        error = str(e)
        model = None
    result = {
        "index": index, "is_chief": distribute.is_chief(),
        "worker_path": distribute.worker_path(backup),
        "epochs": record.epochs, "losses": record.losses,
        "shared": record.shared, "own": record.own, "error": error,
        "ema_steps": int(ema.steps), "best_epoch": stop.best_epoch,
        "weights": None if model is None else [
            w.tolist() for w in model.get_weights()],
    }
    print("RESULT " + json.dumps(result), flush=True)


def _tf_loop(make_model, x, y, callbacks, backup):
    """`fit`'s epochs and callback hooks around `strategy.run` steps."""
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
        hooks = keras.callbacks.CallbackList(
            callbacks, model=model, epochs=EPOCHS, steps=len(x) // 8,
            verbose=0)
        # Where Keras's BackupAndRestore resumes (its metadata file, the
        # chief's, in the shared folder).
        metadata = os.path.join(backup, "training_metadata.json")
        initial_epoch = 0
        if os.path.exists(metadata):
            with open(metadata) as f:
                initial_epoch = json.load(f)["epoch"]
        hooks.on_train_begin()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)  # already this half
    data = strategy.experimental_distribute_dataset(data.with_options(options))

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(xb, training=True) - yb) ** 2)
                scaled = loss / strategy.num_replicas_in_sync
            grads = tape.gradient(scaled, model.trainable_variables)
            model.optimizer.apply(grads, model.trainable_variables)
            return scaled
        losses = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce("SUM", losses, axis=None)

    for epoch in range(initial_epoch, EPOCHS):
        with strategy.scope():
            hooks.on_epoch_begin(epoch)
        losses = [float(step(xb, yb)) for xb, yb in data]
        with strategy.scope():
            hooks.on_epoch_end(epoch, {"loss": sum(losses) / len(losses)})
    with strategy.scope():
        hooks.on_train_end()
    return model


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4],
         sys.argv[5])
