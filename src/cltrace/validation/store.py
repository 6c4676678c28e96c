"""Per-prompt result files: written atomically, found again by a rerun, tied to one set of settings.

Layout of a run folder (one per transcoder set):  settings.json  and  prompts/<prompt key>.json.
A result file is complete or absent (written to a temporary name, then renamed), so an interrupted run
loses at most the prompt in progress, and a rerun computes only the prompts without a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cltrace.errors import CltraceError
from cltrace.validation.prompts import Prompt


def _clean(x):
    """NaN/inf -> None, recursively: the files stay strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    """Write strict JSON atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(obj), ensure_ascii=False, indent=1))
    os.replace(tmp, path)


class ResultStore:
    """The result folder of one transcoder set under one Settings."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.identity = identity  # settings + transcoder fingerprint: what makes results comparable
        meta = self.folder / "settings.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CltraceError(f"{meta} is unreadable ({type(e).__name__}): remove it or use another --out") from e
            if old != _clean(identity):
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != _clean(identity).get(k))
                raise CltraceError(f"{self.folder} holds results made with other settings ({', '.join(diff)}): "
                                   "use another --out, or the same settings to resume")
        else:
            write_json(meta, identity)

    def path(self, prompt: Prompt) -> Path:
        return self.folder / "prompts" / f"{prompt.key}.json"

    def load(self, prompt: Prompt) -> dict | None:
        """The stored result of this prompt, or None (absent, or unreadable: then it is recomputed)."""
        p = self.path(prompt)
        if not p.exists():
            return None
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return res if res.get("ids") == list(prompt.ids) else None

    def save(self, prompt: Prompt, result: dict) -> None:
        write_json(self.path(prompt), result)
