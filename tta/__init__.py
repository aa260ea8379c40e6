"""clip-tta core: CLIP loading, label sets, test-time adaptation methods. No server imports here."""

from tta.engine import Engine, Prediction
from tta.errors import BadRequest, ModelUnavailable, TTAError
from tta.images import decode_image
from tta.methods.base import get_method_class, list_methods
from tta.models import ClipModel, load_model
from tta.text import LabelSet, load_labels

__all__ = [
    "BadRequest", "ClipModel", "Engine", "LabelSet", "ModelUnavailable", "Prediction", "TTAError",
    "decode_image", "get_method_class", "list_methods", "load_labels", "load_model",
]
__version__ = "0.1.0"
