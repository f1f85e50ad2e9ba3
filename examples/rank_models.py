"""List an experiment's logged models, trials and soups together, ranked by held-out accuracy,
each with the datasets its figures were measured on. Only `MlflowClient`: run it against any store.

    MLFLOW_TRACKING_URI=sqlite:///DIR/mlflow.db python examples/rank_models.py [EXPERIMENT]
"""

import sys

from mlflow.tracking import MlflowClient


def ranked(client: MlflowClient, experiment: str) -> list:
    """The experiment's logged models, best held-out accuracy first (every page)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no experiment {experiment!r} in {client.tracking_uri}")
    models, token = [], None
    while True:
        page = client.search_logged_models(
            [exp.experiment_id], order_by=[{"field_name": "metrics.heldout_acc", "ascending": False}],
            page_token=token)
        models += page
        token = page.token
        if not token:
            return models


def main(experiment: str = "tiny-digits") -> None:
    rows = []
    for m in ranked(MlflowClient(), experiment):
        latest = {x.key: x.value for x in sorted(m.metrics or [], key=lambda x: (x.timestamp, x.step))}
        accs = [f"{latest[k]:.1%}" if k in latest else "-" for k in ("heldout_acc", "test_acc", "shift_mean_acc")]
        rows.append([m.name, m.tags.get("soup.role", "?"), *accs, datasets(m)])
    width = max([len("model"), *(len(r[0]) for r in rows)])
    print(f"{'model':<{width}} {'kind':<5} {'held-out':>8} {'test':>6} {'shift':>6}  datasets")
    for name, kind, heldout, test, shift, data in rows:
        print(f"{name:<{width}} {kind:<5} {heldout:>8} {test:>6} {shift:>6}  {data}")


def datasets(model) -> str:
    """The names of the datasets the model's metrics were measured on, in the order first seen
    (held-out first), their common prefix said once: ``tiny_digits/{heldout,test,rotate}``."""
    names = list(dict.fromkeys(x.dataset_name for x in model.metrics or [] if x.dataset_name))
    prefixes = {n.rpartition("/")[0] for n in names}
    if len(prefixes) == 1 and "/" in names[0]:
        return f"{prefixes.pop()}/{{{','.join(n.rpartition('/')[2] for n in names)}}}"
    return ", ".join(names)


if __name__ == "__main__":
    main(*sys.argv[1:])
