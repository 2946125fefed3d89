"""Magnitude pruning with a server-owned mask (docs/pruning.md).

- :mod:`fedmq.prune.mask`: the mask, its compact bitmap bytes and strict decoding, and
  magnitude selection;
- :mod:`fedmq.prune.strategy`: the schedule and the strategy wrapper that owns the mask,
  re-chooses it, keeps pruned weights at exactly zero and folds masked updates.

This package imports nothing from ``fedmq.prune.strategy`` at import time: the masked codecs
(:mod:`fedmq.update.codecs.masked`) need only the mask.
"""
