"""Guarded YAML loading and validation: a file is read only if it is UTF-8, under 1 MB and free of
alias bombs; pydantic's errors become one `ConfigError` line naming the file and the dotted key."""

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


class FieldError(ValueError):
    """Raised by a model validator to blame a key below the model (``key`` is relative to it),
    so that the message names ``data.selection_split`` rather than just ``data``."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


S = TypeVar("S", bound=BaseModel)


def one_line(text: str) -> str:
    """`text` with its lines joined by '; ' (error messages are printed as one line)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error_key(e: dict) -> str:
    loc = [str(p) for p in e["loc"]]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc.append(cause.key)
    return ".".join(loc)


def error_text(e: dict) -> str:
    msg = one_line(e["msg"]).removeprefix("Value error, ")
    key = _error_key(e)
    return f"key '{key}': {msg}" if key else msg


def _format_errors(source: str, err: ValidationError) -> str:
    """All of pydantic's errors on one line: ``file: key 'a.b': why; key 'c': why``."""
    return f"{source}: " + "; ".join(error_text(e) for e in err.errors())


def validate(schema: type[S], data: Any, source: str = "<config>") -> S:
    """Validate `data` against `schema`, raising `ConfigError` that names `source` and each key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


# A search space or a fine-tuning config is a few KB and a few hundred YAML nodes. The limits stop
# a wrong file (a data set, a binary) and a YAML bomb before they cost memory or time.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after expanding aliases


def read_yaml(path: str | Path) -> Any:
    """Read a YAML config file, turning every way it can be unusable into a `ConfigError` naming
    it: missing, a folder, unreadable, over `MAX_YAML_BYTES`, not UTF-8, not YAML, a YAML bomb,
    or empty (a given file that holds nothing is a mistake, not a request for the defaults)."""
    path = Path(path)
    data = parse_yaml(_read_text(path), str(path))
    if data is None:
        raise ConfigError(f"{path}: no settings in it (the file is empty, only comments, or null)")
    return data


def _read_text(path: Path) -> str:
    """The file's text, read no further than one byte past the size limit (so that neither a huge
    file nor an endless one such as a FIFO is read into memory)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: refused: larger than {MAX_YAML_BYTES // 2**20} MB "
                          "(a config is a few KB); is it the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document parsed with the safe loader, or None when there is none (empty text,
    only comments, or null); every problem is a `ConfigError` naming `source`.

    Aliases are counted before they are expanded: the document is first composed into a node
    graph, in which an alias is its anchored node itself, and the graph's expanded size is checked
    against `MAX_YAML_NODES` before any Python object is built. A few hundred bytes of nested
    aliases (a "billion laughs") would otherwise grow to gigabytes inside `yaml.safe_load`.
    """
    try:
        return _load_checked(text, source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except ConfigError:
        raise
    except ValueError as err:  # a scalar the constructor cannot convert (an int of 5,000 digits)
        raise ConfigError(f"{source}: not valid YAML: {one_line(str(err))}") from None


def _load_checked(text: str, source: str) -> Any:
    """Compose, check the expanded size, then construct (what `yaml.safe_load` does, checked)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _Recursive(Exception):
    """An alias inside its own anchor: the document is an infinite structure."""


def _check_expanded_size(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand it past `MAX_YAML_NODES`, or into itself."""
    try:
        size = _expanded_size(root, {}, set())
    except _Recursive:
        raise ConfigError(f"{source}: refused: an alias refers to its own anchor "
                          "(an endless structure)") from None
    if size > MAX_YAML_NODES:
        raise ConfigError(f"{source}: refused: its aliases expand it to {size:,} YAML nodes "
                          f"(limit {MAX_YAML_NODES:,}); a config needs a few hundred")


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in `node` with every alias expanded. A shared node is measured once (`sizes`) and
    counted at each reference, so the cost is the graph's size, not the expansion's; `open_`
    holds the nodes being measured, to detect a cycle."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _Recursive
    if isinstance(node, yaml.ScalarNode):
        children = []
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = [part for pair in node.value for part in pair]
    open_.add(key)
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return one_line(str(err))


def load_yaml(schema: type[S], path: str | Path) -> S:
    """Load and validate a YAML file; errors name the file and the key."""
    return validate(schema, read_yaml(path), str(path))


def with_overrides(cfg: S, overrides: dict[str, Any], source: str = "<overrides>") -> S:
    """Return a copy of `cfg` with dotted-key overrides (``train.lr``) applied and re-validated."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{source}: key '{key}': no such section '{p}'")
            node = node[p]
        node[parts[-1]] = value
    return validate(type(cfg), data, source)
