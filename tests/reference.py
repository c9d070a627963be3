"""Published reference values (tests/data/accountants.json, a copy of ../shared/reference)."""

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "accountants.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "accountants.json"


def load_reference() -> dict:
    return json.loads(DATA.read_text())
