"""What MLflow records, and every call to an MLflow store:

- `schema`: every tag, run role, param, artifact path and metric name the package writes or
  reads (the record's layout; imports nothing);
- `tracking`: the facade over the tracking store and the registry (`Tracker`) and its helpers
  (URI resolution, retries, search filters);
- `trials`: a trial's final result (metrics, checkpoint, logits) and MLflow's system metrics;
- `logits`: the format of a trial's logged logits;
- `soups`: a sweep found by its id, soup runs found by their key, a soup logged as a pyfunc model
  and registered as a version;
- `promotion`: the gate that moves a registry alias;
- `store`: the check of a tracking URI before a command does any work.

The only package that imports mlflow (with the top-level `serving`, whose pyfunc class MLflow
loads). May import: nothing else of the package but `hashing`.
"""
