"""The pipeline behind the launcher: shared pieces, evaluation, and the train/coldstart/eval/
export modes."""
