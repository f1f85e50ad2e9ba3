"""`soup ...`: a thin command line over the library. Every command accepts `argv` for tests."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from orchestrator.config import (
    LEARNED_MODES,
    ConfigError,
    FinetuneConfig,
    load_yaml,
    one_line,
    parse_yaml,
    with_overrides,
)
from orchestrator.cook.report import text_table, verdict


def _resource_options(sp, what: str) -> None:
    """--no-ray, --cpus, --gpus, --memory-gib: where the cook's (or the doctor's) compute runs."""
    sp.add_argument("--no-ray", action="store_true", help=f"run {what} in this process instead of a Ray task")
    sp.add_argument("--cpus", type=float, help=f"CPUs of {what} (default: the space's cook.resources.cpu)")
    sp.add_argument("--gpus", type=float, help=f"GPUs of {what}, 0 or 1 (default: cook.resources.gpu)")
    sp.add_argument("--memory-gib", type=float, help=f"memory {what} reserves (default: cook.resources.memory_gib)")


def _positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _fail(command: str, err: Exception | str) -> int:
    """Bad input ends a command with exit code 2 and one line on stderr, never a traceback."""
    print(f"soup {command}: error: {one_line(str(err))}", file=sys.stderr)
    return 2


def _store(write: bool, must_exist: bool = True) -> None:
    """Refuse, before any work, an MLflow store the command cannot use: a URI that names no
    database store or tracking server (a plain path, the file store, an unknown scheme), a
    sqlite store that is not there (or is an empty database) where one is read (a mistyped
    MLFLOW_TRACKING_URI is not created empty), a sqlite file that holds another program's
    tables, a path that cannot be opened, or a read-only store where the command writes."""
    from orchestrator.record.store import StoreError, check_store
    from orchestrator.record.tracking import resolve_uri

    try:
        check_store(resolve_uri(), write=write, must_exist=must_exist)
    except StoreError as err:
        raise ConfigError(str(err)) from None


def _overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        out[key.strip()] = parse_yaml(value, f"--set {pair!r}")  # the same guarded loader as files
    return out


def _finetune_config(path: str | None, sets: Sequence[str] | None) -> FinetuneConfig:
    cfg = load_yaml(FinetuneConfig, path) if path else FinetuneConfig()
    return with_overrides(cfg, _overrides(sets), "--set") if sets else cfg


def cmd_zeroshot(args) -> int:
    from orchestrator.quickstart import zeroshot_report

    cfg = _finetune_config(args.config, args.set)
    print(text_table([zeroshot_report(cfg)]))
    return 0


def cmd_finetune(args) -> int:
    from orchestrator.record.schema import HELDOUT_ACC, TRAIN_LOSS
    from orchestrator.soups import save_weights
    from orchestrator.train.finetune import finetune

    cfg = _finetune_config(args.config, args.set)
    t0 = time.perf_counter()
    res = finetune(cfg, on_epoch=lambda r: print(  # an epoch's row holds what a trial logs for it
        f"epoch {r['epoch']}/{cfg.train.epochs}  loss {r[TRAIN_LOSS]:.3f}  "
        f"held-out {r[HELDOUT_ACC]:.1%}", flush=True))
    wall = time.perf_counter() - t0
    print(text_table([{"run": "finetune", **res.metrics()}]))
    print(f"test accuracy {res.test_acc:.1%}  wall time {wall:.1f}s "
          f"(training {res.train_seconds:.1f}s)")
    if args.out:
        print(f"weights written to {save_weights(res.state_dict, args.out)}")
    return 0


def cmd_pair(args) -> int:
    from orchestrator.quickstart import pair_soup

    base = _finetune_config(args.config, None)
    cfg_a = with_overrides(base, _overrides(args.a), "--a")
    cfg_b = with_overrides(base, _overrides(args.b), "--b")
    print(text_table(pair_soup(cfg_a, cfg_b, log=print)))
    return 0


def _detail(args, command: str):
    """The block whose detail goes to the log file (`terminal.detail_to`); none with --verbose."""
    from orchestrator.runtime import terminal

    return terminal.detail_to(None if args.verbose else args.log_file or terminal.default_log_file(command))


def keep_log(uri: str, run_id: str, log) -> str | None:
    """The detail log `log` (None with --verbose) kept on run `run_id` too; its artifact path, or
    None. A store that refuses it costs a line, not the finished work: the file stays on disk."""
    from orchestrator.record.tracking import Tracker

    if log is None or not Path(log).exists():
        return None
    try:
        return Tracker(uri).keep_log(run_id, log)
    except Exception as err:  # noqa: BLE001 - the sweep is done; the log is still where it was
        print(f"detail log not kept in MLflow ({type(err).__name__}: {err}); it stays at {log}")
        return None


def cmd_sweep(args) -> int:
    from orchestrator.sweep.driver import SweepInterrupted, cook_hint, run_sweep

    _store(write=True, must_exist=False)  # a sweep starts a new store or logs to an existing one
    try:
        with _detail(args, "sweep") as log:
            out = run_sweep(args.space, name=args.name, resume=args.resume, storage_path=args.storage_path)
            registered = _register_online(out)
    except SweepInterrupted as err:
        print(f"soup sweep: {err}", file=sys.stderr)
        return 128 + signal.Signals[err.signal_name].value  # as a shell reports death by signal
    if where := keep_log(out.tracking_uri, out.parent_run_id, log):
        print(f"detail log also on the sweep run: {where}")
    print(f"sweep {out.sweep_id}: {out.finished} trials finished, {out.failed} failed; "
          f"parent run {out.parent_run_id} in {out.tracking_uri}")
    if registered:
        print(registered)
    print(f"cook it with: {cook_hint(out.sweep_id)}")
    return 0 if out.finished else 1


def _register_online(out) -> str | None:
    """A sweep with an online soup registers it at its end (recipe online-greedy); the line
    that says so, or why not."""
    from orchestrator.cook.driver import CookError, cook_online

    if not (out.online_soup and out.finished):
        return None
    try:
        cooked = cook_online(out.sweep_id, out.tracking_uri)
    except CookError as err:  # the sweep itself is done and logged; say why, and how to retry
        return f"online soup not registered: {err} (soup cook --sweep {out.sweep_id} --recipes online-greedy)"
    row = next(r for r in cooked.rows if r["name"] == "online-greedy soup")
    return (f"online soup: registered as online-greedy, version {cooked.versions['online-greedy']} "
            f"(held-out {row['heldout']:.1%}, test {row['test']:.1%})")


def _recipes(text: str | None) -> tuple[str, ...] | None:
    """The recipes named on the command line, each checked against the recipe table."""
    from orchestrator.soups.recipe import get_recipe

    if text is None:
        return None  # the cook's default
    recipes = tuple(r.strip() for r in text.split(",") if r.strip())
    if not recipes:
        raise ConfigError(f"--recipes {text!r}: name at least one recipe")
    for r in recipes:  # checked before any download or build
        try:
            get_recipe(r)
        except ValueError as err:
            raise ConfigError(f"--recipes: {err}") from None
    return recipes


def cmd_cook(args) -> int:
    from orchestrator.cook.driver import CookError, cook

    recipes = _recipes(args.recipes)
    resources = {"cpu": args.cpus, "gpu": args.gpus, "memory_gib": args.memory_gib}
    if args.plan:
        return _cook_plan(args, recipes, resources)
    _store(write=True)
    try:
        with _detail(args, "cook") as log:
            out = cook(args.sweep, recipes=recipes, model_name=args.model_name,
                       strict=args.strict, use_ray=not args.no_ray, learned_mode=args.learned_mode,
                       partial=args.partial, resources=resources, rebuild=args.rebuild,
                       learned_sample=args.learned_sample)
    except CookError as err:
        return _fail("cook", err)
    print(text_table(_table_rows(out.rows)))
    if said := verdict(out.rows):
        print("\n" + "\n".join(said))
    if args.doctor:
        from orchestrator.cook.doctor import doctor

        try:
            print("\n" + "\n".join(doctor(args.sweep, use_ray=not args.no_ray, resources=resources).lines()))
        except CookError as err:
            return _fail("cook", err)
    if where := keep_log(out.tracking_uri, out.parent_run_id, log):
        print(f"detail log also on the sweep run: {where}")
    return 0


def cmd_doctor(args) -> int:
    from orchestrator.cook.doctor import doctor
    from orchestrator.cook.driver import CookError

    _store(write=True)
    try:
        out = doctor(args.sweep, images=args.images, use_ray=not args.no_ray,
                     resources={"cpu": args.cpus, "gpu": args.gpus, "memory_gib": args.memory_gib})
    except CookError as err:
        return _fail("doctor", err)
    print("\n".join(out.lines()))
    return 0


def _cook_plan(args, recipes, resources) -> int:
    from orchestrator.cook.driver import CookError
    from orchestrator.cook.plan import plan_cook

    _store(write=False)
    try:
        plan = plan_cook(args.sweep, recipes=recipes, model_name=args.model_name,
                         learned_mode=args.learned_mode, partial=args.partial, resources=resources,
                         learned_sample=args.learned_sample, doctor=args.doctor)
    except CookError as err:
        return _fail("cook", err)
    print("\n".join(plan.lines()))
    return 0


def _table_rows(rows: list[dict]) -> list[dict]:
    return [{"model": r["name"], "held-out": r["heldout"], "test": r["test"],
             "mean shift": r["shift_mean"]} for r in rows]


def cmd_demo(args) -> int:
    from orchestrator.demo import WorldUnavailable, run_demo
    from orchestrator.record.schema import LOCAL_ARTIFACTS

    try:
        res = run_demo(args.workdir, space=args.space, verbose=args.verbose, world=args.world)
    except WorldUnavailable as err:
        return _fail(args.command, err)
    print("\n" + text_table(_table_rows(res["rows"])))
    if said := verdict(res["rows"]):
        print("\n" + "\n".join(said))
    print(f"\ndemo finished in {res['seconds']:.0f}s; registered versions: {res['versions']}")
    print(f"plot:         {res['plot']}")
    print(f"MLflow store: {res['uri']} (artifacts in {res['workdir']}/{LOCAL_ARTIFACTS})")
    ui = f"mlflow ui --backend-store-uri {shlex.quote(res['uri'])} --host 127.0.0.1 --port 5000"
    print(f"open the UI:  {ui}")
    if res["log"]:
        kept = keep_log(res["uri"], res["sweep_run"], res["log"])
        print(f"detail log:   {res['log']}" + (f" (also on the sweep run: {kept})" if kept else ""))
    return 0


def cmd_promote(args) -> int:
    from orchestrator.record.promotion import PromotionError, promote
    from orchestrator.record.tracking import Tracker

    _store(write=True)
    try:
        v = promote(Tracker(), args.model, args.version, args.alias, args.force, args.reason or "")
    except PromotionError as err:
        return _fail("promote", err)
    print(f"{args.model}@{args.alias} -> version {v}")
    return 0


def cmd_models(args) -> int:
    from orchestrator.record.promotion import PromotionError, list_versions
    from orchestrator.record.tracking import Tracker

    _store(write=False)
    try:
        print(text_table(list_versions(Tracker(), args.model)))
    except PromotionError as err:
        return _fail("models", err)
    return 0


def cmd_init(args) -> int:
    from orchestrator import starter
    from orchestrator.data.trust import DataError

    try:
        cfg = starter.guess_data(args.data, args.root, skip_unreadable=args.skip_unreadable)
        insp = starter.inspect(cfg, progress=_progress("checked"))
        out = Path(args.out or f"{starter.data_name(cfg)}.yaml")
        print(f"{args.data}: {cfg.dataset}, {len(insp.found.train.classes)} classes ({insp.found.source})")
        print(insp.table())
        print(insp.report.summary())
        starter.write_space(insp, out, args.arch, args.pretrained, args.gpus)
    except (DataError, ValueError, OSError) as err:
        raise ConfigError(err) from None
    print(f"guessed: image_size {starter.image_size(args.arch)} for {args.arch}; the paper's search "
          f"distributions{' scaled for the tiny tower' if args.arch == starter.TINY_ARCH else ''}; "
          f"shifts {', '.join(starter.CORRUPTIONS)} of the test split; "
          + (f"{args.gpus} GPU(s): one trial per GPU" if args.gpus else "CPU only: 2 trials at a time"))
    print(f"wrote {out}; start the sweep with: {starter.launch_command(out, args.gpus)}")
    return 0


def _progress(what: str):
    """A progress line now and then on stderr for long checks (every 10% of the images)."""
    state = {"next": 0.1}

    def show(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            print(f"  {what} {done:,}/{total:,} images", file=sys.stderr, flush=True)
            state["next"] = done / total + 0.1
    return show


def cmd_pretrain_base(args) -> int:
    from orchestrator.train.pretrain import pretrain, pretrain_fashion

    run = pretrain_fashion if args.world == "fashion" else pretrain
    path = run(args.out, **({"steps": args.steps} if args.steps else {}), seed=args.seed)
    print(f"base checkpoint written to {path}")
    return 0


def _recipes_help() -> str:
    from orchestrator.soups.recipe import RECIPES, default_recipes, recipe_names

    known = "; ".join(f"{n}: {RECIPES[n].summary}" if RECIPES[n].summary else n for n in recipe_names())
    return (f"comma-separated recipes (default: {','.join(default_recipes())}). Known recipes: "
            f"{known}").replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    from orchestrator.record.schema import PARTIAL_SWEEP

    p = argparse.ArgumentParser(prog="soup", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    for name, fn, help_ in [
        ("zeroshot", cmd_zeroshot, "Zero-shot accuracy of the base checkpoint on every split."),
        ("finetune", cmd_finetune, "Run one fine-tune and print its accuracies and wall time."),
    ]:
        sp = add(name, fn, help_)
        sp.add_argument("--config", help="fine-tuning YAML (model, data, train); defaults if omitted")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
        if name == "finetune":
            sp.add_argument("--out", help="write the fine-tuned weights here (safetensors)")
    sp = add("pair", cmd_pair, "Fine-tune twice and average the two 50/50: the first soup.")
    sp.add_argument("--config", help="shared fine-tuning YAML")
    sp.add_argument("--a", action="append", metavar="KEY=VALUE", help="overrides for parent A")
    sp.add_argument("--b", action="append", metavar="KEY=VALUE", help="overrides for parent B")
    sp = add("sweep", cmd_sweep, "Run a Ray Tune sweep from a search-space YAML, tracked in MLflow.")
    sp.add_argument("space", help="search-space YAML, e.g. search_spaces/tiny_digits.yaml")
    sp.add_argument("--name", help="sweep id (default: <space>-<timestamp>); needed with --resume")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    sp.add_argument("--storage-path", help="where Tune keeps its state (overrides the YAML)")
    _output_options(sp, "sweep")
    sp = add("cook", cmd_cook, "Build, evaluate, log and register the soups of a finished sweep.")
    sp.add_argument("--sweep", required=True, help="sweep id (printed by soup sweep)")
    sp.add_argument("--recipes", help=_recipes_help())
    sp.add_argument("--model-name", help="registered model (default <experiment>-soup)")
    sp.add_argument("--strict", action="store_true", help="greedy keeps a candidate only if accuracy rises")
    sp.add_argument("--learned-mode", choices=LEARNED_MODES,
                    help="learned soups: every ingredient read once and held on the device (stacked), "
                         "cook.learned_sample of them per step (sampled), every one read at every step "
                         "(streaming), or stacked when they fit cook.memory_budget, else sampled (auto); "
                         "default: the space's cook.learned_mode")
    sp.add_argument("--learned-sample", type=_positive_int, metavar="K",
                    help="ingredients a sampled learned soup mixes per step (default: cook.learned_sample)")
    _resource_options(sp, "the build task")
    sp.add_argument("--doctor", action="store_true",
                    help="then run soup doctor on the sweep (with --plan: its cost too)")
    sp.add_argument("--plan", action="store_true",
                    help="print what the cook would do (ingredients, exclusions, recipes, forward passes "
                         "and bytes per phase, device) and change nothing")
    sp.add_argument("--partial", action="store_true",
                    help="cook a sweep that has not finished (running, interrupted or failed) from "
                         f"the trials finished so far; its versions are tagged {PARTIAL_SWEEP}=true")
    sp.add_argument("--rebuild", action="store_true",
                    help="build and evaluate the soups again even when this sweep is already cooked "
                         "with the same trials, recipes and settings (nothing is registered twice)")
    _output_options(sp, "cook")
    sp = add("demo", cmd_demo, "Sweep and cook a tiny world end to end in a temporary workspace.")
    sp.add_argument("--workdir", help="keep the demo's MLflow store and plot here (default: a new temp dir)")
    sp.add_argument("--world", choices=("fashion", "digits"),
                    help="fashion: Fashion-MNIST (search_spaces/tiny_fashion.yaml; the default when its "
                         "files are here or downloadable); digits: the embedded digits "
                         "(search_spaces/tiny_digits.yaml; the default otherwise, said in one line)")
    sp.add_argument("--space", help="search-space YAML to sweep instead of a world's")
    sp.add_argument("--verbose", action="store_true",
                    help="show everything Ray, Tune and the workers print (by default it goes to "
                         "<workdir>/soup.log, and the terminal shows the trials, the cook and the table)")
    sp = add("promote", cmd_promote, "Move a registry alias to a version, behind a held-out gate.")
    sp.add_argument("model", help="registered model name, e.g. tiny-digits-soup")
    sp.add_argument("--version", required=True)
    sp.add_argument("--alias", default="champion")
    sp.add_argument("--force", action="store_true", help="promote even if held-out accuracy is lower")
    sp.add_argument("--reason", help="why (recorded with --force)")
    sp = add("doctor", cmd_doctor, "Why the greedy soup kept what it kept: each ingredient's path to the "
             "best model (its barrier) and the angle between their updates; findings logged on the sweep.")
    sp.add_argument("--sweep", required=True, help="sweep id (printed by soup sweep)")
    sp.add_argument("--images", type=_positive_int,
                    help="held-out images, a seeded stratified subsample (default: the space's doctor.images, "
                         "2000; all when fewer)")
    _resource_options(sp, "the doctor's task")
    sp = add("models", cmd_models, "List a registered model's versions, metrics and aliases.")
    sp.add_argument("model", help="registered model name")
    sp = add("init", cmd_init, "Look at your own data and write a starter search space for it.")
    sp.add_argument("data", help="a folder with train/<class>/ (optional heldout/, test/), a Hugging Face "
                                 "data set on disk (save_to_disk folder, parquet), hf:<hub id>, or "
                                 "torchvision:<class> (e.g. torchvision:FashionMNIST, files under --root)")
    sp.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    sp.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or a .safetensors file")
    sp.add_argument("--gpus", type=int, default=0, help="GPUs the sweep may use (0: CPU only)")
    sp.add_argument("--root", help="torchvision: the data set's root folder (default ./data)")
    sp.add_argument("--out", help="the space YAML to write (default <data name>.yaml here)")
    sp.add_argument("--skip-unreadable", action="store_true",
                    help="skip and count images that cannot be decoded (data.skip_unreadable) instead of refusing")
    sp = add("pretrain-base", cmd_pretrain_base, "Regenerate a tiny world's base checkpoint.")
    sp.add_argument("--world", choices=("digits", "fashion"), default="digits",
                    help="digits: the glyph base (tiny-glyphs), from scratch; fashion: tiny-fashion, "
                         "the glyph base in --out pretrained further on Fashion-MNIST's web slice")
    sp.add_argument("--out", default="orchestrator/assets", help="output folder")
    sp.add_argument("--steps", type=int, default=None, help="default: the world's (3000 digits, 1000 fashion)")
    sp.add_argument("--seed", type=int, default=0)
    return p


def _output_options(sp, command: str) -> None:
    shown = {"sweep": "each trial's start and end", "cook": "the cook's progress and its table"}[command]
    out = sp.add_mutually_exclusive_group()
    out.add_argument("--verbose", action="store_true",
                     help="show everything Ray, Tune and the workers print (Tune's status tables, "
                          "Ray Train's reports, worker logs) on the terminal, with no log file")
    out.add_argument("--log-file", metavar="PATH",
                     help=f"without --verbose that detail goes to this file, named on the terminal first, "
                          f"and the terminal shows {shown} (default: a new file "
                          f"~/.local/state/soup/logs/{command}-<time>-<pid>.log, or under "
                          "$XDG_STATE_HOME/soup/logs if that is set)")


def _no_artifact_progress_bars():
    """MLflow draws a progress bar on stderr for every artifact download, which would bury the
    one-line error of a refused command; set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true to see them."""
    from orchestrator.runtime.terminal import env_default

    return env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `soup` console script."""
    from orchestrator.runtime import signals, task  # import no ray

    args = _parser().parse_args(argv)
    # The sweep and the cook stop on SIGINT or SIGTERM in any phase, the same way: interrupted
    # once, then a bounded cleanup (while Tune runs, the sweep hands the first signal to Tune).
    stops = signals.stop_signals() if args.command in ("sweep", "cook") else contextlib.nullcontext()
    with _no_artifact_progress_bars(), stops:
        try:
            return args.fn(args)
        except ConfigError as err:
            return _fail(args.command, err)
        except task.RayLost as err:  # raised by the Ray task's wait, before anything is logged
            code = _fail(args.command, f"{err}; nothing was logged to MLflow: run soup {args.command} again")
        except KeyboardInterrupt:
            sig = signals.stop_signal()
            print(f"soup {args.command}: interrupted by {sig.name}", file=sys.stderr)
            code = 128 + sig.value
    task.prepare_to_exit(code)  # promptly: a stopped or failed command must end within a bound
    return code


if __name__ == "__main__":
    sys.exit(main())
