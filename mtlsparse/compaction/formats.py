"""The files export writes, one per format, each reloaded in its runtime and checked.

* `state_dict`: `compact_model.pt` (`serialise`): weights + config, rebuilt with mtlsparse's
  model code (trainable again);
* `torch_export`: `compact_model.pt2`: `torch.export.export` with a dynamic batch axis, saved
  with `torch.export.save`; `torch.export.load(path).module()` runs it without mtlsparse;
* `onnx`: `compact_model.onnx`: torch's torch.export-based ONNX exporter (`dynamo=True`; the
  TorchScript exporter is deprecated since torch 2.9), input `input` with a dynamic batch
  axis, one named output per task; run with onnxruntime. Needs the `deploy` extra.

`choose_formats` is the one place a format request is read (the command's `--format`, the
config's `export.formats`): an unknown name or an explicitly requested format whose packages
are missing is a one-line `ConfigError`; `auto` takes every installed format and says why the
others were skipped.

`write_formats` writes the files into a staging directory inside the run dir, reloads each
and checks that its outputs on the export batch and on a batch of one (the batch axis is
dynamic) match the masked torch model's within `TOLERANCE` × max(1, largest |output|), and returns the reloaded runtimes
for timing. The files reach the run dir only on `Staging.commit`, so a failed export leaves an
earlier one as it was. A model with nothing to compact can still be written in the deploy
formats as `dense_model.*`: zeros in dense tensors, no runtime gain.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn

from mtlsparse.compaction.errors import ExportError
from mtlsparse.compaction.serialise import load_compact, save_compact
from mtlsparse.compaction.surgery import TOLERANCE
from mtlsparse.errors import ConfigError

log = logging.getLogger("mtlsparse")

#: every format, in the order they are written and reported
FORMATS = ("state_dict", "torch_export", "onnx")
#: formats that run without mtlsparse's code (a dense model is worth writing in them too)
DEPLOY_FORMATS = ("torch_export", "onnx")
AUTO = "auto"
#: importable packages each format needs beyond torch, and the extra that installs them
REQUIRES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}
EXTRAS = {"onnx": "deploy"}
SUFFIXES = {"state_dict": ".pt", "torch_export": ".pt2", "onnx": ".onnx"}
COMPACT_STEM = "compact_model"
DENSE_STEM = "dense_model"
INPUT_NAME = "input"
# an ONNX protobuf holds at most 2 GiB: bigger models keep their weights in `<file>.data` next to it
ONNX_INLINE_BYTES = 1 << 30
# loggers of the ONNX exporter that narrate every pass at INFO
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")

UNSTRUCTURED_NOTE = ("unstructured sparsity: no runtime gain in onnxruntime/torch; weights are zeros in dense "
                     "tensors")


def file_name(fmt: str, dense: bool = False) -> str:
    """`compact_model.onnx`, `dense_model.pt2`, ...: the file of format `fmt`."""
    return f"{DENSE_STEM if dense else COMPACT_STEM}{SUFFIXES[fmt]}"


def missing_packages(fmt: str) -> list[str]:
    """The packages format `fmt` needs that are not importable."""
    return [name for name in REQUIRES.get(fmt, ()) if importlib.util.find_spec(name) is None]


def _request(source: str, name: str) -> str:
    """How the user spelled a request: `--format onnx` or `export.formats=onnx`."""
    return f"{source} {name}" if source.startswith("-") else f"{source}={name}"


def needs_extra(fmt: str, source: str) -> str:
    """The one line for a requested format whose packages are missing."""
    extra = EXTRAS[fmt]
    return f"{_request(source, fmt)} needs the '{extra}' extra: pip install \"mtlsparse[{extra}]\""


def parse_formats(requested: Any, source: str = "--format") -> tuple[str, ...] | None:
    """The format names in `requested`, checked; None for `auto` (every installed format).

    Accepts None, `auto`, a name, a comma list (`onnx,torch_export`) or a list of those (a
    repeated `--format`, a yaml list). An unknown name is a one-line `ConfigError`.
    """
    if requested is None:
        return None
    items = [requested] if isinstance(requested, str) else list(requested) \
        if isinstance(requested, (list, tuple, ListConfig)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{source} takes format names ({', '.join(FORMATS)}) or {AUTO}, got {requested!r}")
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{source} names no format; choose from {', '.join(FORMATS)} or {AUTO}")
    if AUTO in names:
        if len(names) > 1:
            raise ConfigError(f"{source}: {AUTO} (every installed format) cannot be combined with format names")
        return None
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format {', '.join(map(repr, unknown))} in {source}; "
                          f"choose from {', '.join(FORMATS)} or {AUTO}")
    return tuple(name for name in FORMATS if name in names)


@dataclass(frozen=True)
class FormatChoice:
    """The formats to write, the ones `auto` skipped (format → why), and whether they were named."""

    formats: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    explicit: bool = False

    @property
    def deploy(self) -> tuple[str, ...]:
        return tuple(fmt for fmt in self.formats if fmt in DEPLOY_FORMATS)

    def skipped_line(self) -> str | None:
        """'skipped format onnx: ...' for the log, None when nothing was skipped."""
        if not self.skipped:
            return None
        return "; ".join(f"skipped format {fmt}: {why}" for fmt, why in self.skipped.items())


def choose_formats(requested: Any, source: str = "--format") -> FormatChoice:
    """What to write for a request (`parse_formats`): named formats must be installed (else a
    one-line `ConfigError` naming the extra); `auto` keeps the installed ones and records why
    each other was skipped."""
    names = parse_formats(requested, source)
    if names is not None:
        for fmt in names:
            if missing_packages(fmt):
                raise ConfigError(needs_extra(fmt, source))
        return FormatChoice(names, explicit=True)
    skipped = {fmt: f"{', '.join(missing)} not installed (the '{EXTRAS[fmt]}' extra: pip install "
                    f"\"mtlsparse[{EXTRAS[fmt]}]\")"
               for fmt in FORMATS if (missing := missing_packages(fmt))}
    return FormatChoice(tuple(fmt for fmt in FORMATS if fmt not in skipped), skipped)


# ------------------------------------------------------------------ outputs


def output_names(outputs: Any) -> list[str]:
    """Names of a model's outputs: a dict's keys (task names), else `output` / `output_0`, `output_1`, ..."""
    if isinstance(outputs, dict):
        names = [str(name) for name in outputs]
        if INPUT_NAME in names:
            raise ExportError(f"a task named '{INPUT_NAME}' clashes with the exported input's name")
        return names
    if isinstance(outputs, Tensor):
        return ["output"]
    return [f"output_{i}" for i in range(len(outputs))]


def output_list(outputs: Any) -> list[Tensor]:
    """A model's outputs as a list, in `output_names` order."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, Tensor):
        return [outputs]
    return list(outputs)


class NamedOutputs(nn.Module):
    """`model` with its outputs as a tuple in a fixed order, so each becomes a named ONNX output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(output_list(self.model(x)))


def max_output_diff(reference: Sequence[Tensor], outputs: Sequence[Any]) -> float:
    """Largest |difference| between two output lists (tensors or numpy arrays), shapes checked."""
    outputs = [torch.as_tensor(out) for out in outputs]
    if len(reference) != len(outputs) or any(r.shape != o.shape for r, o in zip(reference, outputs)):
        raise ExportError(f"the exported model's outputs {[tuple(o.shape) for o in outputs]} do not have the "
                          f"torch model's shapes {[tuple(r.shape) for r in reference]}")
    return max((float((r.float() - o.float()).abs().max()) for r, o in zip(reference, outputs) if r.numel()),
               default=0.0)


# ------------------------------------------------------------------ the runtimes


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's INFO narration kept out of the job log (its warnings still show)."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def batch_dynamic() -> tuple[dict[int, Any]]:
    """`dynamic_shapes` for a model of one input whose dim 0 is the batch."""
    return ({0: torch.export.Dim("batch")},)


def save_torch_export(model: nn.Module, x: Tensor, path: Path) -> None:
    """`torch.export.export` of `model` on `x` with a dynamic batch axis, saved to `path` (`.pt2`)."""
    with quiet_exporter(), torch.no_grad():
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=batch_dynamic())
    torch.export.save(program, path)


class ProgramRunner:
    """A saved `.pt2` program reloaded with `torch.export.load`, called like a model.

    A plain callable, not a module: the program's module is fixed in inference form and
    refuses `.eval()`.
    """

    def __init__(self, path: Path) -> None:
        self.module = torch.export.load(path).module()

    def __call__(self, x: Tensor) -> Any:
        return self.module(x)


def save_onnx(model: nn.Module, x: Tensor, path: Path) -> list[str]:
    """ONNX of `model` on `x` (dynamic batch axis, named outputs) at `path`; returns the output names."""
    model = model.eval()
    with torch.no_grad():
        names = output_names(model(x))
    inline = sum(t.numel() * t.element_size() for t in model.state_dict().values()) < ONNX_INLINE_BYTES
    with quiet_exporter():
        torch.onnx.export(NamedOutputs(model).eval(), (x,), path, input_names=[INPUT_NAME], output_names=names,
                          dynamo=True, dynamic_shapes=batch_dynamic(), external_data=not inline, verbose=False)
    return names


class OnnxRunner:
    """An onnxruntime session on the CPU (`threads` intra-op threads, sequential), called like a model.

    Returns the outputs as numpy arrays, in the file's output order.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output_names = [out.name for out in self.session.get_outputs()]

    def __call__(self, x: Tensor) -> list[Any]:
        return self.session.run(None, {self.input: x.detach().cpu().contiguous().numpy()})


# ------------------------------------------------------------------ writing and checking


class Staging:
    """A scratch directory inside the run dir; the kept files move into the run dir on `commit`."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".export-", dir=self.out_dir))
        self.kept: list[str] = []

    def path(self, name: str, keep: bool = True) -> Path:
        """Where to write `name`; with `keep`, it is moved into the run dir on commit."""
        if keep:
            self.kept.append(name)
        return self.dir / name

    def commit(self) -> list[Path]:
        """Move the kept files (and an ONNX file's external `.data`) into the run dir."""
        moved = []
        for name in self.kept:
            for source in (self.dir / name, self.dir / f"{name}.data"):
                if source.exists():
                    source.replace(self.out_dir / source.name)
                    moved.append(self.out_dir / source.name)
        return moved

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_runtime(reference: nn.Module, run: Callable[[Tensor], Any], xs: Iterable[Tensor], what: str) -> float:
    """max |Δ| between `run` and the torch `reference` on every batch in `xs`; `ExportError` past the bound.

    Another runtime's float32 kernels sum in other orders, so their rounding grows with the size of
    the outputs: the bound is `TOLERANCE` × max(1, largest |output|), relative for large logits
    and absolute for small ones (an ONNX model of a correct export differed by 1.4e-4 on logits
    of a batch of 512). A wrong export is off by far more.
    """
    diff, scale = 0.0, 0.0
    with torch.inference_mode():
        for x in xs:
            expected = output_list(reference(x))
            diff = max(diff, max_output_diff(expected, output_list(run(x))))
            scale = max([scale, *(float(out.abs().max()) for out in expected if out.numel())])
    bound = TOLERANCE * max(1.0, scale)
    if not diff <= bound:
        raise ExportError(f"{what} differs from the torch model by max |Δout| {diff:.3g} > {bound:.3g} "
                          f"({TOLERANCE:g} × max(1, largest |output| {scale:.3g}))")
    return diff


def write_deploy(model: nn.Module, fmt: str, x: Tensor, path: Path, threads: int) -> Callable[[Tensor], Any]:
    """Write `model` in deploy format `fmt` at `path` and return the reloaded runtime."""
    if fmt == "onnx":
        save_onnx(model, x, path)
        return OnnxRunner(path, threads)
    save_torch_export(model, x, path)
    return ProgramRunner(path)


def write_formats(dense: nn.Module, small: nn.Module | None, x: Tensor, staging: Staging,
                  formats: Sequence[str], config: DictConfig | dict | None = None,
                  threads: int = 1) -> tuple[dict[str, Any], dict[str, Callable[[Tensor], Any]]]:
    """Write `formats` of the compact model `small` (or, with `small=None`, the deploy formats of
    `dense`) into `staging`, reload and check each against the masked torch model `dense`.

    With a compact model the dense model is written in each deploy format too, checked and
    returned for timing, but not kept. Returns the metrics (`export/<format>/max_abs_diff`
    of the kept file, `export/<format>/dense_max_abs_diff`, `export/<format>/file`) and the
    reloaded runtimes by `<format>/dense` and `<format>/compact`.
    """
    xs = (x, x[:1])  # the export batch and a batch of one: the batch axis is dynamic
    example = x[:2] if len(x) >= 2 else torch.cat([x, x])  # traced at 2: a batch of 1 would be specialised
    metrics: dict[str, Any] = {}
    runtimes: dict[str, Callable[[Tensor], Any]] = {}
    for fmt in formats:
        if fmt == "state_dict":
            if small is None:
                continue
            path = staging.path(file_name(fmt))
            save_compact(small, path, config)
            reloaded = load_compact(path, copy.deepcopy(dense))
            metrics[f"export/{fmt}/max_abs_diff"] = check_runtime(dense, reloaded, xs, f"reloaded {path.name}")
            metrics[f"export/{fmt}/file"] = path.name
            continue
        dense_path = staging.path(file_name(fmt, dense=True), keep=small is None)
        runtimes[f"{fmt}/dense"] = write_deploy(dense, fmt, example, dense_path, threads)
        metrics[f"export/{fmt}/dense_max_abs_diff"] = check_runtime(dense, runtimes[f"{fmt}/dense"], xs,
                                                                    f"{fmt} {dense_path.name}")
        if small is None:
            metrics[f"export/{fmt}/max_abs_diff"] = metrics[f"export/{fmt}/dense_max_abs_diff"]
            metrics[f"export/{fmt}/file"] = dense_path.name
            continue
        path = staging.path(file_name(fmt))
        runtimes[f"{fmt}/compact"] = write_deploy(small, fmt, example, path, threads)
        metrics[f"export/{fmt}/max_abs_diff"] = check_runtime(dense, runtimes[f"{fmt}/compact"], xs,
                                                              f"{fmt} {path.name}")
        metrics[f"export/{fmt}/file"] = path.name
    return metrics, runtimes
