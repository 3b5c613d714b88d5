"""Trial replay: :class:`TrialBuffer` stores whole trials FIFO; :class:`TrialBatch` is a
padded, masked batch sampled from it."""
from mpn_dqn.replay.buffer import TrialBatch, TrialBuffer

__all__ = ["TrialBatch", "TrialBuffer"]
