"""Published MoE compression methods, run through the same `molae convert` pipeline as MoLAE
(`--method NAME --budget FRACTION`), so every one meets the same model, calibration data and
parameter budget (a fraction of the routed-expert parameters) and is scored by the same `molae eval`.

  svd               per-expert truncated SVD (SVD-LLM's whitening with calibration data); written
                    as MoLAE experts with one group per expert (B_i, A_i: W_i = A_i B_i)
  d2moe             D²-MoE: Fisher-weighted base plus a per-expert low-rank delta (lowrank.py)
  mobe              MoBE: A_i times a mixture of shared basis matrices, fitted by Adam (mobe.py)
  hcsmoe            HC-SMoE: experts clustered by their outputs on calibration data, merged (merging.py)
  prune-frequency   drop the least-routed experts (pruning.py)
  prune-reap        drop the experts with the least REAP saliency (pruning.py)

Methods that produce whole expert matrices (d2moe, mobe, hcsmoe) are written multiplied out in the
source's own layout, so the result loads with the family's own transformers class; what the method
would store is counted from its factors and recorded (config.json `molae_compression`, the report).
Pruning writes a smaller model of the same family (fewer experts, router rows dropped).
"""

from .lowrank import d2moe, svd_rank
from .merging import hcsmoe
from .mobe import mobe
from .pruning import keep_experts

DENSE_METHODS = ("d2moe", "mobe", "hcsmoe")
PRUNE_METHODS = ("prune-frequency", "prune-reap")
METHODS = ("molae", "svd", *DENSE_METHODS, *PRUNE_METHODS)
NEEDS_CALIBRATION = ("hcsmoe", *PRUNE_METHODS)

__all__ = ["d2moe", "svd_rank", "hcsmoe", "mobe", "keep_experts", "METHODS", "DENSE_METHODS", "PRUNE_METHODS",
           "NEEDS_CALIBRATION"]
