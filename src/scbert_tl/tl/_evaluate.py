"""The old home of the evaluation helpers, now :mod:`scbert_tl.tl._evaluation`; kept while ``_cli/demo.py`` imports from here."""

from ._evaluation._methods import l1_logistic

__all__ = ["l1_logistic"]
