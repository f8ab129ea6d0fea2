"""Property-based fuzzing of the contract decoder: whatever a publisher sends, the daemon
either gets a valid task or a ``PermanentError`` with a reason (dead-lettered at once, with
that reason in its headers). Anything else (a ``ValueError``, a ``RecursionError``, a
``UnicodeError``) would be treated as a transient failure and retried, or worse.

Valid messages (``contracts/examples/*.json`` and richer ones built from the models in
``mlpipe.contract.models`` so that every field of every model is present) are mutated, a few
mutations stacked per case:

* the document tree: field deletions, type swaps (null, booleans, numbers at and past their
  limits, ``NaN``/``Infinity``, strings, lists, objects), key renames, string edits (lone
  surrogates, NUL, non-BMP and control characters);
* giant values (strings up to past the 4 MiB body limit, integers of thousands of digits,
  floats out of range, huge arrays and objects) and deeply nested arrays and objects, in
  place of any value or as an unknown field anywhere;
* the bytes: flips, insertions, deletions, truncation, duplicated slices, syntax characters,
  a BOM, other encodings, duplicate keys.

Each body goes through ``mlpipe.contract.codec.decode``, what the daemon calls on every
delivery (``mlpipe.worker.process``); Celery-style messages go through
``mlpipe.contract.celery.from_celery``, what it calls for those. A valid task must also be one
a producer could have sent: ``encode`` (how Python producers publish) turns it into strict
UTF-8 JSON that decodes to the same task.

At least 10,000 cases through ``decode`` plus the Celery ones; the seed is fixed
(``derandomize``), so CI sees the same cases every run.

What it found when written (all fixed in ``mlpipe.contract``): an integer of more than 4,300
digits anywhere in the body, even in an unknown field, escaped ``decode`` as a ``ValueError``
(``json.loads``' limit); numbers out of float range (``1e400``, a 400-digit integer) and the
non-JSON literal ``Infinity`` gave tasks with an infinite ``timestamp`` or segment time, which
re-encode as ``null`` and are refused on the way back; a Celery header that is not UTF-8
(AMQP hands it over as bytes) escaped ``from_celery`` as a ``UnicodeDecodeError``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlpipe.contract.celery import DEFAULT_TASK_MAP, from_celery
from mlpipe.contract.codec import MAX_BODY_BYTES, decode, encode
from mlpipe.contract.models import TASK_MODELS, TaskType, build_task
from mlpipe.errors import PermanentError

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
T = TypeVar("T")

#: Cases per family; the three ``decode`` families add up to 10,000.
TREE_CASES = 5_000
BYTE_CASES = 3_500
GIANT_CASES = 1_500
CELERY_CASES = 1_500


# Choices among lists built per case are drawn as an index (``pick``): ``st.integers`` is cached
# by its bounds, a fresh ``st.sampled_from`` per draw is not, and that dominated the runtime.


def pick(draw: st.DrawFn, items: Sequence[T]) -> T:
    return items[draw(st.integers(0, len(items) - 1))]


def choice(items: Sequence[T]) -> st.SearchStrategy[T]:
    return st.sampled_from(list(items))


# --- valid seeds --------------------------------------------------------------------------------

_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_SEGMENTS = [{"start": 0.0, "end": 4.2, "text": "First sentence of the talk."},
             {"start": 4.2, "end": 9.75, "text": "Second one, a little longer."}]
_CONTENT = {"text": "Rockets reach orbit by going sideways very fast.\n\nStages drop off.",
            "title": "How rockets reach orbit", "url": "https://example.org/v/1",
            "platform": "youtube", "type": "transcript", "segments": _SEGMENTS,
            "lead": "A video about rockets. #space #rockets"}


def _rich() -> list[dict[str, Any]]:
    """One message per task type with every optional field of its models set."""
    tasks = [
        build_task(TaskType.TRANSCRIBE_WHISPER, "yt-rocket-1", {
            "mediaUrl": "https://media.example.org/v/1.mp4", "language": "pt-BR",
            "options": {"backend": "local", "model": "base", "forceRecompute": True},
            "video": {"caption": "Rockets!", "hashtags": ["space", "rockets"],
                      "platform": "youtube"}}, correlation_id="c-1", traceparent=_TRACEPARENT),
        build_task(TaskType.SUMMARIZE_LLM, "web:article.2", {
            "content": _CONTENT, "options": {"backend": "api", "model": "gpt-4o-mini",
                                             "maxLength": 120, "forceRecompute": False}},
            traceparent=_TRACEPARENT),
        build_task(TaskType.SUMMARIZE_VIDEO_COMBINED, "tt_3", {
            "transcript": _CONTENT, "caption": "Sourdough in 7 days", "hashtags": ["bread"],
            "options": {"maxLength": 200, "model": "gpt-4o-mini", "backend": "api",
                        "forceRecompute": True}}, traceparent=_TRACEPARENT),
        build_task(TaskType.EMBED_VECTORS, "tw-4", {
            "content": _CONTENT, "options": {"backend": "local", "model": "all-MiniLM-L6-v2",
                                             "embeddingType": "composite",
                                             "chunkStrategy": "transcript",
                                             "forceRecompute": True}},
            traceparent=_TRACEPARENT),
    ]
    return [json.loads(encode(t)) for t in tasks]


SEEDS: list[tuple[str, dict[str, Any]]] = [
    *((p.stem, json.loads(p.read_text())) for p in sorted((CONTRACTS / "examples").glob("*.json"))),
    *((f"rich:{d['taskType']}", d) for d in _rich()),
]


_SEEDS = choice(SEEDS)


def _keys(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield key
            yield from _keys(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _keys(value)


def _schema_properties(schema: dict[str, Any]) -> set[str]:
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


def test_seeds_are_valid_and_cover_every_field() -> None:
    """The fuzzer starts from valid messages only, and from every field the models know, so
    mutations reach each one."""
    for name, doc in SEEDS:
        assert decode(json.dumps(doc).encode()).task_type.value == doc["taskType"], name
    for task_type, model in TASK_MODELS.items():
        fields = _schema_properties(model.model_json_schema(by_alias=True))
        present = {k for _, doc in SEEDS if doc["taskType"] == task_type.value
                   for k in _keys(doc)}
        assert fields <= present, f"{task_type.value}: no seed has {sorted(fields - present)}"


# --- building bodies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced into the body as it is (what ``json.dumps`` cannot or will not
    write: integers of thousands of digits, lone surrogate escapes, 100,000 brackets)."""

    text: str


_RAW_MARK = re.compile(r'"\\u0000raw(\d+)\\u0000"')


def serialize(doc: Any, *, compact: bool) -> bytes:
    raws: list[str] = []

    def splice(value: Any) -> str:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(value).__name__)

    text = json.dumps(doc, default=splice, ensure_ascii=False,
                      separators=(",", ":") if compact else (", ", ": "))
    text = _RAW_MARK.sub(lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "surrogatepass")


class Case:
    """One fuzz case: the seed, the mutations made and the body; its repr (what a failure
    shows) stays short however large the body is."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self.ops: list[str] = []
        self.body = b""

    def __repr__(self) -> str:
        return (f"Case(seed={self.seed!r}, ops={self.ops!r}, {len(self.body)} bytes, "
                f"body[:300]={self.body[:300]!r})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))


Path_ = tuple[str | int, ...]


def paths(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every value's path, the root's included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from paths(value, (*prefix, index))


def containers(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    if isinstance(doc, dict | list):
        yield prefix
        items = doc.items() if isinstance(doc, dict) else enumerate(doc)
        for key, value in items:
            yield from containers(value, (*prefix, key))


def get(doc: Any, path: Path_) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def put(doc: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    get(doc, path[:-1])[path[-1]] = value
    return doc


# --- values -------------------------------------------------------------------------------------

SWAPS = st.one_of(
    st.sampled_from([
        None, True, False, 0, 1, -1, -0.0, 0.5, 5e-324, 1e308, -1e308, 2**31, 2**53 + 1,
        2**63, 2**64 + 1, -(2**63) - 1, float("inf"), float("-inf"), float("nan"),
        "", " ", "0", "1", "1.0", "2.0", "true", "null", "NaN", "transcribe_whisper",
        "embed_vectors", "1.999", "01.0", "1.0 ", "\u0000", [], {}, [None], {"": None},
        ["a"], {"text": "x"}, [{"start": 1, "end": 0, "text": ""}],
    ]),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers()), max_size=3),
).map(copy.deepcopy)  # later mutations must not edit the shared constants

#: Inserted into a string: escapes json.dumps never writes, and characters that trip code.
STRING_BITS = [
    Raw("\\ud800"), Raw("\\udfff"), Raw("\\udc00\\ud800"), Raw("\\ud83d\\ude00"),
    Raw("\\u0000"), Raw("\\u001f"), Raw("\\\""), Raw("\\/"), Raw("\\x41"), Raw("\\u12"),
    "\u0000", "\u202e", "\u2028", "\ufeff", "\U0001f680", "\x7f", "../../etc/passwd",
    "%00", "\r\n", "\t", " ", '"taskType":"embed_vectors"', "é", "\u0301", "A" * 300,
]


def _string_with(original: str, position: int, bit: str | Raw) -> Raw | str:
    position = min(position, len(original))
    if isinstance(bit, str):
        return original[:position] + bit + original[position:]
    head, tail = (json.dumps(s, ensure_ascii=False)[1:-1]
                  for s in (original[:position], original[position:]))
    return Raw(f'"{head}{bit.text}{tail}"')


def deep(kind: str, depth: int) -> Raw:
    if kind == "array":
        return Raw("[" * depth + "]" * depth)
    if kind == "object":
        return Raw('{"a":' * depth + "1" + "}" * depth)
    return Raw('{"a":[' * (depth // 2) + "1" + "]}" * (depth // 2))


GIANT_STRING_SIZES = [4_097, 100_000, 2_000_000, 2_000_001, MAX_BODY_BYTES - 1_000,
                      MAX_BODY_BYTES + 1]
GIANT_DIGITS = [19, 20, 309, 400, 4_300, 4_301, 20_000]
GIANT_FLOATS = ["1e309", "-1e309", "1e-400", "1" + "0" * 400 + ".5", "0." + "0" * 400 + "1",
                "1.5e+308", "-0.0e-0", "1E400", "9" * 400 + ".0"]
DEPTHS = [2, 31, 32, 33, 64, 100, 127, 128, 129, 200, 255, 256, 257, 500, 999, 1_000,
          1_001, 3_000, 100_000]


@functools.cache
def giant_json(kind: str, size: int, item: str = "") -> Raw:
    """Built once per shape: the cases reuse the same (immutable) text."""
    if kind == "string":  # ``size`` characters; multi-byte ones cut to about as many bytes
        return Raw('"' + item * (size // len(item.encode())) + '"')
    if kind == "array":
        return Raw("[" + ",".join([item] * size) + "]")
    return Raw("{" + ",".join(f'"k{i}":{i}' for i in range(size)) + "}")


_GIANT_KINDS = choice(["string", "int", "float", "array", "object", "deep"])
_GIANT_STRING_SIZES = choice(GIANT_STRING_SIZES)
_GIANT_CHARS = choice("x \u00e9\U0001f680")
_GIANT_DIGITS = choice(GIANT_DIGITS)
_SIGNS = choice(["", "-"])
_GIANT_FLOATS = choice(GIANT_FLOATS)
_ARRAY_SIZES = choice([1_000, 50_000])
_ARRAY_ITEMS = choice(["0", '"x"', "null", "{}", "[]"])
_OBJECT_SIZES = choice([1_000, 20_000])
_DEEP_SHAPES = choice(["array", "object", "mixed"])
_DEPTHS = choice(DEPTHS)


@st.composite
def giant(draw: st.DrawFn) -> tuple[str, Raw]:
    kind = draw(_GIANT_KINDS)
    if kind == "string":
        size, char = draw(_GIANT_STRING_SIZES), draw(_GIANT_CHARS)
        return f"string{size}x{char!r}", giant_json("string", size, char)
    if kind == "int":
        digits = draw(_GIANT_DIGITS)
        return f"int{digits}", Raw(draw(_SIGNS) + "9" * digits)
    if kind == "float":
        text = draw(_GIANT_FLOATS)
        return f"float{text[:12]}", Raw(text)
    if kind == "array":
        size = draw(_ARRAY_SIZES)
        return f"array{size}", giant_json("array", size, draw(_ARRAY_ITEMS))
    if kind == "object":
        size = draw(_OBJECT_SIZES)
        return f"object{size}", giant_json("object", size)
    shape, depth = draw(_DEEP_SHAPES), draw(_DEPTHS)
    return f"deep-{shape}{depth}", deep(shape, depth)


# --- mutations ----------------------------------------------------------------------------------
_RENAMES = choice([
    str.upper, str.lower, lambda k: k + " ", lambda k: " " + k, lambda k: k[:-1],
    lambda k: re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k),
    lambda k: k.replace("a", "\u0430"), lambda k: "", lambda k: k + "\u0000",
])
_STRING_BITS = choice(STRING_BITS)
#: In place of a number: edges of JSON numbers, of floats and of the models' bounds.
_NUMBER_EDGES = choice([
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e309"), Raw("-1e309"), Raw("1e-400"),
    Raw("-0"), Raw("-0.0"), Raw("1.0"), Raw("1E2"), Raw("01"), Raw("+1"), Raw(".5"), Raw("1."),
    Raw("0x10"), Raw("9" * 4_301), Raw("1" + "0" * 400), Raw("1" + "0" * 400 + ".0"),
    float("inf"), -1, -1e-300, 0, 1, 15, 16, 8_192, 8_193, 2**31, 2**53 + 1, 2**63, 2**64,
    1.7976931348623157e308, 5e-324, "1", None, True,
])
_NEW_KEYS = choice(["x", "taskType", "version", "", "payload"])


def _delete(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    targets = [p for p in paths(doc) if p]
    if targets:
        path = pick(draw, targets)
        del get(doc, path[:-1])[path[-1]]
        case.ops.append(f"delete {path}")
    return doc


def _swap(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    path = pick(draw, list(paths(doc)))
    value = draw(SWAPS)
    case.ops.append(f"swap {path} -> {value!r:.40}")
    return put(doc, path, value)


def _rename(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    keyed = [p for p in paths(doc) if p and isinstance(p[-1], str)]
    if keyed:
        path = pick(draw, keyed)
        parent = get(doc, path[:-1])
        parent[draw(_RENAMES)(path[-1])] = parent.pop(path[-1])
        case.ops.append(f"rename {path}")
    return doc


def _string(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    strings = [p for p in paths(doc) if isinstance(get(doc, p), str)]
    if not strings:
        return doc
    path = pick(draw, strings)
    bit = draw(_STRING_BITS)
    where = draw(st.integers(0, 200))
    case.ops.append(f"string {path} @{where} + {bit!r:.30}")
    return put(doc, path, _string_with(get(doc, path), where, bit))


def _number(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    numbers = [p for p in paths(doc)
               if isinstance(get(doc, p), int | float) and not isinstance(get(doc, p), bool)]
    if not numbers:
        return doc
    path = pick(draw, numbers)
    value = draw(_NUMBER_EDGES)
    case.ops.append(f"number {path} -> {value!r:.40}")
    return put(doc, path, value)


def _add(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    places = list(containers(doc))
    if not places:
        return doc
    path = pick(draw, places)
    value = draw(SWAPS)
    target = get(doc, path)
    if isinstance(target, dict):
        target[draw(_NEW_KEYS)] = value
    else:
        target.insert(draw(st.integers(0, len(target))), value)
    case.ops.append(f"add {path} {value!r:.40}")
    return doc


def _wrap(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    path = pick(draw, list(paths(doc)))
    in_list = draw(st.booleans())
    case.ops.append(f"wrap {path} in {'a list' if in_list else 'an object'}")
    value = get(doc, path)
    return put(doc, path, [value] if in_list else {"value": value})


TreeOp = Callable[[st.DrawFn, Any, Case], Any]
_TREE_OPS: st.SearchStrategy[TreeOp] = choice(
    [_delete, _swap, _swap, _rename, _string, _number, _add, _wrap])


def mutate_tree(draw: st.DrawFn, doc: Any, case: Case) -> Any:
    return draw(_TREE_OPS)(draw, doc, case)


_SYNTAX = choice([
    b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x80", b" ", b"\n", b"-", b"e", b".", b"0", b"9",
    b"n", b"t", b"/", b"\\u"])
_FRAMES = choice([(b"\xef\xbb\xbf", b""), (b"", b"\x00"), (b" \n\t", b" \n"), (b"[", b"]"),
                  (b"", b"garbage"), (b"", b"}"), (b"", b"{}"), (b"\x00", b""), (b"", b"\r\n")])
_CODECS = choice(["utf-16", "utf-16-le", "utf-32", "latin-1", "utf-8-sig"])
_DUP_KEYS = choice(["version", "taskType", "shareId", "payload", "metadata"])
_DUP_VALUES = choice([b'"2.0"', b'"1.0"', b'"summarize_llm"', b"null", b"{}", b'"x"', b"[]"])


def _flip(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    if not body:
        return body
    bit = draw(st.integers(0, 7))
    case.ops.append(f"flip byte {at} bit {bit}")
    return body[:at] + bytes([body[at] ^ (1 << bit)]) + body[at + 1:]


def _set(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    new = draw(_SYNTAX)
    case.ops.append(f"set {at} {new!r}")
    return body[:at] + new + body[at + 1:]


def _insert(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    new = draw(_SYNTAX) if draw(st.booleans()) else draw(st.binary(min_size=1, max_size=8))
    case.ops.append(f"insert {at} {new!r}")
    return body[:at] + new + body[at:]


def _cut(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    length = draw(st.integers(1, 16))
    case.ops.append(f"delete {at}:+{length}")
    return body[:at] + body[at + length:]


def _truncate(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    case.ops.append(f"truncate {at}")
    return body[:at]


def _repeat(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    length = draw(st.integers(1, 64))
    case.ops.append(f"duplicate {at}:+{length}")
    return body[:at] + body[at:at + length] * 2 + body[at + length:]


def _frame(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    head, tail = draw(_FRAMES)
    case.ops.append(f"frame {head!r} {tail!r}")
    return head + body + tail


def _reencode(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    codec = draw(_CODECS)
    case.ops.append(f"re-encode {codec}")
    return body.decode("utf-8", "replace").encode(codec, "replace")


def _dup_key(draw: st.DrawFn, body: bytes, at: int, case: Case) -> bytes:
    key, value = draw(_DUP_KEYS), draw(_DUP_VALUES)
    case.ops.append(f"duplicate key {key}={value!r}")
    first = body.find(b"{")
    return body[:first + 1] + b'"' + key.encode() + b'":' + value + b"," + body[first + 1:]


ByteOp = Callable[[st.DrawFn, bytes, int, Case], bytes]
_BYTE_OPS: st.SearchStrategy[ByteOp] = choice(
    [_flip, _flip, _set, _insert, _cut, _truncate, _repeat, _frame, _reencode, _dup_key])


def mutate_bytes(draw: st.DrawFn, body: bytes, case: Case) -> bytes:
    op = draw(_BYTE_OPS)
    at = draw(st.integers(0, max(len(body) - 1, 0)))
    return op(draw, body, at, case)


@st.composite
def tree_cases(draw: st.DrawFn) -> Case:
    name, seed = draw(_SEEDS)
    case = Case(name)
    doc = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 4))):
        doc = mutate_tree(draw, doc, case)
    case.body = serialize(doc, compact=draw(st.booleans()))
    return case


@st.composite
def byte_cases(draw: st.DrawFn) -> Case:
    name, seed = draw(_SEEDS)
    case = Case(name)
    doc = copy.deepcopy(seed)
    if draw(st.booleans()):
        doc = mutate_tree(draw, doc, case)
    body = serialize(doc, compact=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        body = mutate_bytes(draw, body, case)
    case.body = body
    return case


@st.composite
def giant_cases(draw: st.DrawFn) -> Case:
    name, seed = draw(_SEEDS)
    case = Case(name)
    doc = copy.deepcopy(seed)
    label, value = draw(giant())
    if draw(st.booleans()):  # in place of a value
        path = pick(draw, list(paths(doc)))
        case.ops.append(f"giant {label} at {path}")
        doc = put(doc, path, value)
    else:  # as an unknown field, which the contract ignores... once parsed
        path = pick(draw, [p for p in containers(doc) if isinstance(get(doc, p), dict)])
        case.ops.append(f"giant {label} as unknown field in {path}")
        get(doc, path)["unknownExtra"] = value
    if draw(st.integers(0, 3)) == 0:
        doc = mutate_tree(draw, doc, case)
    case.body = serialize(doc, compact=True)
    return case


# --- the property -------------------------------------------------------------------------------


def refused(exc: PermanentError) -> str:
    assert isinstance(exc.reason, str), exc.reason
    assert exc.reason.strip(), f"{type(exc).__name__} without a reason"
    assert str(exc).strip(), f"{type(exc).__name__} ({exc.reason}) without a message"
    return f"refused:{exc.reason}"


def accepted(task: Any) -> str:
    """A valid task is one of the contract's task models and a message the contract can
    carry: strict UTF-8 JSON that decodes to the same task."""
    assert isinstance(task, tuple(TASK_MODELS.values())), type(task)
    again = encode(task)
    again.decode("utf-8")  # strict: no lone surrogates
    try:
        assert decode(again) == task, "a valid task does not survive re-encoding"
    except PermanentError as exc:
        raise AssertionError(f"accepted as valid, but its own encoding is refused: {exc}; "
                             f"re-encoded: {again[:300]!r}") from None
    return "valid"


def decode_outcome(case: Case) -> str:
    """Only ``PermanentError`` may escape ``decode``; anything else fails the test with the
    case that raised it."""
    try:
        task = decode(case.body)
    except PermanentError as exc:
        return refused(exc)
    return accepted(task)


def fuzz(strategy: st.SearchStrategy[Any], cases: int,
         outcome: Callable[[Any], str]) -> Counter[str]:
    """Run ``cases`` generated cases (fixed seed, no example database) and count outcomes."""
    seen: Counter[str] = Counter()

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(strategy)
    def run(case: Any) -> None:
        try:
            seen[outcome(case)] += 1
        except BaseException as exc:
            exc.add_note(f"fuzz case: {case!r}")
            raise

    run()
    assert sum(seen.values()) >= cases, seen
    return seen


def share(seen: Counter[str], key: str) -> float:
    return sum(n for k, n in seen.items() if k.startswith(key)) / sum(seen.values())


def test_tree_mutations_give_a_task_or_a_permanent_error() -> None:
    seen = fuzz(tree_cases(), TREE_CASES, decode_outcome)
    # neither side is degenerate: many mutations keep a valid task, many are refused by schema
    assert share(seen, "valid") > 0.05, seen
    assert share(seen, "refused:schema_violation") > 0.2, seen
    assert {"refused:unsupported_version", "refused:unknown_task_type"} <= set(seen), seen


def test_byte_mutations_give_a_task_or_a_permanent_error() -> None:
    seen = fuzz(byte_cases(), BYTE_CASES, decode_outcome)
    assert share(seen, "valid") > 0.05, seen
    assert {"refused:not_json", "refused:schema_violation"} <= set(seen), seen


def test_giant_and_deep_values_give_a_task_or_a_permanent_error() -> None:
    seen = fuzz(giant_cases(), GIANT_CASES, decode_outcome)
    assert {"valid", "refused:too_large", "refused:schema_violation"} <= set(seen), seen


@pytest.mark.parametrize(("body", "reason"), [
    # an unknown field, which is ignored once parsed, that json.loads cannot parse
    (b'{"version":"1.0","x":' + b"9" * 4_301 + b',"taskType":"transcribe_whisper"}',
     "not_json"),
    (json.dumps({**dict(SEEDS)["transcribe_whisper"], "metadata": {
        "correlationId": "c", "timestamp": float("inf")}}).encode(), "schema_violation"),
    (serialize({**dict(SEEDS)["rich:embed_vectors"], "metadata": {
        "correlationId": "c", "timestamp": Raw("1e400")}}, compact=True), "schema_violation"),
])
def test_what_the_fuzzer_found(body: bytes, reason: str) -> None:
    with pytest.raises(PermanentError) as refused_:
        decode(body)
    assert refused_.value.reason == reason


# --- Celery protocol-2 messages -----------------------------------------------------------------

_TEXT = "The council approved the plan on Tuesday after a long debate about parking."
CELERY_SEEDS: list[tuple[str, list[Any]]] = [
    ("llm_service.tasks.summarize_content",
     [["s-1", {"text": _TEXT, "title": "Council"}, {"maxLength": 120}], {}, {}]),
    ("llm_service.tasks.summarize_video_combined",
     [["s-2", {"text": _TEXT, "segments": _SEGMENTS}, {}],
      {"caption": "cap", "hashtags": ["a"]}, {"callbacks": None, "chain": None}]),
    ("whisper.tasks.transcribe_api", [["s-3", "https://media.example.org/a.mp3",
                                       {"language": "en"}], {}, {}]),
    ("whisper.tasks.transcribe_local", [[], {"share_id": "s-4", "media_url": "s3://b/k.wav",
                                             "options": {}}, {}]),
    ("vector_service.tasks.generate_embeddings",
     [["s-5"], {"content": _TEXT, "options": {"embeddingType": "content"}}, {}]),
]

_CELERY_SEEDS = choice(CELERY_SEEDS)
_HEADER_KEYS = choice(["task", "id", "root_id", "retries", "traceparent"])
HEADER_VALUES = st.one_of(
    st.none(), st.integers(), st.text(max_size=40), st.binary(max_size=12),
    st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", "", "0", -1, 2**70, True, 1.5, float("nan"),
                     [], {}, ["x"], {"a": b"\xff"}, _TRACEPARENT, _TRACEPARENT.upper()]),
).map(copy.deepcopy)


class CeleryCase(Case):
    headers: dict[str, Any]

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, headers={self.headers!r:.300})"


@st.composite
def celery_cases(draw: st.DrawFn) -> CeleryCase:
    name, seed = draw(_CELERY_SEEDS)
    case = CeleryCase(name)
    headers: dict[str, Any] = {"task": name, "id": "4f1c-celery-id", "root_id": "root-1",
                               "retries": 0, "lang": "py"}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(_HEADER_KEYS)
        headers[key] = draw(HEADER_VALUES)
        case.ops.append(f"header {key}={headers[key]!r:.40}")
    case.headers = headers
    doc: Any = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, 3))):
        doc = mutate_tree(draw, doc, case)
    if draw(st.integers(0, 4)) == 0:
        label, value = draw(giant())
        path = pick(draw, list(paths(doc)))
        case.ops.append(f"giant {label} at {path}")
        doc = put(doc, path, value)
    body = serialize(doc, compact=True)
    if draw(st.integers(0, 3)) == 0:
        body = mutate_bytes(draw, body, case)
    case.body = body
    return case


def celery_outcome(case: CeleryCase) -> str:
    try:
        task = from_celery(case.headers, case.body, DEFAULT_TASK_MAP,
                           local=case.seed.endswith("_local"))
    except PermanentError as exc:
        return refused(exc)
    return accepted(task)


def test_celery_header_not_utf8_is_malformed() -> None:
    """What the fuzzer found: AMQP hands a string header that is not UTF-8 over as bytes."""
    name, body = CELERY_SEEDS[0]
    for header in ("id", "root_id", "task", "traceparent"):
        headers = {"task": name, "id": "i-1", header: b"\xff\xfe"}
        with pytest.raises(PermanentError) as refused_:
            from_celery(headers, serialize(body, compact=True), DEFAULT_TASK_MAP)
        assert refused_.value.reason == "celery_malformed", header


def test_celery_messages_give_a_task_or_a_permanent_error() -> None:
    seen = fuzz(celery_cases(), CELERY_CASES, celery_outcome)
    assert share(seen, "valid") > 0.1, seen
    assert {"refused:celery_malformed", "refused:schema_violation"} <= set(seen), seen
