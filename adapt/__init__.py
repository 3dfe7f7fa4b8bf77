"""The adaptation stage (adapt-epic).  Its Python API, for notebooks and scripts (:mod:`adapt.api`):

    import adapt
    run = adapt.train("dann", source="K1", target="K2", features_root="features/demo", steps=150)
    res = adapt.sweep("my_sweep.toml");  res.table
    rep = adapt.report(["runs/my_sweep"], select="all");  rep.tables[0]

A mistake is raised as :class:`adapt.AdaptError` with the one line the command line prints.
"""

from adapt.api import AdaptError, Report, RunResult, SweepResult, report, sweep, train

__all__ = ["train", "sweep", "report", "AdaptError", "RunResult", "SweepResult", "Report"]
