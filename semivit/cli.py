"""The ``ssl`` command line: parses options and delegates.  No logic lives here."""

from __future__ import annotations

import errno
import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from semivit.errors import UserError

try:  # Typer >= 0.22 vendors Click as typer._click; older Typer uses Click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the Typer version
    from click import exceptions as click_errors

_ABORTS = tuple({typer.Abort, getattr(click_errors, "Abort", typer.Abort)})


class OneLineErrors(TyperGroup):
    """The one central hook for Click's own errors (a bad choice or range, a missing argument, an
    unknown option or subcommand): one line starting ``error:`` and exit code 2, like every other
    error of ``ssl``, instead of Typer's multi-line box.  ``ssl`` or ``ssl models`` alone still
    print their help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:
            e.show()
            rv = 0
        except click_errors.ClickException as e:
            usage = isinstance(e, click_errors.UsageError)
            msg = " ".join(e.format_message().replace("Value error, ", "").split())
            where = getattr(e, "ctx", None) and e.ctx.command_path
            typer.echo(f"error: {msg}" + (f" (see `{where} --help`)" if usage and where else ""), err=True)
            rv = 2 if usage else e.exit_code
        except _ABORTS:
            typer.echo("error: aborted", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="ssl",
    help="semivit: semi-supervised Vision Transformers - train, export, predict, refresh.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Inspect and switch the versions in a model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def cli_errors(fn):
    """One line and exit code 2 for user errors; one line and exit 1 for anything unexpected."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg="red", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if os.environ.get("SEMIVIT_DEBUG"):
                raise
            if isinstance(e, OSError) and e.errno in _FULL:
                where = f" writing {e.filename}" if e.filename else ""
                typer.secho(f"error: {e.strerror}{where}: the disk, quota or file-size limit is full; no output "
                            "was half-written (outputs are renamed into place only when complete)", fg="red", err=True)
                raise typer.Exit(1) from None
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            typer.secho(f"error: {type(e).__name__}: {msg} (set SEMIVIT_DEBUG=1 for the traceback)",
                        fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _choices(name: str, names) -> type[Enum]:
    """An Enum (typer's choice type) of the names a registry holds, in its order."""
    return Enum(name, {n: n for n in names}, type=str)


def _registered_choices():
    # The names live where the things are registered; adding one there adds it here.
    from semivit.config import DEVICES, PRESETS
    from semivit.serve.backends import backend_names
    from semivit.serve.predict import ENGINES
    from semivit.serve.writers import FORMATS
    from semivit.trainer.stages import stage_names

    backends = ["auto"] + [b for b in backend_names() if b != "auto"]
    return (_choices("Preset", PRESETS), _choices("Device", DEVICES), _choices("Backend", backends),
            _choices("Engine", ENGINES), _choices("Format", FORMATS), stage_names())


Preset, Device, Backend, Engine, Format, STAGE_NAMES = _registered_choices()


@app.command("demo-data")
@cli_errors
def demo_data(
    out: Path = typer.Argument(..., help="Directory to create (must be new or empty)."),
    labeled_fraction: float = typer.Option(0.2, help="Share of the training pool that keeps its labels."),
    seed: int = typer.Option(0, help="Seed for the stratified splits."),
):
    """Write the embedded ELPV solar-cell data as train/ (labeled), unlabeled/ and test/."""
    from semivit.data.demo import write_demo

    counts = write_demo(out, labeled_fraction=labeled_fraction, seed=seed)
    for split, per in counts.items():
        typer.echo(f"{split:10s} {sum(per.values()):5d}  " + "  ".join(f"{k}={v}" for k, v in per.items()))
    typer.echo(f"wrote {out}")


@app.command()
@cli_errors
def train(
    data: Optional[Path] = typer.Argument(None, help="DATA directory; default: the embedded ELPV demo data."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<timestamp>)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file applied over the preset."),
    preset: Optional[Preset] = typer.Option(None, "--preset", help=f"{', '.join(Preset.__members__)}: tiny (tests), quick (default), seed (GPU)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override one key, e.g. --set train.epochs=5."),
    stages: Optional[str] = typer.Option(None, help=f"Comma list from {','.join(STAGE_NAMES)}."),
    device: Optional[Device] = typer.Option(None, help=f"{', '.join(Device.__members__)}."),
    seed: Optional[int] = typer.Option(None, help="Seed for python, numpy and torch."),
    registry: Optional[Path] = typer.Option(None, help="Also register the result as the registry's first version."),
):
    """Run the semi-supervised pipeline and write a 10-model ensemble to the run directory."""
    from semivit import config as cfgmod

    cfg = cfgmod.resolve(
        preset=preset.value if preset else None,
        config_file=config,
        overrides=set_ or [],
        **{"device": device.value if device else None, "seed": seed},
    )
    if registry is not None:  # a foreign --registry is refused now, not after the training
        from semivit.kinds import require_registry_or_new

        require_registry_or_new(registry)
    from semivit.trainer.pipeline import run_training

    run = run_training(data=data, out=out, cfg=cfg, stages=stages)
    if registry is not None and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 registers
        from semivit.refresh.build import register_run

        register_run(registry, run.dir)


@app.command("eval")
@cli_errors
def eval_(
    model: Path = typer.Argument(..., help="A run directory or an export directory."),
    data: Path = typer.Argument(..., help="Labeled images: DIR/labels.csv, DIR/test/<class>/ or DIR/<class>/."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report JSON (a PNG confusion matrix is written beside it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out report and its PNG."),
):
    """Macro F1, accuracy, per-class scores and the confusion matrix on labeled images."""
    from semivit.evaluate import evaluate_cli

    evaluate_cli(model, data, out, force=force)


@app.command()
@cli_errors
def export(
    run: Path = typer.Argument(..., help="A trained run directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Export directory (default RUN/export)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (needs a CUDA GPU)."),
    int8: bool = typer.Option(False, "--int8", help="Also write an INT8 graph for CPU serving if it keeps macro F1."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Leave the horizontal-flip TTA out of the graph."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Largest batch of the TensorRT profile."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export directory."),
    candidates: Optional[str] = typer.Option(
        None, "--candidates", help="Serving candidates to build, gate and time for `predict --backend auto`: auto "
                                   "(all that apply here; the default, or SEMIVIT_EXPORT_CANDIDATES), none (FP32 "
                                   "only), or a comma list."),
):
    """Export the ensemble as one ONNX graph (TTA and preprocessing fused), verified against PyTorch."""
    from semivit.export.exporter import export_run

    export_run(run, out=out, trt=trt, int8=int8, tta=not no_tta, max_batch=max_batch, force=force,
               candidates=candidates)


@app.command()
@cli_errors
def predict(
    dir: Path = typer.Argument(..., help="Directory of images (searched recursively)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Export dir, run dir or registry (then its current version)."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="Output file."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0.1, help="Finish within this many seconds."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    backend: Backend = typer.Option(Backend.auto, "--backend"),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: take the I-th of N deterministic parts."),
    format: Format = typer.Option(Format.csv, "--format"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    engine: Engine = typer.Option(Engine.local, "--engine",
                                  help="local, or ray: a Ray Data pipeline (pip install 'semivit[ray]')."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray cluster address (--engine ray; default: a local Ray)."),
):
    """Predict every image in a directory; every file gets exactly one row."""
    from semivit.serve.predict import predict_cli

    code = predict_cli(dir, model=model, out=out, time_limit=time_limit, batch_size=batch_size,
                       backend=backend.value, shard=shard, fmt=format.value, force=force,
                       engine=engine.value, address=address)
    raise typer.Exit(code)


@app.command()
@cli_errors
def refresh(
    registry: Path = typer.Option(..., "--registry", help="Model registry directory."),
    inbox: Path = typer.Option(..., "--inbox", help="Directory where new field images arrive (never modified)."),
    every: Optional[str] = typer.Option(None, "--every", help="Run in a loop, e.g. 30m, 6h, 1d."),
    min_new: int = typer.Option(50, "--min-new", min=1, help="Retrain once this many new pseudo-labels exist."),
    tolerance: float = typer.Option(0.0, "--tolerance", min=-1.0, max=1.0,
                                    help="Promote if macro F1 drops by at most this (negative: demand a gain)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a training key for the retrain."),
):
    """Pseudo-label new inbox images, retrain, compare, promote atomically (or keep the old model)."""
    from semivit.refresh.job import refresh_cli

    raise typer.Exit(refresh_cli(registry, inbox, every=every, min_new=min_new,
                                 tolerance=tolerance, overrides=set_ or []))


@models_app.command("list")
@cli_errors
def models_list(registry: Path = typer.Option(..., "--registry")):
    """Versions, their metrics, and which one is current."""
    from semivit.refresh.commands import list_cli

    list_cli(registry)


@models_app.command("promote")
@cli_errors
def models_promote(version: str = typer.Argument(...), registry: Path = typer.Option(..., "--registry")):
    """Make VERSION the serving version (atomic switch)."""
    from semivit.refresh.commands import promote_cli

    promote_cli(registry, version)


@models_app.command("rollback")
@cli_errors
def models_rollback(registry: Path = typer.Option(..., "--registry")):
    """Go back to the previously current version."""
    from semivit.refresh.commands import rollback_cli

    rollback_cli(registry)


TRAINING_COMMANDS = ("train", "refresh")  # their training loops adapt their threads to the load


def _command(argv: list[str]) -> Optional[str]:
    """The subcommand named on the command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main() -> None:
    from semivit.utils import cpu_runtime_defaults, keep_freed_memory

    # before any command imports torch (OpenMP reads these once)
    cpu_runtime_defaults(training=_command(sys.argv[1:]) in TRAINING_COMMANDS)
    keep_freed_memory()  # glibc keeps freed blocks: no page faults on every training step
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
