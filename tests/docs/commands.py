"""What a quick start tells someone to type: the commands and flags in its code blocks, for comparing translations."""

from __future__ import annotations

import re

FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
PROGRAMS = ("maxfl", "flwr", "pip", "make", ".venv/bin/python")


def commands_and_flags(markdown: str) -> set[str]:
    """`maxfl plant join`, `maxfl plant join --check`, ...: each command (program and subcommands) and each of
    its flags, from every line of every fenced block that runs one of PROGRAMS (comments aside)."""
    found: set[str] = set()
    for block in FENCE.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line.startswith(PROGRAMS):
                continue
            words = line.split()
            command = [words[0]]
            for word in words[1:]:
                if not re.fullmatch(r"[a-z][a-z0-9-]*", word) or len(command) >= 3:
                    break
                command.append(word)
            name = " ".join(command)
            found.add(name)
            found |= {f"{name} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)}
    return found
