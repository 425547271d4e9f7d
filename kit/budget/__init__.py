"""The acceptance budget: product-language rules, frozen before results, judged by intervals.

``grammar``  sentences -> :class:`~kit.budget.grammar.Rule` values (:func:`load_budget`)
``frozen``   the frozen copy verdicts use and whether the budget file changed since
``judge``    rules + evidence -> verdicts (:func:`evaluate_rules`) -> decisions (:func:`decide`)
"""

from kit.budget.grammar import Budget, Rule, load_budget, parse_rule
from kit.budget.judge import decide, evaluate_rules

__all__ = ["Budget", "Rule", "decide", "evaluate_rules", "load_budget", "parse_rule"]
