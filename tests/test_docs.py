"""The documentation's command lines parse, and its links lead somewhere.

Every ``ovsam`` command line in ``README.md`` and ``docs/*.md`` is parsed with the real parser,
``jobs.cli.build_parser().parse_args(argv)``: nothing runs, nothing is stubbed, and a line naming an option or a
value the parser rejects fails with argparse's message and the file and line it came from. What counts:

- in fenced code blocks, every line whose command is ``ovsam`` (or a path ending in ``/ovsam``) or
  ``python -m jobs.NAME`` (also after ``ray job submit ... --``): lines ending in a backslash are joined with the
  next, ``# comments`` are dropped, and the line ends at the first shell operator (``|``, ``&&``, ``;``, ``&``,
  ``>``); ``python -m jobs.NAME ARGS`` is parsed as ``ovsam NAME ARGS``, the command it shares its options with;
- inline code spans that start with ``ovsam `` or ``python -m jobs.``: a span with arguments must parse like a
  line; a span of command words only (```ovsam annotate```, ```ovsam eval prompts```) names a command and must
  name one that exists;
- fenced blocks tagged ``synopsis`` hold templates (``[--opt X]``, ``A|B``, ``...``) and are not parsed: an
  indented line continues the one above, each entry's command must exist, and every option it names must be one
  of that command's options.

Building the parser imports neither torch nor Ray.
"""

from __future__ import annotations

import io
import re
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"}
COMMAND_WORD = re.compile(r"^[a-z][a-z0-9-]*$")
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")


@dataclass(frozen=True)
class DocCommand:
    path: str  # relative to the repository root
    line: int
    text: str
    kind: str  # "line" (fenced), "span" (inline code) or "synopsis"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _is_command(text: str) -> bool:
    words = text.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # FOO=1 ovsam ...
        words = words[1:]
    return bool(words) and (words[0] == "ovsam" or words[0].endswith("/ovsam") or "-m jobs." in text)


def collect(text: str, path: str) -> list[DocCommand]:
    """The command lines of one Markdown document (see the module docstring for what counts)."""
    found: list[DocCommand] = []
    lines = text.splitlines()
    fence: str | None = None
    tag = ""
    pending: tuple[int, str] | None = None  # a fenced line continued with a backslash
    prose: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        opening = FENCE.match(raw)
        if fence is None:
            if opening:
                fence, tag = opening.group(1), opening.group(2)
                _spans(prose, path, found)
                prose = []
            else:
                prose.append((number, raw))
            continue
        if raw.strip().startswith(fence[0] * len(fence)) and not raw.strip().strip(fence[0]):
            fence, pending = None, None
            continue
        if tag == "synopsis":
            if raw[:1].isspace() and found and found[-1].kind == "synopsis" and raw.strip():
                last = found.pop()
                found.append(DocCommand(last.path, last.line, f"{last.text} {raw.strip()}", "synopsis"))
            elif _is_command(raw):
                found.append(DocCommand(path, number, raw.strip(), "synopsis"))
            continue
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if pending is not None:
            start, line = pending[0], f"{pending[1]} {line}"
        else:
            start = number
        if line.endswith("\\"):
            pending = (start, line[:-1].rstrip())
            continue
        pending = None
        if _is_command(line):
            found.append(DocCommand(path, start, line, "line"))
    _spans(prose, path, found)
    return found


def _spans(prose: list[tuple[int, str]], path: str, found: list[DocCommand]) -> None:
    """Inline code spans of the prose between fences, paragraph by paragraph (a span may wrap a line)."""
    paragraph: list[tuple[int, str]] = []
    for item in [*prose, (0, "")]:
        if item[1].strip():
            paragraph.append(item)
            continue
        if paragraph:
            text = "\n".join(line for _, line in paragraph)
            for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.S):
                span = " ".join(m.group(2).split()).replace("\\|", "|")
                if span.startswith(("ovsam ", "python -m jobs.")):
                    line = paragraph[text.count("\n", 0, m.start())][0]
                    found.append(DocCommand(path, line, span, "span"))
        paragraph = []


@lru_cache(maxsize=1)
def _parser():
    from jobs.cli import build_parser

    return build_parser()


def _parse(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of parsing ``argv``; 0 when argparse accepts it (or prints help/version)."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            _parser().parse_args(argv)
        except SystemExit as e:
            code = e.code
    return (code if isinstance(code, int) else 0 if code is None else 2), out.getvalue(), err.getvalue()


def _argparse_message(err: str) -> str:
    errors = [line for line in err.splitlines() if ": error: " in line]
    return errors[-1] if errors else err.strip()


def _command_help(words: list[str]) -> str | None:
    """The help text of ``ovsam WORDS`` if WORDS name a command, else None."""
    code, out, _ = _parse([*words, "--help"])
    usage = re.escape(" ".join(["ovsam", *words]))
    return out if code == 0 and re.match(rf"usage: {usage}(\s|$)", out) else None


def _argv(text: str) -> list[str]:
    """The arguments after ``ovsam`` (or after ``python -m jobs.NAME``, as ``NAME ...``) of one command line."""
    tokens = shlex.split(text, comments=True)
    for i, token in enumerate(tokens):
        if token in SHELL_OPERATORS:
            tokens = tokens[:i]
            break
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # FOO=1 ovsam ...
        tokens = tokens[1:]
    if tokens and (tokens[0] == "ovsam" or tokens[0].endswith("/ovsam")):
        return tokens[1:]
    for i in range(len(tokens) - 2):
        if Path(tokens[i]).name.startswith("python") and tokens[i + 1] == "-m" and tokens[i + 2].startswith("jobs."):
            name = tokens[i + 2][len("jobs."):]
            module = sys.modules.get(f"jobs.{name}")
            if module is None or not hasattr(module, "main") or _command_help([name]) is None:
                raise ValueError(f"python -m jobs.{name}: no ovsam command shares its options with jobs.{name}")
            return [name, *tokens[i + 3:]]
    raise ValueError("no ovsam command in this line")


def _command_of(words: list[str]) -> tuple[list[str], str] | None:
    """The longest run of leading ``words`` that names a command, with its help text; None if the first word is
    meant as a command (lower case) and is none."""
    path = []
    for word in words:
        if not COMMAND_WORD.match(word):
            break
        path.append(word)
    help_text = _command_help(path)
    while help_text is None and path:  # trailing lower-case words may be positional values
        path.pop()
        help_text = _command_help(path)
    if help_text is None or (not path and words and COMMAND_WORD.match(words[0])):
        return None
    return path, help_text


def _unknown_options(words: list[str], options: list[str]) -> str:
    """``options`` that the command ``words`` start with does not have, as a sentence ('' if none)."""
    command = _command_of(words)
    if command is None:
        return ""
    path, help_text = command
    known = set(OPTION.findall(help_text))
    unknown = [opt for opt in options if opt not in known]
    return f"not options of `ovsam {' '.join(path)}`: {', '.join(unknown)}" if unknown else ""


def check(command: DocCommand) -> str | None:
    """None when ``command`` is right; else what is wrong, with argparse's message."""
    _parser()  # imports the jobs modules that `python -m jobs.NAME` lines refer to
    if command.kind == "synopsis":
        words = command.text.split()[1:]
        if _command_of(words) is None:
            return f"{command}\n    no such command"
        unknown = _unknown_options(words, OPTION.findall(command.text))
        return f"{command}\n    {unknown}" if unknown else None
    try:
        argv = _argv(command.text)
    except ValueError as e:
        return f"{command}\n    {e}"
    code, _, err = _parse(argv)
    if code == 0:
        return None
    if command.kind == "span" and argv and all(COMMAND_WORD.match(w) for w in argv) and _command_help(argv):
        return None  # `ovsam eval prompts` in prose: a command's name
    options = [arg.split("=", 1)[0] for arg in argv if OPTION.fullmatch(arg.split("=", 1)[0])]
    unknown = _unknown_options(argv, options)  # argparse names missing required options before unknown ones
    return f"{command}\n    {_argparse_message(err)}" + (f"\n    {unknown}" if unknown else "")


def all_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in doc_files():
        found.extend(collect(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    return found


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.path}:{c.line}" for c in COMMANDS])
def test_documented_command_parses(command: DocCommand) -> None:
    problem = check(command)
    assert problem is None, problem


def test_the_docs_hold_commands_of_every_kind() -> None:
    kinds = {(Path(c.path).name, c.kind) for c in COMMANDS}
    assert ("README.md", "line") in kinds and ("README.md", "span") in kinds
    assert ("cli.md", "synopsis") in kinds
    assert len([c for c in COMMANDS if c.kind == "line"]) >= 40


def test_a_wrong_command_is_reported() -> None:
    doc = "\n".join([
        "Run `ovsam annotate --input a/ --output b/ --no-such-flag` to see.",
        "",
        "```bash",
        "ovsam annotate --input a/ --output b/ \\",
        "    --prompts grid --points-per-side many   # a bad value",
        "python -m jobs.no_such_job --input a/",
        "ovsam export --format pdf --input out/ -o x.pdf | head",
        "```",
        "",
        "```synopsis",
        "ovsam train --dataset NAME=URL:KIND:WEIGHT",
        "    [--no-such-option N]",
        "ovsam nothing-here [--input URL]",
        "```",
    ])
    commands = collect(doc, "wrong.md")
    assert [(c.line, c.kind) for c in commands] == [(1, "span"), (4, "line"), (6, "line"), (7, "line"),
                                                    (11, "synopsis"), (13, "synopsis")]
    problems = [check(c) for c in commands]
    assert all(problems), [str(c) for c, p in zip(commands, problems) if p is None]
    assert "unrecognized arguments: --no-such-flag" in problems[0]
    assert "--points-per-side" in problems[1] and "wrong.md:4" in problems[1]
    assert "jobs.no_such_job" in problems[2]
    assert "invalid choice: 'pdf'" in problems[3]
    assert "--no-such-option" in problems[4]
    assert "no such command" in problems[5]
    span = collect("`ovsam no-such-command`", "wrong.md")
    assert check(span[0]) is not None
    # argparse reports missing required options first; the unknown one is named too
    bare = collect("```\novsam annotate --no-such-flag\n```", "wrong.md")
    assert "not options of `ovsam annotate`: --no-such-flag" in check(bare[0])


def test_right_commands_pass() -> None:
    doc = "\n".join([
        "`ovsam annotate` and `ovsam eval prompts` name commands; `ovsam.build_ovsam` is Python.",
        "```bash",
        "FOO=1 ovsam models | head -1",
        "ray job submit --working-dir . -- python -m jobs.annotate --input s3://b/x/ --output s3://b/y/  # note",
        "```",
    ])
    commands = collect(doc, "right.md")
    assert [c.kind for c in commands] == ["span", "span", "line", "line"]
    assert [check(c) for c in commands] == [None] * 4


# Links: every relative link of README.md and docs/*.md points at a file that exists, and an #anchor at one of
# its headings (GitHub's rule: lower case, punctuation dropped, spaces to hyphens).

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchor, n = slug, 1
            while anchor in anchors:
                anchor, n = f"{slug}-{n}", n + 1
            anchors.add(anchor)
    return anchors


def test_relative_links_resolve() -> None:
    broken = []
    for doc in doc_files():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (doc.parent / file_part).resolve() if file_part else doc
                where = f"{doc.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)
