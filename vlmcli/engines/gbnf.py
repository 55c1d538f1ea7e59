"""GBNF (llama.cpp's grammar format) in pure Python: a parser, a recognizer that follows generated
bytes as llama.cpp's grammar sampler does, and the shortest way to finish a partial answer.

llama.cpp's grammar sampler decides which tokens may come next, but it cannot say how far an answer is
from its end. The engine needs that to close a constrained answer inside its token budget (a JSON
string left open at --max-tokens does not parse): `Recognizer` tracks the same pushdown stacks as
llama-grammar.cpp (the same parse, the same repetition rewrites, the same UTF-8 decoding) and
`completion` gives the shortest bytes that complete the grammar from a state. Token elements
(`<token>`, `!<token>`) are not supported here: grammars with them are sampled without closing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field

# An element of an alternative: a character class, a rule reference, or any character.
# ("chars", ((lo, hi), ...), negated) | ("rule", rule index) | ("any",)
Element = tuple
Position = tuple[int, int]  # (alternative id, index of the element still to match)
Stack = tuple[Position, ...]  # bottom first; every position points at an element not yet matched

MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_MAX_EXPANSION = 4096  # stacks one step may produce: past it the grammar is too ambiguous to follow here
_PREFERRED = (ord("a"), ord("0"), ord(" "))  # filler characters, when a class allows them
# Following a grammar costs each token a check against the alternatives in play: 50,000 of them took
# minutes per answer (as an enum of 100,000 values did; json_schema.py bounds those likewise).
MAX_ALTERNATIVES = 4096
# Each answer's setup parses the grammar and searches it for the shortest ways to finish: in time
# linear in its text, which this bounds (a schema's length bounds on a few hundred properties write megabytes).
MAX_GRAMMAR_CHARS = 262_144


class GrammarError(ValueError):
    """A grammar this module cannot parse or follow (the message says where)."""


@dataclass(frozen=True)
class State:
    stacks: frozenset[Stack]
    partial_value: int = 0  # an incomplete UTF-8 sequence: its value so far and bytes still to come
    partial_remain: int = 0

    @property
    def complete(self) -> bool:
        return () in self.stacks and self.partial_remain == 0


class Grammar:
    """A parsed grammar: rules of alternatives, every alternative a tuple of elements."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.rules: list[list[int] | None] = []  # rule index -> alternative ids
        self.alts: list[tuple[Element, ...]] = []
        self._min: list[tuple[float, int]] = []
        self._shortest_rule: dict[int, str] = {}
        self._suffix: dict[Position, str] = {}

    # -- parsing (llama-grammar.cpp's parser, line for line where it matters) ------------------

    @classmethod
    def parse(cls, text: str, root: str = "root") -> Grammar:
        if len(text) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is {len(text):,} characters, more than {MAX_GRAMMAR_CHARS:,}")
        g = cls()
        p = _Parser(text, g)
        p.parse()
        for name, index in g.names.items():
            if g.rules[index] is None:
                raise GrammarError(f"rule {name!r} is used but not defined")
        if root not in g.names:
            raise GrammarError(f"the grammar has no rule {root!r}")
        g.root = g.names[root]
        g._compute_shortest()
        return g

    root: int = 0

    def symbol(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = len(self.rules)
            self.rules.append(None)
        return self.names[name]

    def generated(self, base: str) -> int:
        index = len(self.rules)
        self.names[f"{base}_{index}"] = index
        self.rules.append(None)
        return index

    def define(self, index: int, alternatives: list[list[Element]]) -> None:
        ids = []
        for alt in alternatives:
            ids.append(len(self.alts))
            self.alts.append(tuple(alt))
        self.rules[index] = ids

    # -- shortest derivations ------------------------------------------------------------------

    def _compute_shortest(self) -> None:
        """(length, height) of each rule's shortest string: a fixpoint; height breaks ties so that
        building the string always reaches terminals."""
        inf = (float("inf"), 0)
        best = [inf] * len(self.rules)
        users: list[set[int]] = [set() for _ in self.rules]  # rule -> the rules whose alternatives use it
        for r, alts in enumerate(self.rules):
            assert alts is not None
            for a in alts:
                for el in self.alts[a]:
                    if el[0] == "rule":
                        users[el[1]].add(r)
        # A first-in first-out worklist, not sweeps over every rule until none changes: nested groups (a
        # schema's maxLength of N is N groups deep) took one sweep per level. First-in first-out: a rule
        # of thousands of alternatives is evaluated again once per round, not once per alternative.
        todo = collections.deque(range(len(self.rules)))
        queued = [True] * len(self.rules)
        while todo:
            r = todo.popleft()
            queued[r] = False
            cost = min((self._alt_cost(a, 0, best) for a in self.rules[r] or ()), default=inf)
            if cost < best[r]:
                best[r] = cost
                for u in users[r]:
                    if not queued[u]:
                        queued[u] = True
                        todo.append(u)
        self._min = best
        if best[self.root][0] == float("inf"):
            raise GrammarError("the root rule derives no finite string")

    def _alt_cost(self, alt: int, start: int, best: list[tuple[float, int]]) -> tuple[float, int]:
        length, height = 0.0, 0
        for el in self.alts[alt][start:]:
            if el[0] == "rule":
                sub = best[el[1]]
                length += sub[0]
                height = max(height, sub[1] + 1)
            else:
                length += 1
        return length, height

    def can_finish(self, pos: Position) -> bool:
        """Whether the rest of an alternative from pos derives a finite string."""
        return self._alt_cost(pos[0], pos[1], self._min)[0] != float("inf")

    def shortest_rule(self, r: int) -> str:
        """Built innermost rule first from a list of rules still to build, not by recursion: a grammar
        may nest thousands of groups. The shortest alternative's rules are lower (its height), so
        every rule on the list is built once its own are."""
        todo = [r]
        while todo:
            q = todo[-1]
            if q in self._shortest_rule:
                todo.pop()
                continue
            alts = self.rules[q]
            assert alts is not None
            if self._min[q][0] == float("inf"):  # only reached from a stack _shortest skips; never loop on it
                raise GrammarError("a rule of the grammar derives no finite string")
            a = min(alts, key=lambda a: self._alt_cost(a, 0, self._min))
            needed = [el[1] for el in self.alts[a] if el[0] == "rule" and el[1] not in self._shortest_rule]
            if needed:
                todo.extend(needed)
                continue
            self._shortest_rule[q] = self.shortest_suffix((a, 0))
            todo.pop()
        return self._shortest_rule[r]

    def shortest_suffix(self, pos: Position) -> str:
        if pos not in self._suffix:
            alt, i = pos
            out = []
            for el in self.alts[alt][i:]:
                out.append(self.shortest_rule(el[1]) if el[0] == "rule" else chr(_filler(el)))
            self._suffix[pos] = "".join(out)
        return self._suffix[pos]


def _filler(el: Element, lo: int = 0, hi: int = 0x10FFFF) -> int:
    """The character a completion writes for a character element (within lo..hi), or -1."""
    for c in _PREFERRED:
        if lo <= c <= hi and _matches(el, c):
            return c
    if el[0] == "any":
        return max(lo, 0x20) if max(lo, 0x20) <= hi else lo
    _, ranges, negated = el
    if not negated:
        starts = [max(a, lo) for a, b in ranges if max(a, lo) <= min(b, hi)]
        return min(starts) if starts else -1
    c = max(lo, 0x20) if lo <= 0x20 <= hi else lo
    while c <= hi:
        hit = next((b for a, b in ranges if a <= c <= b), None)
        if hit is None:
            return c
        c = hit + 1
    return -1


def _matches(el: Element, c: int) -> bool:
    if el[0] == "any":
        return True
    _, ranges, negated = el
    return any(a <= c <= b for a, b in ranges) != negated


@dataclass
class _Group:
    """A rule, or a group in parentheses, being read: its alternatives so far and the sequence open."""

    index: int
    nested: bool  # inside parentheses: newlines are spaces
    alts: list[list[Element]] = field(default_factory=list)
    seq: list[Element] = field(default_factory=list)
    last: int = 0  # where the sequence's last item starts (what a repetition applies to)


class _Parser:
    def __init__(self, text: str, grammar: Grammar):
        self.s = text
        self.i = 0
        self.g = grammar

    def error(self, what: str) -> GrammarError:
        line = self.s.count("\n", 0, self.i) + 1
        return GrammarError(f"{what} at line {line}: {self.s[self.i : self.i + 20]!r}")

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def space(self, newline_ok: bool) -> None:
        while True:
            c = self.peek()
            if c == "#":
                while self.peek() not in ("", "\r", "\n"):
                    self.i += 1
            elif c in (" ", "\t") or (newline_ok and c in ("\r", "\n")):
                self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.peek() and (self.peek().isascii() and (self.peek().isalnum() or self.peek() == "-")):
            self.i += 1
        if self.i == start:
            raise self.error("expecting a name")
        return self.s[start : self.i]

    def parse(self) -> None:
        self.space(True)
        while self.i < len(self.s):
            name = self.name()
            self.space(False)
            if self.s[self.i : self.i + 3] != "::=":
                raise self.error("expecting ::=")
            self.i += 3
            self.space(True)
            index = self.g.symbol(name)
            if self.g.rules[index] is not None:
                raise self.error(f"rule {name!r} defined twice")
            self.alternates(name, index, nested=False)
            c = self.peek()
            if c == "\r":
                self.i += 2 if self.peek(1) == "\n" else 1
            elif c == "\n":
                self.i += 1
            elif c:
                raise self.error("expecting newline or end")
            self.space(True)

    def alternates(self, name: str, index: int, nested: bool) -> None:
        """A rule's alternatives. A group in parentheses becomes a generated rule; open groups are kept
        on a list here, not in Python's recursion (a schema's maxLength of 4,096 nests 4,096 deep)."""
        groups = [_Group(index, nested)]
        while True:
            group = groups[-1]
            if self.sequence(name, group):  # stopped at "(": the group it opens comes first
                groups.append(_Group(self.g.generated(name), True))
                continue
            group.alts.append(group.seq)
            if len(group.alts) > MAX_ALTERNATIVES:
                raise self.error(f"more than {MAX_ALTERNATIVES:,} alternatives in one rule")
            group.seq, group.last = [], 0
            if self.peek() == "|":
                self.i += 1
                self.space(True)
                continue
            self.g.define(group.index, group.alts)
            groups.pop()
            if not groups:
                return
            if self.peek() != ")":
                raise self.error("expecting ')'")
            self.i += 1
            outer = groups[-1]
            outer.last = len(outer.seq)
            outer.seq.append(("rule", group.index))
            self.space(outer.nested)

    def char(self) -> int:
        c = self.peek()
        if c == "\\":
            e = self.peek(1)
            sizes = {"x": 2, "u": 4, "U": 8}
            if e in sizes:
                digits = self.s[self.i + 2 : self.i + 2 + sizes[e]]
                if len(digits) != sizes[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(f"expecting {sizes[e]} hex digits")
                self.i += 2 + sizes[e]
                if int(digits, 16) > 0x10FFFF:
                    raise self.error("not a Unicode code point")
                return int(digits, 16)
            simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
            if e not in simple:
                raise self.error("unknown escape")
            self.i += 2
            return simple[e]
        if not c:
            raise self.error("unexpected end of input")
        self.i += 1
        return ord(c)

    def sequence(self, name: str, group: _Group) -> bool:
        """Reads the group's current sequence on; True when it stops at a "(" (the group it opens is
        read next, then this sequence goes on), False at its end."""
        seq, last, nested = group.seq, group.last, group.nested
        while self.i < len(self.s):
            c = self.peek()
            if c == '"':
                self.i += 1
                last = len(seq)
                while self.peek() != '"':
                    ch = self.char()
                    seq.append(("chars", ((ch, ch),), False))
                self.i += 1
                self.space(nested)
            elif c == "[":
                self.i += 1
                negated = self.peek() == "^"
                if negated:
                    self.i += 1
                ranges = []
                while self.peek() != "]":
                    first = self.char()
                    last_char = first
                    if self.peek() == "-" and self.peek(1) != "]":
                        if not self.peek(1):
                            raise self.error("unexpected end of input")
                        self.i += 1
                        last_char = self.char()
                    ranges.append((first, last_char))
                if not negated and not any(a <= b for a, b in ranges):  # [] or [z-a]: nothing can follow it
                    raise self.error("a character class that matches no character")
                self.i += 1
                last = len(seq)
                seq.append(("chars", tuple(ranges), negated))
                self.space(nested)
            elif c in ("<", "!"):
                raise self.error("token elements are not supported for closing")
            elif c.isascii() and (c.isalnum() or c == "-"):
                ref = self.g.symbol(self.name())
                self.space(nested)
                last = len(seq)
                seq.append(("rule", ref))
            elif c == "(":
                self.i += 1
                self.space(True)
                group.seq, group.last = seq, last
                return True
            elif c == ".":
                self.i += 1
                last = len(seq)
                seq.append(("any",))
                self.space(nested)
            elif c in "*+?":
                self.i += 1
                self.space(nested)
                seq = self.repeat(name, seq, last, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
            elif c == "{":
                self.i += 1
                self.space(nested)
                lo = self.integer()
                self.space(nested)
                hi: int | None = lo
                if self.peek() == "}":
                    pass
                elif self.peek() == ",":
                    self.i += 1
                    self.space(nested)
                    hi = self.integer() if self.peek().isdigit() else None
                    self.space(nested)
                    if self.peek() != "}":
                        raise self.error("expecting '}'")
                else:
                    raise self.error("expecting ','")
                self.i += 1
                self.space(nested)
                if lo > MAX_REPETITION:
                    raise self.error("too many repetitions")
                if hi is not None and hi > MAX_REPETITION:
                    hi = None
                seq = self.repeat(name, seq, last, lo, hi)
            else:
                break
        group.seq, group.last = seq, last
        return False

    def integer(self) -> int:
        start = self.i
        while self.peek().isdigit():
            self.i += 1
        if self.i == start:
            raise self.error("expecting an integer")
        return int(self.s[start : self.i])

    def repeat(self, name: str, seq: list[Element], last: int, lo: int, hi: int | None) -> list[Element]:
        """S{lo,hi} as llama.cpp rewrites it: S lo times, then nested optional rules (or one recursive one)."""
        if last == len(seq):
            raise self.error("expecting an item before the repetition")
        item = seq[last:]
        out = seq[:last] + item * lo
        n_opt = 1 if hi is None else hi - lo
        previous = -1
        for k in range(n_opt):
            rule = self.g.generated(name)
            body = list(item)
            if hi is None:
                body.append(("rule", rule))
            elif k > 0:
                body.append(("rule", previous))
            self.g.define(rule, [body, []])
            previous = rule
        if n_opt > 0:
            out.append(("rule", previous))
        return out


class Recognizer:
    """Follows bytes through a grammar as llama.cpp's sampler does; states are immutable values."""

    def __init__(self, grammar: Grammar):
        self.g = grammar

    def initial(self) -> State:
        root_alts = self.g.rules[self.g.root]
        assert root_alts is not None
        stacks: set[Stack] = set()
        for a in root_alts:
            stacks.update(self._expand(((a, 0),) if self.g.alts[a] else ()))
        return State(frozenset(stacks))

    def _expand(self, stack: Stack, depth: int = 0) -> Iterator[Stack]:
        """`stack` advanced until its top is a character element (or it is empty: the grammar is done)."""
        if not stack:
            yield stack
            return
        if depth > 500:
            raise GrammarError("the grammar recurses without consuming input (left recursion)")
        alt, i = stack[-1]
        el = self.g.alts[alt][i]
        if el[0] != "rule":
            yield stack
            return
        rest = stack[:-1] + ((alt, i + 1),) if i + 1 < len(self.g.alts[alt]) else stack[:-1]
        alts = self.g.rules[el[1]]
        assert alts is not None
        for a in alts:
            yield from self._expand(rest + ((a, 0),) if self.g.alts[a] else rest, depth + 1)

    def _step(self, stacks: frozenset[Stack], c: int) -> frozenset[Stack]:
        out: set[Stack] = set()
        for stack in stacks:
            if not stack:
                continue
            alt, i = stack[-1]
            if not _matches(self.g.alts[alt][i], c):
                continue
            rest = stack[:-1] + ((alt, i + 1),) if i + 1 < len(self.g.alts[alt]) else stack[:-1]
            out.update(self._expand(rest))
            if len(out) > _MAX_EXPANSION:
                raise GrammarError("the grammar is too ambiguous to follow")
        return frozenset(out)

    def advance(self, state: State, data: bytes) -> State | None:
        """The state after `data`, or None when the grammar does not allow it (llama.cpp's UTF-8 decoding)."""
        stacks, value, remain = state.stacks, state.partial_value, state.partial_remain
        pos = 0
        while pos < len(data) and remain > 0:
            b = data[pos]
            if b >> 6 != 2:
                return None
            value = (value << 6) + (b & 0x3F)
            pos += 1
            remain -= 1
            if remain == 0:
                stacks = self._step(stacks, value)
                if not stacks:
                    return None
        while pos < len(data):
            first = data[pos]
            remain = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)[first >> 4] - 1
            if remain < 0:
                return None
            value = first & ((1 << (7 - remain)) - 1)
            pos += 1
            while pos < len(data) and remain > 0:
                value = (value << 6) + (data[pos] & 0x3F)
                pos += 1
                remain -= 1
            if remain == 0:
                if value == 0:
                    return None  # llama.cpp reads a 0 code point as the end of the piece
                stacks = self._step(stacks, value)
                if not stacks:
                    return None
        if remain > 0 and not any(stack and self._partial_ok(stack, value, remain) for stack in stacks):
            return None
        return State(stacks, value if remain else 0, remain)

    def _partial_ok(self, stack: Stack, value: int, remain: int) -> bool:
        alt, i = stack[-1]
        lo = value << (6 * remain)
        return _filler(self.g.alts[alt][i], lo, lo + (1 << (6 * remain)) - 1) >= 0

    def completion(self, state: State) -> bytes | None:
        """The shortest bytes that complete the grammar from `state` (b"" when it is complete)."""
        prefix = b""
        stacks = state.stacks
        if state.partial_remain:
            remain = state.partial_remain
            lo = state.partial_value << (6 * remain)
            hi = lo + (1 << (6 * remain)) - 1
            best: tuple[int, bytes, frozenset[Stack]] | None = None
            for stack in stacks:
                if not stack:
                    continue
                alt, i = stack[-1]
                c = _filler(self.g.alts[alt][i], lo, hi)
                if c < 0:
                    continue
                after = self._step(stacks, c)
                rest = self._shortest(after)
                if rest is not None and (best is None or len(rest) < best[0]):
                    tail = bytes(0x80 | ((c >> (6 * k)) & 0x3F) for k in reversed(range(remain)))
                    best = (len(rest), tail, after)
            if best is None:
                return None
            prefix, stacks = best[1], best[2]
        rest = self._shortest(stacks)
        return None if rest is None else prefix + rest.encode("utf-8", "surrogatepass")

    def _shortest(self, stacks: frozenset[Stack]) -> str | None:
        if () in stacks:
            return ""
        best: str | None = None
        for stack in stacks:
            # a stack inside a rule that can never end (x ::= "b" x) has no completion: skip it
            if not all(self.g.can_finish(p) for p in stack):
                continue
            text = "".join(self.g.shortest_suffix(p) for p in reversed(stack))
            if best is None or len(text) < len(best):
                best = text
        return best
