"""Every file under deploy/ is validated: it parses, holds no secret, pins its images and versions,
agrees with the other files, and every `soup ...` command it runs parses with the real CLI and
names files that exist and validate. Fast: no network, no Docker, no cluster."""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import mlflow
import pytest
import ray
import tomllib
import yaml

from orchestrator.cli import _parser
from orchestrator.config import ConfigError, Resources, SearchSpace, load_yaml
from orchestrator.soups.recipe import recipe_names

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_VERSION = "2.60.0"      # the one Ray version of image, launcher and KubeRay manifests
MLFLOW_VERSION = "3.17.2"   # the MLflow server image
IMAGE = "soup-orchestrator:0.1.0"
BUILD = re.compile(r"docker build -f deploy/Dockerfile -t (\S+) \.")


def _rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def _docs(rel: str) -> list:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# --- secrets ----------------------------------------------------------------------------------

# `KEY=value` anywhere (shell, env files), or `key: value` ending the line (YAML, ini); prose such
# as "carries no password: libpq reads it" continues past the word and is left alone.
_SECRET_ASSIGN = re.compile(
    r"(?i)(?<!\{)\b([A-Za-z0-9_.-]*(?:password|passwd|secret|token|secret_key|access_key))\b"
    r"(?:\s*:\s*(\S+)\s*(?:[#;].*)?$|=(\S*))")
_URL_CREDENTIAL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s/]+)@")
_KEY_MATERIAL = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN|ghp_[A-Za-z0-9]{20,}|xox[abprs]-|sk-[A-Za-z0-9]{20,}")


def _harmless(value: str) -> bool:
    """An env/command reference, a <placeholder>, CHANGE-ME, a YAML structure, or no word at all."""
    value = value.strip("\"'")
    return (not re.search(r"[A-Za-z0-9]", value) or value[0] in "${<" or "change-me" in value.lower())


def secret_leaks(text: str) -> list[str]:
    """Lines of `text` that look like a literal secret."""
    leaks = []
    for n, line in enumerate(text.splitlines(), 1):
        if _KEY_MATERIAL.search(line):
            leaks.append(f"{n}: key material: {line.strip()}")
        leaks += [f"{n}: {m.group(1)} = {m.group(2) or m.group(3)}" for m in _SECRET_ASSIGN.finditer(line)
                  if not _harmless(m.group(2) or m.group(3) or "")]
        leaks += [f"{n}: password in URL: {line.strip()}" for m in _URL_CREDENTIAL.finditer(line)
                  if not _harmless(m.group(1))]
    return leaks


def test_secret_scanner_flags_literals_and_passes_references():
    # Guards the guard: a scanner that flags nothing would make every deploy test vacuous.
    for bad in ["POSTGRES_PASSWORD=hunter2", "password: hunter2", "auth_token: 3f9a  # x",
                "MLFLOW_TRACKING_PASSWORD=hunter2 soup models m", 'token: "3f9a"',
                "uri: postgresql://mlflow:hunter2@db/mlflow", "AWS_SECRET_ACCESS_KEY=abc",
                "id AKIAABCDEFGHIJKLMNOP", "-----BEGIN OPENSSH PRIVATE KEY-----"]:
        assert secret_leaks(bad), bad
    for good in ["POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}", "password: CHANGE-ME",
                 "MLFLOW_TRACKING_PASSWORD=<its password>", 'auth_token="$(openssl rand -hex 32)"',
                 "secretKeyRef: {name: soup-mlflow, key: password}", "secretName: soup-ray-token",
                 "postgresql://mlflow@postgres:5432/mlflow", "env: RAY_AUTH_MODE=token",
                 "X: ${POSTGRES_PASSWORD:?set_it}", "; carries no password: libpq reads PGPASSWORD",
                 "create_user('soup-ray', input('password: '))"]:
        assert not secret_leaks(good), good


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.is_file()), ids=_rel)
def test_no_literal_secret_in_any_deploy_file(path):
    leaks = secret_leaks(path.read_text())
    assert not leaks, f"{_rel(path)} looks like it holds a secret:\n" + "\n".join(leaks)


# --- soup commands ----------------------------------------------------------------------------

def soup_argv(command: str) -> list[str] | None:
    """argv after `soup` when a shell command runs it directly or as `ray job submit ... -- soup`."""
    words = shlex.split(command, comments=True)
    segments, seg = [], []
    for w in words + [";"]:
        if w in {"&&", "||", ";", "|", "&"}:
            segments, seg = segments + [seg], []
        else:
            seg.append(w)
    for seg in segments:
        if seg[:3] == ["ray", "job", "submit"] and "--" in seg:
            seg = seg[seg.index("--") + 1:]
        if seg[:1] == ["soup"]:
            return seg[1:]
    return None


def check_soup_command(argv: list[str], where: str):
    """Parse with the real CLI; a sweep's space must exist and validate, recipes must exist."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `soup {shlex.join(argv)}` is rejected by the CLI:\n{err.getvalue()}")
    if args.command == "sweep":
        space = REPO / args.space
        assert space.is_file(), f"{where}: search space {args.space} is not in the repository"
        try:
            load_yaml(SearchSpace, space)
        except ConfigError as e:
            pytest.fail(f"{where}: {args.space} does not validate: {e}")
    if args.command == "cook":
        unknown = set((args.recipes or "").split(",")) - {""} - set(recipe_names())
        assert not unknown, f"{where}: unknown recipes {unknown}"
    return args


def _readme_commands() -> list[str]:
    """Shell lines of deploy/README.md's fenced blocks, backslash continuations joined."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (DEPLOY / "README.md").read_text(), re.M | re.S)
    return [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def _all_soup_commands() -> list[tuple[str, list[str]]]:
    found = [(f"kuberay/{p.name}", soup_argv(d["spec"]["entrypoint"]))
             for p in sorted((DEPLOY / "kuberay").glob("*.yaml"))
             for d in _docs(f"kuberay/{p.name}") if d.get("kind") == "RayJob"]
    cluster = _docs("ray/cluster.yaml")[0]
    found += [("ray/cluster.yaml", soup_argv(c)) for key, cmds in cluster.items()
              if key.endswith("_commands") for c in cmds]
    found += [("README.md", soup_argv(c)) for c in _readme_commands()]
    return [(where, argv) for where, argv in found if argv is not None]


def test_every_soup_command_parses_and_cooks_a_sweep_that_is_launched():
    commands = _all_soup_commands()
    parsed = [(w, check_soup_command(argv, w)) for w, argv in commands]
    kinds = {a.command for _, a in parsed}
    assert {"sweep", "cook"} <= kinds, f"deploy/ should show both steps, found {kinds}"
    swept = {a.name for _, a in parsed if a.command == "sweep"}
    for where, a in parsed:
        if a.command == "cook":
            assert a.sweep in swept, f"{where}: cooks sweep {a.sweep!r}, which no sweep command names"


def test_readme_shell_blocks_are_valid_shell():
    for line in _readme_commands():
        try:
            shlex.split(line, comments=True)
        except ValueError as e:
            pytest.fail(f"README.md: {line!r}: {e}")


# --- images and versions ----------------------------------------------------------------------

def test_image_name_is_one_across_build_commands_and_matches_the_package_version():
    names = BUILD.findall((DEPLOY / "Dockerfile").read_text()) + BUILD.findall((DEPLOY / "README.md").read_text())
    assert names and set(names) == {IMAGE}, f"build commands name {set(names)}, expected {IMAGE}"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert IMAGE.split(":")[1] == version, "tag the image with the package version"


def test_pinned_versions_track_the_project_environment():
    # A venv upgrade of Ray or MLflow must come with a deploy/ upgrade: nodes, drivers and
    # clients refuse or misbehave across versions.
    assert _minor(ray.__version__) == _minor(RAY_VERSION), (ray.__version__, RAY_VERSION)
    assert _minor(mlflow.__version__) == _minor(MLFLOW_VERSION), (mlflow.__version__, MLFLOW_VERSION)


def _assert_ours(image: str, where: str):
    """The project image, under any registry prefix, with exactly the built name and tag."""
    assert image == IMAGE or image.endswith("/" + IMAGE), f"{where}: image {image!r} is not {IMAGE}"


def _assert_pinned(image: str, where: str):
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in {"", "latest"}, f"{where}: image {image!r} is not pinned"


# --- per-file checks --------------------------------------------------------------------------

_ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}")
_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|KEY")


def _uncommented(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _compose_env_refs(text: str, where: str) -> set[str]:
    """Every ${VAR} compose interpolates; secret-looking ones must use the required form."""
    refs = set()
    for var, op, _ in _ENV_REF.findall(_uncommented(text)):
        refs.add(var)
        if _SECRETISH.search(var):
            assert op == ":?", f"{where}: ${{{var}}} must be required (${{{var}:?message}})"
    return refs


def _env_example_vars() -> set[str]:
    text = (DEPLOY / "mlflow/.env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))


def _published(service: dict, where: str) -> list[int]:
    """Container ports a service publishes; each must bind an explicit loopback default."""
    out = []
    for spec in service.get("ports", []):
        spec = _ENV_REF.sub(lambda m: m.group(3) if m.group(2) == ":-" else m.group(1), str(spec))
        parts = spec.split(":")
        assert len(parts) == 3 and parts[0] == "127.0.0.1", \
            f"{where}: port {spec!r} must bind 127.0.0.1 by default, not every interface"
        out.append(int(parts[2].split("/")[0]))
    return out


def _service_checks(name: str, svc: dict, where: str):
    assert "image" in svc, f"{where}: service {name} needs an image"
    _assert_pinned(svc["image"], f"{where}: {name}")


def check_compose(rel: str):
    text = (DEPLOY / rel).read_text()
    (spec,) = _docs(rel)
    missing = _compose_env_refs(text, rel) - _env_example_vars()
    assert not missing, f"{rel}: {missing} not documented in mlflow/.env.example"
    declared = set(spec.get("volumes") or {})
    for name, svc in spec["services"].items():
        if "image" in svc or rel == "mlflow/compose.yaml":
            _service_checks(name, svc, rel)
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in declared, f"{rel}: {name} uses undeclared volume {src}"
        assert not {5432, 9000} & set(_published(svc, rel)), f"{rel}: {name} publishes an internal port"
    return spec


def _command(svc: dict) -> str:
    cmd = svc.get("command", "")
    return " ".join(map(str, cmd)) if isinstance(cmd, list) else cmd


def check_compose_base(rel: str):
    spec = check_compose(rel)
    pg, ml = spec["services"]["postgres"], spec["services"]["mlflow"]
    assert "ports" not in pg, "PostgreSQL must stay on the compose network"
    assert "healthcheck" in pg and "healthcheck" in ml
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    cmd = _command(ml)
    for flag in ["--backend-store-uri postgresql://", "--serve-artifacts", "--app-name basic-auth",
                 "--host 0.0.0.0"]:
        assert flag in cmd, f"mlflow command lacks {flag!r}: {cmd}"
    env = ml["environment"]
    assert "--artifacts-destination" in cmd or env.get("MLFLOW_ARTIFACTS_DESTINATION") == "/mlartifacts"
    for var in ["PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"]:
        assert var in env, f"the basic-auth server needs {var}"
    assert (DEPLOY / "mlflow" / ml["build"]["dockerfile"]).is_file()
    assert ml["image"].split(":")[1] == MLFLOW_VERSION


def check_compose_s3(rel: str):
    spec = check_compose(rel)
    base = _docs("mlflow/compose.yaml")[0]["services"]
    assert {"minio", "mlflow"} <= set(spec["services"])
    for name, svc in spec["services"].items():
        assert name in base or "image" in svc, f"{rel}: new service {name} needs an image"
    env = spec["services"]["mlflow"]["environment"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert "healthcheck" in spec["services"]["minio"]


def check_env_example(rel: str):
    required = {v for f in ["mlflow/compose.yaml", "mlflow/compose.s3.yaml"]
                for v, op, _ in _ENV_REF.findall(_uncommented((DEPLOY / f).read_text())) if op == ":?"}
    text = (DEPLOY / rel).read_text()
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
    assert required <= listed, f"{rel}: required variables not listed uncommented: {required - listed}"


def check_auth_ini(rel: str):
    ini = configparser.ConfigParser()
    ini.read_string((DEPLOY / rel).read_text())
    cfg = ini["mlflow"]
    assert {"default_permission", "database_uri", "authorization_function"} <= set(cfg)
    assert "admin_password" not in cfg, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    uri = cfg["database_uri"]
    assert re.fullmatch(r"postgresql://mlflow@postgres:5432/\w+", uri), f"{rel}: {uri}"
    sql = (DEPLOY / "mlflow/initdb/10-auth-db.sql").read_text()
    assert f"CREATE DATABASE {uri.rsplit('/', 1)[1]} " in sql, "initdb must create the auth database"


def check_initdb(rel: str):
    assert "CREATE DATABASE" in (DEPLOY / rel).read_text()


def _from(rel: str) -> str:
    (image,) = re.findall(r"^FROM\s+(\S+)", (DEPLOY / rel).read_text(), re.M)
    return image


def check_mlflow_dockerfile(rel: str):
    text = (DEPLOY / rel).read_text()
    assert _from(rel) == f"ghcr.io/mlflow/mlflow:v{MLFLOW_VERSION}"
    for pkg in ['"psycopg[binary]', "boto3", f'"mlflow[auth]=={MLFLOW_VERSION}"']:
        assert pkg in text, f"{rel}: the server image must install {pkg}"
    assert "COPY basic_auth.ini" in text and "MLFLOW_AUTH_CONFIG_PATH" in text


def check_project_dockerfile(rel: str):
    text = (DEPLOY / rel).read_text()
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", _from(rel))
    assert m and m.group(1) == RAY_VERSION, f"{rel}: base {_from(rel)} is not Ray {RAY_VERSION} (GPU)"
    assert int(m.group(2)) >= 10, "pyproject requires Python >= 3.10"
    assert f'"ray[default,tune]=={RAY_VERSION}" .' in text, "pip install the project with Ray pinned"
    assert re.search(r"^WORKDIR\s+/\S+", text, re.M), "entrypoints' relative paths need a WORKDIR"
    sources = [s for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M) for s in line.split()[:-1]]
    assert "orchestrator" in sources and "pyproject.toml" in sources
    for src in sources:
        assert (REPO / src).exists(), f"{rel}: COPY {src} is not in the repository"
    assert "COPY . " not in text, "copy named paths only: the context is the whole repository"


def check_cluster_launcher(rel: str):
    (cfg,) = _docs(rel)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert {"cluster_name", "max_workers", "provider", "auth", "available_node_types",
            "head_node_type", "docker", "setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands", "cluster_synced_files"} <= set(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] > 0 for t in gpu), "no GPU worker type"
    _assert_ours(cfg["docker"]["image"], rel)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token ray start" in cmd, cmd
    assert "~/.ray/auth_token" in cfg["file_mounts"], "nodes need the token"
    for space in SPACES:
        check_trials_fit(launcher_nodes(cfg), space, rel)


def check_readme(rel: str):
    text = (DEPLOY / rel).read_text()
    for needle in ["ray up deploy/ray/cluster.yaml", "docker compose -f deploy/mlflow/compose.yaml",
                   "What is exposed on which port"]:
        assert needle in text, f"{rel} should say {needle!r}"
    for port in ["5000", "5432", "9000", "9001", "6379", "8265", "10001"]:
        assert f"| {port} |" in text, f"{rel}: port {port} missing from the exposure table"


# --- trials on the GPU workers ----------------------------------------------------------------
# A trial is `workers` training processes, each reserving `cpu` CPUs and `gpu` GPUs: one worker in
# the Tune trial's own actor, several as Ray Train workers. It should fit one worker type whole
# (its gradient all-reduce then stays inside a node); a TorchTrainer trial also needs a spare CPU
# for its coordinating processes: the Tune trial function and Ray Train's controller reserve no
# CPU (sweep.DRIVER_BUNDLE; Train V2's controller) but run on some node all the same, and Train
# V1's ScalingConfig would reserve 1 CPU for its trainer. The cluster at its largest
# should run `max_concurrent_trials` of them. Heads are left out (here they advertise no CPUs).

SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
COORDINATOR_CPU = 1
CLOUD_STORAGE = ("s3://", "gs://", "abfss://", "az://")


@dataclass(frozen=True)
class NodeType:
    """One kind of worker node: what it advertises to Ray, and how many of it there may be."""
    name: str
    cpu: float
    gpu: float
    min_nodes: int
    max_nodes: int


def trials_per_node(res: Resources, node: NodeType) -> int:
    """Whole trials of `res` that one node holds (workers, their CPUs and GPUs, a coordinator)."""
    fits = [math.floor(node.cpu / (res.workers * res.cpu + (0 if res.in_trial else COORDINATOR_CPU)) + 1e-9)]
    if res.gpu:
        fits.append(math.floor(node.gpu / (res.workers * res.gpu) + 1e-9))
    return min(fits)


def launcher_nodes(cfg: dict) -> list[NodeType]:
    return [NodeType(name, t["resources"].get("CPU", 0), t["resources"].get("GPU", 0),
                     t.get("min_workers", 0), t["max_workers"])
            for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]


def _quantity(q) -> float:
    """A Kubernetes CPU or count quantity: 8, "8", "500m"."""
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def group_nodes(spec: dict) -> list[NodeType]:
    """Worker groups as Ray sees them: rayStartParams override the container limits."""
    out = []
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = g.get("rayStartParams") or {}
        cpu = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
        gpu = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        out.append(NodeType(g["groupName"], cpu, gpu, g["minReplicas"], g["maxReplicas"]))
    return out


def check_trials_fit(nodes: list[NodeType], space_path: Path, where: str) -> SearchSpace:
    space = load_yaml(SearchSpace, space_path)
    res, name = space.sweep.resources, space_path.name
    per_node = {n.name: trials_per_node(res, n) for n in nodes}
    need = (f"{res.workers} worker(s) x {{cpu: {res.cpu:g}, gpu: {res.gpu:g}}}"
            + ("" if res.in_trial else f" + {COORDINATOR_CPU} CPU for the trial"))
    assert any(per_node.values()), (
        f"{where}: no worker type holds a whole trial of {name} ({need}); "
        f"types: {[(n.name, n.cpu, n.gpu) for n in nodes]}")
    capacity = sum(per_node[n.name] * n.max_nodes for n in nodes)
    assert capacity >= space.sweep.max_concurrent_trials, (
        f"{where}: at most {capacity} trials of {name} at once, but its max_concurrent_trials is "
        f"{space.sweep.max_concurrent_trials}")
    return space


def check_sweep_launch(args, nodes: list[NodeType], mounts: set[str], where: str):
    """A sweep that deploy/ launches: its trials fit the cluster, it may wait for the autoscaler
    when no node that fits runs yet, and its checkpoints go where every node can reach them."""
    space = check_trials_fit(nodes, REPO / args.space, where)
    res = space.sweep.resources
    running = any(n.min_nodes and trials_per_node(res, n) for n in nodes)
    assert running or space.sweep.autoscale, (
        f"{where}: {args.space}: the cluster starts with no node that fits a trial, and "
        "`soup sweep` refuses that unless sweep.autoscale is true")
    storage = args.storage_path or space.sweep.storage_path
    assert storage, f"{where}: {args.space} keeps checkpoints in ~/ray_results of each node"
    shared = storage.startswith(CLOUD_STORAGE) or any(
        storage == m or storage.startswith(m.rstrip("/") + "/") for m in mounts)
    assert shared, (f"{where}: storage {storage!r} is neither object storage nor a volume "
                    f"mounted read-write on every pod ({sorted(mounts) or 'none'})")


def shared_mounts(spec: dict) -> set[str]:
    """Paths of PersistentVolumeClaims that the head and every worker group mount read-write."""
    def mounts(template: dict) -> set[str]:
        pod = template["spec"]
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
                  and not v["persistentVolumeClaim"].get("readOnly")}
        return {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                if m["name"] in claims and not m.get("readOnly")}
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return set.intersection(*(mounts(g["template"]) for g in groups))


def _check_gpu_group(group: dict, where: str):
    """GPUs are whole and requested as limited; a multi-GPU pod has a memory-backed /dev/shm
    (NCCL's shared-memory transport and the DataLoader workers; a container gets 64 MiB)."""
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    gpus = res["limits"].get("nvidia.com/gpu", 0)
    assert isinstance(gpus, int), f"{where}: nvidia.com/gpu must be a whole number, got {gpus!r}"
    assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, \
        f"{where}: nvidia.com/gpu requests and limits must be equal"
    if gpus > 1:
        memory = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        shm = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and shm[0]["name"] in memory, f"{where}: {gpus} GPUs need a memory-backed /dev/shm"


def test_trial_fit_arithmetic():
    # Guards the guard: a fit check that always passes would make the cluster checks vacuous.
    l14, b32 = Resources(workers=4, cpu=8, gpu=1), Resources(workers=1, cpu=8, gpu=1)
    one, eight = NodeType("one", 16, 1, 0, 8), NodeType("eight", 96, 8, 0, 2)
    assert trials_per_node(l14, one) == 0 and trials_per_node(l14, eight) == 2
    # one worker in the Tune actor needs no coordinator; in a TorchTrainer it does
    assert trials_per_node(b32, one) == 1 and trials_per_node(b32, NodeType("x", 8, 1, 0, 1)) == 1
    assert trials_per_node(Resources(workers=1, cpu=8, gpu=1, launcher="torch_trainer"),
                           NodeType("x", 8, 1, 0, 1)) == 0
    assert trials_per_node(b32, NodeType("x", 7, 1, 0, 1)) == 0
    assert trials_per_node(Resources(workers=1, cpu=1, gpu=0.5), NodeType("y", 4, 1, 0, 1)) == 2
    assert trials_per_node(Resources(workers=1, cpu=1), NodeType("cpu", 4, 0, 0, 1)) == 4
    with pytest.raises(AssertionError, match="no worker type holds a whole trial"):
        check_trials_fit([one], REPO / "search_spaces" / "clip_vit_l14_imagenet.yaml", "test")


def test_readme_sweeps_fit_the_launcher_and_keep_checkpoints_on_shared_storage():
    nodes = launcher_nodes(_docs("ray/cluster.yaml")[0])
    sweeps = [check_soup_command(argv, "README.md") for where, argv in _all_soup_commands()
              if where == "README.md" and argv[:1] == ["sweep"]]
    assert {a.space for a in sweeps} >= {"search_spaces/clip_vit_b32_imagenet.yaml",
                                         "search_spaces/clip_vit_l14_imagenet.yaml"}
    for args in sweeps:
        check_sweep_launch(args, nodes, set(), f"README.md: soup sweep {args.space}")



# --- KubeRay ----------------------------------------------------------------------------------

def _example_secrets() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["stringData"]) for d in _docs("kuberay/secrets.example.yaml")}


def _config_maps() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["data"]) for d in _docs("kuberay/config.yaml")}


def _check_env(container: dict, where: str):
    env = {e["name"]: e for e in container.get("env", [])}
    for name in ["RAY_AUTH_TOKEN", "RAY_AUTH_MODE"]:
        assert name not in env, f"{where}: {name} is set by KubeRay from authOptions; don't duplicate it"
    for name, key in [("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")]:
        ref = env[name].get("valueFrom", {}).get("secretKeyRef")
        assert ref and key in _example_secrets().get(ref["name"], set()), f"{where}: {name} must come from a Secret"
    uri = env["MLFLOW_TRACKING_URI"]
    ref = uri.get("valueFrom", {}).get("configMapKeyRef")
    assert (ref and ref["key"] in _config_maps().get(ref["name"], set())) or \
        str(uri.get("value", "")).startswith("http"), f"{where}: MLFLOW_TRACKING_URI"


def _check_pod(template: dict, where: str):
    containers = template["spec"]["containers"]
    _assert_ours(containers[0]["image"], where)
    for c in containers:
        _assert_pinned(c["image"], where)
    _check_env(containers[0], where)


def check_ray_cluster_spec(spec: dict, where: str):
    assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']}"
    auth = spec["authOptions"]
    assert auth["mode"] == "token", f"{where}: Ray token auth must be on"
    assert "auth_token" in _example_secrets().get(auth["secretName"], set()), f"{where}: token Secret"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head must not be exposed"
    groups = spec["workerGroupSpecs"]
    for g in [head] + groups:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{where}: rayStartParams are strings"
    _check_pod(head["template"], f"{where} head")
    for g in groups:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
        _check_pod(g["template"], f"{where} {g['groupName']}")
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for g in groups
            for c in g["template"]["spec"]["containers"]]
    assert any(n >= 1 for n in gpus), f"{where}: no worker group requests nvidia.com/gpu"
    for g in groups:
        _check_gpu_group(g, f"{where} {g['groupName']}")


def check_ray_job(doc: dict, where: str):
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "soup", f"{where}: entrypoint must run the soup CLI: {spec['entrypoint']}"
    args = check_soup_command(argv[1:], where)
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), f"{where}: no cluster"
    if args.command == "sweep" and spec.get("rayClusterSpec"):
        cluster = spec["rayClusterSpec"]
        check_sweep_launch(args, group_nodes(cluster), shared_mounts(cluster), where)
    if spec.get("rayClusterSpec"):
        assert spec["shutdownAfterJobFinishes"] is True, f"{where}: its cluster must go when the job ends"
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
        check_ray_cluster_spec(spec["rayClusterSpec"], where)
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode"}


def check_secret(doc: dict, where: str):
    assert "example" in where, f"{where}: real Secrets do not belong in the repository"
    assert all(v == "CHANGE-ME" for v in doc["stringData"].values()), f"{where}: placeholders only"


def check_config_map(doc: dict, where: str):
    assert doc["data"]["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))


def check_standing_cluster(doc: dict, where: str):
    """A RayCluster for `ray job submit`: any shipped space may be submitted to it."""
    check_ray_cluster_spec(doc["spec"], where)
    for space in SPACES:
        check_trials_fit(group_nodes(doc["spec"]), space, where)


KINDS = {"RayCluster": check_standing_cluster, "RayJob": check_ray_job,
         "Secret": check_secret, "ConfigMap": check_config_map}


def check_kuberay(rel: str):
    docs = _docs(rel)
    assert docs, f"{rel} is empty"
    for doc in docs:
        where = f"{rel} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        expected = "v1" if doc.get("kind") in {"Secret", "ConfigMap"} else "ray.io/v1"
        assert doc.get("apiVersion") == expected, f"{where}: apiVersion {doc.get('apiVersion')}"
        assert doc.get("kind") in KINDS, f"{where}: no check for kind {doc.get('kind')}"
        KINDS[doc["kind"]](doc, where)


# --- every file has a check -------------------------------------------------------------------

CHECKS = {
    "README.md": check_readme,
    "Dockerfile": check_project_dockerfile,
    "mlflow/Dockerfile": check_mlflow_dockerfile,
    "mlflow/compose.yaml": check_compose_base,
    "mlflow/compose.s3.yaml": check_compose_s3,
    "mlflow/.env.example": check_env_example,
    "mlflow/basic_auth.ini": check_auth_ini,
    "mlflow/initdb/10-auth-db.sql": check_initdb,
    "ray/cluster.yaml": check_cluster_launcher,
    "kuberay/raycluster.yaml": check_kuberay,
    "kuberay/rayjob-sweep.yaml": check_kuberay,
    "kuberay/rayjob-cook.yaml": check_kuberay,
    "kuberay/rayjob-sweep-vitl14.yaml": check_kuberay,
    "kuberay/rayjob-cook-vitl14.yaml": check_kuberay,
    "kuberay/secrets.example.yaml": check_kuberay,
    "kuberay/config.yaml": check_kuberay,
}


def test_every_deploy_file_has_a_check():
    on_disk = {_rel(p) for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk == set(CHECKS), (f"unchecked: {sorted(on_disk - set(CHECKS))}; "
                                    f"missing: {sorted(set(CHECKS) - on_disk)}")


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=_rel)
def test_yaml_parses(path):
    assert list(yaml.safe_load_all(path.read_text())), f"{_rel(path)} is empty"


@pytest.mark.parametrize("rel", sorted(CHECKS))
def test_deploy_file(rel):
    CHECKS[rel](rel)
