"""Scoring (pure): what the judges' verdicts add up to, and how far to trust it. Pooling ratings and
comparisons, binarizing into pairs, agreement between judges, confidence per pair, Bradley-Terry,
and calibration against gold labels. Imports no panel, no call path and no Dagster."""
