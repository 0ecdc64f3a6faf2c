"""Fine-tuned model files and prediction on raw image files (command line: ``tools/predict.py``)."""

from medmae.inference.export import TASKS, load_finetuned, read_finetuned_meta, resolve_checkpoint, save_finetuned
from medmae.inference.predict import Predictor, PredictResult, logits_to_labels, predict_paths

__all__ = [
    "TASKS",
    "PredictResult",
    "Predictor",
    "load_finetuned",
    "logits_to_labels",
    "predict_paths",
    "read_finetuned_meta",
    "resolve_checkpoint",
    "save_finetuned",
]
