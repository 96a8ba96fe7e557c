"""Strong and weak model backends, model specs and fingerprints."""

from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.specs import load_model, register_kind

__all__ = ["LanguageModel", "ModelInfo", "Session", "load_model", "register_kind"]
