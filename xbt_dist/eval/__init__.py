"""Evaluation: multi-caption retrieval recalls, zero-shot accuracy, backward-compatibility cases
(old/old, new/old, phi/old, xbt/old, new/new, xbt/xbt) with the paper's Eqn-1 verdict, and the
report (eval.json, report.md, plots) plus the ablation table merging several runs.

Works from plain embedding tensors; `run.py` (when present) computes them from models and shards.
"""

from xbt_dist.eval.compat import (CASES, align_dim, compatibility_report, on_off_check, verdict,
                                  zero_shot_report)
from xbt_dist.eval.metrics import (class_text_embeddings, image_to_text_recall,
                                   retrieval_recalls, text_to_image_recall, zero_shot_accuracy)

__all__ = ["CASES", "align_dim", "compatibility_report", "on_off_check", "verdict",
           "zero_shot_report", "class_text_embeddings", "image_to_text_recall",
           "retrieval_recalls", "text_to_image_recall", "zero_shot_accuracy"]
