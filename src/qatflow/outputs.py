"""A step's output files: checked before any work, staged, then committed all together.

``staged_outputs`` refuses an output that cannot be written (a folder, a parent that is a file,
a folder without write access, the step's own input, the sidecar name of an engine) before the
step does any work. The step writes its main output and side files into a staging folder; only
when the step succeeds are they moved into place (side files first, the main output last) or,
for an ``s3://`` output, uploaded (then the URI is reported). A failed step leaves none of them.
Side files the step may write but did not write this time are removed at the destination, so a
later step never picks up a stale one from an earlier run; so are the staging folders that runs
killed before they could clean up left for the same output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qatflow import storage
from qatflow.errors import StorageError

log = logging.getLogger("qatflow.outputs")

PathLike = str | os.PathLike[str]
Location = Path | str  # a local path, or an s3:// URI as a string
# Files whose ``<name>.json`` is an engine sidecar (TensorRT) that an output must not replace.
ENGINE_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")


def side_location(main: PathLike, suffix: str) -> Location:
    """The side file of ``main`` with ``suffix``: ``q.keras`` + ``.placement.md``; a URI stays
    a URI."""
    if storage.is_s3_uri(main):
        text = str(main)
        folder, _, name = text.rpartition("/")
        return f"{folder}/{Path(name).stem}{suffix}"
    path = Path(main)
    return path.with_name(path.stem + suffix)


def check_output(
    output: PathLike, *, inputs: Iterable[PathLike | None] = (), overwrite: bool | None = None
) -> None:
    """Raise a StorageError naming ``output`` unless a step can write it.

    Checked: an ``s3://`` output names an object in a bucket that exists, with credentials
    set (``storage.check_uploadable``); a local output is not a folder, its parent
    folder can be created and written (a file is created and removed there); ``output`` is not
    one of ``inputs`` unless ``overwrite`` (None: the step offers no such option, so the message
    does not suggest it); ``output`` is not ``<engine file>.json``.
    """
    for source in inputs:
        if source is not None and _same(output, source) and not overwrite:
            remedy = "" if overwrite is None else ", or pass --overwrite (overwrite=True)"
            raise StorageError(
                f"output {output} is the input {source}: it would be overwritten; give another "
                f"--output{remedy}"
            )
    if storage.is_s3_uri(output):
        storage.check_uploadable(str(output))
        return
    final = Path(output).expanduser()
    if final.is_dir():
        raise StorageError(f"output {final} is a folder: give a file name")
    engine = final.with_name(final.name.removesuffix(".json"))
    if final.suffix == ".json" and engine.suffix in ENGINE_SUFFIXES and engine.is_file():
        raise StorageError(
            f"output {final} is the metadata sidecar name of the engine {engine}: writing it "
            "would change how that engine loads; choose another --output"
        )
    _check_folder(final)


@contextlib.contextmanager
def staged_outputs(
    output: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool | None = None,
    side_names: Sequence[str] = (),
) -> Iterator[Staging]:
    """Check ``output`` (see ``check_output``), then yield a ``Staging`` to write files into.

    ``side_names`` are the file names (beside the output) of the side files the step may write.
    """
    check_output(output, inputs=inputs, overwrite=overwrite)
    remote = storage.is_s3_uri(output)
    final = str(output) if remote else Path(output).expanduser()
    name = final.rpartition("/")[2] if isinstance(final, str) else final.name
    parent = None if isinstance(final, str) else final.parent
    if parent is not None:  # the staging folders of runs that were killed
        for leftover in parent.glob(f".{name}.staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent))
    except OSError as exc:
        raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    try:  # at once: an interrupt from here on removes the folder
        staging = Staging(final, folder / name, side_names)
        yield staging
        staging.commit()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Staging:
    """Where a step writes its outputs (``main``, ``side``) before they are committed."""

    def __init__(self, final: Location, main: Path, side_names: Sequence[str]) -> None:
        self.final = final
        self.main = main
        self._side_names = tuple(side_names)

    def side(self, suffix: str) -> Path:
        """The staging path of the side file with ``suffix`` (``.calibration.json``)."""
        return Path(side_location(self.main, suffix))

    def location(self, staged: PathLike) -> Location:
        """Where the staged file ``staged`` ends up once committed."""
        name = Path(staged).name
        if isinstance(self.final, str):
            return f"{self.final.rpartition('/')[0]}/{name}"
        return self.final.with_name(name)

    def commit(self) -> None:
        """Move (or upload) every staged file into place, the main output last."""
        if not self.main.exists():
            raise StorageError(f"the step wrote nothing to {self.final}")
        staged = sorted(p for p in self.main.parent.iterdir() if not p.name.startswith("."))
        order = [p for p in staged if p != self.main] + [self.main]
        written = {p.name for p in order}
        for path in order:
            target = self.location(path)
            if isinstance(target, str):
                storage.upload(path, target)
            else:
                _replace(path, target)
        if isinstance(self.final, Path):
            for name in self._side_names:
                stale = self.final.with_name(name)
                if name not in written and stale.is_file():
                    log.info("removing %s, left by an earlier run", stale)
                    stale.unlink()


def _replace(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc


def _check_folder(final: Path) -> None:
    """The parent of ``final`` exists (created if needed) and takes new files."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (final.parent, *final.parent.parents) if p.exists())
        raise StorageError(f"cannot write {final}: {blocker} is a file, not a folder") from None
    except OSError as exc:
        raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    try:
        with tempfile.TemporaryFile(dir=final.parent):
            pass
    except OSError as exc:
        raise StorageError(
            f"cannot write {final}: folder {final.parent} is not writable ({exc.strerror or exc})"
        ) from exc


def _same(output: PathLike, source: PathLike) -> bool:
    if storage.is_s3_uri(output) or storage.is_s3_uri(source):
        return str(output) == str(source)
    a, b = Path(output).expanduser(), Path(source).expanduser()
    return a.resolve() == b.resolve()
