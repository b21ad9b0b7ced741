"""What a run was: resolved arguments, command line and git commit, written next to its results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def git_sha(repo_dir: str | None = None) -> str:
    """The checkout's commit (with `-dirty` when the tree has changes), or 'unknown' outside git."""
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def write_run_info(output_dir: str, args) -> str:
    """`<output_dir>/run_<timestamp>.json` with args, argv and git SHA; returns its path."""
    path = os.path.join(output_dir, f"run_{time.strftime('%Y%m%d_%H%M%S')}.json")
    info = {"argv": sys.argv, "git_sha": git_sha(), "args": vars(args)}
    with open(path, "w") as f:
        json.dump(info, f, indent=1, default=str)
    return path
