"""Running ``iron-state`` as a process in tests: the command, a clean environment, stopping it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def iron_state_command() -> list[str]:
    """The installed ``iron-state`` script, or the same entry point through this interpreter."""
    script = Path(sys.executable).with_name("iron-state")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from iron_runtime_state.cli import main; main()"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``IRON_STATE_*`` variable, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("IRON_STATE_")}, **extra}


def terminate(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Stop a server command as a supervisor would (SIGTERM, then SIGKILL after 20 s); what it
    wrote on stdout and stderr (empty for a stream that was not piped)."""
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out or "", err or ""
