"""Loading a config: YAML in, validated typed objects (the schema: pipeline/schema.py) out.

    cfg = load_config("pipeline/configs/demo.yaml", overrides=["train.lr=2e-4"])

A config file may start with `inherit: other.yaml` (resolved next to it, then in the packaged
configs), or a list of files merged left to right (`inherit: [paper.yaml, variant.yaml]`); its own
keys are deep-merged over the parents. Overrides (`--set a.b.0.c=value`) are applied
to the merged YAML before validation, their values parsed as YAML scalars. Every error is one
line: `<file>: <dotted.key>: <what was expected>` (ConfigError).
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.schema import (  # the schema's names, importable from here as before
    OFFICIAL_TOMEFORMER,
    Config,
    DataConfig,
    EvalConfig,
    LaunchConfig,
    LLMConfig,
    MergeSchedule,
    ModelConfig,
    QFormerConfig,
    RunConfig,
    Section,
    SourceConfig,
    TomeFormerConfig,
    TrackingConfig,
    TrainConfig,
    VideoConfig,
    VisionConfig,
)

PACKAGED_CONFIGS = Path(str(resources.files("pipeline") / "configs"))


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the dotted key and the problem."""


# Fields that name files which must exist when set; relative paths resolve as resolve_file says (the
# config file's folder, the packaged configs, the working directory, then the package: ds_configs/...).
FILE_FIELDS = [
    "model.init_connector",
    "model.vision.arch_config",
    "model.tomeformer.arch_config",
    "model.qformer.arch_config",
    "model.llm.arch_config",
    "model.pformer.arch_config",
    "train.ds_config",
]


# ------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (plain YAML 1.1 needs `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config by path, or by name among the packaged configs (`demo`, `demo.yaml`)."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [PACKAGED_CONFIGS / name, PACKAGED_CONFIGS / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    return Path(name)  # reported as unreadable by _read_yaml


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_raw(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit: cycle through {' -> '.join(str(s) for s in seen)}")
    raw = _read_yaml(path)
    parents = raw.get("inherit")
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) for p in parents):
        raise ConfigError(
            f"{path}: inherit: expected a config file name or a list of them, got {raw.get('inherit')!r}"
        )
    merged: dict = {}
    for parent in parents:  # left to right: a later parent's keys win
        merged = _deep_merge(
            merged, _load_raw(resolve_config_path(parent, path.parent), seen + (path.resolve(),))
        )
    return _deep_merge(merged, raw)


def apply_override(raw: dict, override: str, source: str = "--set") -> None:
    """Apply `a.b.0.c=value` to the raw dict in place; value is parsed as a YAML scalar/list."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source} {override!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source} {override!r}: {where}: expected a list index below {len(node)}")
            part = int(part)
        elif isinstance(node, dict):
            if not last and part not in node:
                node[part] = {}  # the schema decides whether the key exists
        else:
            raise ConfigError(f"{source} {override!r}: {where}: cannot index into a {type(node).__name__}")
        if last:
            node[part] = value
        else:
            node = node[part]


def _lower(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _format_error(err: dict, loc: tuple | None = None) -> str:
    loc = err["loc"] if loc is None else loc
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    if kind == "value_error" and isinstance(got, dict):  # a section's own check: its message says it
        return f"{key}: {_lower(msg)}"
    if isinstance(got, (dict, list)):
        got = type(got).__name__
    return f"{key}: {_lower(msg)}, got {got!r}"


def _branch_shape(tag: str) -> str:
    """The value shape a union branch accepts, from pydantic's tag: list[...], a model, a scalar."""
    if tag.startswith(("list[", "tuple[")):
        return "list"
    if tag.startswith("dict[") or tag[:1].isupper():
        return "dict"
    return "scalar"


def _union_error(errors: list[dict]) -> str | None:
    """A union field (r: int | list | schedule) fails once per form it accepts: report the form that
    matches the value's shape, naming the entry at fault, or the accepted forms if none matches."""
    common = errors[0]["loc"]
    for e in errors[1:]:
        n = 0
        while n < min(len(common), len(e["loc"])) and common[n] == e["loc"][n]:
            n += 1
        common = common[:n]
    if len(errors) < 2 or any(len(e["loc"]) <= len(common) for e in errors):
        return None
    branches: dict[str, list[dict]] = {}
    for e in errors:
        branches.setdefault(str(e["loc"][len(common)]), []).append(e)
    if len(branches) < 2:
        return None
    field = ".".join(map(str, common))
    value = next((e["input"] for e in errors if len(e["loc"]) == len(common) + 1), None)
    shape = "list" if isinstance(value, list) else "dict" if isinstance(value, dict) else "scalar"
    for tag, errs in branches.items():
        e = errs[0]
        rest = tuple(e["loc"][len(common) + 1 :])
        if _branch_shape(tag) != shape or (not rest and e["type"].endswith(("_type", "_parsing"))):
            continue
        if shape == "list" and rest and isinstance(rest[0], int):
            what = _lower(e["msg"]).removeprefix("input ")
            return f"{field}: entries {what}, got {e['input']!r} at index {rest[0]}"
        return _format_error(e, tuple(common) + rest)
    forms = " | ".join(t.replace("constrained-", "") for t in branches)
    return f"{field}: expected one of {forms}, got {value!r}"


def validate(raw: dict, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
    message = _union_error(errors)
    if message is None:
        message = _format_error(errors[0]) + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
    raise ConfigError(f"{source}: {message}") from None


def resolve_file(value: str, config_dir: Path | None) -> Path | None:
    """A file a config names: absolute, or relative to the config's folder, the packaged configs, the
    working directory, the installed package (which ships ds_configs/ as pipeline/ds_configs/) or the
    checkout (an editable install, or PYTHONPATH at the repository)."""
    package = PACKAGED_CONFIGS.parent
    bases = [PACKAGED_CONFIGS, Path.cwd(), package, package.parent]
    for base in ([config_dir] if config_dir else []) + bases:
        p = (base / value) if not Path(value).is_absolute() else Path(value)
        if p.exists():
            return p.resolve()
    return None


def _check_files(cfg: Config, source: str, config_dir: Path | None) -> None:
    for dotted in FILE_FIELDS:
        section, *rest = dotted.split(".")
        obj = getattr(cfg, section)
        for attr in rest[:-1]:
            obj = getattr(obj, attr)
        value = getattr(obj, rest[-1])
        if value is None:
            continue
        found = resolve_file(value, config_dir)
        if found is None:
            raise ConfigError(f"{source}: {dotted}: file not found: {value}")
        setattr(obj, rest[-1], str(found))


def _check_batch(cfg: Config, source: str) -> None:
    t, launch = cfg.train, cfg.launch
    if t.micro_batch * t.grad_accum * cfg.world_size != t.global_batch:
        raise ConfigError(
            f"{source}: train.global_batch: expected train.micro_batch ({t.micro_batch}) x "
            f"train.grad_accum ({t.grad_accum}) x ranks ({launch.nodes} nodes x {launch.gpus_per_node}"
            f" per node) = {t.micro_batch * t.grad_accum * cfg.world_size}, got {t.global_batch}"
        )


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    path = resolve_config_path(path)
    raw = _load_raw(path)
    for ov in overrides:
        apply_override(raw, ov)
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    cfg = validate(raw, source)
    _check_batch(cfg, source)
    _check_files(cfg, source, path.parent)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: for MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


__all__ = [
    "OFFICIAL_TOMEFORMER",
    "PACKAGED_CONFIGS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LaunchConfig",
    "LLMConfig",
    "MergeSchedule",
    "ModelConfig",
    "QFormerConfig",
    "RunConfig",
    "Section",
    "SourceConfig",
    "TomeFormerConfig",
    "TrackingConfig",
    "TrainConfig",
    "VideoConfig",
    "VisionConfig",
    "apply_override",
    "dump_yaml",
    "flatten",
    "load_config",
    "parse_yaml",
    "resolve_config_path",
    "resolve_file",
    "validate",
]
