"""coral-fast: Triton kernels and a draft/verify loop for CORAL-style speculative decoding.

Names are imported lazily so that `import coral_fast` stays cheap (no transformers import
until a name that needs it is touched).
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # grouped LM head (issue 2)
    "VocabGrouping": "coral_fast.grouping",
    "GroupRouter": "coral_fast.router",
    "GroupedLMHead": "coral_fast.head",
    "RoutedLMHead": "coral_fast.head",
    # trees and tree attention (issue 3)
    "DraftTree": "coral_fast.tree",
    "build_dynamic_tree": "coral_fast.tree",
    "tree_attention": "coral_fast.kernels.tree_attention",
    # draft model and the draft/verify loop (issue 5)
    "DraftConfig": "coral_fast.draft",
    "DraftModel": "coral_fast.draft",
    "SpeculativeGenerator": "coral_fast.generate",
    "TreeConfig": "coral_fast.generate",
    "GenerationResult": "coral_fast.generate",
    "load_target": "coral_fast.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coral_fast' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
