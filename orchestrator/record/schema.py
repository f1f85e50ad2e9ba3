"""The record's layout: every name the package writes to MLflow or reads back from it.

Run roles, tags (of runs, registered versions and dataset inputs), params, artifact paths,
metric names and the statuses MLflow uses, in one place, so that the writer (a sweep, a trial,
the cook) and every reader (the cook, `soup cook --plan`, promotion, the UI's descriptions) agree
by construction. A name that is built (a shift's metric, a promotion's tag, a soup's weights) has
a helper here; a search filter names a tag through `tag_filter`.

Changing a value here changes what is recorded: runs, versions and artifacts logged before keep
the old name, so a rename needs a reader for both.

Imports nothing of the package. `train` and `soups`, which may not import `record`, spell a few
of these metric names themselves: `train.finetune` the final metrics (``heldout_acc``,
``test_acc``, ``shift_<name>_acc``, ``shift_mean_acc``) and each logged step's ``train_loss``,
``lr`` and ``images_per_s``; the greedy recipes (`soups.greedy`, `soups.ensemble`) their steps'
``heldout_acc``.
"""

from __future__ import annotations

import re

# --- run roles: tag ROLE on every run the package creates -------------------------------------

ROLE = "soup.role"
ROLE_SWEEP = "sweep"  # the parent run of a sweep
ROLE_TRIAL = "trial"  # one fine-tuning run, nested under its sweep's run
ROLE_SOUP = "soup"  # one cooked soup, nested under its sweep's run


def soup_run_name(recipe: str) -> str:
    """The name of a soup's run and of its logged model (a sweep's run is named by its id, a
    trial's by `sweep.trial.trial_label`)."""
    return f"{recipe}-soup"


# --- run tags: identity and lineage ------------------------------------------------------------

SWEEP_ID = "sweep_id"  # on sweep, trial and soup runs (and soup versions): the sweep's id
TRIAL_ID = "trial_id"  # Tune's trial id (updated when a resumed trial gets a new one)
TRIAL_KEY = "trial_key"  # index and params: finds a trial's run across retries and resumes
WORKERS = "workers"  # how many training processes (DDP workers) trained the trial
LAUNCHER = "launcher"  # who ran its training loop: "trial" (the Tune trial's actor) or "torch_trainer"
SOUP_KEY = "soup_key"  # recipe, settings and ingredients: a soup cooked twice is found, not doubled
SOUP_RUN_ID = "soup_run_id"  # on a soup's registered version: the run that logged it
RECIPE = "recipe"  # also a soup run's param
INGREDIENTS = "ingredients"  # comma-separated run ids, in the order given to the recipe
CLASSES = "classes"  # a soup version's: its class names in output order, JSON (cut with "..." past MAX_CLASSES_TAG)
CLASSES_SHA = "classes_sha256"  # of the full JSON list: the serving model's config holds the whole list
N_CLASSES = "n_classes"
DATA_DIGESTS = "data_digests"  # a soup version's: {split: digest} of the held-out split it was selected on and those it was measured on
MAX_CLASSES_TAG = 4000  # characters of class names a version's tag holds (MLflow's tag values are bounded)
KEPT_INGREDIENTS = "kept_ingredients"  # those the recipe kept, in the order added
PARTIAL_SWEEP = "partial_sweep"  # "true" on soups of a sweep that had not finished
COOK_OWNER = "cook_owner"  # host/pid/start of the cook logging a soup run (`cook.locking`)

# --- run tags: the sweep's base model, so that the cook can refuse a foreign checkpoint --------

BASE_ARCH = "base_arch"
PRETRAINED = "pretrained"  # the pretrained weights' reference
PRETRAINED_SHA = "pretrained_sha256"
ARCH_SHA = "arch_sha256"  # digest of the architecture's description
SPACE_NAME = "space"  # the search-space file's stem
BASE_DIGESTS = (ARCH_SHA, PRETRAINED_SHA)  # on sweep and trial runs: a trial must match its sweep's

# --- run tags: what a trial logged and where it stands -----------------------------------------

CHECKPOINT_SHA = "checkpoint_sha256"  # sha256 of CHECKPOINT_PATH (also named in the logits file)
LOGITS_SHA = "logits_sha256"  # sha256 of the logged LOGITS_PATH
LOGITS_SPLITS = "logits_splits"  # {split: [n, labels sha256]} (JSON): `soup cook --plan` reads it
LOGGED_MODEL_ID = "logged_model_id"  # the trial's logged model, created with its run
RAY_CHECKPOINT = "checkpoint"  # the latest checkpoint's name (`trial.checkpoint_name`): the run is resumable
RESULT_LOGGED = "result_logged"  # set once the final weights and logits are in the run
RESUMED_FROM = "resumed_from"  # the checkpoint an attempt resumed from (its name)
END_REASON = "end_reason"  # why a run ended before finishing (dropped when it is reopened)
ERROR = "error"  # a failed trial's exception: its type and message

# --- MLflow's own tags, as the package writes or reads them ------------------------------------

PARENT_RUN = "mlflow.parentRunId"  # nests a run under another in the UI
DESCRIPTION = "mlflow.note.content"  # the run's description (the UI's Description box)
RUN_NAME = "mlflow.runName"  # read only: MLflow sets it from the run's name
USER = "mlflow.user"
SOURCE_TYPE = "mlflow.source.type"
SOURCE_NAME = "mlflow.source.name"
GIT_COMMIT = "mlflow.source.git.commit"

# --- dataset inputs: the tags of each split logged as a run's input ----------------------------

DATASET_CONTEXT = "mlflow.data.context"  # MLflow's role of an input (train, eval...)
DATASET_SPLIT = "soup.split"  # the split's key (heldout, test, a shift's name)

# --- registered versions: promotion ------------------------------------------------------------

FORCED_PROMOTION = "forced_promotion"  # "<time>: <reason>" of a promotion past the gate


def promoted_tag(alias: str) -> str:
    """The version tag recording when `alias` last moved to the version."""
    return f"promoted_{alias}_at"


# --- params (besides the flattened configs) ----------------------------------------------------

N_INGREDIENTS = "n_ingredients"  # a soup run's: ingredients given to the recipe
N_KEPT = "n_kept"  # a soup run's: ingredients it kept

# --- artifacts of a sweep run ------------------------------------------------------------------

SPACE_DIR = "space"  # the search-space file as given
RESOLVED_SPACE = f"{SPACE_DIR}/resolved_config.yaml"  # the space as validated: the cook reads it back
LOGS_DIR = "logs"  # the detail logs of the commands that worked on the run (any run)
COOK_DIR = "cook"
# the online soup's record on the sweep run: every finished trial offered, in order, and what the
# greedy rule decided (what a restarted soup actor and the cook's `online-greedy` recipe read)
ONLINE_RECORD = "online/record.json"
STOP_REASON = "stop_reason"  # on the sweep run: why `sweep.stop` ended it before its last trial
COOK_TABLE = f"{COOK_DIR}/comparison.md"  # soups, baselines and ingredients compared
COOK_FIGURE = f"{COOK_DIR}/soups.png"  # test against mean shift accuracy
COOK_COST = f"{COOK_DIR}/cost.txt"  # forward passes, bytes and time per phase
COOK_RECORDS = f"{COOK_DIR}/records"  # one JSON per cook, named by its inputs


def cook_record(key: str) -> str:
    """The record of the cook whose inputs have identity `key` (`cook.driver.record_key`)."""
    return f"{COOK_RECORDS}/{key}.json"


# --- artifacts of a trial run ------------------------------------------------------------------

CHECKPOINT_PATH = "checkpoint/model.safetensors"  # the fine-tuned weights the cook reads
LOGITS_PATH = "logits/logits.safetensors"  # every evaluated split's logits (`record.logits`)
CHECKPOINT_POINTER = "checkpoint.json"  # in a trial's logged model: where its checkpoint is

# --- artifacts of a soup run and of its logged model -------------------------------------------

SOUP_DIR = "soup"
COEFFICIENTS = f"{SOUP_DIR}/coefficients.json"  # the ingredients and their mixing weights
PLOTS_DIR = "plots"  # the cook's figure, beside each soup
PYFUNC_WEIGHTS = "weights"  # the pyfunc's artifacts (`serving`): the soup's state dict
PYFUNC_CONFIG = "config"  # ... and its model config and class names (JSON)
PYFUNC_CONFIG_FILE = "soup_config.json"  # the file PYFUNC_CONFIG names


def soup_artifact(recipe: str) -> str:
    """The soup's weights in its run's artifacts."""
    return f"{SOUP_DIR}/{recipe}.safetensors"


# --- the local artifact store beside a sqlite database -----------------------------------------

LOCAL_ARTIFACTS = "mlartifacts"

# --- metrics -----------------------------------------------------------------------------------

HELDOUT_ACC = "heldout_acc"  # the selection split: trials are ranked by it, the gate reads it
TEST_ACC = "test_acc"
SHIFT_MEAN_ACC = "shift_mean_acc"  # mean over the distribution shifts
SOUP_HELDOUT_ACC = "soup_heldout_acc"  # a greedy soup's held-out accuracy per ingredient tried
# the online soup, on the sweep run, at step = trials finished (`sweep.online`)
SOUP_KEPT = "soup_kept"  # ingredients the online soup holds
BEST_TRIAL_HELDOUT_ACC = "best_trial_heldout_acc"  # the best single trial so far, beside it
TRAIN_LOSS = "train_loss"  # per logged step
EPOCH = "epoch"  # logged at each epoch's end: which epochs are in
EPOCH_TRAIN_LOSS = "epoch_train_loss"
TRAIN_SECONDS = "train_seconds"
ATTEMPT_START_EPOCH = "attempt_start_epoch"  # one point per attempt of a trial
ATTEMPT_START_STEP = "attempt_start_step"
TRIALS_FINISHED = "trials_finished"  # on the sweep run, at its end
TRIALS_FAILED = "trials_failed"
# table columns (and splits) whose accuracy metric is ``<column>_acc``; any other is a shift's
_OWN_ACCURACY = ("heldout", "test", "shift_mean")


def shift_metric(name: str) -> str:
    """The accuracy metric of distribution shift `name` (``sketch`` -> ``shift_sketch_acc``)."""
    return f"shift_{name}_acc"


def accuracy_metric(column: str) -> str:
    """A table column's accuracy as the metric trials log (``test`` -> ``test_acc``, a shift
    ``sketch`` -> ``shift_sketch_acc``), so that MLflow charts trials and soups on the same axes."""
    return f"{column}_acc" if column in _OWN_ACCURACY else shift_metric(column)


def time_metric(part: str) -> str:
    """Seconds a trial spent in `part` (``time_worker_start_s``; benchmarks/sweep_overhead.py)."""
    return f"time_{part}_s"


def metric_split(key: str) -> str | None:
    """The split a metric was measured on: ``heldout_acc`` -> heldout, ``test_acc`` -> test,
    ``shift_sketch_acc`` or ``sketch_acc`` -> sketch; None for others (a mean over shifts, a loss)."""
    m = re.fullmatch(r"(?:shift_)?(.+)_acc", key)
    return None if m is None or m.group(1) in ("mean", "shift_mean") else m.group(1)


# --- statuses (MLflow's values) ----------------------------------------------------------------

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"  # of a run
READY, PENDING = "READY", "PENDING"  # of a logged model (FAILED too)

# --- search filters ----------------------------------------------------------------------------


def tag_filter(key: str) -> str:
    """Tag `key` as an MLflow search filter names it: ``tags.sweep_id``, or quoted in backticks
    when it holds a dot (``tags.`soup.role```). Values go through `tracking.quoted`."""
    return f"tags.`{key}`" if "." in key else f"tags.{key}"


def metric_order(key: str) -> str:
    """A search's ``order_by`` clause: highest metric `key` first."""
    return f"metrics.{key} DESC"
