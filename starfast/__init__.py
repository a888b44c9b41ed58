"""starfast: find and study star models (Sonthalia et al., ICLR 2025) on flat parameter rows.

The public API is re-exported here; each submodule's docstring says what it owns.
"""
from starfast.lap import linear_assignment

__all__ = ["linear_assignment"]
__version__ = "0.1.0"
