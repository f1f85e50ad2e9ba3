"""What MLflow records: the facade over the tracking store and the registry (`tracking`), a trial's
logits on disk (`logits`), the promotion gate (`promotion`).

The only package that imports mlflow (with the top-level `serving`, whose pyfunc class MLflow
loads). May import: nothing else of the package but `hashing`.
"""
