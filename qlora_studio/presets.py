"""Presets and config files: YAML (or JSON) files of `TrainConfig` settings.

A preset in ``resources/presets/NAME.yaml`` (shipped in the package) has a ``description`` and a
``settings`` mapping; a config file is either the same shape or a bare mapping of settings. Relative
data paths in a preset are relative to the package's resources folder (``data: assets/sql/train.jsonl``
is a shipped sample, found wherever the package is installed); in a config file, to the file.
Errors name the file, the line and the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import TrainConfig
from .errors import ConfigError
from .home import resource_dir

RESOURCE_DIR = resource_dir()  # a preset's relative data paths start here
PRESETS_DIR = RESOURCE_DIR / "presets"
_PATH_FIELDS = ("data", "test_data", "eval_db")


@dataclass
class Preset:
    name: str
    description: str
    settings: dict
    path: Path


def _key_lines(text: str) -> dict[str, int]:
    """Line numbers (1-based) of the keys of the settings mapping, for error messages."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        lines.setdefault(k.value, k.start_mark.line + 1)
        if k.value == "settings" and isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                lines[k2.value] = k2.start_mark.line + 1
    return lines


def read_settings_file(path: str | Path, base_dir: Path | None = None) -> tuple[dict, str, dict[str, int]]:
    """(settings, description, key lines) from a YAML/JSON file; raises ConfigError naming file:line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings")
    lines = _key_lines(text)
    settings = doc.get("settings", doc if "settings" not in doc else None)
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}:{lines.get('settings', 1)} settings: expected a mapping")
    settings = {k: v for k, v in settings.items() if k not in ("description", "name")} if settings is doc else dict(settings)
    base = base_dir or path.parent
    for key in _PATH_FIELDS:
        if isinstance(settings.get(key), str) and settings[key] and not Path(settings[key]).expanduser().is_absolute():
            settings[key] = str((base / settings[key]).resolve())
    return settings, str(doc.get("description", "")), lines


def build_config(settings: dict, source: Path, lines: dict[str, int], overrides: dict | None = None) -> TrainConfig:
    merged = dict(settings)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.from_dict(merged, source=str(source))
    except ConfigError as e:
        if e.field and e.field in settings and (overrides or {}).get(e.field) is None:
            raise ConfigError(f"{source}:{lines.get(e.field, 1)} {e.field}: {e.why}", e.field, why=e.why) from e
        raise ConfigError(f"{e.field or 'settings'}: {e.why}" if e.field else str(e), e.field, why=e.why) from e


def list_presets() -> list[Preset]:
    out = []
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        try:
            settings, desc, _ = read_settings_file(p, base_dir=RESOURCE_DIR)
        except ConfigError:
            continue
        out.append(Preset(p.stem, desc, settings, p))
    return out


def load_preset(name: str, overrides: dict | None = None) -> TrainConfig:
    path = PRESETS_DIR / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset named {name!r}; presets: {known}")
    settings, _, lines = read_settings_file(path, base_dir=RESOURCE_DIR)
    return build_config(settings, path, lines, overrides)


def load_config_file(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    settings, _, lines = read_settings_file(path)
    return build_config(settings, Path(path), lines, overrides)
