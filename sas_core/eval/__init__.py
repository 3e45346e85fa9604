"""Evaluation under OpenScene's protocol: confusion-matrix mIoU / mAcc, long-tail groups (ScanNet's
instance AP: :mod:`sas_core.eval.instances`).

NumPy only (no torch), so it can be imported anywhere.
"""

from sas_core.eval.metrics import (  # noqa: F401
    LONG_TAIL_K,
    NO_FEATURE,
    boundary_mask,
    boundary_miou,
    confusion_matrix,
    evaluate,
    format_table,
    group_means,
    long_tail_groups,
    miou_macc,
    to_json,
)
