"""KnowFREE core library: data, model, training and evaluation without Ray.

Nothing in this package imports ray; the Ray entry points live in ``jobs/``.
"""

__version__ = "0.1.0"
