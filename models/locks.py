"""One lock per model: Zennit and Captum mutate a model while explaining it (hooks, merged
batch norms), so every use of a shared model, inference included, holds its lock.

The table is weakly keyed by the model: the one piece of module state, and it never affects results.
"""

from __future__ import annotations

import threading
import weakref

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock
