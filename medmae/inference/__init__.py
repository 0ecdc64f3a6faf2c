"""Prediction on raw image files with a fine-tuned model file (command line: ``tools/predict.py``).

The model file format is a task artefact: :mod:`medmae.tasks.model_file`."""

from medmae.inference.predict import Predictor, PredictResult, logits_to_labels, predict_paths

__all__ = ["PredictResult", "Predictor", "logits_to_labels", "predict_paths"]
