"""The sweep: Ray Tune over a search space (`driver`: the space as Tune domains, resume, stop
signals, callbacks) and one trial (`trial`: the Tune trial function, whose one training loop runs
in the trial's own actor or, for several workers, in a Ray Train `TorchTrainer`; checkpoints,
metrics to MLflow once each).

May import: config, data, train, record, runtime (and ray).
"""
