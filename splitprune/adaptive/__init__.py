"""Adapting to the network at run time: the device's budget controller (torch-free)."""
from splitprune.adaptive.controller import BudgetController, Decision, Observation, Option, option_ladder

__all__ = ["BudgetController", "Decision", "Observation", "Option", "option_ladder"]
