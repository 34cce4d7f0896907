"""Checks of a network before training: `diagnose` and its report."""

from kreg.diagnostics.diagnose import diagnose
from kreg.diagnostics.problem import Problem
from kreg.diagnostics.report import Report

__all__ = ["Problem", "Report", "diagnose"]
