"""JSON Schema -> llama.cpp GBNF: our own converter, bounded, for schemas that come from clients.

The grammar it writes holds the sampler to JSON valid under the schema. Schemas are untrusted: a
`maxLength: 1000000000`, a 10,000-deep nesting, a recursive `$ref` or a regex `a{0,30000000}`
must not turn into a grammar (or a conversion) that takes the server down. So every bound is
checked while the grammar is built, and each one passed raises InvalidParameterError naming the
request parameter and the place in the schema (a JSON pointer such as `#/properties/tags/maxItems`).

Repetitions are written with GBNF's `{m,n}`, which llama.cpp's grammar parser expands itself (to
about n small rules of one symbol each; it refuses counts above 2,000): the grammar text stays
linear in the schema, and its size is counted as llama.cpp will expand it.

Supported (as llama.cpp's own converter, common/json-schema-to-grammar): type (one or a list),
object properties / required / additionalProperties (false when absent, as llama.cpp),
array items / prefixItems / minItems / maxItems, string minLength / maxLength / pattern (an
anchored `^...$` regex: literals, escapes, classes, `.`, groups, `|`, `* + ? {m,n}`) / format
(date, time, date-time, uuid), enum, const, anyOf / oneOf (as anyOf), allOf (merged), `$ref` into
the same document (`#/$defs/...`, `#/definitions/...`, any JSON pointer; recursion allowed), and
`true` / `{}` as any JSON value. Other keywords (minimum, description, ...) are ignored: the output
is still JSON of the right shape. Remote `$ref`s are refused, never fetched.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_llm.errors import InvalidParameterError

# A laptop model writing a 10,000-item array under a grammar is not a use case, and each count
# unrolls into grammar rules (llama.cpp itself refuses counts above 2,000).
MAX_REPEAT = 256
MAX_SCHEMA_DEPTH = 32  # nesting of the schema's JSON
MAX_SCHEMA_CHARS = 64_000
MAX_GRAMMAR_SIZE = 256_000  # characters of grammar, each repetition counted as llama.cpp expands it
MAX_RULES = 4_096
MAX_ENUM = 1_024
MAX_PATTERN_CHARS = 2_000
MAX_VISITS = 10_000  # schema nodes converted, each $ref and allOf target as often as it is used
MAX_NESTING = 64  # subschemas being converted inside one another, through $refs too
MAX_REGEX_GROUPS = 32  # nested (...) in one pattern

SEPARATOR = '"," space'
SPACE = '" "?'  # whitespace is at most one space: a model cannot run away in it
PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false") space', ()),
    "null": ('"null" space', ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part) space', ("integral-part",)),
    "char": (r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": (r'"\"" char* "\"" space', ("char",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
               ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value",)),
    "uuid": (r'"\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
             r'[0-9a-fA-F]{12} "\"" space', ()),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": (r'"\"" date "\"" space', ("date",)),
    "time-string": (r'"\"" time "\"" space', ("time",)),
    "date-time-string": (r'"\"" date-time "\"" space', ("date-time",)),
}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_RULE_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]+")
# Characters a JSON string cannot hold as they are: they are written escaped, or not at all.
_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F))


class SchemaGrammar:
    """One GBNF grammar built from JSON schemas (add_schema) and rules of the caller's (add_rule).

    Every bound is checked as the grammar grows; the first one passed raises InvalidParameterError
    with `param`, the message beginning with `label` ("the JSON schema", "the tool parameters")."""

    def __init__(self, *, param: str, label: str = "the JSON schema") -> None:
        self.param = param
        self.label = label
        self._rules: dict[str, str | None] = {}  # None: reserved for a $ref being converted
        self._suffixes: dict[str, int] = {}
        self._size = 0
        self._visits = 0
        self._nesting = 0
        self._add("space", SPACE)

    # -- the public side ------------------------------------------------------------------------------

    def add_schema(self, schema: Any, name: str, *, where: str = "") -> str:
        """Rules for one JSON value valid under `schema`; returns the name of its rule (`name`,
        or `name` with a number after it when taken). The schema's `$ref`s resolve within it;
        `where` names it in error messages (e.g. "tools[0].function.parameters")."""
        check_schema_size(schema, self.param, self.label)
        scope = _Scope(schema, where, name)
        return self._visit(schema, name, scope, "#")

    def add_rule(self, name: str, body: str) -> str:
        """A rule of the caller's own; returns its name (made unique as add_schema's are)."""
        return self._add(name, body)

    def text(self) -> str:
        return "\n".join(f"{name} ::= {body}" for name, body in self._rules.items() if body is not None)

    # -- bounds ---------------------------------------------------------------------------------------

    def refuse(self, message: str, scope: _Scope | None = None, path: str | None = None) -> InvalidParameterError:
        where = f" (at {scope.where}{path})" if scope is not None and path is not None else ""
        return InvalidParameterError(f"{self.label} {message}{where}", param=self.param)

    def _grow(self, size: int, scope: _Scope | None = None, path: str | None = None) -> None:
        self._size += size
        if self._size > MAX_GRAMMAR_SIZE:
            raise self.refuse(f"makes a grammar too large to run (over {MAX_GRAMMAR_SIZE} characters as "
                              "llama.cpp expands it)", scope, path)

    def _count(self, value: Any, keyword: str, scope: _Scope, path: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.refuse(f"has a {keyword} that is not an integer: {value!r}", scope, f"{path}/{keyword}")
        if not 0 <= value <= MAX_REPEAT:
            raise self.refuse(f"repeats something {value} times, above the limit of {MAX_REPEAT} for "
                              f"grammar-constrained output ({keyword})", scope, f"{path}/{keyword}")
        return value

    # -- rules ----------------------------------------------------------------------------------------

    def _unique(self, name: str) -> str:
        name = _RULE_NAME_CHARS.sub("-", name)[:80] or "rule"
        if name not in self._rules and name not in PRIMITIVES:
            return name
        i = self._suffixes.get(name, 0)
        while f"{name}{i}" in self._rules:
            i += 1
        self._suffixes[name] = i + 1
        return f"{name}{i}"

    def _add(self, name: str, body: str, scope: _Scope | None = None, path: str | None = None) -> str:
        clean = _RULE_NAME_CHARS.sub("-", name)[:80] or "rule"
        if self._rules.get(clean, "") is None:  # reserved for this rule
            key = clean
        elif self._rules.get(clean) == body and clean not in PRIMITIVES:
            return clean
        else:
            key = self._unique(clean)
        if len(self._rules) >= MAX_RULES:
            raise self.refuse(f"makes a grammar of more than {MAX_RULES} rules", scope, path)
        self._grow(len(key) + len(body) + 5, scope, path)
        self._rules[key] = body
        return key

    def _primitive(self, name: str) -> str:
        """One of PRIMITIVES, under its own name (which no other rule takes)."""
        if name not in self._rules:
            body, deps = PRIMITIVES[name]
            self._grow(len(name) + len(body) + 5)
            self._rules[name] = body
            for dep in deps:
                self._primitive(dep)
        return name

    def _repeat(self, item: str, low: int, high: int | None, scope: _Scope, path: str,
                separator: str | None = None) -> str:
        """`item` low to high times (high None: no end), with `separator` between: written with
        GBNF's {m,n}, counted at the size llama.cpp expands it to."""
        self._grow((max(low, high or 0, 1)) * (len(item) + len(separator or "") + 8), scope, path)
        if separator is None:
            return _quantified(item, low, high)
        # `item (sep item){low-1,high-1}`: the repetition applies to one group, as llama.cpp wants
        # (it refuses a repeated group that itself holds many repetition rules).
        rest = _quantified(f"({separator} {item})", max(low - 1, 0), None if high is None else max(high - 1, 0))
        whole = f"{item} {rest}".rstrip()
        if high == 0:
            return '""'
        return whole if low > 0 else f"({whole})?"

    # -- schemas --------------------------------------------------------------------------------------

    def _visit(self, schema: Any, name: str, scope: _Scope, path: str) -> str:
        """Rule `name` (or a free name like it) for one value valid under `schema`."""
        return self._add(name, self._bounded_body(schema, name, scope, path), scope, path)

    def _bounded_body(self, schema: Any, name: str, scope: _Scope, path: str) -> str:
        self._visits += 1
        if self._visits > MAX_VISITS:
            raise self.refuse(f"takes more than {MAX_VISITS} steps to convert (its $refs or allOfs repeat "
                              "too much)", scope, path)
        if self._nesting >= MAX_NESTING:
            raise self.refuse(f"nests deeper than {MAX_NESTING} (through its $refs)", scope, path)
        self._nesting += 1
        try:
            return self._body(schema, name, scope, path)
        finally:
            self._nesting -= 1

    def _body(self, schema: Any, name: str, scope: _Scope, path: str) -> str:
        """The GBNF right-hand side for one value valid under `schema`."""
        if schema is True:
            return self._primitive("value")
        if schema is False:
            raise self.refuse("has a `false` schema, which no value fits", scope, path)
        if not isinstance(schema, dict):
            raise self.refuse(f"has a subschema that is not an object: {_short(schema)}", scope, path)
        kind = schema.get("type")

        if "$ref" in schema:
            return self._ref(schema["$ref"], name, scope, f"{path}/$ref")
        if "anyOf" in schema or "oneOf" in schema:
            key = "oneOf" if "oneOf" in schema else "anyOf"
            alternatives = self._list(schema[key], key, scope, path)
            return " | ".join(self._visit(alt, f"{name}-{i}", scope, f"{path}/{key}/{i}")
                              for i, alt in enumerate(alternatives))
        if isinstance(kind, list):
            types = self._list(kind, "type", scope, path)
            return " | ".join(self._visit({**schema, "type": t}, f"{name}-{t}", scope, f"{path}/type/{i}")
                              for i, t in enumerate(types))
        if kind is not None and kind not in _TYPES:
            raise self.refuse(f"has an unknown type {_short(kind)}", scope, f"{path}/type")
        if "const" in schema:
            return f"{self._json_literal(schema['const'], scope, f'{path}/const')} space"
        if "enum" in schema:
            values = self._list(schema["enum"], "enum", scope, path)
            if len(values) > MAX_ENUM:
                raise self.refuse(f"has an enum of {len(values)} values, above the limit of {MAX_ENUM}",
                                  scope, f"{path}/enum")
            self._grow(sum(len(str(v)) + 8 for v in values), scope, f"{path}/enum")
            literals = [self._json_literal(v, scope, f"{path}/enum/{i}") for i, v in enumerate(values)]
            return f"({' | '.join(literals)}) space"
        if "allOf" in schema:
            return self._bounded_body(self._merge_all_of(schema, scope, path), name, scope, path)
        if kind in (None, "object") and ("properties" in schema or schema.get("additionalProperties", True) is not True):
            return self._object(schema, name, scope, path)
        if kind in (None, "array") and ("items" in schema or "prefixItems" in schema
                                        or "minItems" in schema or "maxItems" in schema):
            return self._array(schema, name, scope, path)
        if kind in (None, "string") and "pattern" in schema:
            return _Regex(self, schema["pattern"], name, scope, f"{path}/pattern").rule()
        format = schema.get("format")
        if kind in (None, "string") and isinstance(format, str) and re.fullmatch(r"uuid[1-5]?", format):
            return self._primitive("uuid")
        if kind in (None, "string") and format in ("date", "time", "date-time"):
            return self._primitive(f"{format}-string")
        if kind in (None, "string") and ("minLength" in schema or "maxLength" in schema):
            low = self._count(schema.get("minLength", 0), "minLength", scope, path)
            high = self._count(schema.get("maxLength"), "maxLength", scope, path)
            self._order(low, high, "minLength", "maxLength", scope, path)
            return rf'"\"" {self._repeat(self._primitive("char"), low or 0, high, scope, path)} "\"" space'
        if kind is None:
            return self._primitive("value")
        return self._primitive(kind)

    def _list(self, value: Any, keyword: str, scope: _Scope, path: str) -> list:
        if not isinstance(value, list) or not value:
            raise self.refuse(f"has a {keyword} that is not a non-empty list", scope, f"{path}/{keyword}")
        return value

    def _order(self, low: int | None, high: int | None, low_key: str, high_key: str, scope: _Scope, path: str) -> None:
        if low is not None and high is not None and low > high:
            raise self.refuse(f"has {low_key} {low} above {high_key} {high}", scope, path)

    def _json_literal(self, value: Any, scope: _Scope, path: str) -> str:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self.refuse(f"has a value that is not JSON: {exc}", scope, path) from None
        return gbnf_literal(text)

    def _ref(self, ref: Any, name: str, scope: _Scope, path: str) -> str:
        if not isinstance(ref, str):
            raise self.refuse(f"has a $ref that is not a string: {_short(ref)}", scope, path)
        if not ref.startswith("#"):
            raise self.refuse(f"has a $ref outside the schema ({_short(ref)}): only refs into the same "
                              "document (#/$defs/...) are followed, never fetched", scope, path)
        if ref in scope.refs:
            return scope.refs[ref]
        target = scope.resolve(ref, self, path)
        # The rule's name is reserved before its target is converted, so a recursive $ref names it.
        last = ref.rstrip("/").split("/")[-1].lstrip("#") or "self"
        rule = self._unique(f"{scope.prefix}{last}")
        self._rules[rule] = None
        scope.refs[ref] = rule
        self._visit(target, rule, scope, ref)
        return rule

    def _merge_all_of(self, schema: dict, scope: _Scope, path: str) -> dict:
        """allOf as one schema: the components' properties together (required where a component
        requires them; an anyOf component's optional), other keywords from the first that has them."""
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        properties = dict(merged.get("properties") or {})
        required = list(merged.get("required") or [])
        for i, part in enumerate(self._list(schema["allOf"], "allOf", scope, path)):
            part = self._deref(part, scope, f"{path}/allOf/{i}")
            alternatives = part.get("anyOf") if isinstance(part, dict) else None
            for j, alt in enumerate(alternatives if isinstance(alternatives, list) else ()):
                alt = self._deref(alt, scope, f"{path}/allOf/{i}/anyOf/{j}")
                if isinstance(alt, dict) and isinstance(alt.get("properties"), dict):
                    properties.update(alt["properties"])
            if alternatives is not None or not isinstance(part, dict):
                continue
            if isinstance(part.get("properties"), dict):
                properties.update(part["properties"])
            if isinstance(part.get("required"), list):
                required += part["required"]
            for key, value in part.items():
                if key not in ("properties", "required", "$defs", "definitions"):
                    merged.setdefault(key, value)
        if properties:
            merged["properties"] = properties
            merged.setdefault("additionalProperties", False)
        if required:
            merged["required"] = required
        return merged

    def _deref(self, schema: Any, scope: _Scope, path: str) -> Any:
        for _ in range(MAX_NESTING):
            if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#")):
                return schema
            schema = scope.resolve(schema["$ref"], self, path)
        raise self.refuse(f"has a chain of more than {MAX_NESTING} $refs", scope, path)

    def _object(self, schema: dict, name: str, scope: _Scope, path: str) -> str:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise self.refuse("has properties that are not an object", scope, f"{path}/properties")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.refuse("has a required that is not a list of names", scope, f"{path}/required")
        kv: dict[str, str] = {}
        for key, subschema in properties.items():
            value = self._visit(subschema, f"{name}-{key}", scope, f"{path}/properties/{_pointer_part(key)}")
            kv[key] = self._add(f"{name}-{key}-kv", f"{gbnf_literal(json.dumps(key, ensure_ascii=False))} space "
                                                     f'":" space {value}', scope, path)
        needed = [k for k in properties if k in required]
        optional = [k for k in properties if k not in required]
        additional = schema.get("additionalProperties")
        if additional is True or isinstance(additional, dict):
            value = self._visit(additional if isinstance(additional, dict) else True, f"{name}-additional-value",
                                scope, f"{path}/additionalProperties")
            kv["*"] = self._add(f"{name}-additional-kv", f'{self._primitive("string")} ":" space {value}', scope, path)
            optional.append("*")

        rule = '"{" space ' + ' "," space '.join(kv[k] for k in needed)
        if optional:
            # Optional properties in their order, each one possibly left out: a chain of rules
            # where `k-rest` is what may follow property k.
            def chain(keys: list[str], first_optional: bool) -> str:
                key, rest = keys[0], keys[1:]
                if key == "*":
                    out = self._add(f"{name}-additional-kvs", f'{kv[key]} ( "," space {kv[key]} )*', scope, path)
                elif first_optional:
                    out = f'( "," space {kv[key]} )?'
                else:
                    out = kv[key]
                if rest:
                    out += " " + self._add(f"{name}-{key}-rest", chain(rest, True), scope, path)
                return out

            alternatives = " | ".join(chain(optional[i:], False) for i in range(len(optional)))
            rule += f' ( "," space ( {alternatives} ) )?' if needed else f" ( {alternatives} )?"
        return rule + ' "}" space'

    def _array(self, schema: dict, name: str, scope: _Scope, path: str) -> str:
        low = self._count(schema.get("minItems", 0), "minItems", scope, path) or 0
        high = self._count(schema.get("maxItems"), "maxItems", scope, path)
        self._order(low, high, "minItems", "maxItems", scope, path)
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if prefix is None and isinstance(items, list):  # draft 4-2019's tuple form
            prefix, items = items, schema.get("additionalItems")
        if prefix is not None:
            if not isinstance(prefix, list) or len(prefix) > MAX_REPEAT:
                raise self.refuse(f"has prefixItems that are not a list of at most {MAX_REPEAT}", scope, path)
            parts = [self._visit(s, f"{name}-tuple-{i}", scope, f"{path}/prefixItems/{i}") for i, s in enumerate(prefix)]
            body = ' "," space '.join(parts)
            if isinstance(items, dict) or items is True:
                # More items after the tuple, as far as maxItems lets them.
                more = self._visit(items, f"{name}-item", scope, f"{path}/items")
                extra_high = None if high is None else max(high - len(parts), 0)
                extra_low = max(low - len(parts), 0)
                if extra_high != 0:
                    repeated = self._repeat(f"({SEPARATOR} {more})", extra_low, extra_high, scope, path)
                    body = f"{body} {repeated}" if parts else self._repeat(more, extra_low, extra_high, scope, path,
                                                                           separator=SEPARATOR)
            return f'"[" space {body} "]" space'
        item = self._visit(items if items is not None else True, f"{name}-item", scope, f"{path}/items")
        return f'"[" space {self._repeat(item, low, high, scope, path, separator=SEPARATOR)} "]" space'


class _Scope:
    """One schema document: where its `$ref`s resolve, and the rules made for them."""

    def __init__(self, root: Any, where: str, name: str) -> None:
        self.root = root
        self.where = where
        self.prefix = "" if name == "root" else f"{name}-"
        self.refs: dict[str, str] = {}

    def resolve(self, ref: str, grammar: SchemaGrammar, path: str) -> Any:
        if ref != "#" and not ref.startswith("#/"):
            raise grammar.refuse(f"has a $ref that is not a JSON pointer: {_short(ref)}", self, path)
        target = self.root
        for part in ref[2:].split("/") if ref not in ("#", "#/") else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise grammar.refuse(f"has a $ref that points to nothing: {_short(ref)}", self, path)
        return target


class _Regex:
    """A JSON-schema `pattern` (an ECMA regex, anchored ^...$) as GBNF for the JSON string whose
    value matches it. Characters a JSON string must escape are written escaped."""

    def __init__(self, grammar: SchemaGrammar, pattern: Any, name: str, scope: _Scope, path: str) -> None:
        if not isinstance(pattern, str):
            raise grammar.refuse("has a pattern that is not a string", scope, path)
        if len(pattern) > MAX_PATTERN_CHARS:
            raise grammar.refuse(f"has a pattern longer than {MAX_PATTERN_CHARS} characters", scope, path)
        if not (pattern.startswith("^") and pattern.endswith("$")) or pattern.endswith("\\$") or len(pattern) < 2:
            raise grammar.refuse(f"has a pattern that is not anchored as ^...$: {_short(pattern)}", scope, path)
        self.grammar, self.name, self.scope, self.path = grammar, name, scope, path
        self.text = pattern[1:-1]
        self.i = 0
        self.groups = 0
        self.subrules = 0

    def rule(self) -> str:
        body = self._alternatives(0)
        if self.i < len(self.text):
            raise self._unsupported(f"an unbalanced ')' at {self.i}")
        return rf'"\"" ({body}) "\"" space'

    def _unsupported(self, what: str) -> InvalidParameterError:
        return self.grammar.refuse(f"has a pattern with {what}, which grammars do not support: "
                                   f"{_short('^' + self.text + '$')}", self.scope, self.path)

    def _alternatives(self, depth: int) -> str:
        out = [self._sequence(depth)]
        while self.i < len(self.text) and self.text[self.i] == "|":
            self.i += 1
            out.append(self._sequence(depth))
        return " | ".join(out)

    def _sequence(self, depth: int) -> str:
        items: list[tuple[str, str]] = []  # (kind, text): kind "lit" holds decoded characters
        while self.i < len(self.text) and self.text[self.i] not in "|)":
            atom = self._atom(depth)
            quantifier = self._quantifier()
            if quantifier is not None:
                atom = ("expr", self._repeated(atom, *quantifier))
            if atom[0] == "lit" and items and items[-1][0] == "lit":
                items[-1] = ("lit", items[-1][1] + atom[1])
            else:
                items.append(atom)
        if not items:
            return '""'
        return " ".join(_json_chars(t) if kind == "lit" else f"({t})" if kind == "group" else t for kind, t in items)

    def _repeated(self, atom: tuple[str, str], low: int, high: int | None) -> str:
        kind, text = atom
        if kind == "lit":
            item = _json_chars(text)
        elif kind == "group":
            self.subrules += 1
            item = self.grammar._add(f"{self.name}-{self.subrules}", text, self.scope, self.path)
        else:
            item = text
        return self.grammar._repeat(item, low, high, self.scope, self.path)

    def _atom(self, depth: int) -> tuple[str, str]:
        c = self.text[self.i]
        self.i += 1
        if c == "(":
            if depth >= MAX_REGEX_GROUPS:
                raise self._unsupported(f"groups nested deeper than {MAX_REGEX_GROUPS}")
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.text.startswith("?", self.i):
                raise self._unsupported("a lookaround or named group")
            body = self._alternatives(depth + 1)
            if self.i >= len(self.text) or self.text[self.i] != ")":
                raise self._unsupported("an unclosed '('")
            self.i += 1
            return ("group", body)
        if c == "[":
            return ("expr", self._class())
        if c == ".":
            return ("expr", self.grammar._primitive("dot"))
        if c == "\\":
            return self._escape(in_class=False)
        if c in "*+?{":
            raise self._unsupported(f"a quantifier {c!r} with nothing before it")
        if c in "^$":
            raise self._unsupported(f"an anchor {c!r} inside it")
        return ("lit", c)

    def _escape(self, *, in_class: bool) -> tuple[str, Any]:
        """("lit", characters), ("expr", GBNF) or, in a class, ("ranges", [(low, high), ...])."""
        if self.i >= len(self.text):
            raise self._unsupported("a trailing backslash")
        c = self.text[self.i]
        self.i += 1
        if c in "dDwWsS":
            ranges, negated = _SHORTHANDS[c.lower()], c.isupper()
            if in_class:
                if negated:
                    raise self._unsupported(f"\\{c} inside a class")
                return ("ranges", ranges)
            return ("expr", _char_class(ranges, negated=negated))
        if c in "xu":
            digits = 2 if c == "x" else 4
            code = self.text[self.i:self.i + digits]
            if not re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", code):
                raise self._unsupported(f"a malformed \\{c} escape")
            self.i += digits
            return ("lit", chr(int(code, 16)))
        simple = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
        if c in simple:
            return ("lit", simple[c])
        if c.isalnum():  # \b, \B, \1, \k, \p...: word boundaries, back-references, properties
            raise self._unsupported(f"the escape \\{c}")
        return ("lit", c)

    def _class(self) -> str:
        negated = self.text.startswith("^", self.i)
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(self.text):
                raise self._unsupported("an unclosed '['")
            c = self.text[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                kind, value = self._escape(in_class=True)
                if kind == "ranges":
                    ranges += value
                    continue
                c = value
            low = ord(c)
            if self.text.startswith("-", self.i) and not self.text.startswith("-]", self.i) and self.i + 1 < len(self.text):
                self.i += 1
                end = self.text[self.i]
                self.i += 1
                if end == "\\":
                    kind, value = self._escape(in_class=True)
                    if kind == "ranges":
                        raise self._unsupported("a range ending in a class escape")
                    end = value
                if ord(end) < low:
                    raise self._unsupported("a character range out of order")
                ranges.append((low, ord(end)))
            else:
                ranges.append((low, low))
        return _char_class(ranges, negated=negated)

    def _quantifier(self) -> tuple[int, int | None] | None:
        if self.i >= len(self.text):
            return None
        c = self.text[self.i]
        if c in "*+?":
            self.i += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            end = self.text.find("}", self.i)
            found = re.fullmatch(r"\s*([0-9]+)\s*(,\s*([0-9]*)\s*)?", self.text[self.i + 1:end], re.ASCII) if end > 0 else None
            if found is None:
                raise self._unsupported("a malformed {m,n} quantifier")
            self.i = end + 1
            low = int(found.group(1))
            high = low if found.group(2) is None else int(found.group(3)) if found.group(3) else None
            for count in (low, high):
                if count is not None and count > MAX_REPEAT:
                    raise self.grammar.refuse(f"repeats something {count} times, above the limit of {MAX_REPEAT} "
                                              "for grammar-constrained output (a regex {m,n})", self.scope, self.path)
            if high is not None and low > high:
                raise self._unsupported("a {m,n} quantifier with m above n")
            bounds = (low, high)
        else:
            return None
        if self.text.startswith("?", self.i):  # lazy: the same strings match
            self.i += 1
        return bounds


_SHORTHANDS = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
               "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x2028, 0x2029), (0xFEFF, 0xFEFF)]}


def _quantified(item: str, low: int, high: int | None) -> str:
    if high == 0:
        return ""
    if (low, high) == (0, 1):
        return f"{item}?"
    if high is None:
        return f"{item}*" if low == 0 else f"{item}+" if low == 1 else f"{item}{{{low},}}"
    if low == high:
        return item if low == 1 else f"{item}{{{low}}}"
    return f"{item}{{{low},{high}}}"


def _char_class(ranges: list[tuple[int, int]], *, negated: bool) -> str:
    """GBNF for one character of the class as a JSON string writes it: the characters JSON must
    escape (quote, backslash, controls) as their escapes, the others as they are."""
    merged = _merge(ranges)
    inside = [any(lo <= code <= hi for lo, hi in merged) for code in range(0x80)]
    unsafe = [code for lo, hi in _UNSAFE for code in range(lo, hi + 1)]
    escaped = [gbnf_literal(json.dumps(chr(code))[1:-1]) for code in unsafe if inside[code] != negated]
    if negated:
        raw = "[^" + "".join(_class_range(lo, hi) for lo, hi in _merge(ranges + list(_UNSAFE))) + "]"
    else:
        safe = [piece for span in merged for piece in _subtract(span, _UNSAFE)]
        raw = "[" + "".join(_class_range(lo, hi) for lo, hi in safe) + "]" if safe else ""
    parts = ([raw] if raw else []) + escaped
    if not parts:
        return '""'
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(span: tuple[int, int], cuts: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    pieces = [span]
    for cut_lo, cut_hi in cuts:
        pieces = [p for lo, hi in pieces for p in ((lo, min(hi, cut_lo - 1)), (max(lo, cut_hi + 1), hi)) if p[0] <= p[1]]
    return pieces


def _class_range(lo: int, hi: int) -> str:
    return _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"


def _class_char(code: int) -> str:
    if chr(code).isascii() and chr(code).isalnum():
        return chr(code)
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _json_chars(text: str) -> str:
    """GBNF literal for characters of a string's value, as JSON writes them inside the quotes."""
    return gbnf_literal(json.dumps(text, ensure_ascii=False)[1:-1])


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def check_schema_size(schema: Any, param: str, label: str = "the JSON schema") -> None:
    """The bounds a schema's JSON shows before conversion: an object, nested at most
    MAX_SCHEMA_DEPTH deep, at most about MAX_SCHEMA_CHARS long as JSON. Walked without recursion,
    holding one iterator per level, and stopped at the first bound passed."""
    if not isinstance(schema, dict):
        raise InvalidParameterError(f"{label} must be an object", param=param)
    size = 0
    stack = [iter(schema.items())]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        size += (len(key) + 4 if isinstance(key, str) else 1) + (
            len(value) + 2 if isinstance(value, str) else len(repr(value)) if isinstance(value, (int, float)) else 2)
        if size > MAX_SCHEMA_CHARS:
            raise InvalidParameterError(f"{label} is larger than {MAX_SCHEMA_CHARS} characters", param=param)
        if isinstance(value, (dict, list)):
            if len(stack) >= MAX_SCHEMA_DEPTH:
                raise InvalidParameterError(f"{label} nests deeper than {MAX_SCHEMA_DEPTH}", param=param)
            stack.append(iter(value.items()) if isinstance(value, dict) else iter((None, v) for v in value))


def json_schema_gbnf(schema: Any, *, param: str, label: str = "the JSON schema") -> str:
    """A whole grammar (rule `root`) for one JSON value valid under `schema`."""
    grammar = SchemaGrammar(param=param, label=label)
    root = grammar.add_schema(schema, "root")
    assert root == "root"
    return grammar.text()


def _pointer_part(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# `.`: any character but a line break (as ECMA's), written as JSON writes it inside a string.
PRIMITIVES["dot"] = (_char_class([(0x0A, 0x0A), (0x0D, 0x0D)], negated=True), ())
