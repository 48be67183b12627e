"""Where the project keeps generated data; every location can be moved with an environment variable."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "XAI_DATA_DIR"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT / "data")


def demo_dataset() -> Path:
    return data_dir() / "demo"


def demo_model_cards() -> list[Path]:
    """The demo's fold classifiers (built by ``python -m core demo``), fold order."""
    return sorted((demo_dataset() / "models").glob("classifier-fold-*.json"))


def demo_parser_card() -> Path | None:
    card = demo_dataset() / "models" / "parser.json"
    return card if card.is_file() else None
