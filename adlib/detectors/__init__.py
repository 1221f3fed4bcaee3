"""One file per method; importing this package registers them all."""

from .autoencoder import Autoencoder
from .densehybrid import DenseHybrid
from .dfr import DFR
from .base import DETECTORS, Detector, get_detector, load_detector, register
from .padim import PaDiM
from .patchcore import PatchCore
from .pixel_stats import PixelStats

__all__ = ["Autoencoder", "DenseHybrid", "DETECTORS", "DFR", "Detector", "get_detector", "load_detector", "register", "PaDiM", "PatchCore", "PixelStats"]
