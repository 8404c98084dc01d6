"""The research commands: mixln-study (study.py: the placement study's grid, LR sweep and guard sweep; report.py:
its analysis and report; runs.py: the runs, their statistics and outcomes both share) and mixln-compare
(compare.py: one table of several runs)."""
