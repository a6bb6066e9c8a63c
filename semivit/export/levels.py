"""Degradation levels: cheaper graphs the time-limited predictor falls back to.

Contract with semivit/serve (meta.json ``levels``, most to least expensive):

    {"name": "full",        "file": "model.onnx",               "tta": true,  "members": M}
    {"name": "no_tta",      "file": "levels/no_tta.onnx",       "tta": false, "members": M}
    {"name": "top{k}_no_tta", "file": "levels/top{k}_no_tta.onnx", "tta": false, "members": k}

k = ceil(M/2) highest-weight members (ties: ensemble order), weights renormalised; that level is
left out when M == 1.  With ``--no-tta`` the full level has tta false and no_tta is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Level:
    name: str
    file: str
    tta: bool
    members: list[dict]  # ensemble.json member entries, with the level's (renormalised) weight

    def contract(self) -> dict:
        return {"name": self.name, "file": self.file, "tta": self.tta, "members": len(self.members)}


def top_members(members: list[dict], k: int) -> list[dict]:
    order = sorted(range(len(members)), key=lambda i: (-members[i]["weight"], i))[:k]
    chosen = [members[i] for i in sorted(order)]  # keep ensemble order inside the level
    total = sum(m["weight"] for m in chosen)
    return [{**m, "weight": m["weight"] / total} for m in chosen]


def plan_levels(members: list[dict], tta: bool) -> list[Level]:
    m = len(members)
    total = sum(x["weight"] for x in members)
    everyone = [{**x, "weight": x["weight"] / total} for x in members]
    levels = [Level("full", "model.onnx", tta, everyone)]
    if tta:
        levels.append(Level("no_tta", "levels/no_tta.onnx", False, everyone))
    if m > 1:
        k = math.ceil(m / 2)
        levels.append(Level(f"top{k}_no_tta", f"levels/top{k}_no_tta.onnx", False, top_members(members, k)))
    return levels
