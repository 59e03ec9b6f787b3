""".dockerignore matching (fs/ignore.py) against an independent model.

The model is written here from moby/patternmatcher's documented behaviour
(the matcher ``docker build`` and BuildKit use), not from our regex
translation: a backtracking matcher over pattern tokens with Go
``filepath.Match`` meanings (``*`` and ``?`` stop at ``/``, ``[...]`` classes
with ``^`` negation and ranges, ``\\`` escapes) plus patternmatcher's own rules:

* ``**`` at the end matches anything, ``**`` (or ``**/``) elsewhere matches
  nothing or anything ending in ``/``;
* a pattern that starts with ``**`` and is literal after it is a plain suffix
  test (so ``**a`` matches ``xa``, not only ``a`` or ``x/a``);
* a negated class is a Go regexp class, so it also matches ``/``;
* a path is excluded when the last pattern matching it or one of its parent
  directories is not an ``!`` exception.

Subset (documented gaps): escapes only of punctuation (patternmatcher hands
``\\a`` to Go's regexp, where it is a bell character), no ``^`` outside a
class (Go's regexp reads it as an anchor), no newline in names.
"""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ociworker.errors import DockerfileError
from ociworker.fs.ignore import IgnoreMatcher

pytestmark = pytest.mark.stress

Token = tuple[str, ...]


def tokens(pattern: str) -> list[Token]:
    out: list[Token] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*" and i < n and pattern[i] == "*":
            i += 1
            if i < n and pattern[i] == "/":
                i += 1
            out.append(("anything",) if i >= n else ("dirs",))
        elif ch == "*":
            out.append(("star",))
        elif ch == "?":
            out.append(("one",))
        elif ch == "\\":
            out.append(("lit", pattern[i]))
            i += 1
        elif ch == "[":
            negated = pattern[i] == "^"
            if negated:
                i += 1
            items: list[str] = []
            while pattern[i] != "]" or not items:
                lo = pattern[i + 1] if pattern[i] == "\\" else pattern[i]
                i += 2 if pattern[i] == "\\" else 1
                hi = lo
                if pattern[i] == "-":
                    hi = pattern[i + 2] if pattern[i + 1] == "\\" else pattern[i + 1]
                    i += 3 if pattern[i + 1] == "\\" else 2
                items.append(lo + hi)
            i += 1
            out.append(("class", "^" if negated else "", *items))
        else:
            out.append(("lit", ch))
    return out


def pattern_matches(pattern: str, path: str) -> bool:
    toks = tokens(pattern)
    literal_rest = all(t[0] == "lit" for t in toks[1:]) and "\\" not in pattern
    if toks and toks[0] == ("dirs",) and literal_rest:
        # patternmatcher's suffixMatch: the text after "**", as a string suffix
        # (an escape anywhere makes it a regexp match instead)
        suffix = pattern[2:]
        return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])

    @cache
    def m(ti: int, si: int) -> bool:
        if ti == len(toks):
            return si == len(path)
        kind = toks[ti][0]
        rest = path[si:]
        if kind == "lit":
            return rest[:1] == toks[ti][1] and m(ti + 1, si + 1)
        if kind == "one":
            return rest[:1] not in ("", "/") and m(ti + 1, si + 1)
        if kind == "class":
            if not rest:
                return False
            inside = any(lo <= rest[0] <= hi for lo, hi in toks[ti][2:])
            return inside != (toks[ti][1] == "^") and m(ti + 1, si + 1)
        if kind == "star":
            end = si
            while True:
                if m(ti + 1, end):
                    return True
                if end == len(path) or path[end] == "/":
                    return False
                end += 1
        if kind == "anything":
            return True
        # "dirs": nothing, or anything up to and including some "/"
        return m(ti + 1, si) or any(
            path[j] == "/" and m(ti + 1, j + 1) for j in range(si, len(path))
        )

    return m(0, 0)


def model_excluded(patterns: list[str], path: str) -> bool:
    parts = path.split("/")
    ancestors = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    matched = False
    for raw in patterns:
        exclusion = raw.startswith("!")
        pattern = raw[1:] if exclusion else raw
        if exclusion != matched:
            continue
        if pattern_matches(pattern, path) or any(pattern_matches(pattern, a) for a in ancestors):
            matched = not exclusion
    return matched


CLASS_CHARS = "ab.*?-"


@st.composite
def klass(draw: st.DrawFn) -> str:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            items.append(draw(st.sampled_from(["a-b", "a-z", "*-b", ".-a"])))
        else:
            ch = draw(st.sampled_from("ab.*?]-\\"))
            items.append("\\" + ch if ch in "]-\\" else ch)
    return "[" + draw(st.sampled_from(["", "^"])) + "".join(items) + "]"


@st.composite
def segment(draw: st.DrawFn) -> str:
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["a", "b", ".", "ab", "*", "?", "**", "\\*", "\\?", "\\[", "\\."]),
                klass(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    seg = "".join(parts)
    return "x" if seg in (".", "..") else seg


@st.composite
def pattern(draw: st.DrawFn) -> str:
    text = "/".join(draw(st.lists(segment(), min_size=1, max_size=3)))
    return ("!" if draw(st.booleans()) else "") + text


PATH_SEGMENT = st.text(alphabet="ab.*?[]\\-", min_size=1, max_size=4).filter(
    lambda s: s not in (".", "..")
)
PATHS = st.lists(PATH_SEGMENT, min_size=1, max_size=4).map("/".join)


@st.composite
def instance(draw: st.DrawFn, pattern: str) -> str:
    """A path made to fit ``pattern`` (then maybe spoilt), so that the
    comparison is not almost always between two "no"s."""
    out: list[str] = []
    for tok in tokens(pattern.lstrip("!")):
        kind = tok[0]
        if kind == "lit":
            out.append(tok[1])
        elif kind == "one":
            out.append(draw(st.sampled_from("ab.")))
        elif kind == "star":
            out.append(draw(st.text(alphabet="ab.", max_size=2)))
        elif kind == "class":
            out.append("z" if tok[1] else draw(st.sampled_from(tok[2:]))[0])
        elif kind == "dirs":
            out.append(draw(st.sampled_from(["", "a/", "a/b/", "b"])))
        else:
            out.append(draw(st.sampled_from(["", "a", "/a", "a/b"])))
    path = "".join(out)
    if draw(st.booleans()):
        path = path + draw(st.sampled_from(["/c", "c", ""]))
    if path and draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, len(path) - 1))
        path = path[:i] + path[i + 1 :]
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "a"


@st.composite
def patterns_and_paths(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    patterns = draw(st.lists(pattern(), min_size=1, max_size=4))
    paths = draw(st.lists(PATHS, max_size=3))
    for p in patterns:
        paths += draw(st.lists(instance(p), min_size=1, max_size=3))
    return patterns, paths


@given(patterns_and_paths())
@example((["**a"], ["xa", "b/xa", "a"]))
@example((["a[^b]c"], ["a/c"]))
@example((["**/a", "!b/a"], ["a", "b/a", "c/b/a"]))
# a model bug the long run found: an escape after a leading "**" makes a regexp,
# not patternmatcher's plain suffix test
@example((["**\\."], ["a.", "a\\.", "b/c."]))
@example((["*/*?[aa]", "**\\*"], ["aa", "*"]))
def test_excluded_matches_the_model(case: tuple[list[str], list[str]]) -> None:
    patterns, paths = case
    matcher = IgnoreMatcher(patterns)
    for path in paths:
        assert matcher.excluded(path) == model_excluded(patterns, path), (patterns, path)


@given(patterns_and_paths(), st.lists(PATHS, max_size=4))
def test_a_skipped_directory_holds_only_excluded_paths(
    case: tuple[list[str], list[str]], below: list[str]
) -> None:
    # can_skip_dir lets the context walker skip a whole directory; it may say
    # no too often, never yes when something below would be sent. The paths
    # below are the other generated paths plus random ones.
    patterns, dirs = case
    matcher = IgnoreMatcher(patterns)
    for directory in dirs:
        if not matcher.can_skip_dir(directory):
            continue
        for rel in below + dirs:
            assert model_excluded(patterns, directory + "/" + rel), (patterns, directory, rel)


@given(st.lists(st.text(alphabet="ab*?[]^-\\/.! \t", max_size=12), max_size=4), PATHS)
@example(["["], "a")
@example(["a\\"], "a")
@example(["[]a]"], "a")
@example(["!"], "a")
# found by this test: a reversed range passed our check and reached re.compile,
# which raised re.error (a traceback) instead of DockerfileError
@example(["[?-/]"], "?")
def test_any_pattern_is_accepted_or_refused_with_our_error(patterns: list[str], path: str) -> None:
    try:
        matcher = IgnoreMatcher(patterns)
    except DockerfileError:
        return
    assert isinstance(matcher.excluded(path), bool)
    assert isinstance(matcher.can_skip_dir(path), bool)
