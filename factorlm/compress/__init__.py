"""Post-training compression of a trained model (issue #22): dense LSTM -> F-LSTM by SVD, -> G-LSTM by
permuted blocks, and pruning (unstructured magnitude masks, or whole hidden units removed).

Each conversion returns ``(converted, report)``; ``factorlm compress svd|blocks|prune RUN --out RUN2``
writes the converted model as an ordinary run directory that ``factorlm evaluate`` reads.
"""

from factorlm.compress.svd import low_rank_factors, svd_to_flstm

__all__ = ["svd_to_flstm", "low_rank_factors"]
