"""mpn-dqn: MPN-DQN agents (deep Q-networks with a Multi-Plasticity Network core) trained on
NeuroGym tasks by Ray actors, a replay server and a learner.

The whole project has one import name: ``mpn_dqn.actors``, ``mpn_dqn.learner``,
``mpn_dqn.replay``, ``mpn_dqn.common`` and ``mpn_dqn.driver``.  An installed wheel holds them
inside this package; in a source checkout they are the folders at the repository's top level,
which this package's search path then includes.
"""
from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
if not (_HERE / "common").is_dir():                  # a source checkout: the top-level folders
    __path__.append(str(_HERE.parent))              # noqa: F821 (the package's search path)
