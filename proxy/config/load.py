"""config.yaml to a Config: YAML with duplicate keys as errors, then every section read and checked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import yaml

from .callers import check_claim_selectors, read_callers
from .checks import Checker, show
from .model import Config, ConfigError
from .policy import read_api_keys, read_routes, read_tiers
from .sections import read_sections


def _duplicates(node: yaml.Node | None, path: str, out: list[str]) -> None:
    """Report keys given twice in a mapping, by key path; API keys are never shown."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = f"{path}.{key}" if path else str(key)
            if path == "api_keys":
                child = "api_keys[...]"  # the mapping key is the secret itself
            if key is not None and key in seen:
                line = key_node.start_mark.line + 1
                what = "an API key is given twice" if path == "api_keys" else f"duplicate key {show(key)}"
                out.append(f"{path or 'top level'}: {what} (line {line}); the last one would win")
            if key is not None:
                seen.add(key)
            _duplicates(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, f"{path}[{index}]", out)


def parse_yaml(text: str) -> tuple[Any, list[str]]:
    """YAML text -> (tree, duplicate-key errors); ConfigError for broken syntax.

    Duplicates are returned, not raised, so the rest of the file is still
    validated and every error is reported at once.
    """
    loader = yaml.SafeLoader(text)
    duplicates: list[str] = []
    try:
        node = loader.get_single_node()
        _duplicates(node, "", duplicates)
        tree = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"]) from exc
    finally:
        loader.dispose()
    return tree, duplicates


TOP_KEYS: Final = ("server", "admin", "upstream", "storage", "clients", "whatif", "log", "tiers", "api_keys", "routes")


def build(tree: Any, path: str | None = None, *, errors: list[str] | None = None) -> Config:
    """Validate a parsed YAML tree; raise ConfigError listing every problem."""
    ck = Checker()
    ck.errors.extend(errors or ())
    raw = ck.mapping("", tree, dict.fromkeys(TOP_KEYS)) if tree is not None else {}
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(["the file must hold a mapping of sections, got " + show(tree)])
    sections = read_sections(ck, raw)
    require_key = sections["clients"].require_key
    lease = sections["upstream"].timeout + 5  # a slot outlives its longest exchange, then a dead instance's ends
    tiers = read_tiers(ck, raw.get("tiers"), require_key, lease=lease)
    known = raw.get("tiers") if isinstance(raw.get("tiers"), dict) else {"anonymous": None}
    api_keys = read_api_keys(ck, raw.get("api_keys"), tiers, known or {})
    routes = read_routes(ck, raw.get("routes"), tiers, lease=lease)
    base = Path(path).parent if path is not None else Path(".")  # key files are relative to the config file
    callers = read_callers(ck, raw.get("clients"), known or {}, base)
    if not ck.errors:
        check_claim_selectors(ck, tiers, routes, callers.get("jwt"))
    if ck.errors:
        raise ConfigError(ck.errors)
    sections["clients"] = replace(sections["clients"], **callers)
    return Config(tiers=tiers, api_keys=api_keys, routes=routes, path=path, **sections)


def read(path: str | Path) -> tuple[str, str]:
    """A config file's text and resolved path; ConfigError when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    return text, str(Path(path).resolve())


def load(path: str | Path) -> Config:
    """Read, parse and validate a config file; ConfigError says why it cannot be used."""
    return from_text(*read(path))


def from_text(text: str, path: str | None = None) -> Config:
    """Parse and validate YAML text (what `load` and the tests use)."""
    tree, duplicates = parse_yaml(text)
    return build(tree, path, errors=duplicates)
