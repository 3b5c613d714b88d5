"""Shared fixtures: one Ray session for the whole test run (ray.init costs 3-7 s here)."""
import logging
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# ceilings measured by the tests are cached in the test session's own folder, never in ~/.cache
if "MPN_DQN_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["MPN_DQN_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpn-dqn-test-cache-")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray bound to 127.0.0.1, started once and shut down at the end of the run."""
    import ray
    logging.getLogger("ray").setLevel(logging.ERROR)
    if not ray.is_initialized():
        from mpn_dqn.driver.runtime.ray_cluster import init_local_ray      # binds every Ray port to 127.0.0.1
        init_local_ray(num_cpus=4, include_dashboard=False,
                       logging_level=logging.ERROR, log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore",
                                                 "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
