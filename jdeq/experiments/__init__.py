"""Reproductions of the global-convergence papers: each returns a results object."""

from . import gao2022, kawaguchi2021, ling2023
from ._common import Claim, Results, RunRecord, save_results

EXPERIMENTS = {"kawaguchi2021": kawaguchi2021, "gao2022": gao2022, "ling2023": ling2023}

__all__ = ["EXPERIMENTS", "Claim", "Results", "RunRecord", "gao2022", "kawaguchi2021", "ling2023", "save_results"]
