"""Prediction on raw image files with a fine-tuned model file (command line: ``tools/predict.py``).

The model file format itself lives in :mod:`medmae.models.model_file`; it is re-exported here for convenience."""

from medmae.inference.predict import Predictor, PredictResult, logits_to_labels, predict_paths
from medmae.models.model_file import load_finetuned, read_finetuned_meta, resolve_checkpoint, save_finetuned

__all__ = [
    "PredictResult",
    "Predictor",
    "load_finetuned",
    "logits_to_labels",
    "predict_paths",
    "read_finetuned_meta",
    "resolve_checkpoint",
    "save_finetuned",
]
