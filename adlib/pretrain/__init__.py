"""Backbone recipes: fine-tune a pretrained CNN for anomaly detection, on :mod:`adlib.train`'s loop.

Each recipe writes one fine-tuned backbone file (:func:`adlib.backbones.save_backbone`) that every
feature method (PaDiM, PatchCore, DFR) accepts in place of a backbone name.

- :mod:`~adlib.pretrain.centering`: ``L_class + lambda * L_center`` on the target's normal images.
- :mod:`~adlib.pretrain.semi_formula`: separation and ranking losses on a stream of Gaussian-mixture
  anomalies added to the target's normal images.
"""

from .centering import CenteringNet, CenteringRecipe, CenteringRun, center_loss, pretrain_centering

from .semi_formula import (SemiFormulaNet, SemiFormulaRecipe, SemiFormulaRun, SemiFormulaStream,
                           pretrain_semi_formula)

__all__ = ["CenteringNet", "CenteringRecipe", "CenteringRun", "center_loss", "pretrain_centering",
           "SemiFormulaNet", "SemiFormulaRecipe", "SemiFormulaRun", "SemiFormulaStream", "pretrain_semi_formula"]
