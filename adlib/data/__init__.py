"""Data: MVTec AD-layout data sets, where they come from and which one a notebook runs on.

The rooms, one job each:

- :mod:`adlib.data.mvtec`: the MVTec AD folder layout on disk: finding the data root, how files become
  detector inputs (:class:`Preprocessing`), :class:`MVTecDataset`, :class:`ImageFiles`, batches,
  ImageNet normalization, the category names.
- :mod:`adlib.data.download`: the resumable downloader, :func:`download_mvtec`.
- :mod:`adlib.data.synthetic`: :func:`make_synthetic`, a small synthetic category in the same layout.
- :mod:`adlib.data.choice`: :func:`choose_data` and :class:`DataChoice`, the notebooks' choice of data
  (real when it can be had, else a synthetic stand-in that says so).

Everything in ``__all__`` is importable from here (``from adlib.data import MVTecDataset``).

MVTec AD is licensed CC BY-NC-SA 4.0 by MVTec Software GmbH (non-commercial use, attribution,
share-alike); cite Bergmann et al., CVPR 2019 and IJCV 2021.
"""

from ..imagefiles import IMAGENET_MEAN, IMAGENET_STD, DataError
from .choice import DataChoice, choose_data
from .download import MVTEC_SHA256, MVTEC_URL, download_mvtec
from .mvtec import (MVTEC_CATEGORIES, ImageFiles, MVTecDataset, Preprocessing, batches, denormalize, find_data_root,
                    holdout_split, list_image_files, load_split, normalize, train_batches, user_cache_root)
from .synthetic import make_synthetic

__all__ = [
    "DataError",
    "MVTecDataset",
    "find_data_root",
    "load_split",
    "batches",
    "train_batches",
    "download_mvtec",
    "make_synthetic",
    "choose_data",
    "DataChoice",
    "Preprocessing",
    "ImageFiles",
    "list_image_files",
    "normalize",
    "denormalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
    "MVTEC_URL",
    "MVTEC_SHA256",
    "holdout_split",
    "user_cache_root",
]
