"""Package marker so the module file ships with kit; load it with ``evaluate.load(<folder>)``."""
