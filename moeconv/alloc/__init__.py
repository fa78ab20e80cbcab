"""Expert-wise mixed precision: which QuantSpec each routed expert gets under a bit budget.

``plan_allocation`` is the one entry point (used by ``moeconv plan`` and
``moeconv convert --avg-bits``); see ``planner`` for the allocators.
"""

from .planner import ALLOCATORS, DEFAULT_CANDIDATES, ExpertChoice, Plan, plan_allocation, spec_label

__all__ = ["ALLOCATORS", "DEFAULT_CANDIDATES", "ExpertChoice", "Plan", "plan_allocation", "spec_label"]
