"""Configuration: the schemas (`schemas`: model, data, fine-tuning), the search space (`space`),
and guarded YAML loading with errors naming the file and the dotted key (`loading`).

Owns: pydantic schemas (frozen, ``extra="forbid"``) and their loading. May import: pydantic,
yaml (and the standard library); nothing else of the package.
"""

from orchestrator.config.loading import *  # noqa: F401,F403
from orchestrator.config.loading import (  # noqa: F401
    ConfigError,
    FieldError,
    load_yaml,
    one_line,
    parse_yaml,
    validate,
    with_overrides,
)
from orchestrator.config.schemas import *  # noqa: F401,F403
from orchestrator.config.space import *  # noqa: F401,F403
