"""``losslab-compare``: statistics, tables and plots comparing finished runs, grouped by a config key.

collect (find and load runs) ─► fairness (refuse mixed configs) ─► stats ─► table, plots ─► html
"""

from losslab.errors import LossLabError


class ReportError(LossLabError):
    """Runs that cannot be compared as asked: none found, a missing metric or key, mixed configs."""
