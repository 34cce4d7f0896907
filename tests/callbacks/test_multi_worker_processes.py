"""Two workers on 127.0.0.1 sharing one backup folder: only the chief
writes it, and a resumed run starts from its files on both workers.

Runs the session's backend in two subprocesses
(tests/callbacks/multi_worker_script.py): JAX with
`jax.distributed.initialize` and `keras.distribution.DataParallel`
(`model.fit`); TensorFlow with `MultiWorkerMirroredStrategy` and a loop of
`strategy.run` steps (Keras's `fit` fails under that strategy,
keras-team/keras#20585). PyTorch is skipped.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TIMEOUT = 150  # seconds, per phase
STATE_FILES = {"kreg_ema.npz", "kreg_early_stopping.npz",
               "latest.weights.h5", "training_metadata.json"}


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_workers(backend, folder, phase):
    """Both workers' results (index order); fails with their output."""
    ports = ",".join(_free_ports(2))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CONFIG", "XLA_FLAGS", "KERAS_BACKEND")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.callbacks.multi_worker_script",
             backend, str(i), ports, folder, phase],
            cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        raise AssertionError(f"{phase}: the workers did not finish within "
                             f"{TIMEOUT} s")
    results = []
    for i, (process, output) in enumerate(zip(processes, outputs)):
        lines = [line for line in output.splitlines()
                 if line.startswith("RESULT ")]
        if process.returncode != 0 or not lines:
            raise AssertionError(f"{phase}: worker {i} exited with "
                                 f"{process.returncode}:\n{output[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


@pytest.mark.slow
class TwoWorkersTest(unittest.TestCase):
    def setUp(self):
        self.backend = keras.backend.backend()
        if self.backend == "torch":
            self.skipTest("no multi-process route of kreg is tested on "
                          "PyTorch")
        if self.backend == "jax":
            import jax

            if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
                self.skipTest("this JAX has no CPU collectives (gloo)")

    def test_chief_writes_the_shared_backup_and_both_resume_from_it(self):
        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            chief, worker = _run_workers(self.backend, folder, "interrupt")
            for result in (chief, worker):
                self.assertEqual(result["error"], "interrupted")
                self.assertEqual(result["epochs"], [0, 1])
            self.assertEqual(chief["losses"], worker["losses"])
            self.assertTrue(chief["is_chief"])
            self.assertEqual(chief["worker_path"], backup)
            self.assertFalse(worker["is_chief"])
            own = worker["worker_path"]
            self.assertIn("kreg_workertemp_1_", own)
            self.assertFalse(own.startswith(folder))
            # The worker ran every write, into its own folder.
            for names in worker["own"]:
                self.assertLessEqual(STATE_FILES, set(names))
            self.assertFalse(os.path.exists(own))  # gone with its process
            # The shared folder holds the chief's files only.
            self.assertEqual(os.listdir(folder), ["backup"])
            self.assertLessEqual(STATE_FILES, set(os.listdir(backup)))
            self.assertEqual(
                {n for n in os.listdir(backup) if "workertemp" in n}, set())

            steps = chief["ema_steps"]
            chief2, worker2 = _run_workers(self.backend, folder, "resume")
            for before, after in ((chief, chief2), (worker, worker2)):
                self.assertIsNone(after["error"])
                self.assertEqual(after["epochs"], [2, 3])
                self.assertEqual(after["ema_steps"], 2 * steps)
            self.assertEqual(chief2["losses"], worker2["losses"])
            self.assertEqual(chief2["weights"], worker2["weights"])
            self.assertEqual(chief2["best_epoch"], worker2["best_epoch"])
            # The chief deleted the backup at the end, the worker its own.
            self.assertFalse(os.path.exists(backup))
            self.assertFalse(os.path.exists(worker2["worker_path"]))
