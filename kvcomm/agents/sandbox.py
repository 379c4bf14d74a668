"""Run model-written code in a separate, limited process: never in ours, never with eval.

The program runs as `python -I` (isolated mode: no user site, no env-driven imports) in a fresh temp
directory, with a wall-clock timeout, CPU-time and address-space limits (RLIMIT_CPU, RLIMIT_AS), no
core files, an empty environment, and — where `unshare --net` works (Linux, root or user namespaces)
— in a network namespace with no interfaces, so it has no network at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

MEMORY_LIMIT = 1 << 30
TIMEOUT_S = 10.0


@dataclass
class SandboxResult:
    passed: bool
    returncode: int
    timed_out: bool
    output: str


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "--net") if ok else ()


def network_isolated() -> bool:
    return bool(_unshare_prefix())


def _limits(memory: int, cpu_s: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()

    return apply


def run_python(source: str, timeout: float = TIMEOUT_S, memory: int = MEMORY_LIMIT) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="kvcomm-sandbox-") as d:
        path = os.path.join(d, "program.py")
        with open(path, "w") as f:
            f.write(source)
        cmd = [*_unshare_prefix(), sys.executable, "-I", path]
        try:
            proc = subprocess.run(cmd, cwd=d, capture_output=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"},
                                  preexec_fn=_limits(memory, int(timeout) + 1), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return SandboxResult(False, -9, True, "")
        out = (proc.stdout + proc.stderr).decode(errors="replace")[-2000:]
        return SandboxResult(proc.returncode == 0, proc.returncode, False, out)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.S | re.I)
_CODE_START = re.compile(r"^(?:from\s|import\s|def\s|class\s|@)", re.M)


def extract_code(prompt: str, reply: str, entry_point: str) -> str:
    """The program to test. A reply's code block (```python, ```py or a bare ```; the first that defines the
    function, else the first; an unclosed block runs to the end) or, without blocks, the reply from its
    first line of code on. Code that defines the function follows the prompt (its imports and helpers);
    anything else is taken as the function's body and appended to the prompt."""
    defines = re.compile(rf"def\s+{re.escape(entry_point)}\s*\(")
    blocks = _FENCE.findall(reply)
    if blocks:
        code = next((b for b in blocks if defines.search(b)), blocks[0])
    else:
        start = _CODE_START.search(reply)
        code = reply[start.start() :] if start and defines.search(reply) else reply
    if defines.search(code):
        # keep the prompt's imports and helpers, then the reply's definition overrides
        return prompt + "\n    pass\n\n" + code
    return prompt + code


def run_humaneval(prompt: str, reply: str, test: str, entry_point: str, timeout: float = TIMEOUT_S) -> SandboxResult:
    program = extract_code(prompt, reply, entry_point) + "\n\n" + test + f"\n\ncheck({entry_point})\n"
    return run_python(program, timeout=timeout)
