"""README.md's shell commands, parsed when the tests run, and a sandbox that runs them here at tiny scale.

`commands()` reads every ```bash block of README.md: lines ending in a backslash are joined, `# ...` comments
dropped, one command per line. `find(name, **flags)` is the one command running `name` (a `-m` module or a
`bash` script) with those flag values, as printed. `Sandbox(root).run(command, extra)` runs it in a subprocess
after the substitutions below, with `extra` flags appended after the README's own (absl takes the last of a
repeated flag, so an appended `--num_samples=2` shrinks `--num_samples=2048`); the README's flags are never
removed or renamed.

Substitutions, applied to the program and to every path value (a word, or what follows `=` in `--flag=value`)
starting with the README prefix:

    python, .venv/bin/python    -> sys.executable (the interpreter running the tests)
    gs://BUCKET/                -> SANDBOX/bucket/        (local folders; one bucket per sandbox)
    /path/to/                   -> SANDBOX/path/to/
    /data/                      -> SANDBOX/data/          (the tests write tiny stand-ins there)
    runs/demo                   -> SANDBOX/runs/demo
    configs/modelscope_t2v.py   -> ROOT/configs/tiny.py   (the full-size model cannot train or sample on a CPU)
    configs/, launch/           -> ROOT/configs/, ROOT/launch/ (this checkout)

`local=False` keeps remote paths (gs://, /path/to/, /data/, runs/demo) as printed, for `--dry_run`s. Commands run
in SANDBOX/work, so relative inputs (cat.jpg, my_shape.png) and outputs (cat.mp4, out.gif, metrics.json) live
there; this checkout comes first on PYTHONPATH (the caller's env decides the rest).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PROGRAMS = ("python", ".venv/bin/python")
REMOTE = ("gs://BUCKET/", "/path/to/", "/data/", "runs/demo")


@dataclasses.dataclass(frozen=True)
class Command:
    text: str  # as printed, continuation lines joined
    argv: tuple[str, ...]
    line: int  # README line where it starts

    @property
    def name(self) -> str:
        """`dreamvideo_jax.train` for `python -m dreamvideo_jax.train ...`, `launch/demo.sh` for `bash launch/demo.sh`."""
        a = self.argv
        if a[0] in PROGRAMS and len(a) > 2 and a[1] == "-m":
            return a[2]
        if a[0] == "bash" and len(a) > 1:
            return a[1]
        return a[0]

    @property
    def flags(self) -> dict[str, str]:
        """`--key=value` flags as printed (a bare `--key` maps to '')."""
        out = {}
        for w in self.argv:
            if w.startswith("--"):
                k, _, v = w[2:].partition("=")
                out[k] = v
        return out

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def commands(path: str = README) -> list[Command]:
    text = open(path, encoding="utf-8").read()
    out = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S):
        first = text.count("\n", 0, m.start(1)) + 1
        lines = m.group(1).split("\n")
        i = 0
        while i < len(lines):
            start, parts = i, []
            while lines[i].rstrip().endswith("\\"):
                parts.append(lines[i].rstrip()[:-1].strip())
                i += 1
            parts.append(lines[i].strip())
            i += 1
            joined = " ".join(p for p in parts if p)
            argv = tuple(shlex.split(joined, comments=True))
            if argv:
                if any(w in ("&&", ";", "|", "||") for w in argv):
                    raise AssertionError(f"README.md:{first + start}: one command per line, please: {joined}")
                out.append(Command(joined.split(" #")[0].strip(), argv, first + start))
    return out


def find(name: str, **flags: str) -> Command:
    """The one README command running `name` whose printed flags include `flags`."""
    found = [c for c in commands() if c.name == name and all(c.flags.get(k) == v for k, v in flags.items())]
    if len(found) != 1:
        listing = "\n".join(map(str, commands()))
        raise AssertionError(f"expected one README command {name} {flags or ''}, found {len(found)}:\n{listing}")
    return found[0]


class Sandbox:
    """Where README commands run: SANDBOX/work as the working directory, remote paths mapped under SANDBOX."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.table = [
            ("gs://BUCKET/", str(self.root / "bucket") + "/"),
            ("/path/to/", str(self.root / "path" / "to") + "/"),
            ("/data/", str(self.root / "data") + "/"),
            ("runs/demo", str(self.root / "runs" / "demo")),
            ("configs/modelscope_t2v.py", os.path.join(ROOT, "configs", "tiny.py")),
            ("configs/", os.path.join(ROOT, "configs") + "/"),
            ("launch/", os.path.join(ROOT, "launch") + "/"),
        ]

    def path(self, readme_path: str) -> pathlib.Path:
        """Where a path printed in the README lives in this sandbox."""
        return pathlib.Path(self._value(readme_path, local=True))

    def _value(self, value: str, local: bool) -> str:
        for prefix, repl in self.table:
            if value.startswith(prefix) and (local or prefix not in REMOTE):
                return repl + value[len(prefix):]
        return value

    def _word(self, word: str, local: bool) -> str:
        if word.startswith("-") and "=" in word:
            flag, _, value = word.partition("=")
            return f"{flag}={self._value(value, local)}"
        return self._value(word, local)

    def argv(self, command: Command, extra=(), *, local: bool = True) -> list[str]:
        a = list(command.argv)
        program = [sys.executable] if a[0] in PROGRAMS else [a[0]]
        return program + [self._word(w, local) for w in a[1:]] + list(extra)

    def run(self, command: Command, extra=(), *, env: dict | None = None, local: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess:
        """Runs `command` (substituted, `extra` appended); asserts exit status 0, naming the README line."""
        argv = self.argv(command, extra, local=local)
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(argv, cwd=self.work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (f"{command}\nran as: {shlex.join(argv)}\nexit status {proc.returncode}\n"
                                      f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}")
        return proc
