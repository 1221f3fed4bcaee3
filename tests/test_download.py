"""adlib.data.download_mvtec against a local HTTP server (Range requests, cuts, 404) on 127.0.0.1.

``ADLIB_MVTEC_URL`` points the downloader at the server, which serves tiny per-category archives
in the layout of MVTec's ``<category>.tar.xz``; nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from adlib import data
from adlib.data import DataError, MVTecDataset, make_synthetic

PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"


class Server:
    """Serves files of ``folder`` with Range support; records each request's path and Range header.
    ``cut_after = N`` makes the next response announce the whole length but stop after N bytes."""

    def __init__(self, folder: Path):
        self.folder, self.requests, self.cut_after = folder, [], None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                wanted = self.headers.get("Range")
                server.requests.append((self.path, wanted))
                path = server.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                content = path.read_bytes()
                start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted else 0
                if start >= len(content) and wanted:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(content)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if wanted else 200)
                if wanted:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                body = content[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut, server.cut_after = server.cut_after, None
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mvtec/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "served" / "mvtec").mkdir(parents=True)
    srv = Server(tmp_path / "served")
    srv.thread.start()
    monkeypatch.setenv("ADLIB_MVTEC_URL", srv.url)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _category_archive(tmp_path: Path, out: Path, category: str = "bottle") -> str:
    """A tiny ``<category>.tar.xz`` in MVTec's layout at ``out``; returns its SHA-256."""
    src = make_synthetic(tmp_path / "src", category=category, n_train=2, n_test_good=1, n_test_defect=1, size=16)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        tar.add(src / category, arcname=category)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _serve(tmp_path: Path, server: Server, category: str = "bottle") -> tuple[bytes, str]:
    digest = _category_archive(tmp_path, server.folder / "mvtec" / f"{category}.tar.xz", category)
    return (server.folder / "mvtec" / f"{category}.tar.xz").read_bytes(), digest


def test_downloads_and_extracts_one_category(tmp_path, server, capsys):
    _, digest = _serve(tmp_path, server)
    root = data.download_mvtec(tmp_path / "dest", "bottle", sha256={"bottle": digest})
    assert server.paths() == ["/mvtec/bottle.tar.xz"]   # one archive, from the setting's URL
    assert len(MVTecDataset(root, "bottle", "test")) == 3 and (root / "bottle" / ".complete").exists()
    assert not (root / "bottle.tar.xz").exists() and not (root / "bottle.tar.xz.part").exists()
    assert "download bottle.tar.xz" in capsys.readouterr().err   # the progress bar, on stderr
    data.download_mvtec(root, ["bottle"])                          # already there: not downloaded again
    assert len(server.requests) == 1


def test_unchecked_download_still_verifies_integrity_and_layout(tmp_path, server):
    _serve(tmp_path, server)
    assert data.MVTEC_SHA256.get("bottle") is None   # no checksum known: archive and layout checks only
    root = data.download_mvtec(tmp_path / "dest", ["bottle"], keep_archive=True)
    assert (root / "bottle.tar.xz").read_bytes() == (server.folder / "mvtec" / "bottle.tar.xz").read_bytes()
    assert len(MVTecDataset(root, "bottle", "train")) == 2


def test_resumes_after_a_cut_with_a_range_request(tmp_path, server):
    content, digest = _serve(tmp_path, server)
    dest = tmp_path / "dest"
    cut = len(content) // 3
    server.cut_after = cut
    with pytest.raises(DataError, match=rf"closed after {cut:,} of {len(content):,} bytes.*kept in .*"
                                        r"bottle\.tar\.xz\.part; call download_mvtec again"):
        data.download_mvtec(dest, ["bottle"], sha256={"bottle": digest})
    assert (dest / "bottle.tar.xz.part").read_bytes() == content[:cut]
    assert not (dest / "bottle").exists()
    data.download_mvtec(dest, ["bottle"], sha256={"bottle": digest}, keep_archive=True)
    assert server.requests[-1] == ("/mvtec/bottle.tar.xz", f"bytes={cut}-")
    assert (dest / "bottle.tar.xz").read_bytes() == content and not (dest / "bottle.tar.xz.part").exists()
    assert len(MVTecDataset(dest, "bottle", "test")) == 3


def test_bad_checksum_is_refused_and_the_part_is_not_renamed(tmp_path, server):
    _, digest = _serve(tmp_path, server)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        data.download_mvtec(dest, ["bottle"], sha256={"bottle": "0" * 64})
    message = str(info.value)
    assert f"expected {'0' * 64}" in message and f"actual {digest}" in message and "Nothing was extracted" in message
    assert not (dest / "bottle.tar.xz").exists() and not (dest / "bottle").exists()
    assert not (dest / "bottle.tar.xz.part").exists()   # downloaded entirely by this call: deleted


def test_bad_checksum_after_resuming_keeps_the_earlier_bytes_aside(tmp_path, server):
    content, _ = _serve(tmp_path, server)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "bottle.tar.xz.part").write_bytes(content[:50])   # an earlier call's partial download
    with pytest.raises(DataError, match=r"renamed bottle\.tar\.xz\.rejected"):
        data.download_mvtec(dest, ["bottle"], sha256={"bottle": "f" * 64})
    assert server.requests[-1][1] == "bytes=50-"
    assert (dest / "bottle.tar.xz.rejected").read_bytes() == content
    assert not (dest / "bottle.tar.xz").exists() and not (dest / "bottle.tar.xz.part").exists()


def _assert_one_clear_message(message: str, dest: Path) -> None:
    assert message.startswith("Could not download MVTec AD 'cable' from ")
    assert PAGE in message and "CC BY-NC-SA 4.0" in message and "non-commercial" in message
    assert f"{dest}/cable/train/good/*.png" in message and f"ADLIB_DATA={dest}" in message
    assert "ADLIB_MVTEC_URL" in message


def test_404_gives_one_clear_message(tmp_path, server):
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        data.download_mvtec(dest, ["cable"])
    assert "HTTP error 404" in str(info.value)
    _assert_one_clear_message(str(info.value), dest)
    assert info.value.__cause__ is None and info.value.__suppress_context__   # no chained traceback
    assert not (dest / "cable.tar.xz.part").exists() and not (dest / "cable").exists()


def test_refused_connection_and_timeout_give_the_same_message(tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    with socket.socket() as probe:   # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ADLIB_MVTEC_URL", f"http://127.0.0.1:{port}/")
    with pytest.raises(DataError) as info:
        data.download_mvtec(dest, ["cable"], timeout=5)
    _assert_one_clear_message(str(info.value), dest)
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv("ADLIB_MVTEC_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/")
        with pytest.raises(DataError, match="timed out") as info:
            data.download_mvtec(dest, ["cable"], timeout=0.5)
    _assert_one_clear_message(str(info.value), dest)


def test_a_page_instead_of_an_archive_is_refused(tmp_path, server):
    (server.folder / "mvtec" / "cable.tar.xz").write_bytes(b"<html>please fill in the form</html>")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"(?s)not a valid MVTec AD 'cable' archive.*not a readable tar.*mvtec-ad"):
        data.download_mvtec(dest, ["cable"])
    assert not (dest / "cable.tar.xz.part").exists() and not (dest / "cable").exists()


def test_a_users_archive_is_used_and_never_deleted(tmp_path, server):
    dest = tmp_path / "dest"
    placed = dest / "bottle.tar.xz"
    digest = _category_archive(tmp_path, placed)
    content = placed.read_bytes()
    data.download_mvtec(dest, ["bottle"], sha256={"bottle": digest})
    assert server.requests == [] and placed.read_bytes() == content   # extracted, kept, nothing fetched
    assert len(MVTecDataset(dest, "bottle", "train")) == 2


@pytest.mark.parametrize("bad", ["garbage", "checksum"])
def test_a_bad_users_archive_is_left_as_it_is(tmp_path, server, bad):
    dest = tmp_path / "dest"
    placed = dest / "bottle.tar.xz"
    _category_archive(tmp_path, placed)
    if bad == "garbage":
        placed.write_bytes(b"not an archive")
    content = placed.read_bytes()
    with pytest.raises(DataError, match=r"already there \(adlib did not download it now\) and is left as it is"):
        data.download_mvtec(dest, ["bottle"], sha256={"bottle": "0" * 64} if bad == "checksum" else None)
    assert placed.read_bytes() == content and server.requests == [] and not (dest / "bottle").exists()


def test_unknown_category_is_refused_before_any_download(tmp_path, server):
    with pytest.raises(DataError, match=r"'bottel'.*categories are: bottle, cable, capsule.*zipper"):
        data.download_mvtec(tmp_path / "dest", ["bottle", "bottel"])
    assert server.requests == [] and not (tmp_path / "dest").exists()


def test_an_archive_of_another_category_is_refused(tmp_path, server):
    _category_archive(tmp_path, server.folder / "mvtec" / "cable.tar.xz", "bottle")   # wrong content
    with pytest.raises(DataError, match=r"not an MVTec AD 'cable' archive.*top-level names are \['bottle'\]"):
        data.download_mvtec(tmp_path / "dest", ["cable"])
    assert not (tmp_path / "dest" / "bottle").exists()


def test_member_outside_root_is_refused(tmp_path, server):
    src = make_synthetic(tmp_path / "src", category="bottle", n_train=1, n_test_good=1, n_test_defect=1, size=16)
    with tarfile.open(server.folder / "mvtec" / "bottle.tar.xz", "w:xz") as tar:
        tar.add(src / "bottle", arcname="bottle")
        info = tarfile.TarInfo("bottle/../../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="would be written outside"):
        data.download_mvtec(dest, ["bottle"])
    assert not (tmp_path / "escape.txt").exists() and not (dest / "bottle").exists()


def test_a_folder_adlib_did_not_make_is_not_written_into(tmp_path, server):
    _serve(tmp_path, server)
    dest = tmp_path / "dest"
    (dest / "bottle").mkdir(parents=True)
    (dest / "bottle" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"bottle: already exists but holds no bottle/train/good"):
        data.download_mvtec(dest, ["bottle"])
    assert sorted(p.name for p in (dest / "bottle").iterdir()) == ["notes.txt"]
    assert server.requests == []   # refused before downloading


def test_cut_extraction_is_resumed(tmp_path, server):
    _serve(tmp_path, server)
    dest = tmp_path / "dest"
    (dest / "bottle" / "train" / "good").mkdir(parents=True)
    (dest / "bottle" / ".adlib-extracting").touch()   # an extraction that was stopped halfway
    data.download_mvtec(dest, ["bottle"])
    assert len(MVTecDataset(dest, "bottle", "test")) == 3 and not (dest / "bottle" / ".adlib-extracting").exists()


def test_choose_data_downloads_when_asked(tmp_path, server, monkeypatch, capsys):
    _serve(tmp_path, server)
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "data"))
    choice = data.choose_data("bottle", synthetic_root=tmp_path / "syn", download=True)
    assert choice.real and choice.root == tmp_path / "data" and "SYNTHETIC" not in capsys.readouterr().out
    assert len(MVTecDataset(choice.root, "bottle", "train")) == 2


def test_choose_data_falls_back_loudly_when_the_download_fails(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "data"))
    choice = data.choose_data("bottle", synthetic_root=tmp_path / "syn", download=True)
    shown = capsys.readouterr().out
    assert not choice.real and "SYNTHETIC STAND-IN" in shown and "HTTP error 404" in choice.reason
    with pytest.raises(DataError, match="HTTP error 404"):
        data.choose_data("bottle", synthetic_root=tmp_path / "syn", download=True, synthetic="never")
