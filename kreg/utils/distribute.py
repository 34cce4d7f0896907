"""Cross-replica sums for the three backends (used by synchronized layers)."""

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
