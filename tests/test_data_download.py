"""Downloads against a local HTTP server on 127.0.0.1 (nothing else may be contacted): full download
+ checksum + extraction, resume from a .part file, checksum mismatch, a server without Range
support, mirrors, unsafe archives, junk answers and stalled transfers, the ``factorlm data``
command and the real dataset table."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from factorlm.cli import main
from factorlm.data import open_corpus
from factorlm.data import download as dl
from factorlm.data.corpus import _detect_layout

PTB_FILES = {
    "ptb.train.txt": b" the cat sat \n the dog sat \n a <unk> ran \n",
    "ptb.valid.txt": b" the cat ran \n",
    "ptb.test.txt": b" a dog sat \n",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Refuse any connection that is not to 127.0.0.1."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] != "127.0.0.1":
            raise AssertionError(f"a test tried to contact {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.support_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.trickle is not None:  # one byte at a time, slowly (stops when the client hangs up)
            deadline = time.monotonic() + 5.0
            for i in range(len(body)):
                if time.monotonic() > deadline:
                    break
                try:
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    break
                time.sleep(server.trickle)
            self.close_connection = True
            return
        if server.truncate_at is not None:  # the connection drops part-way
            body = body[: server.truncate_at]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.support_range, httpd.truncate_at, httpd.trickle = {}, [], True, None, None
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def ptb_tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        members = {f"./simple-examples/data/{k}": v for k, v in PTB_FILES.items()}
        members["./simple-examples/data/ptb.char.train.txt"] = b"c a t\n"
        members["./simple-examples/README"] = b"readme\n"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ptb_spec(server, archive: bytes, **changes) -> dl.DatasetSpec:
    server.files["/simple-examples.tgz"] = archive
    spec = replace(dl.DATASETS["ptb"],
                   archive=dl.RemoteFile((server.base + "/simple-examples.tgz",), "simple-examples.tgz",
                                         sha256(archive)),
                   checks=tuple((name, sha256(data)) for name, data in PTB_FILES.items()))
    return replace(spec, **changes)


def test_full_download_checksum_and_extraction(server, tmp_path):
    archive = ptb_tarball()
    messages = []
    target = dl.download_dataset(ptb_spec(server, archive), tmp_path / "ptb", log=messages.append)
    assert target == tmp_path / "ptb"
    assert sorted(p.name for p in target.iterdir()) == [dl.MARKER, *sorted(PTB_FILES)]  # archive deleted
    for name, data in PTB_FILES.items():
        assert (target / name).read_bytes() == data
    corpus = open_corpus(target)
    assert corpus.layout == "ptb" and corpus.num_tokens("train") == 12
    assert server.requests == [("/simple-examples.tgz", None)]
    # already complete: nothing is fetched again
    dl.download_dataset(ptb_spec(server, archive), target, log=messages.append)
    assert len(server.requests) == 1 and "already in" in messages[-1]


def test_zip_layout_and_keep_archive(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("wikitext-2/", "")
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2/wiki.{split}.tokens", f" \n = Title = \n the {split} text \n")
    data = buffer.getvalue()
    server.files["/wikitext-2-v1.zip"] = data
    spec = replace(dl.DATASETS["wikitext-2"],
                   archive=dl.RemoteFile((server.base + "/wikitext-2-v1.zip",), "wikitext-2-v1.zip", sha256(data)))
    target = dl.download_dataset(spec, tmp_path / "w2", keep_archive=True, log=lambda m: None)
    assert (target / "wikitext-2-v1.zip").read_bytes() == data
    assert open_corpus(target).num_tokens("valid") == 3 + 3 + 3


def test_resume_after_an_interrupted_download(server, tmp_path):
    archive = ptb_tarball() + bytes(range(256)) * 40  # trailing bytes: tar ignores them
    spec = ptb_spec(server, archive)
    half = len(archive) // 2
    server.truncate_at = half
    with pytest.raises(dl.DownloadError, match=f"closed after {half:,} of {len(archive):,} bytes.*run again to resume"):
        dl.download_dataset(spec, tmp_path, log=lambda m: None)
    part = tmp_path / "simple-examples.tgz.part"
    assert part.read_bytes() == archive[:half]
    assert not (tmp_path / "simple-examples.tgz").exists() and not (tmp_path / dl.MARKER).exists()
    server.truncate_at = None
    messages = []
    dl.download_dataset(spec, tmp_path, log=messages.append)
    assert server.requests[-1] == ("/simple-examples.tgz", f"bytes={half}-")
    assert any(f"resuming simple-examples.tgz.part after {half:,} bytes" in m for m in messages)
    assert not part.exists() and (tmp_path / "ptb.train.txt").read_bytes() == PTB_FILES["ptb.train.txt"]


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    archive = ptb_tarball()
    server.support_range = False
    (tmp_path / "simple-examples.tgz.part").write_bytes(b"stale bytes that must be discarded")
    messages = []
    dl.download_dataset(ptb_spec(server, archive), tmp_path, log=messages.append)
    assert server.requests == [("/simple-examples.tgz", "bytes=34-")]  # asked to resume, got the whole file
    assert any("does not support resuming" in m for m in messages)
    assert (tmp_path / "ptb.valid.txt").read_bytes() == PTB_FILES["ptb.valid.txt"]


def test_part_file_longer_than_the_download_starts_over(server, tmp_path):
    archive = ptb_tarball()
    (tmp_path / "simple-examples.tgz.part").write_bytes(b"x" * (len(archive) + 10))
    dl.download_dataset(ptb_spec(server, archive), tmp_path, log=lambda m: None)
    assert [r[1] for r in server.requests] == [f"bytes={len(archive) + 10}-", None]  # 416, then from zero
    assert (tmp_path / "ptb.test.txt").read_bytes() == PTB_FILES["ptb.test.txt"]


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    archive = ptb_tarball()
    spec = ptb_spec(server, archive)
    spec = replace(spec, archive=replace(spec.archive, sha256="0" * 64))
    with pytest.raises(dl.ChecksumError) as info:
        dl.download_dataset(spec, tmp_path, log=lambda m: None)
    message = str(info.value)
    assert "sha256 mismatch for simple-examples.tgz" in message
    assert f"expected {'0' * 64}, got {sha256(archive)}" in message and "deleted" in message
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, no marker, nothing unpacked


def test_extracted_file_checksum_mismatch(server, tmp_path):
    spec = ptb_spec(server, ptb_tarball())
    spec = replace(spec, checks=(("ptb.valid.txt", "f" * 64),))
    with pytest.raises(dl.ChecksumError, match=r"sha256 mismatch for ptb.valid.txt unpacked from simple-examples.tgz"):
        dl.download_dataset(spec, tmp_path, log=lambda m: None)
    assert not (tmp_path / "ptb.valid.txt").exists() and not (tmp_path / dl.MARKER).exists()


def test_unknown_sha256_prints_the_digest_unverified(server, tmp_path):
    archive = ptb_tarball()
    spec = ptb_spec(server, archive)
    spec = replace(spec, archive=replace(spec.archive, sha256=None))
    messages = []
    dl.download_dataset(spec, tmp_path, log=messages.append)
    warning = next(m for m in messages if m.startswith("warning"))
    assert "NOT verified" in warning and sha256(archive) in warning


def unverified_ptb_spec(server, archive: bytes) -> dl.DatasetSpec:
    """The PTB table entry as it is: no known archive digest, the three files' digests known."""
    spec = ptb_spec(server, archive)
    return replace(spec, archive=replace(spec.archive, sha256=None))


def test_junk_without_a_known_digest_is_never_kept(server, tmp_path, capsys):
    """A server answering 200 with random bytes: the junk is deleted before it replaces anything,
    with one line; nothing is unpacked, no marker is written."""
    junk = bytes(range(256)) * 64
    spec = unverified_ptb_spec(server, junk)
    with pytest.raises(dl.BadDownloadError, match=r"simple-examples.tgz from http://127.0.0.1:\d+/simple-examples.tgz "
                                                  r"is not usable: simple-examples.tgz is not a readable tar archive "
                                                  r"\(.*\); the download was deleted"):
        dl.download_dataset(spec, tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
    # the same through the command line: one line, exit 2, no traceback
    with pytest.MonkeyPatch.context() as m:
        m.setitem(dl.DATASETS, "ptb", spec)
        assert main(["data", "get", "ptb", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("downloading") and len(err) == 2 and "Traceback" not in err
    assert err[1].startswith("factorlm data: error: ") and "not a readable tar archive" in err[1]


def test_an_archive_without_the_expected_members_or_with_wrong_files_is_refused(server, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # a real .tgz, of something else
        info = tarfile.TarInfo("other/README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(dl.BadDownloadError, match="simple-examples.tgz has no simple-examples/data/ptb.train.txt"):
        dl.download_dataset(unverified_ptb_spec(server, buffer.getvalue()), tmp_path / "a", log=lambda m: None)
    assert list((tmp_path / "a").iterdir()) == []
    spec = unverified_ptb_spec(server, ptb_tarball())
    spec = replace(spec, checks=(("ptb.valid.txt", sha256(b"another valid split")),))
    with pytest.raises(dl.BadDownloadError, match=r"ptb.valid.txt in simple-examples.tgz has sha256 [0-9a-f]{64}, "
                                                  r"expected"):
        dl.download_dataset(spec, tmp_path / "b", log=lambda m: None)
    assert list((tmp_path / "b").iterdir()) == []


def test_an_existing_junk_archive_is_replaced_not_reused(server, tmp_path):
    """A junk file left in place by an older version is checked like a download, deleted, and
    downloaded again (before: "using the existing ... NOT verified" and a crash, every time)."""
    archive = ptb_tarball()
    (tmp_path / "simple-examples.tgz").write_bytes(b"<html>503 Service Unavailable</html>")
    messages = []
    dl.download_dataset(unverified_ptb_spec(server, archive), tmp_path, log=messages.append)
    assert any("simple-examples.tgz is not usable (simple-examples.tgz is not a readable tar archive" in m
               and "downloading it again" in m for m in messages)
    assert server.requests == [("/simple-examples.tgz", None)]
    assert (tmp_path / "ptb.train.txt").read_bytes() == PTB_FILES["ptb.train.txt"]


def test_a_good_copy_prints_the_archive_digest_to_record(server, tmp_path):
    """No archive digest is known (the slot is None), but the unpacked files match theirs: the
    archive's digest is printed as the one to record, and the marker says the contents were verified."""
    archive = ptb_tarball()
    messages = []
    dl.download_dataset(unverified_ptb_spec(server, archive), tmp_path, log=messages.append)
    assert any(f"is a good copy (its files match their known sha256 digests); its own sha256 is {sha256(archive)}"
               in m for m in messages)
    record = json.loads((tmp_path / dl.MARKER).read_text())
    assert record["archive"] == {"file": "simple-examples.tgz", "sha256": sha256(archive), "verified": False,
                                 "contents_verified": True}
    assert dl.DATASETS["ptb"].archive.sha256 is None  # the slot, to fill once a real copy is recorded
    # a known archive digest is used when the slot is filled
    known = replace(unverified_ptb_spec(server, archive), archive=replace(dl.DATASETS["ptb"].archive, sha256="0" * 64,
                                                                         urls=(server.base + "/simple-examples.tgz",)))
    with pytest.raises(dl.ChecksumError, match="sha256 mismatch for simple-examples.tgz"):
        dl.download_dataset(known, tmp_path / "again", log=lambda m: None)


def test_a_stalled_transfer_times_out_with_one_line(server, tmp_path):
    """A server that trickles a byte now and then never trips the socket timeout; the transfer is
    abandoned after ``timeout`` seconds with under 1 KB, the partial download kept for a resume."""
    server.trickle = 0.05
    spec = ptb_spec(server, ptb_tarball())
    start = time.monotonic()
    with pytest.raises(dl.DownloadError, match=r"could not download simple-examples.tgz: .*the transfer stalled: "
                                               r"\d+ bytes in the last 0.5 s; the partial download .* is kept"):
        dl.download_dataset(spec, tmp_path, log=lambda m: None, timeout=0.5)
    assert time.monotonic() - start < 4.0
    assert 0 < (tmp_path / "simple-examples.tgz.part").stat().st_size < dl.STALL_BYTES


def test_mirrors_are_tried_in_order(server, tmp_path):
    archive = ptb_tarball()
    spec = ptb_spec(server, archive)
    spec = replace(spec, archive=replace(spec.archive, urls=(server.base + "/gone.tgz",) + spec.archive.urls))
    dl.download_dataset(spec, tmp_path, log=lambda m: None)
    assert [r[0] for r in server.requests] == ["/gone.tgz", "/simple-examples.tgz"]
    spec = replace(spec, archive=replace(spec.archive, urls=(server.base + "/gone.tgz", server.base + "/lost.tgz")))
    with pytest.raises(dl.DownloadError, match=r"could not download simple-examples.tgz: .*gone.tgz: HTTP Error 404.*"
                                               r"lost.tgz: HTTP Error 404"):
        dl.download_dataset(spec, tmp_path / "other", log=lambda m: None)


def test_unsafe_archive_paths_are_refused(server, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("simple-examples/data/../../../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ValueError, match=r"unsafe member path 'simple-examples/data/../../../evil.txt'"):
        dl.download_dataset(ptb_spec(server, buffer.getvalue()), tmp_path / "a" / "b", log=lambda m: None)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()


def test_extract_unpacks_regular_files_only(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in {"top/dir/a.txt": b"a", "top/b.txt": b"b", "other/c.txt": b"c"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("top/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(buffer.getvalue())
    written = dl.extract(archive, (("top/", "in/"),), tmp_path / "out")
    assert sorted(written) == ["in/b.txt", "in/dir/a.txt"]
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "in", "in/b.txt", "in/dir", "in/dir/a.txt"]  # no link, no temporary directory left
    with pytest.raises(ValueError, match=r"cannot unpack .*x.rar: expected a .zip, .tar"):
        dl.extract(tmp_path / "x.rar", (), tmp_path)


def test_cli_get_and_stats(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.DATASETS, "ptb", ptb_spec(server, ptb_tarball()))
    assert main(["data", "get", "ptb", "--dir", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p")
    assert main(["data", "stats", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 8 words" in out and re.search(r"train\s+3\s+12\s+8.33%", out)


def test_cli_default_directory_honours_factorlm_data(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.DATASETS, "ptb", ptb_spec(server, ptb_tarball()))
    monkeypatch.setenv("FACTORLM_DATA", str(tmp_path / "root"))
    assert dl.dataset_dir("ptb") == tmp_path / "root" / "ptb"
    assert main(["data", "get", "ptb"]) == 0
    assert (tmp_path / "root" / "ptb" / "ptb.train.txt").exists()
    monkeypatch.delenv("FACTORLM_DATA")
    assert dl.default_root() == Path.home() / ".cache" / "factorlm" / "data"


def test_cli_errors(server, tmp_path, monkeypatch, capsys):
    assert main(["data", "get", "unknown"]) == 2
    assert "unknown dataset 'unknown'; known datasets: ptb, wikitext-2, wikitext-103, lm1b" in capsys.readouterr().err
    spec = ptb_spec(server, ptb_tarball())
    monkeypatch.setitem(dl.DATASETS, "ptb", replace(spec, archive=replace(spec.archive, urls=(server.base + "/x",))))
    assert main(["data", "get", "ptb", "--dir", str(tmp_path)]) == 2  # a network failure: one line, no traceback
    assert "could not download simple-examples.tgz" in capsys.readouterr().err


def test_progress_line_on_a_terminal():
    stream = io.StringIO()
    bar = dl._Progress("file.tgz", 0, 4_000_000, True, stream)
    bar.update(1_000_000)
    bar.close()
    assert stream.getvalue().startswith("\rfile.tgz: 1.0 / 4.0 MB (25%)") and stream.getvalue().endswith("\n")
    quiet = io.StringIO()
    dl._Progress("file.tgz", 0, None, None, quiet).update(5)  # not a terminal: silent
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("name", list(dl.DATASETS))
def test_the_real_table_ends_in_a_layout_open_corpus_reads(name, tmp_path):
    spec = dl.DATASETS[name]
    assert spec.name == name and spec.archive.urls and spec.expected
    for remote in (spec.archive, *spec.extras):
        assert all(u.startswith(("http://", "https://")) for u in remote.urls)
        assert remote.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
    for rel in spec.expected:  # what a successful download guarantees
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<S> 1\n<UNK> 1\n" if rel.endswith("vocab.txt") else "a b\n")
    layout, files = _detect_layout(tmp_path)
    assert layout == {"ptb": "ptb", "wikitext-2": "wikitext", "wikitext-103": "wikitext", "lm1b": "lm1b"}[name]
    assert open_corpus(tmp_path).num_tokens("test") == 3
