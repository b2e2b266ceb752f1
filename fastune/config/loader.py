"""Load a training config: YAML file or shipped name, overrides, defaults, validation.

``load_config(config, overrides)`` goes through these steps and stops at the
first problem with a ``ConfigError`` that names the file (and line) or the
override, and the key:

1. find the file: a path, or the name of a config shipped in ``fastune.configs``
   (``demo``, ``llama3_2/1B_lora``, with or without ``.yaml``);
2. parse it (OmegaConf's YAML);
3. apply the overrides in order: ``key.sub=value`` (value parsed as YAML),
   ``~key`` (delete), ``section=short_name`` (``metric_logger=wandb``);
4. check for unknown keys and fill in the schema's defaults;
5. resolve ``${...}`` interpolations (``${output_dir}``, ``${oc.env:HOME}``,
   ``${asset:demo/base_model}`` for files shipped in ``fastune/assets``);
6. check types, ranges and choices, that paths exist (``check_paths``), and
   that every ``_component_`` imports and accepts its keys.

The result is a resolved, struct-mode ``DictConfig``: every key in
``fastune.config.schema.SCHEMA`` can be read, and reading a key that does not
exist raises instead of returning None.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastune.config.components import locate
from fastune.config.secrets import redact_secrets, resolve_env
from fastune.config.schema import (
    COMPONENT, SCHEMA, Key, Mismatch, Section, closest, did_you_mean, require_path, show, walk_keys,
)
from fastune.data.datasets import FILE_TYPES
from fastune.errors import ConfigError
from fastune.models.spec import normalize_kernel_ops

log = logging.getLogger(__name__)

# `datasets.load_dataset` builders that read local `data_files`, and their files' suffixes:
# those the data pipeline reads.
FILE_BUILDERS = tuple(dict.fromkeys(FILE_TYPES.values()))
_DATA_EXTENSIONS = tuple(FILE_TYPES)


def _asset_path(relative: str) -> str:
    """``${asset:demo/base_model}``: a file shipped in ``fastune/assets``, wherever fastune is installed."""
    return str(importlib.resources.files("fastune") / "assets" / relative)


# OmegaConf 2.4 renamed register_new_resolver (deprecated there) to register_resolver.
_register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
_register("asset", _asset_path, replace=True)
_register("oc.env", resolve_env, replace=True)  # remembers values, to redact them from every output


@dataclasses.dataclass
class _Origin:
    """Where each key came from, so that an error can point at it."""

    path: str  # the config file, as messages show it
    lines: dict[str, int]  # dotted key -> line of the key in the file
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key -> override

    def where(self, key: str) -> str:
        prefixes = [key.rsplit(".", n)[0] for n in range(key.count(".") + 1)]
        for prefix in prefixes:  # the innermost override that set this key or a parent wins
            if prefix in self.overrides:
                return f"override {self.overrides[prefix]!r}"
        for set_key, override in reversed(self.overrides.items()):  # ... or set a key inside it
            if set_key.startswith(key + "."):
                return f"override {override!r}"
        for prefix in prefixes:
            if prefix in self.lines:
                return f"{self.path}:{self.lines[prefix]}"
        return self.path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {key}: {problem}")


# --- finding and parsing the file --------------------------------------------------


def shipped_config_names() -> list[str]:
    """Names of the configs shipped in ``fastune.configs``, e.g. ``llama3_2/1B_lora``."""
    names = []

    def walk(folder, prefix):
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml"):
                names.append(prefix + entry.name[: -len(".yaml")])

    walk(importlib.resources.files("fastune.configs"), "")
    return sorted(names)


def shipped_config(name: str):
    """The shipped config ``name`` (``.yaml`` optional) as an importlib.resources
    Traversable, or None."""
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if name not in shipped_config_names():
        return None
    return importlib.resources.files("fastune.configs").joinpath(*f"{name}.yaml".split("/"))


def read_config_text(config: str | os.PathLike) -> tuple[str, str]:
    """``(path as messages show it, text)`` of a config file, or else of a shipped
    config of that name (a local file wins)."""
    config = os.fspath(config)
    local = os.path.expanduser(config)
    if os.path.isfile(local):
        return config, _decode(Path(local).read_bytes(), config)
    resource = shipped_config(config)
    if resource is not None:
        return str(resource), _decode(resource.read_bytes(), str(resource))
    if os.path.isdir(local):
        raise ConfigError(f"{config}: is a directory, not a config file")
    name = config[: -len(".yaml")] if config.endswith(".yaml") else config
    raise ConfigError(f"no such config file or shipped config: {config}"
                      f"{did_you_mean(name, shipped_config_names())}; `fastune ls` lists shipped configs")


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse_yaml(text: str, path: str) -> dict:
    try:
        cfg = OmegaConf.create(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark and mark and context_mark.line != mark.line:
            context += f" that starts at line {context_mark.line + 1}"  # e.g. an unclosed [
        raise ConfigError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}".splitlines()[0]) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got a list")
    return OmegaConf.to_container(cfg, resolve=False)


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:  # OmegaConf accepted it; messages just go without line numbers
        pass
    return lines


# --- overrides -----------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


def _apply_override(cfg: dict, override: str, origin: _Origin) -> None:
    if override.startswith("~"):
        key = override[1:]
        parent, name = _parent(cfg, key, override, create=False)
        if parent is None or name not in parent:
            existing = [k for k, _ in _walk_values(cfg)]
            raise ConfigError(f"override {override!r}: nothing to delete, {key!r} is not in the config"
                              f"{did_you_mean(key, existing)}")
        del parent[name]
        origin.overrides[key] = override
        return
    key, sep, text = override.partition("=")
    if not sep or not _KEY.fullmatch(key):
        raise ConfigError(f"override {override!r}: expected KEY=VALUE (e.g. optimizer.lr=2e-4) or ~KEY")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {override!r}: cannot parse the value: {problem}") from None
    section = SCHEMA.keys.get(key)
    parent, name = _parent(cfg, key, override, create=True)
    if isinstance(section, Section) and isinstance(value, str):
        value = _expand_short_name(section, key, value, f"override {override!r}")
        value = {**_arguments_it_takes(parent.get(name), value[COMPONENT], key), **value}
    parent[name] = value
    origin.overrides[key] = override


def _arguments_it_takes(previous: Any, component: str, key: str) -> dict:
    """The keys of the section being replaced that ``component`` takes as named
    parameters: ``optimizer=adam`` keeps the config's lr and weight_decay. The others
    are dropped, and said so."""
    if not isinstance(previous, dict):
        return {}
    arguments = {k: v for k, v in previous.items() if k != COMPONENT}
    try:
        parameters = inspect.signature(locate(component)).parameters
    except (ImportError, TypeError, ValueError):
        return {}  # validation reports a component that cannot be imported
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    dropped = sorted(set(arguments) - named)
    if dropped:
        log.warning("%s=%s: dropped %s, which %s does not take", key, component, ", ".join(dropped),
                    component)
    return {k: v for k, v in arguments.items() if k in named}


def _parent(cfg: dict, key: str, override: str, create: bool):
    *path, name = key.split(".")
    node = cfg
    for i, part in enumerate(path):
        if part not in node and create:
            node[part] = {}
        if not isinstance(node.get(part), dict):
            if create:
                raise ConfigError(f"override {override!r}: {'.'.join(path[: i + 1])!r} is not a section")
            return None, name
        node = node[part]
    return node, name


def _expand_short_name(section: Section, key: str, value: str, where: str) -> dict:
    """``metric_logger=wandb`` or ``optimizer=torch.optim.SGD`` -> a component section."""
    if not section.component:
        raise ConfigError(f"{where}: {key}: expected a section of keys, got {show(value)}")
    if value in section.aliases:
        return copy.deepcopy(section.aliases[value])
    if "." in value:
        return {COMPONENT: value}
    raise ConfigError(f"{where}: {key}: unknown short name {value!r}{did_you_mean(value, section.aliases)}; "
                      f"use one of {', '.join(section.aliases) or '(none)'} or a dotted path")


# --- defaults and unknown keys -------------------------------------------------------


def _merge(user: dict, section: Section, prefix: str, origin: _Origin) -> dict:
    """The user's section with the schema's defaults filled in; unknown keys are errors,
    except in a component section, where they are the callable's keyword arguments."""
    if COMPONENT in user and not section.component:
        raise origin.error(prefix + COMPONENT, f"{prefix.rstrip('.') or 'the top level'} takes no {COMPONENT}")
    component = user.get(COMPONENT) or section.default_component  # `_component_: null` = the default
    # Listed keys are the defaults of the default component (or the built-in behaviour).
    use_defaults = component == section.default_component
    merged: dict[str, Any] = {COMPONENT: component} if component is not None else {}
    for name, entry in section.keys.items():
        key = prefix + name
        if name in user:
            value = user[name]
            if isinstance(entry, Section):
                if isinstance(value, str):
                    value = _expand_short_name(entry, key, value, origin.where(key))
                if not isinstance(value, dict):
                    raise origin.error(key, f"expected a section of keys, got {show(value)}")
                value = _merge(value, entry, key + ".", origin)
            merged[name] = value
        elif use_defaults:
            merged[name] = _merge({}, entry, key + ".", origin) if isinstance(entry, Section) \
                else copy.deepcopy(entry.default)
    for name, value in user.items():
        if not isinstance(name, str):
            raise origin.error(prefix.rstrip(".") or "top level", f"key {name!r} is not a name")
        if name in section.keys or name == COMPONENT:
            continue
        if component is None:
            key = prefix + name
            raise ConfigError(f"{origin.where(key)}: unknown key {key!r}{_suggest_key(key)}")
        merged[name] = value  # a keyword argument of the component, checked later
    return merged


def _suggest_key(key: str) -> str:
    """A schema key with the same last part (`lr` -> `optimizer.lr`), else the
    nearest one, comparing `lora_rank` with `lora.rank` too."""
    known = [k for k, _ in walk_keys()]
    flat = {k.replace(".", "_"): k for k in known}
    leaf = key.rsplit(".", 1)[-1]
    suggestion = next((k for k in known if k.rsplit(".", 1)[-1] == leaf), None)
    if suggestion is None:
        match = closest(key.replace(".", "_"), flat)
        suggestion = flat[match] if match else None
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def _walk_values(values: dict, prefix: str = ""):
    for name, value in values.items():
        yield prefix + name, value
        if isinstance(value, dict):
            yield from _walk_values(value, prefix + name + ".")


# --- checks ---------------------------------------------------------------------------


def _check_required(values: dict, origin: _Origin) -> None:
    for key, value in _walk_values(values):
        if value == MISSING:
            entry = dict(walk_keys()).get(key)
            doc = f" ({entry.doc})" if isinstance(entry, Key) and entry.doc else ""
            raise ConfigError(f"{origin.where(key)}: missing required key {key!r}{doc}")


def _check_types(values: dict, section: Section, prefix: str, origin: _Origin, paths: bool) -> None:
    """Check (and coerce, e.g. int -> float, `q` -> `q_proj`) every schema key present."""
    for name, entry in section.keys.items():
        if name not in values:
            continue
        key = prefix + name
        if isinstance(entry, Section):
            _check_types(values[name], entry, key + ".", origin, paths)
            continue
        try:
            values[name] = entry.type.check(values[name], paths)
        except Mismatch as e:
            raise origin.error(key, str(e)) from None


def _check_model_downloaded(values: dict, text: str, origin: _Origin) -> None:
    """A missing model.checkpoint_dir gets the download command to run: the one the
    config's comments give for that folder (the shipped configs have one), else its form."""
    folder = (values.get("model") or {}).get("checkpoint_dir")
    if not isinstance(folder, str) or os.path.exists(os.path.expanduser(folder)):
        return
    found = re.search(r"fastune download (\S+) --output-dir " + re.escape(folder) + r"(?!\S)", text)
    command = f"fastune download {found.group(1) if found else 'REPO_ID'} --output-dir {folder}"
    raise origin.error("model.checkpoint_dir", f"no such directory: {folder}; download the model: `{command}`")


def _check_components(values: dict, origin: _Origin) -> None:
    """Every `_component_` imports, is callable and takes its section's keys by name."""
    for key, entry in walk_keys():
        node = _get(values, key) if isinstance(entry, Section) else None
        if not isinstance(node, dict) or COMPONENT not in node:
            continue
        dotted = node[COMPONENT]
        try:
            fn = locate(dotted)
        except ImportError as e:
            raise origin.error(f"{key}.{COMPONENT}", f"cannot import {dotted!r}: {e}") from None
        if not callable(fn):
            raise origin.error(f"{key}.{COMPONENT}", f"{dotted!r} is not callable")
        _check_signature(fn, dotted, {k for k in node if k != COMPONENT}, key, origin)


def _check_signature(fn, dotted: str, names: set[str], key: str, origin: _Origin) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: the call will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    by_name = [n for n, p in params.items() if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
    for name in sorted(names):
        if name not in by_name:
            raise origin.error(f"{key}.{name}", f"not a parameter of {dotted}{did_you_mean(name, by_name)}")


def _get(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def _check_dataset(values: dict, origin: _Origin, paths: bool) -> None:
    data = values["dataset"]
    if COMPONENT in data:
        return
    if data.get("val_split") is not None and data.get("val_fraction") is not None:
        raise origin.error("dataset.val_fraction", "set dataset.val_split or dataset.val_fraction, not both")
    source, files = data["source"], data["data_files"]
    if source in FILE_BUILDERS and files is None:
        raise origin.error("dataset.data_files", f"source {source!r} reads local files: set dataset.data_files")
    if not paths:
        return
    try:
        if source in FILE_BUILDERS:
            for path in _flatten_files(files):
                require_path(os.path.expanduser(path), "glob")
        elif source.startswith(("/", ".", "~")) or source.endswith(_DATA_EXTENSIONS):
            require_path(os.path.expanduser(source), "any")
    except Mismatch as e:
        key = "dataset.data_files" if source in FILE_BUILDERS else "dataset.source"
        raise origin.error(key, str(e)) from None


def _flatten_files(files) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flatten_files(v)]
    return list(files)


def _check_lora(values: dict, origin: _Origin) -> None:
    if values["method"] != "full" and not values["lora"].get("targets"):
        raise origin.error("lora.targets", f"method {values['method']} needs at least one target")


def _resolve_kernels(values: dict, origin: _Origin) -> None:
    """model.kernels becomes the list of op names; the old model.use_kernels goes."""
    model = values["model"]
    use_kernels, kernels = model.pop("use_kernels", None), model.get("kernels")
    if use_kernels is not None:
        if kernels is not None:
            raise origin.error("model.use_kernels", "set model.kernels or its old alias model.use_kernels, not both")
        kernels = "all" if use_kernels else "none"
    model["kernels"] = list(normalize_kernel_ops("all" if kernels is None else kernels))


# --- the entry points -----------------------------------------------------------------


def load_config(config: str | os.PathLike, overrides: Sequence[str] = (), *,
                check_paths: bool = True) -> DictConfig:
    """Load, override, complete and validate a training config (see the module docstring).

    ``check_paths=False`` skips the checks that files exist (checkpoint, tokenizer,
    data, resume), e.g. to check a shipped config before downloading its model.
    """
    path, text = read_config_text(config)
    values = _parse_yaml(text, path)
    origin = _Origin(path, _key_lines(text))
    for override in overrides:
        _apply_override(values, override, origin)
    values = _merge(values, SCHEMA, "", origin)
    _check_required(values, origin)
    cfg = OmegaConf.create(values)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise origin.error(key, str(getattr(e, "msg", e)).splitlines()[0]) from None
    values = OmegaConf.to_container(cfg)
    if check_paths:
        _check_model_downloaded(values, text, origin)
    _check_types(values, SCHEMA, "", origin, check_paths)
    _check_dataset(values, origin, check_paths)
    _check_lora(values, origin)
    _resolve_kernels(values, origin)
    _check_components(values, origin)
    cfg = OmegaConf.create(values)
    OmegaConf.set_struct(cfg, True)
    return cfg


def save_resolved_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write ``cfg`` as ``output_dir/config.yaml`` (atomically) and return its path.

    An existing, different ``config.yaml`` (an earlier run in the same folder) is
    kept as ``config.1.yaml``, ``config.2.yaml``, ...; nothing is overwritten.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.yaml"
    # Credentials resolved from the environment (${oc.env:HF_TOKEN}) stay out of the file.
    text = OmegaConf.to_yaml(OmegaConf.create(redact_secrets(OmegaConf.to_container(cfg, resolve=True))))
    if target.exists():
        if target.read_text(encoding="utf-8") == text:
            return target
        n = 1
        while (out / f"config.{n}.yaml").exists():
            n += 1
        os.replace(target, out / f"config.{n}.yaml")
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target
