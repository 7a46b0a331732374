#!/usr/bin/env python3
"""Rewrites a CUDA source so that it compiles as host C++ against the simulated device.

Only what no header can express is rewritten; every other line stays as the author wrote it:

- ``kernel<<<grid, block, smem, stream>>>(args)``
  -> ``::fl_sim::launch("kernel", kernel, grid, block, smem, stream)(args)``
- ``extern __shared__ __align__(A) T name[];``
  -> ``T* name = ::fl_sim::dynamic_shared_as<T>(A);``
- ``__shared__ __align__(A) T name[N][M];``
  -> ``auto& name = ::fl_sim::static_shared_as<T[N][M]>(FL_SIM_SHARED_TAG, A, "name");``
- ``__global__ void __launch_bounds__(N, ...) kernel(params) {``
  -> ``__global__ void kernel(params) { FL_SIM_LAUNCH_BOUNDS(N, ...);``
- ``asm volatile("ptx" : "=r"(a) : "r"(b) : "memory");``
  -> ``::fl_sim::ptx_asm("ptx", {::fl_sim::ptx_operand('r', '=', a), ::fl_sim::ptx_operand('r', 0, b)});``

Line numbers are kept (a rewritten span keeps its newlines, and the output starts with a #line
directive naming the original file), so compiler messages, __FILE__/__LINE__ and the simulator's
reports point at the original source. Anything the rewriter does not understand is an error, never
a silent pass-through.

Usage: rewrite_cuda.py INPUT OUTPUT
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


class RewriteError(Exception):
    pass


def mask_comments_and_strings(text: str) -> str:
    """The text with comment bodies and string/char literal contents blanked (newlines kept), so
    that searches see only code. Quotes stay, so a string's extent is still visible."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if text[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def match_forward(masked: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(masked)):
        if masked[i] == open_ch:
            depth += 1
        elif masked[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise RewriteError(f"unbalanced {open_ch}{close_ch} from offset {start}")


def split_top_level(masked: str, begin: int, end: int, sep: str) -> list[tuple[int, int]]:
    """Spans of [begin, end) separated by `sep` outside any brackets."""
    spans, depth, at = [], 0, begin
    for i in range(begin, end):
        ch = masked[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            spans.append((at, i))
            at = i + 1
    spans.append((at, end))
    return spans


def keep_newlines(original: str, replacement: str) -> str:
    return replacement + "\n" * original.count("\n")


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


class Rewriter:
    def __init__(self, text: str, path: str):
        self.text = text
        self.masked = mask_comments_and_strings(text)
        self.path = path
        self.edits: list[tuple[int, int, str]] = []  # (begin, end, replacement)

    def error(self, offset: int, message: str) -> RewriteError:
        return RewriteError(f"{self.path}:{line_of(self.text, offset)}: {message}")

    def tokens(self, word: str):
        for m in re.finditer(r"\b" + re.escape(word) + r"\b", self.masked):
            yield m.start(), m.end()

    def brace_depth(self, offset: int) -> int:
        return self.masked.count("{", 0, offset) - self.masked.count("}", 0, offset)

    # ---- kernel<<<...>>>(...) ---------------------------------------------------------------
    def launches(self) -> None:
        m = self.masked
        for found in re.finditer(r"<<<", m):
            open_at = found.start()
            close_at = m.find(">>>", open_at + 3)
            if close_at < 0:
                raise self.error(open_at, "<<< without >>>")
            after = close_at + 3
            while after < len(m) and m[after].isspace():
                after += 1
            if after >= len(m) or m[after] != "(":
                raise self.error(open_at, "a launch whose >>> is not followed by the argument list")
            # The kernel expression: an identifier, maybe qualified, maybe with template arguments.
            i = open_at
            while i > 0 and m[i - 1].isspace():
                i -= 1
            if i > 0 and m[i - 1] == ">":
                depth = 0
                while i > 0:
                    i -= 1
                    if m[i] == ">":
                        depth += 1
                    elif m[i] == "<":
                        depth -= 1
                        if depth == 0:
                            break
                while i > 0 and m[i - 1].isspace():
                    i -= 1
            while i > 0 and (m[i - 1].isalnum() or m[i - 1] in "_:"):
                i -= 1
            expr = self.text[i:open_at].strip()
            if not expr or not (expr[0].isalpha() or expr[0] in "_:"):
                raise self.error(open_at, "cannot find the kernel in front of <<<")
            name = " ".join(expr.split()).replace('"', "")
            self.edits.append((i, i, f'::fl_sim::launch("{name}", '))
            self.edits.append((open_at, open_at + 3, ", "))
            self.edits.append((close_at, close_at + 3, ")"))

    # ---- __shared__ declarations -----------------------------------------------------------
    def shared_declarations(self) -> None:
        m = self.masked
        for begin, end in self.tokens("__shared__"):
            start = begin
            prefix = m[max(0, begin - 40):begin]
            extern = re.search(r"\bextern\s+$", prefix)
            if extern:
                start = begin - (len(prefix) - extern.start())
            semicolon = m.find(";", end)
            if semicolon < 0:
                raise self.error(begin, "__shared__ declaration without ;")
            if self.brace_depth(start) == 0:
                raise self.error(begin, "a __shared__ variable at file scope (the simulator supports them in kernels only)")
            decl = self.text[end:semicolon]
            align = "0"
            align_match = re.search(r"__align__\s*\(([^)]*)\)", decl)
            if align_match:
                align = align_match.group(1).strip()
                decl = decl[: align_match.start()] + " " + decl[align_match.end():]
            flat = " ".join(decl.split())
            if "=" in flat or "," in re.sub(r"[\[(<][^\])>]*[\])>]", "", flat):
                raise self.error(begin, "a __shared__ declaration with an initializer or several declarators")
            bracket = flat.find("[")
            head, dims = (flat[:bracket], flat[bracket:]) if bracket >= 0 else (flat, "")
            words = list(IDENT.finditer(head))
            if len(words) < 2:
                raise self.error(begin, f"cannot read the __shared__ declaration '{flat}'")
            name = words[-1].group(0)
            type_text = head[: words[-1].start()].strip()
            original = self.text[start:semicolon + 1]
            if extern:
                if dims.replace(" ", "") != "[]":
                    raise self.error(begin, "extern __shared__ must be an array of unknown size")
                code = f"{type_text}* {name} = ::fl_sim::dynamic_shared_as<{type_text}>({align});"
            else:
                code = (f"auto& {name} = ::fl_sim::static_shared_as<{type_text}{dims}>(FL_SIM_SHARED_TAG, {align}, "
                        f'"{name}");')
            self.edits.append((start, semicolon + 1, keep_newlines(original, code)))

    # ---- __launch_bounds__ -----------------------------------------------------------------
    def launch_bounds(self) -> None:
        m = self.masked
        for begin, end in self.tokens("__launch_bounds__"):
            paren = m.find("(", end)
            close = match_forward(m, paren, "(", ")")
            arguments = " ".join(self.text[paren + 1:close - 1].split())
            name = IDENT.search(m, close)
            params = m.find("(", name.end())
            if m[name.end():params].strip():
                raise self.error(begin, "cannot find the kernel's parameter list after __launch_bounds__")
            params_end = match_forward(m, params, "(", ")")
            body = m.find("{", params_end)
            if body < 0 or m[params_end:body].strip():
                raise self.error(begin, "cannot find the kernel's body after __launch_bounds__")
            self.edits.append((begin, close, keep_newlines(self.text[begin:close], "")))
            self.edits.append((body + 1, body + 1, f" FL_SIM_LAUNCH_BOUNDS({arguments});"))

    # ---- inline PTX --------------------------------------------------------------------------
    def inline_asm(self) -> None:
        m = self.masked
        for found in re.finditer(r"\b(?:asm|__asm__)\b(\s*(?:volatile|__volatile__))?\s*\(", m):
            begin = found.start()
            paren = found.end() - 1
            close = match_forward(m, paren, "(", ")")
            semicolon = close
            while semicolon < len(m) and m[semicolon].isspace():
                semicolon += 1
            if semicolon >= len(m) or m[semicolon] != ";":
                raise self.error(begin, "an asm statement not followed by ;")
            sections = split_top_level(m, paren + 1, close - 1, ":")
            template = self.text[sections[0][0]:sections[0][1]].strip()
            operands = []
            for kind, (a, b) in zip(("output", "input"), sections[1:3]):
                for op_begin, op_end in split_top_level(m, a, b, ","):
                    op = self.text[op_begin:op_end].strip()
                    if not op:
                        continue
                    parsed = re.fullmatch(r'"([=+&]*)([a-zA-Z])"\s*\((.*)\)', op, re.S)
                    if not parsed:
                        raise self.error(op_begin, f"cannot read the asm {kind} operand '{op}'")
                    modifiers, letter, expr = parsed.groups()
                    mode = "'+'" if "+" in modifiers else "'='" if "=" in modifiers else "0"
                    if kind == "output" and mode == "0":
                        raise self.error(op_begin, f"asm output operand without = or +: '{op}'")
                    operands.append(f"::fl_sim::ptx_operand('{letter}', {mode}, {' '.join(expr.split())})")
            code = f"::fl_sim::ptx_asm({' '.join(template.split())}, {{{', '.join(operands)}}});"
            self.edits.append((begin, semicolon + 1, keep_newlines(self.text[begin:semicolon + 1], code)))

    def rejected_keywords(self) -> None:
        for word in ("__constant__",):
            for begin, _ in self.tokens(word):
                raise self.error(begin, f"{word} is not supported by the simulator yet")

    def run(self) -> str:
        self.rejected_keywords()
        self.launches()
        self.shared_declarations()
        self.launch_bounds()
        self.inline_asm()
        text = self.text
        self.edits.sort(key=lambda e: (e[0], e[1]))
        for (b1, e1, _), (b2, _, _) in zip(self.edits, self.edits[1:]):
            if b2 < e1:
                raise self.error(b2, "overlapping rewrites")
        for begin, end, replacement in reversed(self.edits):
            text = text[:begin] + replacement + text[end:]
        return f'#line 1 "{self.path}"\n' + text


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = Path(argv[1]), Path(argv[2])
    try:
        out = Rewriter(source.read_text(), str(source)).run()
    except RewriteError as e:
        print(f"rewrite_cuda.py: {e}", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != out:  # keep the timestamp when nothing changed
        target.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
