"""Batch scoring: numpy batches (`Scorer`), whole candidate files (`score_file`), shards and their merge.

from dmrx.scoring import Scorer, score_file
"""

from dmrx.scoring.files import default_output, score_file
from dmrx.scoring.flops import flops_per_candidate
from dmrx.scoring.scorer import BACKENDS, PRECISIONS, Scorer, Work, group_rows
from dmrx.scoring.shards import merge_shards, parse_shard, shard_range

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Scorer",
    "Work",
    "default_output",
    "flops_per_candidate",
    "group_rows",
    "merge_shards",
    "parse_shard",
    "score_file",
    "shard_range",
]
