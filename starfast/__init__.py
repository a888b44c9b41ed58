"""starfast: find and study star models (Sonthalia et al., ICLR 2025) on flat parameter rows.

The public API is re-exported here; each submodule's docstring says what it owns:
``flat`` (ParamSpace), ``spec`` (PermutationSpec), ``ops`` (permute, lerp_gather), ``lap``
(linear_assignment), ``matching`` (match_weights), ``models``, ``data``, ``training``,
``starlight`` (train_star), ``bn`` (recompute_bn), ``barrier`` (barrier_curve), ``evaluation``,
``theory``, ``tracing`` (trace_spec), ``spec_check`` (check_spec); ``in_memory`` (find_star, barrier: the
short path for models held in memory).
"""
from starfast.barrier import BarrierCurve, barrier_curve, loss_barrier
from starfast.bn import recompute_bn
from starfast.flat import ParamSpace
from starfast.in_memory import barrier, find_star  # ``starfast.barrier`` is the function; the module stays importable
from starfast.lap import linear_assignment
from starfast.matching import MatchResult, match_weights
from starfast.ops import lerp_gather, permute
from starfast.spec import Axis, Group, PermutationSpec, Site, permute_model
from starfast.spec_check import SpecCheck, check_spec
from starfast.tracing import TraceError, TracedSpec, trace_spec

__all__ = [
    "Axis", "BarrierCurve", "Group", "MatchResult", "ParamSpace", "PermutationSpec", "barrier", "barrier_curve", "find_star",
    "lerp_gather", "linear_assignment", "loss_barrier", "match_weights", "permute", "permute_model", "recompute_bn", "Site",
    "SpecCheck", "TraceError", "TracedSpec", "check_spec", "trace_spec",
]
__version__ = "0.1.0"
