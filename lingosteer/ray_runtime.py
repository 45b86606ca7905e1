"""One way to start Ray for lingosteer's jobs (the sweep, sharded alignment fits).

A local session gets `num_cpus` single-threaded workers at normal priority; a
cluster address ships the project's packages to the workers, which may not have
them installed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ray_session(address: str | None, num_cpus: int, packages: tuple = ()):
    """Ray initialised for the `with` block (local when `address` is None), shut down after.

    `packages` are the imported project packages the tasks need (shipped to cluster workers).
    """
    import ray

    # One thread per worker: Ray packs one task per CPU, and each torch/BLAS pool
    # defaulting to every core would oversubscribe the machine.
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    if address:
        env["py_modules"] = [Path(package.__file__).parent for package in packages]
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        # Ray renices its workers to 15; on a machine shared with other work that
        # starves the job, so local workers run at normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
