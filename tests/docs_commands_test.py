#!/usr/bin/env python3
"""Checks the shell commands that README.md and docs/ show.

Every line of a fenced code block (no language, or sh/bash/shell/console) is
read as shell: continuation lines are joined, comments dropped, and the line
is split into commands at ;, &&, ||, | and $( ). A command whose program is

  * a file of this repository (scripts/run_local.sh, bench/overhead.sh,
    deploy/build_images.sh, fuzz/run_fuzzers.sh, ...): the file must exist;
    each flag it is given must appear in the script's own text (its
    argument parser), except for scripts/run_local.sh, which hands its flags
    to lmps_local and is checked against that binary;
  * a binary of lmps (`lmps_scheduler`, `.bazel/bin/launcher/lmps_local`,
    ...): each --flag (also --noflag for booleans) must be one that the
    binary lists in its --helpfull;
  * `bazel build|test|run //pkg:target ...`: the package must exist and
    define the target; flags after `--` of a `bazel run` of a binary above
    are checked against that binary;
  * `python3 FILE.py`: the file must exist and define each --flag it is
    given.

Other programs (grpcurl, curl, kubectl, ...) are not lmps's and are skipped.
Before the real documents, the checker runs on a made-up page with a wrong
flag, a missing script and an unknown target, and must report all three:
the test can fail.

  docs_commands_test.py --bin_dir=DIR [--root=DIR] [--verbose]

--bin_dir holds the built binaries (Bazel runfiles, or .bazel/bin); --root
is the source tree (default: where README.md in the runfiles points to).
Exits 0 when every command checks out, 1 otherwise, naming each problem as
FILE:LINE: what is wrong.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile


# Binaries of lmps: the name used in the documents -> path under --bin_dir.
BINARIES = {
    "lmps_local": "launcher/lmps_local",
    "lmps_scheduler": "server/scheduler/lmps_scheduler",
    "lmps_server": "server/lmps_server",
    "lmps_export": "server/lmps_export",
    "lmps_worker": "worker/lmps_worker",
    "lmps_eval": "worker/lmps_eval",
    "lmps_report": "report/lmps_report",
    "lmps_prepare": "tools/lmps_prepare",
    "bpe_tool": "common/text/bpe_tool",
    "lmps_worker_cuda": "worker/lmps_worker_cuda",
    "gpt_cuda_bench": "bench/gpt_cuda_bench",
}
# Built only where nvcc exists: without it their commands are reported as
# unchecked, not as wrong.
CUDA_ONLY = {"lmps_worker_cuda", "gpt_cuda_bench"}
# Scripts that pass their flags on to a binary.
FORWARDS_TO = {"scripts/run_local.sh": "lmps_local"}
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}


def fenced_commands(path):
    """Yields (line_number, command_text) of the shell fences of a page."""
    lines = open(path, encoding="utf-8").read().split("\n")
    in_fence = False
    lang = ""
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            lang = stripped[3:].strip().lower() if in_fence else ""
            pending = ""
            continue
        if not in_fence or lang not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        if text.startswith("$ "):
            text = text[2:]
        if not text or text.startswith("#"):
            continue
        yield start, text


def commands(line):
    """The commands of one shell line, each as its words without leading
    VAR=value assignments: split at ;, &&, ||, |, ( and ) outside quotes
    (so $(...) is a command of its own), comments dropped. [] if the line
    does not parse as shell (a diagram, program output)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()`")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    result, current = [], []
    for token in tokens + [";"]:
        if token and all(c in ";&|()`" for c in token):
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                result.append(current)
            current = []
        else:
            current.append(token.rstrip("$") if token.endswith("=$") else token)
    return result


def flag_name(token):
    """'--foo=1' -> 'foo'; '-n' -> 'n'; None for a non-flag or '--'."""
    match = re.match(r"^--?([A-Za-z][A-Za-z0-9_-]*)", token)
    return match.group(1) if match else None


class Checker:
    def __init__(self, root, bin_dir, verbose):
        self.root = root
        self.bin_dir = bin_dir
        self.verbose = verbose
        self.helpfull = {}
        self.problems = []
        self.checked = 0
        self.unchecked = []

    def flags_of(self, binary):
        """Flag names a binary accepts (from its --helpfull), or None when it
        is not built here."""
        if binary not in self.helpfull:
            path = os.path.join(self.bin_dir, BINARIES[binary])
            if not os.access(path, os.X_OK):
                self.helpfull[binary] = None
            else:
                out = subprocess.run([path, "--helpfull"], capture_output=True,
                                     text=True, timeout=60)
                names = set(re.findall(r"^\s+--([A-Za-z0-9_]+) \(",
                                       out.stdout + out.stderr, re.M))
                if not names:
                    raise RuntimeError(f"{path} --helpfull listed no flags:\n"
                                       f"{out.stdout}{out.stderr}")
                self.helpfull[binary] = names
        return self.helpfull[binary]

    def problem(self, where, text):
        self.problems.append(f"{where}: {text}")

    def check_binary_flags(self, where, binary, args):
        names = self.flags_of(binary)
        if names is None:
            if binary in CUDA_ONLY:
                self.unchecked.append(f"{where}: {binary} (not built here: no nvcc)")
                return
            self.problem(where, f"{binary} is not among the built binaries "
                         f"({os.path.join(self.bin_dir, BINARIES[binary])})")
            return
        for token in args:
            if token == "--":
                break
            if not token.startswith("--"):
                continue
            name = flag_name(token)
            if name is None:
                continue
            if name in names or (name.startswith("no") and name[2:] in names):
                continue
            self.problem(where, f"{binary} has no flag --{name} "
                         f"(not in its --helpfull)")
        self.checked += 1

    def check_script(self, where, script, args):
        path = os.path.join(self.root, script)
        if not os.path.isfile(path):
            self.problem(where, f"{script} does not exist")
            return
        if script in FORWARDS_TO:
            self.check_binary_flags(where, FORWARDS_TO[script], args)
            return
        text = open(path, encoding="utf-8", errors="replace").read()
        for token in args:
            if token == "--":
                break
            name = flag_name(token)
            if name is None:
                continue
            dashes = "--" if token.startswith("--") else "-"
            if not re.search(re.escape(dashes + name) + r"(?![A-Za-z0-9_-])", text):
                self.problem(where, f"{script} does not handle {dashes}{name} "
                             f"(not in its text)")
        self.checked += 1

    def check_bazel(self, where, args):
        if not args or args[0] not in ("build", "test", "run"):
            return
        rest = args[1:]
        labels = [t for t in rest if t.startswith("//")]
        for label in labels:
            package, _, target = label[2:].partition(":")
            if package.endswith("/...") or package == "...":
                package = package[:-4] if package != "..." else ""
                target = ""
            build = os.path.join(self.root, package, "BUILD.bazel")
            if not os.path.isfile(build):
                self.problem(where, f"{label}: no package {package or '//'}")
                continue
            if target and target != "all":
                if not re.search(r'name\s*=\s*"' + re.escape(target) + '"',
                                 open(build, encoding="utf-8").read()):
                    self.problem(where, f"{label}: {package}/BUILD.bazel "
                                 f"defines no target {target}")
                    continue
            if args[0] == "run" and target in BINARIES and "--" in rest:
                self.check_binary_flags(where, target, rest[rest.index("--") + 1:])
                continue
        self.checked += 1

    def check_command(self, where, tokens):
        program, args = tokens[0], tokens[1:]
        base = os.path.basename(program)
        if program == "bazel":
            self.check_bazel(where, args)
        elif program in ("python3", "/usr/bin/python3") and args and args[0].endswith(".py"):
            self.check_script(where, args[0], args[1:])
        elif base in BINARIES and (program == base or program.startswith(".bazel/bin/")):
            if program.startswith(".bazel/bin/") and program[len(".bazel/bin/"):] != BINARIES[base]:
                self.problem(where, f"{program}: the binary is built at .bazel/bin/{BINARIES[base]}")
            self.check_binary_flags(where, base, args)
        elif re.match(r"^[\w.-]+(/[\w.-]+)+$", program) and not program.startswith(".bazel/"):
            self.check_script(where, program, args)
        else:
            return False
        return True

    def check_page(self, path, shown_as):
        for number, line in fenced_commands(path):
            for tokens in commands(line):
                before = len(self.problems)
                ours = self.check_command(f"{shown_as}:{number}", tokens)
                if self.verbose:
                    verdict = ("FAIL" if len(self.problems) > before else "ok  ") if ours else "skip"
                    print(f"  {verdict} {shown_as}:{number}: {' '.join(tokens)[:100]}")


def pages(root):
    yield "README.md"
    yield "deploy/README.md"
    for name in sorted(os.listdir(os.path.join(root, "docs"))):
        if name.endswith(".md"):
            yield "docs/" + name


def self_test(bin_dir):
    """The checker must catch a wrong flag, a missing script and an unknown
    Bazel target on a made-up page."""
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "scripts"))
        with open(os.path.join(root, "scripts/ok.sh"), "w") as f:
            f.write('case "$1" in --fine=*) ;; esac\n')
        with open(os.path.join(root, "BUILD.bazel"), "w") as f:
            f.write('sh_test(name = "exists")\n')
        page = os.path.join(root, "page.md")
        with open(page, "w") as f:
            f.write("```\n"
                    "lmps_scheduler --listen=0.0.0.0:1 --no_such_flag=1   # wrong flag\n"
                    "scripts/ok.sh --fine=1 && scripts/missing.sh\n"
                    "bazel test //:exists //:absent\n"
                    "```\n")
        checker = Checker(root, bin_dir, verbose=False)
        checker.check_page(page, "page.md")
        want = ["--no_such_flag", "scripts/missing.sh does not exist",
                "defines no target absent"]
        missed = [w for w in want if not any(w in p for p in checker.problems)]
        if missed or len(checker.problems) != len(want):
            print("FAIL: the self-test page should give exactly these problems: "
                  f"{want}; got {checker.problems}")
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--root", default="")
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args()
    root = options.root or os.path.dirname(
        os.path.realpath(os.path.join(options.bin_dir, "README.md")))
    if not os.path.isdir(os.path.join(root, "docs")):
        print(f"FAIL: {root} is not the source tree (no docs/); pass --root")
        return 1
    if not self_test(options.bin_dir):
        return 1
    checker = Checker(root, options.bin_dir, options.verbose)
    for page in pages(root):
        checker.check_page(os.path.join(root, page), page)
    for note in checker.unchecked:
        print(f"unchecked {note}")
    if checker.checked < 25:
        checker.problem("all pages", f"only {checker.checked} commands found; "
                        "the fence parser is broken or the pages moved")
    for p in checker.problems:
        print(f"FAIL {p}")
    print(f"{checker.checked} commands checked in {len(list(pages(root)))} pages, "
          f"{len(checker.problems)} problems")
    return 1 if checker.problems else 0


if __name__ == "__main__":
    sys.exit(main())
