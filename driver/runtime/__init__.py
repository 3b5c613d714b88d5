"""Running a training job: the loop, its placements, Ray, recovery, scaling, sweeps (see :mod:`driver`)."""


def train(cfg, exp, *, resume_from: str | None = None, target_episodes: int | None = None,
          log=print) -> dict:
    """Train in one process (``--num-actors 0``) or on Ray; with ``resume_from`` (a checkpoint
    path) continue that run."""
    if cfg.num_actors == 0:
        from mpn_dqn.driver.runtime.local import train_local as run
    else:
        from mpn_dqn.driver.runtime.distributed import train_distributed as run
    return run(cfg, exp, resume_from=resume_from, target_episodes=target_episodes, log=log)
