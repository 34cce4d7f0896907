"""Multi-worker helpers: which process is the chief, where a worker writes,
and cross-replica sums for the three backends."""

import atexit
import json
import os
import shutil
import tempfile

import keras


def all_reduce_sum(tensors):
    """Sums each tensor over all replicas of the running distribution.

    - TensorFlow: inside a `tf.distribute` replica context with more than one
      replica, an all-reduce; elsewhere the tensors are already global.
    - JAX: `keras.distribution` runs one program on the global batch, which
      is a single (sharded) array, so local sums are already global.
    - PyTorch: an autograd-aware all-reduce when a `torch.distributed` process
      group is initialized; a single process is already global.

    Args:
        tensors: list of tensors.

    Returns:
        A list of tensors of the same shapes.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return list(tensors)
        return [
            context.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in tensors
        ]
    if backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from torch.distributed.nn import functional as dist_functional

            return [dist_functional.all_reduce(t) for t in tensors]
    return list(tensors)


class ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A `keras.random.SeedGenerator` whose seeds differ between replicas.

    Under `tf.distribute.MirroredStrategy` and
    `MultiWorkerMirroredStrategy` every replica reads the same seed state, so
    a plain generator gives every replica the same noise for its share of
    the batch. Inside a step with several replicas, the seed drawn here is
    folded with the replica's id (`tf.random.experimental.stateless_fold_in`,
    the id being `replica_id_in_sync_group`, unique over all workers).
    Elsewhere (one device, JAX, PyTorch) it is the plain generator's seed.
    JAX's `keras.distribution` needs no folding: it draws the noise of the
    whole global batch at once.
    """

    def next(self, ordered=True):
        seed = super().next(ordered=ordered)
        if keras.backend.backend() != "tensorflow":
            return seed
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return seed
        # int32, as Keras's TensorFlow random ops map the int64 state (XLA
        # takes int32 seeds only).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), "int32")
        replica = tf.cast(context.replica_id_in_sync_group, "int32")
        return tf.random.experimental.stateless_fold_in(seed, replica)


# Which worker writes shared files -------------------------------------------
def _tf_config_task():
    """``(task type, index, has a chief)`` from the ``TF_CONFIG`` environment
    variable, or None when it names no task."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        task = config.get("task") or {}
        cluster = config.get("cluster") or {}
        if not task:
            return None
        return (str(task["type"]), int(task.get("index", 0)),
                "chief" in cluster)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(
            "Invalid value received for the environment variable "
            "`TF_CONFIG`. Expected JSON with a 'task' of a 'type' and an "
            f"'index' ({type(error).__name__}: {error}). Received: "
            f"TF_CONFIG={raw!r}") from error


def in_tf_strategy():
    """Whether a `tf.distribute` strategy is in scope (TensorFlow only)."""
    import tensorflow as tf

    return tf.distribute.has_strategy()


def _tf_strategy_task():
    """The task of the `tf.distribute` strategy in scope, if it has a
    cluster resolver with a task."""
    import tensorflow as tf

    if not in_tf_strategy():
        return None
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    jobs = resolver.cluster_spec().as_dict()
    return resolver.task_type, int(resolver.task_id or 0), "chief" in jobs


def worker_task():
    """``(task type, index)`` of this process in a multi-worker run, or
    None on the chief (and when there is one process).

    - TensorFlow: the cluster resolver of the `tf.distribute` strategy in
      scope, else ``TF_CONFIG`` (what `MultiWorkerMirroredStrategy` reads).
    - JAX: ``("worker", jax.process_index())`` for a process other than 0
      (after `jax.distributed.initialize`).
    - PyTorch: ``("worker", rank)`` for a rank other than 0 of an
      initialized `torch.distributed` process group.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if jax.process_count() > 1 and jax.process_index() > 0:
            return "worker", jax.process_index()
        return None
    if backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and (
                dist.get_rank() > 0):
            return "worker", dist.get_rank()
        return None
    task = None
    if backend == "tensorflow":
        task = _tf_strategy_task()
    task = task or _tf_config_task()
    if task is None:
        return None
    task_type, index, has_chief = task
    if task_type == "chief" or (
            task_type == "worker" and index == 0 and not has_chief):
        return None  # the chief: shared files are its own
    return task_type, index


def is_chief():
    """Whether this process writes shared files (checkpoints, backups,
    kreg's callback state): True without a multi-worker distribution, else
    only for the chief (``TF_CONFIG`` task ``chief``, or worker 0 of a
    cluster without one; JAX process 0; PyTorch rank 0)."""
    return worker_task() is None


_TEMPORARY_ROOT = {}


def _temporary_root(task):
    """This process's temporary folder for `task`, deleted at exit."""
    if task not in _TEMPORARY_ROOT:
        task_type, index = task
        label = str(index) if task_type == "worker" else \
            f"{task_type}_{index}"
        root = tempfile.mkdtemp(prefix=f"kreg_workertemp_{label}_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _TEMPORARY_ROOT[task] = root
    return _TEMPORARY_ROOT[task]


def worker_path(path):
    """The path (file or folder) this process writes in place of the shared
    `path`: `path` itself on the chief; on any other worker, the same path
    under a temporary folder of its own (``kreg_workertemp_<index>_*``,
    deleted when the process ends), so that shared folders hold the
    chief's files only. A path already under it is returned as it is."""
    task = worker_task()
    if task is None:
        return path
    root = _temporary_root(task)
    absolute = os.path.abspath(os.fspath(path))
    if os.path.commonpath([root, absolute]) == root:
        return absolute
    drive, rest = os.path.splitdrive(absolute)
    return os.path.join(root, drive.strip(":\\/"), rest.lstrip("\\/"))
