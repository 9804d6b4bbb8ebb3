"""Prompt templates for the LLM steps of KnowFREE, loaded from YAML files.

Each step of the paper's workflow has one template per language: ``ent`` (P_ent, Figure 9),
``seg`` (P_seg), ``pos`` (P_pos, Figure 10), ``merge`` (P_merge), ``exp`` (P_exp, Figure 11)
and ``ext`` (P_ext, Figure 12). The templates ship as ``prompts/<language>/<step>.yaml`` (the
folder is installed as the package ``knowfree_prompts``); a user folder with the same layout is
searched first, so wording can be changed or a language added without touching code.

A template file holds::

    name: ent                # the step; must match the file name
    language: zh             # must match the folder name
    version: ent-zh-v1       # recorded with every answer, so results can be traced to wording
    description: ...         # optional
    system: ...              # optional system message (a Jinja2 template)
    user: ...                # the user message (a Jinja2 template)
    response: json           # "json" or "text": what the answer is expected to be
    schema: {...}            # optional, json steps only: the JSON schema of the answer, sent
                             # when the engine has structured_outputs on (see below)

Templates are Jinja2 (``{{ sentence }}``), not ``str.format``, because the paper's prompts
contain literal braces (``[{entity: "", type: ""}]``). Two filters are available:
``json`` (a list or dict as JSON with non-ASCII kept; a string is taken as already formatted)
and ``entity_list`` (``[("院长", "头衔职称")]`` -> ``['院长(头衔职称)']``, the paper's P_exp form).

The ``schema`` lives in the template file, so it is versioned with the wording: change it and
bump ``version``. It must suit OpenAI's strict mode, which vLLM's grammar backends also read:
an object at the top level (an answer that is a list is wrapped in one property, which the
parser unwraps), and every object lists all its properties as ``required`` with
``additionalProperties: false``. Any answer valid under it must parse without a rejection
(tests/test_prompts.py checks the bundled ones).
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jinja2

from knowfree_core.errors import ConfigError
from knowfree_core.llm.engine import ResponseSchema
from knowfree_core.safe_paths import plain_name
from knowfree_core.yaml_files import read_yaml_mapping

STEPS = ("ent", "seg", "pos", "merge", "exp", "ext")
RESPONSE_KINDS = ("json", "text")
_REQUIRED_KEYS = ("name", "language", "version", "user", "response")
_OPTIONAL_KEYS = ("description", "system", "schema")
#: Keys whose value is text (``schema`` is a mapping).
_TEXT_KEYS = _REQUIRED_KEYS + ("description", "system")


def _require_defined(value: Any) -> None:
    # Filters receive the Undefined object itself; stringifying a StrictUndefined raises the
    # UndefinedError that render() turns into a message naming the variable.
    if isinstance(value, jinja2.Undefined):
        str(value)


def _json_filter(value: Any) -> str:
    # Non-ASCII must stay readable: the model sees the words, not \\u escapes.
    _require_defined(value)
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def _entity_list_filter(entities: Any) -> str:
    """Format entities as the paper's P_exp shows them: ``['实体(类型)', ...]``."""
    _require_defined(entities)
    if isinstance(entities, str):
        return entities
    formatted = []
    for item in entities:
        if isinstance(item, str):
            formatted.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            formatted.append(f"{item[0]}({item[1]})")
        else:
            raise ValueError(f"entities must be (entity, type) pairs or strings, got {item!r}")
    # The paper writes a Python-style list with single quotes; repr of a list of str gives
    # exactly that (and escapes a quote inside an entity safely).
    return repr(formatted)


def _environment() -> jinja2.Environment:
    # StrictUndefined: a misspelt or missing variable must fail, not render as "".
    # No autoescape: prompts are plain text, not HTML.
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )
    environment.filters["json"] = _json_filter
    environment.filters["entity_list"] = _entity_list_filter
    return environment


@dataclass(frozen=True)
class PromptTemplate:
    """One step's prompt in one language; :meth:`render` turns it into chat messages."""

    name: str
    language: str
    version: str
    user: str
    system: str | None = None
    response: str = "json"
    path: str = "<string>"
    description: str = ""
    #: The JSON schema of the answer (json steps); None: the template has none.
    # hash=False: a dict does not hash; the version identifies the template.
    schema: dict[str, Any] | None = field(default=None, hash=False)
    _compiled: tuple[jinja2.Template | None, jinja2.Template] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        environment = _environment()
        try:
            system = environment.from_string(self.system) if self.system else None
            user = environment.from_string(self.user)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(
                f"{self.path}: template syntax error on line {error.lineno}: {error.message}"
            ) from error
        object.__setattr__(self, "_compiled", (system, user))
        if self.schema is not None:
            if self.response != "json":
                raise ConfigError(f"{self.path}: schema is for json answers, but response is {self.response!r}")
            check_strict_schema(self.schema, self.path)

    @property
    def response_schema(self) -> ResponseSchema | None:
        """The schema as the engines take it (named after the step), or None."""
        return None if self.schema is None else ResponseSchema(self.name, self.schema)

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages: the system message (when the template has one), then the user's.

        A variable the template uses but the caller did not pass raises
        :class:`ConfigError` naming it and the template file.
        """
        system, user = self._compiled
        messages: list[dict[str, str]] = []
        try:
            if system is not None:
                messages.append({"role": "system", "content": system.render(**variables)})
            messages.append({"role": "user", "content": user.render(**variables)})
        except jinja2.UndefinedError as error:
            raise ConfigError(
                f"{self.path}: cannot render prompt {self.name!r}: {error.message} "
                f"(pass it to render(); given: {sorted(variables) or 'nothing'})"
            ) from error
        return messages


def check_strict_schema(schema: Any, path: str = "<string>") -> None:
    """A one-line ConfigError unless ``schema`` is a JSON schema OpenAI's strict mode takes:
    an object at the top level, and every object node closed (``additionalProperties:
    false``) with all its properties required. A schema that breaks these would fail every
    request of a run with the same 400."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ConfigError(f"{path}: schema must be a mapping with type: object at the top level (strict mode)")
    nodes: list[tuple[str, Any]] = [("schema", schema)]
    while nodes:
        where, node = nodes.pop()
        if isinstance(node, list):
            nodes.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        if node.get("type") == "object":
            properties = node.get("properties") or {}
            if node.get("additionalProperties") is not False:
                raise ConfigError(f"{path}: {where} must set additionalProperties: false (strict mode)")
            if sorted(node.get("required") or []) != sorted(properties):
                raise ConfigError(f"{path}: {where} must list every property in required (strict mode)")
        nodes.extend((f"{where}.{key}", value) for key, value in node.items() if isinstance(value, (dict, list)))


@dataclass(frozen=True)
class PromptInfo:
    """A template found by :func:`available_prompts`."""

    language: str
    step: str
    version: str
    path: str


def bundled_prompts_dir() -> Path:
    """The folder of the templates shipped with the library: ``prompts/`` next to this package
    in a source tree (a checkout, or Ray's unpacked working dir, whose copy must win over the
    one installed on the nodes), else the installed package ``knowfree_prompts``."""
    source_tree = Path(__file__).resolve().parents[1]
    # pyproject.toml marks a source tree: an installed knowfree_core sits in site-packages,
    # where a folder named "prompts" would belong to another distribution.
    if (source_tree / "pyproject.toml").is_file() and _holds_templates(source_tree / "prompts"):
        return source_tree / "prompts"
    try:
        installed = Path(str(importlib.resources.files("knowfree_prompts")))
    except ModuleNotFoundError:
        installed = None
    if installed is not None and _holds_templates(installed):
        return installed
    raise ConfigError(
        "the bundled prompt templates (the package knowfree_prompts) are not installed; "
        "reinstall knowfree or pass prompts_dir"
    )


def _holds_templates(folder: Path) -> bool:
    return (folder / "zh" / "ent.yaml").is_file()


def _search_dirs(prompts_dir: str | Path | None) -> list[Path]:
    dirs = []
    if prompts_dir is not None:
        user_dir = Path(prompts_dir)
        if not user_dir.is_dir():
            raise ConfigError(f"{user_dir}: prompts_dir is not a folder")
        dirs.append(user_dir)
    dirs.append(bundled_prompts_dir())
    return dirs


def load_prompt_file(path: str | Path) -> PromptTemplate:
    """Read and check one template file; every problem names the file."""
    path = Path(path)
    data = read_yaml_mapping(path, "prompt template")
    missing = [key for key in _REQUIRED_KEYS if key not in data or data[key] in (None, "")]
    if missing:
        raise ConfigError(f"{path}: prompt template is missing {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        allowed = ", ".join(_REQUIRED_KEYS + _OPTIONAL_KEYS)
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {allowed})")
    for key in _TEXT_KEYS:
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise ConfigError(f"{path}: {key} must be text, got {type(data[key]).__name__}")
    if data["response"] not in RESPONSE_KINDS:
        raise ConfigError(f"{path}: response must be one of {', '.join(RESPONSE_KINDS)}, got {data['response']!r}")
    # The file's place says which step and language it serves; a copied file whose header
    # was not updated would silently send the wrong prompt, so a mismatch is an error.
    if path.stem != data["name"]:
        raise ConfigError(f"{path}: name is {data['name']!r} but the file is for step {path.stem!r}")
    if path.parent.name != data["language"]:
        raise ConfigError(
            f"{path}: language is {data['language']!r} but the file is in folder {path.parent.name!r}"
        )
    return PromptTemplate(
        name=data["name"],
        language=data["language"],
        version=data["version"],
        user=data["user"],
        system=data.get("system") or None,
        response=data["response"],
        path=str(path),
        description=data.get("description") or "",
        schema=data.get("schema"),
    )


def load_prompt(step: str, language: str = "zh", prompts_dir: str | Path | None = None) -> PromptTemplate:
    """The template of ``step`` in ``language``: ``<prompts_dir>/<language>/<step>.yaml`` when
    the user folder has it, otherwise the bundled one."""
    # Both become path components: "../x" must not reach a YAML file outside the prompt folders.
    plain_name(step, "prompt step")
    plain_name(language, "language")
    dirs = _search_dirs(prompts_dir)
    for directory in dirs:
        path = directory / language / f"{step}.yaml"
        if path.is_file():
            return load_prompt_file(path)
    known = sorted({(info.language, info.step) for info in available_prompts(prompts_dir)})
    listing = ", ".join(f"{lang}/{name}" for lang, name in known)
    searched = ", ".join(str(d / language / f"{step}.yaml") for d in dirs)
    raise ConfigError(f"no prompt template for step {step!r} in language {language!r} (looked for {searched}; available: {listing})")


def _template_files(directory: Path) -> Iterable[Path]:
    return sorted(p for p in directory.glob("*/*.yaml") if p.is_file())


def available_prompts(prompts_dir: str | Path | None = None) -> list[PromptInfo]:
    """Every template that :func:`load_prompt` can find, a user's shadowing the bundled one."""
    found: dict[tuple[str, str], PromptInfo] = {}
    for directory in _search_dirs(prompts_dir):
        for path in _template_files(directory):
            key = (path.parent.name, path.stem)
            if key in found:
                continue
            template = load_prompt_file(path)
            found[key] = PromptInfo(template.language, template.name, template.version, str(path))
    return [found[key] for key in sorted(found)]
