"""famfind's built-in proxies (:mod:`famfind.proxies`): where a position sits in the text's
own structure, read with standard parsers where they exist.

- Python code (documents of kind ``code``), with the standard ``tokenize`` module (and
  ``ast`` for docstrings): ``py_comment``, ``py_string`` (string literals that are not
  docstrings), ``py_docstring``, ``py_brackets`` (inside ``()[]{}``), ``py_indented``
  (inside an indented block). A document ``tokenize`` cannot read (an unterminated string or
  bracket, e.g. a document cut by the end of the corpus) is unparsed for all five.
- Markup (prose documents): ``code_block`` (reST literal blocks after ``::``, code
  directives, doctest blocks; Markdown fenced/indented code), ``inline_literal`` (reST
  double backquotes, Markdown backquotes), ``rst_directive`` (a ``.. name::`` block),
  ``heading``, ``list_item``, ``table`` (reST grid/simple tables and table directives;
  Markdown tables). Markdown is parsed with ``markdown-it-py`` (CommonMark + tables; line
  maps); reST with line rules, because docutils reports no character offsets and rejects
  Sphinx's directives and roles.
- Prose: ``in_quotes`` (inside "..." or curly quotes on one line), ``in_parens`` (inside
  ``( )``), ``in_brackets`` (inside ``( ) [ ] { }``), ``sentence_start`` (the first word of
  a sentence).
- Document (high-level context): ``doc_code`` / ``doc_prose`` (the document's kind),
  ``doc_start`` (its first 64 tokens).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

import numpy as np

from famfind.proxies import Document, Proxy

# --- Python ---------------------------------------------------------------------------------


def _py_tokens(doc: Document) -> list[tokenize.TokenInfo]:
    """The document's Python tokens (cached on the document); raises when ``tokenize``
    cannot read it or it has an unterminated string."""
    if "py_tokens" not in doc.cache:
        try:
            toks = list(tokenize.generate_tokens(io.StringIO(doc.text).readline))
        except (tokenize.TokenError, SyntaxError) as e:
            doc.cache["py_tokens"] = e
        else:
            bad = [t for t in toks if t.type == tokenize.ERRORTOKEN and t.string.strip() and t.string[0] in "'\""]
            doc.cache["py_tokens"] = SyntaxError(f"unterminated string at line {bad[0].start[0]}") if bad else toks
    out = doc.cache["py_tokens"]
    if isinstance(out, Exception):
        raise out
    return out


def _offset(doc: Document, rowcol: tuple[int, int]) -> int:
    """Character offset of a ``tokenize`` ``(row, col)`` (row 1-based, col in characters)."""
    if "line_starts" not in doc.cache:
        doc.cache["line_starts"] = doc.line_starts()
    ls = doc.cache["line_starts"]
    row, col = rowcol
    return int(ls[row - 1]) + col if row - 1 < ls.size else len(doc.text)


def _span(doc: Document, t: tokenize.TokenInfo) -> tuple[int, int]:
    return _offset(doc, t.start), _offset(doc, t.end)


def _docstring_starts(doc: Document) -> set[tuple[int, int]]:
    """``(row, char col)`` of each docstring (the first statement of a module, class or
    function when it is a string), from :mod:`ast` (whose columns are UTF-8 bytes)."""
    tree = ast.parse(doc.text)
    lines = doc.text.split("\n")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                line = lines[first.lineno - 1]
                out.add((first.lineno, len(line.encode()[:first.col_offset].decode(errors="ignore"))))
    return out


class _Python(Proxy):
    kinds = ("code",)

    def mark(self, doc: Document) -> np.ndarray:
        return doc.mask_spans(self.spans(doc, _py_tokens(doc)))


class PyComment(_Python):
    id = "py_comment"
    description = "inside a Python # comment (tokenize COMMENT)"

    def spans(self, doc, toks):
        return [_span(doc, t) for t in toks if t.type == tokenize.COMMENT]


def _string_spans(doc: Document, toks) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(start, end)`` row/col of each string literal (f-strings on 3.12+ are one span)."""
    out, fstart = [], None
    fs, fe = getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "FSTRING_END", -1)
    for t in toks:
        if t.type == tokenize.STRING:
            out.append((t.start, t.end))
        elif t.type == fs:
            fstart = fstart or t.start
        elif t.type == fe and fstart is not None:
            out.append((fstart, t.end))
            fstart = None
    return out


class PyString(_Python):
    id = "py_string"
    description = "inside a Python string literal that is not a docstring (tokenize STRING)"

    def spans(self, doc, toks):
        docs = _docstring_starts(doc)
        return [(_offset(doc, a), _offset(doc, b)) for a, b in _string_spans(doc, toks) if a not in docs]


class PyDocstring(_Python):
    id = "py_docstring"
    description = "inside a docstring of a Python module, class or function (tokenize + ast)"

    def spans(self, doc, toks):
        docs = _docstring_starts(doc)
        return [(_offset(doc, a), _offset(doc, b)) for a, b in _string_spans(doc, toks) if a in docs]


class PyBrackets(_Python):
    id = "py_brackets"
    description = "inside Python brackets ( ) [ ] { } (tokenize OP, outermost pair)"

    def spans(self, doc, toks):
        out, stack = [], []
        for t in toks:
            if t.type == tokenize.OP and t.string in "([{":
                stack.append(t)
            elif t.type == tokenize.OP and t.string in ")]}" and stack:
                o = stack.pop()
                if not stack:
                    out.append((_offset(doc, o.start), _offset(doc, t.end)))
        return out


class PyIndented(_Python):
    id = "py_indented"
    description = "inside an indented Python block (tokenize INDENT to its DEDENT)"

    def spans(self, doc, toks):
        out, depth, start = [], 0, 0
        for t in toks:
            if t.type == tokenize.INDENT:
                if depth == 0:
                    start = _offset(doc, t.start)
                depth += 1
            elif t.type == tokenize.DEDENT and depth:
                depth -= 1
                if depth == 0:
                    out.append((start, _offset(doc, t.start)))
        if depth:
            out.append((start, len(doc.text)))
        return out


# --- markup: reST line rules, Markdown through markdown-it-py ---------------------------------

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:.-]*)::(\s|$)")
CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "literalinclude"}
TABLE_DIRECTIVES = {"table", "list-table", "csv-table"}
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
BULLET = re.compile(r"^(\s*)([-*+]|#\.|\d+\.|\(\d+\)|\d+\))\s+\S")
GRID = re.compile(r"^\s*\+[-=+]+\+\s*$")
SIMPLE = re.compile(r"^\s*=+( +=+)+\s*$")


class _Lines:
    """A document's lines with their character starts and indents."""

    def __init__(self, doc: Document):
        self.text = doc.text
        self.lines = doc.text.split("\n")
        self.starts = doc.line_starts()
        self.indent = [len(x) - len(x.lstrip(" ")) if x.strip() else -1 for x in self.lines]

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Characters of lines ``[a, b)`` (without the final newline)."""
        end = int(self.starts[b - 1]) + len(self.lines[b - 1])
        return int(self.starts[a]), end

    def block_end(self, i: int, base: int) -> int:
        """First line after ``i`` that is not blank and indented at most ``base``, with the
        trailing blank lines before it left out."""
        j = i
        last = i - 1
        while j < len(self.lines) and (self.indent[j] == -1 or self.indent[j] > base):
            if self.indent[j] != -1:
                last = j
            j += 1
        return last + 1


def _lines(doc: Document) -> _Lines:
    if "lines" not in doc.cache:
        doc.cache["lines"] = _Lines(doc)
    return doc.cache["lines"]


def _md_blocks(doc: Document, types: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans of the Markdown block tokens of ``types`` (markdown-it-py line maps)."""
    if "md" not in doc.cache:
        from markdown_it import MarkdownIt

        doc.cache["md"] = MarkdownIt("commonmark").enable("table").parse(doc.text)
    ln = _lines(doc)
    out = []
    for t in doc.cache["md"]:
        if t.type in types and t.map:
            a, b = t.map
            b = min(b, len(ln.lines))
            while b > a + 1 and not ln.lines[b - 1].strip():  # trailing blank lines are not the block's
                b -= 1
            if b > a:
                out.append(ln.span(a, b))
    return out


class _Markup(Proxy):
    kinds = ("prose",)

    def mark(self, doc: Document) -> np.ndarray:
        spans = self.markdown(doc) if doc.markup == "markdown" else self.rst(doc)
        return doc.mask_spans(spans)

    def markdown(self, doc: Document) -> list[tuple[int, int]]:
        return []


class CodeBlock(_Markup):
    id = "code_block"
    description = "inside a literal/code block: reST '::' blocks, code directives, doctest blocks; Markdown code"

    def rst(self, doc):
        ln, out, i = _lines(doc), [], 0
        n = len(ln.lines)
        while i < n:
            line = ln.lines[i]
            d = DIRECTIVE.match(line)
            if d and d.group(2) in CODE_DIRECTIVES or (not d and line.rstrip().endswith("::")):
                end = ln.block_end(i + 1, max(ln.indent[i], 0))
                body = next((j for j in range(i + 1, end) if ln.indent[j] != -1), None)
                if body is not None:
                    out.append(ln.span(body, end))
                i = max(end, i + 1)
                continue
            if line.strip().startswith(">>> ") and (i == 0 or ln.indent[i - 1] == -1):  # doctest block
                j = i
                while j < n and ln.indent[j] != -1:
                    j += 1
                out.append(ln.span(i, j))
                i = j
                continue
            i += 1
        return out

    def markdown(self, doc):
        return _md_blocks(doc, ("fence", "code_block"))


class InlineLiteral(_Markup):
    id = "inline_literal"
    description = "inside an inline literal: reST ``double backquotes``, Markdown `backquotes`"

    def rst(self, doc):
        return [m.span() for m in re.finditer(r"``[^`\n]+?``", doc.text)]

    def markdown(self, doc):
        return [m.span() for m in re.finditer(r"(?<!`)`[^`\n]+`(?!`)", doc.text)]


class RstDirective(_Markup):
    id = "rst_directive"
    description = "inside a reST directive block (.. name:: with its indented body)"

    def rst(self, doc):
        ln, out = _lines(doc), []
        for i, line in enumerate(ln.lines):
            if DIRECTIVE.match(line):
                out.append(ln.span(i, max(ln.block_end(i + 1, max(ln.indent[i], 0)), i + 1)))
        return out


class Heading(_Markup):
    id = "heading"
    description = "a section title: reST text over an underline of punctuation; Markdown headings"

    def rst(self, doc):
        ln, out = _lines(doc), []
        for i in range(len(ln.lines) - 1):
            title, under = ln.lines[i].rstrip(), ln.lines[i + 1].rstrip()
            if ln.indent[i] == 0 and UNDERLINE.match(under) and len(under) >= len(title) \
                    and not UNDERLINE.match(title) and any(c.isalnum() for c in title):
                out.append(ln.span(i, i + 1))
        return out

    def markdown(self, doc):
        return _md_blocks(doc, ("heading_open",))


class ListItem(_Markup):
    id = "list_item"
    description = "inside a list item (bullet or enumerated, with its continuation lines)"

    def rst(self, doc):
        ln, out = _lines(doc), []
        for i, line in enumerate(ln.lines):
            m = BULLET.match(line)
            if m and (i == 0 or ln.indent[i - 1] == -1 or BULLET.match(ln.lines[i - 1])
                      or ln.indent[i - 1] > ln.indent[i]):
                out.append(ln.span(i, max(ln.block_end(i + 1, ln.indent[i]), i + 1)))
        return out

    def markdown(self, doc):
        return _md_blocks(doc, ("list_item_open",))


class Table(_Markup):
    id = "table"
    description = "inside a table: reST grid and simple tables, table directives; Markdown tables"

    def rst(self, doc):
        ln, out, i = _lines(doc), [], 0
        n = len(ln.lines)
        while i < n:
            line = ln.lines[i]
            d = DIRECTIVE.match(line)
            if d and d.group(2) in TABLE_DIRECTIVES:
                end = max(ln.block_end(i + 1, max(ln.indent[i], 0)), i + 1)
                out.append(ln.span(i, end))
                i = end
            elif GRID.match(line):
                j = i + 1
                while j < n and ln.lines[j].strip()[:1] in ("+", "|"):
                    j += 1
                out.append(ln.span(i, j))
                i = j
            elif SIMPLE.match(line):
                j = i + 1  # the closing border: one followed by a blank line or the end
                while j < n and not (SIMPLE.match(ln.lines[j]) and (j + 1 == n or ln.indent[j + 1] == -1)):
                    j += 1
                if j < n:
                    out.append(ln.span(i, j + 1))
                i = j + 1
            else:
                i += 1
        return out

    def markdown(self, doc):
        return _md_blocks(doc, ("table_open",))


# --- prose ----------------------------------------------------------------------------------


class _Prose(Proxy):
    kinds = ("prose",)

    def mark(self, doc: Document) -> np.ndarray:
        return doc.mask_spans(self.spans(doc.text))


def _pairs(text: str, opens: str, closes: str) -> list[tuple[int, int]]:
    """Outermost bracket pairs, matched within a paragraph (a blank line resets)."""
    out, stack = [], []
    para = re.compile(r"\n[ \t]*\n")
    breaks = {m.start() for m in para.finditer(text)}
    for i, c in enumerate(text):
        if i in breaks:
            stack = []
        if c in opens:
            stack.append((i, c))
        elif c in closes and stack and opens[closes.index(c)] == stack[-1][1]:
            s, _ = stack.pop()
            if not stack:
                out.append((s, i + 1))
        elif c in closes:
            stack = []
    return out


class InQuotes(_Prose):
    id = "in_quotes"
    description = "inside double quotes (straight or curly) on one line of prose"

    def spans(self, text):
        return [m.span() for m in re.finditer(r"\"[^\"\n]{1,300}\"|\u201c[^\u201d\n]{1,300}\u201d", text)]


class InParens(_Prose):
    id = "in_parens"
    description = "inside parentheses ( ) in prose"

    def spans(self, text):
        return _pairs(text, "(", ")")


class InBrackets(_Prose):
    id = "in_brackets"
    description = "inside any bracket pair ( ) [ ] { } in prose"

    def spans(self, text):
        return _pairs(text, "([{", ")]}")


class SentenceStart(_Prose):
    id = "sentence_start"
    description = "the first word of a sentence (after . ! ? or a blank line)"

    def spans(self, text):
        return [m.span(1) for m in re.finditer(r"(?:\A\s*|[.!?][\"')\]]?[ \t\n]+|\n[ \t]*\n[ \t]*)([A-Z][A-Za-z']*)",
                                               text)]


# --- document -------------------------------------------------------------------------------


class _WholeDocument(Proxy):
    context = "high_level"

    def mark(self, doc):
        return np.ones(doc.n_tokens, dtype=bool)


class DocCode(_WholeDocument):
    id = "doc_code"
    description = "in a code document (the corpus's document kind)"
    kinds = ("code",)


class DocProse(_WholeDocument):
    id = "doc_prose"
    description = "in a prose document (the corpus's document kind)"
    kinds = ("prose",)


class DocStart(Proxy):
    id = "doc_start"
    description = "among the first 64 tokens of a document"
    context = "high_level"

    def mark(self, doc):
        return np.arange(doc.n_tokens) < 64
