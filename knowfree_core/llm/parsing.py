"""Tolerant parsing of LLM answers to the label-extension prompts.

The prompts ask for JSON, but models wrap it in code fences and prose, use single quotes or
the unquoted keys of the paper's own example (``[{entity: "", type: ""}]``), type Chinese
full-width punctuation (``［｛"entity"："北京"｝］``) and get cut off at the token limit. The
parsers here find the JSON in an answer, repair what :mod:`json_repair` can repair, keep the
complete items of a truncated answer (and drop the incomplete last one rather than trust a
value cut in half: ``"type":"地`` is not the type ``地``), and turn every unusable item into a
:class:`~knowfree_core.annotators.alignment.Rejection` with a reason constant, so a run can
report how many answers and items were lost and why.

No function here raises on any string input: an answer that holds nothing usable comes back
with ``error`` set to a reason constant.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

import json_repair

from knowfree_core.annotators.alignment import Rejection

# Reasons, as constants so that callers can count them by kind.
REASON_EMPTY_ANSWER = "empty answer"
REASON_NO_JSON = "no JSON found"
REASON_NOT_A_LIST = "not a list"
REASON_NOT_AN_OBJECT = "not a JSON object"
REASON_MISSING_FIELD = "missing field"
REASON_EMPTY = "empty field"
REASON_BAD_ITEM = "unusable item"
REASON_TRUNCATED = "truncated answer"
REASON_ANSWER_TOO_LONG = "answer too long"

#: Longest answer read by default: far above what the prompts ask for, and it keeps a server
#: that streams megabytes (a loop, an echo of a huge input) from costing the parser's time and
#: every row's size.
DEFAULT_MAX_ANSWER_CHARS = 20000

T = TypeVar("T")


@dataclass
class ParsedAnswer(Generic[T]):
    """What could be read from one answer.

    ``items`` is a list (a dict of synonym groups for :func:`parse_merge_groups`).
    ``error`` is a reason constant when nothing could be read at all (``items`` is then
    empty); ``rejections`` lists the items (and truncated tails) that were dropped;
    ``repaired`` says the answer was not strict JSON (repaired, or read by a fallback);
    ``truncated`` says the answer ended before its JSON was closed.
    """

    items: T = field(default_factory=list)  # type: ignore[assignment]
    rejections: list[Rejection] = field(default_factory=list)
    error: str | None = None
    repaired: bool = False
    truncated: bool = False


def answer_too_long(text: str, limit: int) -> Rejection | None:
    """The rejection of an answer longer than ``limit`` characters (it is not parsed), or None."""
    if len(text) <= limit:
        return None
    return Rejection(REASON_ANSWER_TOO_LONG, f"{len(text)} characters > max_answer_chars {limit}")


# -- finding the JSON in an answer -------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_OPENERS = "[{［｛"
# Bounds the work on long, bracket-heavy answers (each start is one linear scan).
_MAX_STARTS = 16
# Full-width forms of JSON syntax, mapped only outside strings: inside a string "，" is text.
_FULLWIDTH_SYNTAX = {"［": "[", "］": "]", "｛": "{", "｝": "}", "，": ",", "：": ":"}
# String openers -> (characters that close the string, quote written to the output).
_QUOTES = {
    '"': ('"', '"'),
    "“": ('”“"', '"'),
    "”": ('”“"', '"'),
    "'": ("'", "'"),
    "‘": ("’‘'", "'"),
    "’": ("’‘'", "'"),
}
_SINGLE_QUOTES = "'‘’"
_CLOSER_OF = {"[": "]", "{": "}"}


@dataclass
class _Scan:
    """One scan from an opening bracket: the normalised text read, whether the bracket was
    closed, whether normalisation changed anything, and the latest place where the text can
    be cut so that only complete items remain (position, brackets to append)."""

    text: str
    closed: bool
    changed: bool
    cut: tuple[int, str] | None


def _closers(stack: list[str]) -> str:
    return "".join(_CLOSER_OF[b] for b in reversed(stack))


def _scan(source: str, start: int) -> _Scan:
    """Read a JSON value from ``source[start]`` (an opening bracket) to its matching close.

    Iterative (no recursion limit), tolerant of full-width syntax and single or curly
    quotes. Cut points are element boundaries of any array and pair boundaries of a top-level
    object: cutting there and closing the open brackets gives only complete items.
    """
    out: list[str] = []
    stack: list[str] = []
    closing: str | None = None  # characters that end the current string, None outside one
    out_quote = '"'
    escape = False
    after_colon = False  # in a top-level object: reading a value, not a key
    changed = False
    cut: tuple[int, str] | None = None
    previous = ""  # last non-space character written outside strings
    for ch in source[start:]:
        if closing is not None:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch in closing:
                changed |= ch != out_quote
                out.append(out_quote)
                closing = None
                previous = out_quote
                if stack[-1] == "[" or (len(stack) == 1 and after_colon):
                    cut = (len(out), _closers(stack))
                continue
            out.append(ch)
            continue
        mapped = _FULLWIDTH_SYNTAX.get(ch, ch)
        changed |= mapped != ch
        ch = mapped
        # An apostrophe opens a string only where JSON expects a value or key, so that
        # "don't" in prose inside brackets does not swallow the rest of the answer.
        if ch in _QUOTES and (ch not in _SINGLE_QUOTES or previous in "[{,:"):
            closing, out_quote = _QUOTES[ch]
            changed |= ch != out_quote
            out.append(out_quote)
            continue
        if ch in "[{":
            stack.append(ch)
        elif ch in "]}":
            out.append(ch)
            stack.pop()
            if not stack:
                return _Scan("".join(out), True, changed, cut)
            if stack[-1] == "[" or len(stack) == 1:
                cut = (len(out), _closers(stack))
            previous = ch
            continue
        elif ch == ",":
            if stack[-1] == "[" or len(stack) == 1:
                cut = (len(out), _closers(stack))
            if len(stack) == 1:
                after_colon = False
        elif ch == ":" and len(stack) == 1:
            after_colon = True
        out.append(ch)
        if not ch.isspace():
            previous = ch
    return _Scan("".join(out), False, changed, cut)


@dataclass
class _Found:
    value: Any
    repaired: bool
    truncated: bool
    dropped: str  # the incomplete tail of a truncated answer ("" when none)


def _loads_repaired(text: str) -> Any:
    try:
        return json_repair.loads(text)
    except Exception:  # json_repair is best effort: any failure means "not repairable"
        return None


def _from_scan(scan: _Scan) -> tuple[int, _Found] | None:
    """Interpret one scan; returns (preference tier, result), lower tiers first."""
    if scan.closed:
        try:
            value = json.loads(scan.text)
            if isinstance(value, (list, dict)):
                return 1, _Found(value, scan.changed, False, "")
        except Exception:
            pass
        value = _loads_repaired(scan.text)
        if not isinstance(value, (list, dict)):
            return None
        # Brackets without any quote ("[注意]", "[1]") are more likely prose than JSON.
        quoted = any(q in scan.text for q in "\"'") or re.fullmatch(r"[\[{]\s*[\]}]", scan.text)
        return (2 if quoted else 4), _Found(value, True, False, "")
    if scan.cut is None:
        kept, dropped = scan.text[:1] + _CLOSER_OF[scan.text[0]], scan.text[1:]
    else:
        position, closers = scan.cut
        kept, dropped = scan.text[:position] + closers, scan.text[position:]
    value = _loads_repaired(kept)
    if not isinstance(value, (list, dict)):
        return None
    return 3, _Found(value, True, True, dropped.strip().lstrip(",").strip())


def _find_json(text: str) -> _Found | None:
    """The best JSON container in ``text``: a fenced block's or the answer's first strict
    JSON, else its first repairable one (a truncated answer's complete part among them)."""
    best: tuple[int, int, _Found] | None = None
    order = 0
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        covered_until = 0
        starts = 0
        for position, ch in enumerate(candidate):
            if ch not in _OPENERS or position < covered_until:
                continue
            starts += 1
            if starts > _MAX_STARTS:
                break
            scan = _scan(candidate, position)
            # Brackets inside this value are part of it, not separate answers.
            covered_until = position + len(scan.text) if scan.closed else len(candidate)
            result = _from_scan(scan)
            order += 1
            if result is not None and (best is None or (result[0], order) < best[:2]):
                best = (result[0], order, result[1])
        if best is not None and best[0] == 1:
            break
    return best[2] if best is not None else None


# -- shared item helpers -----------------------------------------------------------------


def _key(name: Any) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _pick(item: dict, keys: tuple[str, ...]) -> tuple[bool, Any]:
    """The value of the first of ``keys`` present in ``item`` (keys compared loosely)."""
    by_key = {_key(k): v for k, v in item.items()}
    for key in keys:
        if key in by_key:
            return True, by_key[key]
    return False, None


def _text(value: Any) -> str | None:
    """A field value as text; numbers count (a year is an entity), containers do not."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _show(value: Any, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _begin(text: Any) -> tuple[ParsedAnswer, _Found | None]:
    """Start a parse: reject non-text and empty answers, find the JSON."""
    answer: ParsedAnswer = ParsedAnswer()
    if not isinstance(text, str) or not text.strip():
        answer.error = REASON_EMPTY_ANSWER
        answer.rejections.append(Rejection(REASON_EMPTY_ANSWER, f"answer {_show(text)}"))
        return answer, None
    found = _find_json(text)
    if found is None:
        return answer, None
    answer.repaired = found.repaired
    answer.truncated = found.truncated
    if found.dropped:
        answer.rejections.append(
            Rejection(REASON_TRUNCATED, f"answer ends inside an item; dropped {_show(found.dropped)}")
        )
    return answer, found


def _fail(answer: ParsedAnswer, reason: str, detail: str) -> ParsedAnswer:
    answer.items = type(answer.items)()  # keep the container kind: [] or {}
    answer.error = reason
    answer.rejections.append(Rejection(reason, detail))
    return answer


def _safely(parse: Callable[[str], ParsedAnswer]) -> Callable[[Any], ParsedAnswer]:
    """Last line of the never-raise promise: an unforeseen failure becomes an error."""

    def wrapper(text: Any) -> ParsedAnswer:
        try:
            return parse(text)
        except Exception as error:  # parsing an LLM answer must not stop a batch job
            answer: ParsedAnswer = ParsedAnswer()
            return _fail(answer, REASON_BAD_ITEM, f"parser failed: {type(error).__name__}: {error}")

    wrapper.__name__ = parse.__name__
    wrapper.__doc__ = parse.__doc__
    return wrapper


_WRAPPER_KEYS = (
    "entities", "entity_list", "words", "tokens", "pos", "pos_tags", "tags", "result", "results",
    "data", "items", "output", "answer", "groups", "实体", "实体列表", "结果", "分词", "分词结果",
    "词性", "词性标注", "输出",
)


def _unwrap(value: Any, item_keys: tuple[str, ...], any_single_list: bool) -> Any:
    """The item list inside ``{"entities": [...]}``-style wrappers, else ``value`` itself."""
    if not isinstance(value, dict):
        return value
    if any(_key(k) in item_keys for k in value):
        return [value]  # one bare item, not a wrapper
    found, inner = _pick(value, _WRAPPER_KEYS)
    if found and isinstance(inner, list):
        return inner
    lists = [v for v in value.values() if isinstance(v, list)]
    if len(value) == 1 and lists and (any_single_list or any(isinstance(x, (dict, list)) for x in lists[0])):
        return lists[0]
    return value


# -- entities (P_ent) ---------------------------------------------------------------------

ENTITY_KEYS = ("entity", "text", "name", "span", "mention", "entity_text", "entity_name", "实体", "实体名称", "实体文本", "名称")
TYPE_KEYS = ("type", "label", "category", "entity_type", "tag", "class", "类型", "实体类型", "类别", "标签")
_ENTITY_WITH_TYPE = re.compile(r"^\s*(.+?)\s*[(（]\s*([^()（）]+?)\s*[)）]\s*$", re.DOTALL)


def _pair(
    answer: ParsedAnswer, index: int, raw: Any, first: tuple[bool, Any], second: tuple[bool, Any], names: tuple[str, str]
) -> None:
    """Append (first, second) to ``answer.items`` or the reason it cannot be used."""
    for (present, value), name in zip((first, second), names):
        if not present or value is None:
            answer.rejections.append(Rejection(REASON_MISSING_FIELD, f"item #{index} {_show(raw)} has no {name}"))
            return
        if _text(value) is None:
            answer.rejections.append(Rejection(REASON_BAD_ITEM, f"item #{index} {_show(raw)}: {name} is not text"))
            return
        if not _text(value):
            answer.rejections.append(Rejection(REASON_EMPTY, f"item #{index} {_show(raw)}: {name} is empty"))
            return
    answer.items.append((_text(first[1]), _text(second[1])))


def _pair_item(answer: ParsedAnswer, index: int, item: Any, keys: tuple[tuple[str, ...], tuple[str, ...]], names: tuple[str, str]) -> None:
    if isinstance(item, dict):
        _pair(answer, index, item, _pick(item, keys[0]), _pick(item, keys[1]), names)
    elif isinstance(item, (list, tuple)) and len(item) <= 2:
        values = list(item) + [None] * (2 - len(item))
        _pair(answer, index, item, (len(item) > 0, values[0]), (len(item) > 1, values[1]), names)
    else:
        answer.rejections.append(Rejection(REASON_BAD_ITEM, f"item #{index} {_show(item)} is not a ({names[0]}, {names[1]}) pair"))


def _read_pairs(answer: ParsedAnswer, value: Any, joined: re.Pattern, keys: tuple[tuple[str, ...], tuple[str, ...]],
                names: tuple[str, str]) -> ParsedAnswer:
    """Pairs from a list of objects, ``[first, second]`` lists or strings that ``joined``
    splits into its two groups (``"北京(地点)"``, ``"北京/ns"``), or from one object
    ``{first: second}``."""
    if isinstance(value, dict):
        if value and all(_text(v) is not None for v in value.values()):
            value = [[first, second] for first, second in value.items()]
        else:
            return _fail(answer, REASON_NOT_A_LIST, f"answer is an object with keys {_show(list(value)[:8])}")
    for index, item in enumerate(value):
        if isinstance(item, str):
            match = joined.match(item.strip())
            item = [match.group(1), match.group(2)] if match else [item]
        _pair_item(answer, index, item, keys, names)
    return answer


@_safely
def parse_entities(text: str) -> ParsedAnswer[list[tuple[str, str]]]:
    """(entity, type) pairs from a P_ent answer.

    Items may be objects with any of the usual key names (``entity``/``type``,
    ``text``/``label``, ``name``/``category``, ``实体``/``类型``), ``["entity", "type"]``
    pairs, or ``"entity(type)"`` strings; an object ``{"地点": ["北京", ...]}`` (type to
    entities) or ``{"北京": "地点"}`` (entity to type) is read too.
    """
    answer, found = _begin(text)
    if answer.error:
        return answer
    if found is None:
        return _fail(answer, REASON_NO_JSON, f"answer {_show(text)}")
    value = _unwrap(found.value, ENTITY_KEYS + TYPE_KEYS, any_single_list=False)
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        value = [[entity, entity_type] for entity_type, entities in value.items() for entity in entities]
    # The pattern allows spaces around its parts, so it reads the stripped text alike.
    return _read_pairs(answer, value, _ENTITY_WITH_TYPE, (ENTITY_KEYS, TYPE_KEYS), ("entity", "type"))


# -- words (P_seg) ------------------------------------------------------------------------

WORD_KEYS = ("word", "token", "text", "词", "词语", "分词")
_WORD_SEPARATORS = re.compile(r"[\s、|/]+")


def _words_from_line(answer: ParsedAnswer, text: str) -> ParsedAnswer:
    """Last resort for P_seg: a line of words separated by spaces, 、, / or |."""
    body = "\n".join(m.group(1) for m in _FENCE.finditer(text)) or text
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    separated = [line for line in lines if _WORD_SEPARATORS.search(line)]
    if separated:
        line = separated[-1]  # prose ("分词结果如下：") comes before the answer
    elif len(lines) == 1:
        line = lines[0]
    else:
        return _fail(answer, REASON_NO_JSON, f"answer {_show(text)}")
    answer.items = [word for word in _WORD_SEPARATORS.split(line) if word]
    answer.repaired = True
    return answer


@_safely
def parse_words(text: str) -> ParsedAnswer[list[str]]:
    """Words from a P_seg answer: a JSON array of strings (or of objects with ``word``),
    else a single line of words separated by whitespace, 、, / or |."""
    answer, found = _begin(text)
    if answer.error:
        return answer
    if found is None:
        return _words_from_line(answer, text)
    value = _unwrap(found.value, WORD_KEYS, any_single_list=True)
    if not isinstance(value, list):
        return _fail(answer, REASON_NOT_A_LIST, f"answer is an object with keys {_show(list(value)[:8])}")
    for index, item in enumerate(value):
        present, word = True, item
        if isinstance(item, dict):
            present, word = _pick(item, WORD_KEYS)
        elif isinstance(item, (list, tuple)):
            present, word = len(item) > 0, item[0] if item else None
        if not present or word is None:
            answer.rejections.append(Rejection(REASON_MISSING_FIELD, f"item #{index} {_show(item)} has no word"))
        elif _text(word) is None:
            answer.rejections.append(Rejection(REASON_BAD_ITEM, f"item #{index} {_show(item)} is not a word"))
        elif not _text(word):
            answer.rejections.append(Rejection(REASON_EMPTY, f"item #{index} {_show(item)} is an empty word"))
        else:
            answer.items.append(_text(word))
    return answer


# -- POS (P_pos) --------------------------------------------------------------------------

POS_KEYS = ("pos", "tag", "pos_tag", "upos", "label", "词性", "标签")
_WORD_SLASH_POS = re.compile(r"^(.+)/([^/\s]+)$", re.DOTALL)


@_safely
def parse_pos(text: str) -> ParsedAnswer[list[tuple[str, str]]]:
    """(word, pos) pairs from a P_pos answer: objects with ``word``/``pos`` (or the usual
    variants), ``["word", "pos"]`` pairs or ``"word/pos"`` strings; without JSON, a line of
    ``word/pos`` tokens."""
    answer, found = _begin(text)
    if answer.error:
        return answer
    if found is None:
        tokens = [t for t in text.split() if _WORD_SLASH_POS.match(t)]
        if not tokens:
            return _fail(answer, REASON_NO_JSON, f"answer {_show(text)}")
        answer.repaired = True
        value: Any = tokens
    else:
        value = _unwrap(found.value, WORD_KEYS + POS_KEYS, any_single_list=False)
    return _read_pairs(answer, value, _WORD_SLASH_POS, (WORD_KEYS, POS_KEYS), ("word", "pos"))


# -- synonym groups (P_merge) -------------------------------------------------------------

STANDARD_KEYS = ("standard", "standard_label", "canonical", "label", "name", "标准标签", "标准", "标签")
SYNONYM_KEYS = ("synonyms", "synonym", "synonymous_labels", "labels", "aliases", "members", "同义标签", "同义词", "同义")


def _add_group(answer: ParsedAnswer, groups: dict[str, list[str]], index: int, standard: Any, synonyms: Any) -> None:
    name = _text(standard)
    if name is None:
        answer.rejections.append(Rejection(REASON_BAD_ITEM, f"group #{index}: standard label {_show(standard)} is not text"))
        return
    if not name:
        answer.rejections.append(Rejection(REASON_EMPTY, f"group #{index}: empty standard label"))
        return
    if _text(synonyms) is not None:
        synonyms = [synonyms]  # one synonym written without a list
    if not isinstance(synonyms, list):
        answer.rejections.append(Rejection(REASON_BAD_ITEM, f"group {name!r}: synonyms {_show(synonyms)} are not a list"))
        return
    group = groups.setdefault(name, [])
    for synonym in synonyms:
        label = _text(synonym)
        if label is None:
            answer.rejections.append(Rejection(REASON_BAD_ITEM, f"group {name!r}: synonym {_show(synonym)} is not text"))
        elif not label:
            answer.rejections.append(Rejection(REASON_EMPTY, f"group {name!r}: empty synonym"))
        elif label not in group:
            group.append(label)


@_safely
def parse_merge_groups(text: str) -> ParsedAnswer[dict[str, list[str]]]:
    """Synonym groups from a P_merge answer: ``{standard label: [synonymous labels]}`` or a
    list of ``{standard: ..., synonyms: [...]}`` objects. Groups with the same standard
    label are joined, and a synonym listed twice in a group is kept once. ``items`` is a
    dict ``{standard label: [synonyms]}`` in answer order; of a truncated answer, the
    synonyms that were written out completely are kept.
    """
    answer, found = _begin(text)
    answer.items = {}
    if answer.error:
        return answer
    if found is None:
        return _fail(answer, REASON_NO_JSON, f"answer {_show(text)}")
    value = found.value
    if isinstance(value, dict):
        found_inner, inner = _pick(value, _WRAPPER_KEYS)
        if found_inner and isinstance(inner, (list, dict)) and len(value) == 1:
            value = inner
    groups: dict[str, list[str]] = {}
    if isinstance(value, dict):
        for index, (standard, synonyms) in enumerate(value.items()):
            _add_group(answer, groups, index, standard, synonyms)
    else:
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                answer.rejections.append(Rejection(REASON_BAD_ITEM, f"group #{index} {_show(item)} is not an object"))
                continue
            has_standard, standard = _pick(item, STANDARD_KEYS)
            has_synonyms, synonyms = _pick(item, SYNONYM_KEYS)
            if not has_standard or not has_synonyms:
                missing = "standard label" if not has_standard else "synonyms"
                answer.rejections.append(Rejection(REASON_MISSING_FIELD, f"group #{index} {_show(item)} has no {missing}"))
                continue
            _add_group(answer, groups, index, standard, synonyms)
    answer.items = groups
    return answer
