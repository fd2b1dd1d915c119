"""Training linen and NNX models with DEQ layers under optax: :func:`fit` (jitted steps with the user's loss and
metrics, the layers' forward and backward solver statistics, progress, orbax checkpoints, resume), :func:`load`
of a run's parameters, and the pieces of a hand-written loop (:func:`as_trainable`, :func:`make_train_step`,
:func:`make_eval_step`, :func:`evaluate`).

``fit`` trains on a :class:`jdeq.data.Dataset`, ``(x, y)`` arrays with any targets, or a stream of ``(x, y)``
batches (``data(epoch)``, a re-iterable, a one-shot iterator), for ``epochs=`` or ``steps=``. A run is a pure
function of its seed, model and data: linen parameters come from ``PRNGKey(seed)`` (an NNX model brings its own),
the batch order of in-memory data in epoch ``e`` from ``numpy.random.default_rng((seed, e))`` (:func:`epoch_batches`,
e.g. for a stream ``data(epoch)`` that augments the batches in-memory training would read). Checkpoints are
written at the end of each epoch (or of the budget) with the run's position, so a run resumed from its last
checkpoint replays exactly the steps an uninterrupted run takes.

Warm starts: a model whose DEQ layers hold a per-example fixed-point cache (``cache_size=len(data.x_train)``,
see :mod:`jdeq.nn`) gets each sample's index in the training set as Flax state (linen: the ``"deq_index"``
collection; NNX: the layers' ``CacheIndex`` variables), so the model's own ``__call__`` takes no index; the
cache is part of the :class:`TrainState`, updated on the device by each step, checkpointed with the
parameters and restored on resume. Evaluation runs without it (a cold start from ``z0``).

Implementation (internal): ``_adapters`` (linen/NNX adapters), ``_sources`` (data forms, budget, position), ``_loop`` (steps and the epoch loop),
``_checkpoints`` (manager, checksums, run config, resume, load), ``_lock`` (the directory lock), ``_fit``.
"""

from ._adapters import as_trainable
from ._checkpoints import CheckpointError, load
from ._fit import FitResult, fit
from ._lock import DirectoryLockedError
from ._loop import NonfiniteError, TrainState, evaluate, make_eval_step, make_train_step
from ._sources import epoch_batches

__all__ = [
    "CheckpointError",
    "DirectoryLockedError",
    "FitResult",
    "NonfiniteError",
    "TrainState",
    "as_trainable",
    "epoch_batches",
    "evaluate",
    "fit",
    "load",
    "make_eval_step",
    "make_train_step",
]
