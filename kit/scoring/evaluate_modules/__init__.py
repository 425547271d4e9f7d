"""``evaluate`` modules shipped with kit, loaded from this folder (never from the Hub).

Each module lives in ``<name>/<name>.py`` (the layout ``evaluate.load`` expects for a local
path); load one with ``kit.scoring.custom.evaluate_scorer("<name>", ...)``.
"""
