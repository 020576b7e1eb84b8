"""Pivotal: pivotal tuning (LoRA + textual-inversion embeddings trained together) for SD webuis.

Importing this package has no side effects: nothing is registered, loaded or patched until a
function is called. ``lib/`` itself is not a package; ``pivotal`` is the only importable name.
"""

__version__ = "0.1.0"
