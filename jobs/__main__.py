"""``python -m jobs COMMAND ...``: every ``mmfp`` command, as Ray job entrypoints run them."""

from __future__ import annotations

from jobs.cli import app

if __name__ == "__main__":
    app(prog_name="python -m jobs")
