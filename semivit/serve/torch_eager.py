"""PyTorch eager backend: the run's own checkpoints, for a run that was not exported.

Levels: ``full`` (all members, flip TTA), ``no_tta`` (all members), ``top{k}_no_tta`` (the
k = ceil(M/2) members with the largest ensemble weights, weights renormalised).  The members are
loaded once; a level is an :class:`~semivit.models.ensemble.EnsembleModel` over a subset of them.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from semivit.serve.backends import Backend, BackendUnavailable, Level, default_threads, first_line, register_backend
from semivit.serve.resolve import ModelRef


def torch_levels(members: list[dict]) -> list[Level]:
    m = len(members)
    names = tuple(x["name"] for x in members)
    levels = [Level("full", True, m, member_names=names), Level("no_tta", False, m, member_names=names)]
    k = math.ceil(m / 2)
    if k < m:
        order = sorted(range(m), key=lambda i: -float(members[i].get("weight", 0.0)))[:k]
        top = tuple(names[i] for i in sorted(order))
        levels.append(Level(f"top{k}_no_tta", False, k, member_names=top))
    return levels


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ref: ModelRef, threads: Optional[int] = None, device: Optional[str] = None, **_ignored):
        super().__init__(ref)
        if ref.run_dir is None:
            raise BackendUnavailable(f"the torch backend needs the run directory (ensemble.json and checkpoints); "
                                     f"{ref.export_dir} is an export without its run")
        import torch

        from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble

        self.torch = torch
        self._Ensemble = EnsembleModel
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.threads = int(threads or default_threads())
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        doc = read_ensemble(ref.run_dir)
        try:
            models, weights, entries = load_members(ref.run_dir, doc)
        except Exception as e:  # noqa: BLE001 - UserError or a torch error: both mean "cannot load"
            raise BackendUnavailable(f"cannot load the run's checkpoints: {first_line(e)}") from None
        self._models = {e["name"]: m.to(self.device).eval() for e, m in zip(entries, models)}
        self._weights = {e["name"]: w for e, w in zip(entries, weights)}
        self._mean, self._std = doc["mean"], doc["std"]
        self.levels = torch_levels(entries)
        self._built: dict[int, object] = {}
        self.set_level(0)

    def _activate(self, i: int) -> None:
        if i not in self._built:
            lv = self.levels[i]
            names = lv.member_names
            model = self._Ensemble([self._models[n] for n in names], [self._weights[n] for n in names],
                                   tta=lv.tta, mean=self._mean, std=self._std)
            self._built[i] = model.to(self.device).eval()

    def _run(self, images: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device)
            probs, labels = self._built[self.level](x)
            return probs.float().cpu().numpy(), labels.cpu().numpy()

    def describe(self) -> str:
        dev = (f"cuda ({self.torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
               else f"cpu ({self.threads} threads)")
        return f"torch {self.torch.__version__} eager on {dev}"


@register_backend("torch")
def _torch(ref: ModelRef, **kw) -> TorchBackend:
    return TorchBackend(ref, **kw)
