"""Evaluation: `metrics` (pixel counting, mIoU), `predictor` (the release's per-image evaluation
modes, jitted), `evaluator` (a validation set through a predictor, results, `main.py --mode eval`)."""
