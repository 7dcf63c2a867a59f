"""The training phases of a fit, each a function from typed inputs to an :class:`Outcome`:

- ``probe``: while the backbone is frozen its features never change, so they are computed once (with the
  recipe's views) and the head is fitted on them by L-BFGS. ``small-*`` recipes end there;
- ``epochs``: Lightning epochs, for recipes that train the backbone (starting from the probed head: LP-FT)
  or a head on uncached features.
- ``lr_find``: a learning-rate range test on the module as the epochs would start it (``finetune lr-find``,
  ``fit --set lr=auto``); it returns a ``LrFinding``, and leaves the module as it was.

``finetune.train.fit`` wires them; a new phase is a new module here that returns an ``Outcome``.
"""

from .outcome import Outcome

__all__ = ["Outcome"]
