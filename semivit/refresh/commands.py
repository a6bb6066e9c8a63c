"""``ssl models list | promote VERSION | rollback``."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from semivit.errors import UserError
from semivit.refresh import history
from semivit.refresh import registry as reg


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def version_rows(registry: Path) -> list[dict]:
    """One dict per version (oldest first), the numbers ``models list`` shows."""
    cur = reg.current_version(registry)
    rows = []
    for v in reg.versions(registry):
        try:
            m = reg.read_manifest(registry / v)
        except UserError as e:
            rows.append({"version": v, "status": "unreadable", "note": str(e), "current": v == cur})
            continue
        val = (m.get("metrics") or {}).get("val") or {}
        hold = (m.get("metrics") or {}).get("holdout") or {}
        comp = m.get("comparison") or {}
        delta = next((c["delta"] for c in comp.get("checks", []) if c["metric"] == "val_macro_f1"), None)
        rows.append({"version": v, "status": m.get("status"), "current": v == cur, "parent": m.get("parent"),
                     "created": m.get("created", ""), "origin": m.get("origin", ""),
                     "val_macro_f1": val.get("macro_f1"), "val_stage": val.get("stage"),
                     "member_mean": val.get("member_mean"), "delta": delta,
                     "holdout_macro_f1": hold.get("macro_f1") if hold else None,
                     "inbox": (m.get("data") or {}).get("inbox_pseudo_labels", 0),
                     "note": (m.get("status_history") or [{}])[-1].get("why", "")})
    return rows


def list_cli(registry: Path) -> list[dict]:
    registry = reg.require_registry(registry)
    rows = version_rows(registry)
    cells = [["*" if r["current"] else "", r["version"], r["status"] or "", r.get("parent") or "",
              (r.get("created") or "")[5:16].replace("T", " "), _fmt(r.get("val_macro_f1")),
              "" if r.get("delta") is None else f"{r['delta']:+.4f}", _fmt(r.get("holdout_macro_f1")),
              str(r.get("inbox", "")), r.get("note", "")] for r in rows]
    heads = ["", "version", "status", "parent", "created", "val F1", "vs parent", "holdout", "inbox", "note"]
    table = Table(title=f"model registry {registry}", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    con = Console(highlight=False)
    note_width = con.width - sum(widths[:-1]) - 2 * len(heads)  # the note takes what is left
    if note_width < 12:  # a narrow terminal: leave the note out (manifest.json has it)
        heads, cells = heads[:-1], [c[:-1] for c in cells]
    for i, h in enumerate(heads):
        if h == "note":
            table.add_column(h, no_wrap=True, overflow="ellipsis", max_width=note_width)
        else:
            table.add_column(h, no_wrap=True, min_width=widths[i], justify="right" if i >= 5 else "left")
    colour = {"promoted": "green", "rejected": "red", "candidate": "yellow"}
    for c in cells:
        c[2] = f"[{colour.get(c[2], 'white')}]{c[2]}[/]"
        table.add_row(*c)
    con.print(table)
    con.print(f"current: {reg.current_version(registry)}   promotion history: "
              f"{' -> '.join(reg.promotion_stack(registry)) or '-'}   (* = current; val macro F1 = out-of-fold "
              "macro F1 of the retrained members on the original labeled folds; inbox = inbox "
              "pseudo-labels trained on)")
    if (registry / "inbox.sqlite").is_file():
        from semivit.refresh.inbox import Inbox

        with Inbox(registry) as db:
            c = db.counts()
        con.print(f"inbox: {sum(c[s] for s in ('new', 'pseudo_labeled', 'used', 'rejected'))} distinct images "
                  f"({c['paths']} paths): new {c['new']}, pseudo-labeled {c['pseudo_labeled']}, "
                  f"used {c['used']}, rejected {c['rejected']}")
    return rows


def promote_cli(registry: Path, version: str) -> str:
    registry = reg.require_registry(registry)
    name = reg.parse_version(version)
    if name not in reg.versions(registry):
        raise UserError(f"no version {name} in {registry} (have: {', '.join(reg.versions(registry)) or 'none'})")
    problems = reg.check_version(registry / name, load_export=True)
    if problems:
        raise UserError(f"refusing to promote {name}: {problems[0]}")
    prev, _ = reg.switch_current(registry, name)
    was = reg.read_manifest(registry / name)["status"]
    reg.set_status(registry, name, "promoted", f"promoted by hand (was {was}; previous current {prev})")
    history.append(registry, {"action": "promote", "version": name, "previous": prev, "decision": "promoted by hand"})
    Console(highlight=False).print(f"current: {prev} -> {name}")
    return name


def rollback_cli(registry: Path) -> str:
    registry = reg.require_registry(registry)
    stack = reg.promotion_stack(registry)
    if len(stack) < 2:
        raise UserError(f"nothing to roll back to: {registry} has no earlier promoted version "
                        f"(history: {' -> '.join(stack) or 'empty'})")
    target, cur = stack[-2], stack[-1]
    problems = reg.check_version(registry / target, load_export=True)
    if problems:
        raise UserError(f"refusing to roll back to {target}: {problems[0]}")
    reg.switch_current(registry, target, rollback=True)
    m = reg.read_manifest(registry / cur)
    m.setdefault("status_history", []).append({"time": reg.now_iso(), "status": m["status"],
                                               "why": f"rolled back (current -> {target})"})
    reg.write_manifest(registry / cur, m)
    history.append(registry, {"action": "rollback", "version": target, "previous": cur, "decision": "rolled back"})
    Console(highlight=False).print(f"current: {cur} -> {target} (rolled back)")
    return target
