"""Ensembles: K replicas of a model trained in one vectorised step with ``torch.func.vmap``.

A *stacked* state is K ordinary :class:`fnlight.TrainState` s in one: every tensor of the
parameters, buffers, optimizer state and key has the replicas on its leading dimension
(optimizer hyperparameters become ``[K]`` tensors, so replicas may differ in learning rate),
while ``step``, ``data`` and ``stop`` are shared. :func:`make_ensemble_step` trains all
replicas per call; :func:`unstack_states` gives them back as ordinary states to evaluate,
export or checkpoint. See ``docs/ensembles.md``.
"""

from ._stack import ensemble_size, replica_state, stack_states, unstack_states
from ._step import EnsembleStep, make_ensemble_step

__all__ = ["EnsembleStep", "ensemble_size", "make_ensemble_step", "replica_state", "stack_states", "unstack_states"]
