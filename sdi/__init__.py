"""Step-Decomposed Influence (SDI) and fast TracIn for looped / weight-tied models.

Drop-in for ``step-decomposed-influence`` 0.1.1, with kernels chosen by ``SDI_BACKEND``.
"""

__version__ = "0.2.0"  # before the imports: sdi.estimators records it in feature stores

from .auto_core import LoopedCore, find_looped_core
from .backend import backend_info
from .checkpoints import CheckpointSpec
from .estimators import FullGradientTracInSDI, ProjectedTracInSDI
from .outputs import FeatureSet, InfluenceOutputs, PairExplanation, TopInfluences
from .rules import ModuleRule, register_rule
from .steps import StepPlan

__all__ = [
    "ProjectedTracInSDI",
    "FullGradientTracInSDI",
    "CheckpointSpec",
    "InfluenceOutputs",
    "FeatureSet",
    "TopInfluences",
    "PairExplanation",
    "backend_info",
    "ModuleRule",
    "register_rule",
    "StepPlan",
    "find_looped_core",
    "LoopedCore",
]
