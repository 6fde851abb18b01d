"""``python -m jobs.pretrain CONFIG [--address ADDRESS]``: train without the ``mmfp`` CLI."""

from __future__ import annotations

from jobs.cli_train import main

if __name__ == "__main__":
    main()
