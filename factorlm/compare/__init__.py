"""The paper's experiment on your data and hardware: train several models under the same budget
and compare perplexity, parameters and speed (``factorlm compare``).

family: which models (the paper's family at any --scale, presets, config files);
run: training them one after the other, resumably; report: the table and the figures.
"""

from factorlm.compare.family import Entry, build_entries, parse_scale, scale_paper_model
from factorlm.compare.run import Budget, run_comparison

__all__ = ["Budget", "Entry", "build_entries", "parse_scale", "run_comparison", "scale_paper_model"]
