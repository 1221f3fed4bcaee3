"""Backbone recipes: fine-tune a pretrained CNN for anomaly detection, on :mod:`adlib.train`'s loop.

Each recipe writes one fine-tuned backbone file (:func:`adlib.backbones.save_backbone`) that every
feature method (PaDiM, PatchCore, DFR) accepts in place of a backbone name.

- :mod:`~adlib.pretrain.centering`: ``L_class + lambda * L_center`` on the target's normal images.
"""

from .centering import CenteringNet, CenteringRecipe, CenteringRun, center_loss, pretrain_centering

__all__ = ["CenteringNet", "CenteringRecipe", "CenteringRun", "center_loss", "pretrain_centering"]
