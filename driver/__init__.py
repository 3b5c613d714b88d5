"""The driver: everything around the roles (``actors/``, ``replay/``, ``learner/``), in four
rooms.

* :mod:`driver.cli` — the command line: ``parser`` (options, commands, exit codes),
  ``preflight`` (checks before anything is written), ``commands`` (eval, render, resume).
* :mod:`driver.runtime` — running a training job: ``loop`` (the one training loop),
  ``local`` and ``distributed`` (its two placements: one process, or each role a Ray actor),
  ``ray_roles`` (the roles wrapped for Ray), ``ray_cluster`` (starting or joining Ray, capacity,
  placement), ``recovery`` (restarts of dead roles, replay snapshots), ``live`` (scaling and
  the heartbeat while a job runs), ``sweep`` (grids of trainings as Ray Tune trials).
* :mod:`driver.observe` — what a run shows: ``progress`` (metrics records, progress lines),
  ``telemetry`` (TensorBoard, Prometheus, heartbeat), ``watch``, ``plots``, ``render``,
  ``analyze``, ``results`` (results tables and curves).
* :mod:`driver.experiment` — the experiment directory: config, metrics, checkpoints (written
  atomically), the lock that keeps one driver per experiment, and the checks of a checkpoint
  against its config.
"""
