"""PyTorch backend: the run's own checkpoints, for a run that was not exported.

``torch`` runs eager fp32 (on CUDA when a GPU is visible, else the CPU).  ``torch-fp16`` (CUDA
only) runs the same ensemble under fp16 autocast, captured once per batch shape as a CUDA graph
and replayed: on an H200 4.4x eager fp32 at batch 32 on the quick ensemble, arg-max agreement
0.9985 with fp32 on the ELPV test split (benchmarks/results/speed_gpu.md).  It is never chosen
by ``auto``: a user asks for it.  On CUDA both warm up at load (one batch), so CUDA's one-time
initialisation is part of the load time and not of the first batch the time-limit scheduler
measures.

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


def capture_cuda_graph(forward, static_in, pool=None):
    """(graph, static output) of ``forward(static_in)`` captured as a CUDA graph: two warm-up calls
    on a side stream first (cuBLAS workspaces, autotuning), as torch.cuda.graphs' docs ask.
    Replay: copy new data into ``static_in``, ``graph.replay()``, read the static output."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(static_in)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        static_out = forward(static_in)
    return g, static_out


class TorchBackend(Backend):
    name = "torch"

    GRAPHS_MAX = 8  # CUDA graphs kept per level (one per batch shape); other shapes run eager

    def __init__(self, ref: ModelRef, threads: Optional[int] = None, device: Optional[str] = None,
                 precision: str = "fp32", warmup_batch: int = 32, **_ignored):
        super().__init__(ref)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, not {precision!r}")
        self.precision = precision
        if precision == "fp16":
            self.name = "torch-fp16"
        if ref.run_dir is None:
            raise BackendUnavailable(f"the torch backend needs the run directory (ensemble.json and checkpoints); "
                                     f"{ref.export_dir} is an export without its run")
        import torch

        from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble

        self.torch = torch
        self._Ensemble = EnsembleModel
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendUnavailable("torch-fp16 needs a CUDA GPU (fp16 autocast + CUDA graphs); "
                                     "this machine has none visible to torch: use --backend torch or auto")
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
        from semivit.models.pool_graph import read_graph

        self._graph_doc = read_graph(ref.run_dir)  # ensemble.graph: pool - as the export's levels
        self.levels = torch_levels(entries)
        self._built: dict[int, object] = {}
        self._graphs: dict[tuple[int, int], tuple] = {}  # (level, batch) -> (graph, static in, static out)
        self._pool = None
        self.set_level(0)
        if self.device.type == "cuda" and warmup_batch > 0:
            # CUDA context, cuBLAS/cuDNN handles and lazily loaded kernels: paid here, at load
            self._run(np.zeros((warmup_batch, self.img_size, self.img_size, 3), np.uint8))

    def _activate(self, i: int) -> None:
        if i not in self._built:
            lv = self.levels[i]
            from semivit.models.pool_graph import graph_for

            names = lv.member_names
            g, g_idx = graph_for(self._graph_doc, names)
            model = self._Ensemble([self._models[n] for n in names], [self._weights[n] for n in names],
                                   tta=lv.tta, mean=self._mean, std=self._std, graph=g, graph_members=g_idx)
            self._built[i] = model.to(self.device).eval()

    def _forward(self, x):
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16"):
            probs, labels = self._built[self.level](x)
            return probs.float(), labels

    def _run(self, images: np.ndarray):
        x = self.torch.from_numpy(images)
        if self.precision == "fp16":
            out = self._graph_run(x)
            if out is not None:
                return out
        probs, labels = self._forward(x.to(self.device))
        return probs.cpu().numpy(), labels.cpu().numpy()

    def _graph_run(self, x):
        """Replay this level's CUDA graph for x's batch size (captured on first use), or None when
        GRAPHS_MAX shapes are already held for the level (then the caller runs eager)."""
        torch = self.torch
        key = (self.level, len(x))
        if key not in self._graphs:
            if sum(1 for k in self._graphs if k[0] == self.level) >= self.GRAPHS_MAX:
                return None
            static_in = x.to(self.device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph
            g, static_out = capture_cuda_graph(self._forward, static_in, self._pool)
            self._graphs[key] = (g, static_in, static_out)
        g, static_in, (probs, labels) = self._graphs[key]
        static_in.copy_(x)
        g.replay()
        return probs.cpu().numpy(), labels.cpu().numpy()

    def describe(self) -> str:
        dev = (f"cuda ({self.torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
               else f"cpu ({self.threads} threads)")
        how = "fp16 autocast, CUDA graphs" if self.precision == "fp16" else "eager"
        return f"torch {self.torch.__version__} {how} on {dev}"

    def close(self) -> None:
        self._graphs.clear()
        self._built.clear()
        self._models = {}
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


@register_backend("torch")
def _torch(ref: ModelRef, **kw) -> TorchBackend:
    return TorchBackend(ref, **kw)


@register_backend("torch-fp16")
def _torch_fp16(ref: ModelRef, **kw) -> TorchBackend:
    return TorchBackend(ref, **{**kw, "precision": "fp16"})
