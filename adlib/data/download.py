"""The resumable MVTec AD downloader: one archive per category from MVTec's server (or
``ADLIB_MVTEC_URL``), continued after a cut, checked, then extracted resumably; tests run it against
a local server.
"""

from __future__ import annotations

import os
import tarfile
import urllib.request
from pathlib import Path
from typing import Iterator

from ..hashing import file_sha256
from ..imagefiles import IMAGE_SUFFIXES, DataError
from .mvtec import MVTEC_CATEGORIES, MVTEC_LICENSE, MVTEC_PAGE, user_cache_root

# MVTec's own download server: one <category>.tar.xz per category below this folder.
MVTEC_URL = "https://www.mvtec.com/fileadmin/Redaktion/mvtec.com/company/research/datasets/mvtec_anomaly_detection/"
MVTEC_SHA256: dict[str, str] = {}  # SHA-256 of <category>.tar.xz where known: MVTec publishes none (see download_mvtec)

_EXTRACTING = ".adlib-extracting"   # in a category folder while download_mvtec extracts into it
_COMPLETE = ".complete"             # written there once the extraction is done


class _FetchFailed(Exception):
    """A transfer failed; the message says how (HTTP status, DNS, refused, timeout, connection cut)."""


def _reason(err: BaseException) -> str:
    import socket

    cause = getattr(err, "reason", None) or err
    text = str(cause) or type(cause).__name__
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"timed out ({text})"
    if isinstance(cause, socket.gaierror):
        return f"the host name could not be resolved, no network or no DNS ({text})"
    if isinstance(cause, ConnectionRefusedError):
        return f"the connection was refused ({text})"
    return text


def _fetch(url: str, dest: Path, timeout: float = 60.0, chunk: int = 1 << 20) -> int:
    """Download ``url`` to ``dest`` with a progress bar on stderr, continuing a partial ``dest`` with an
    HTTP Range request (a server that ignores it sends everything again, which replaces ``dest``).

    Returns how many bytes of ``dest`` were there before and kept (0: all of it downloaded now).
    Raises :class:`_FetchFailed` on any network failure, leaving what arrived in ``dest``.
    """
    import http.client
    import sys
    from urllib.error import HTTPError

    from tqdm import tqdm

    start = dest.stat().st_size if dest.exists() else 0
    headers = {"User-Agent": "adlib", **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and start:   # nothing after `start`: the file is whole (the checks say)
            return start
        raise _FetchFailed(f"HTTP error {err.code} ({err.reason})") from err
    except (OSError, http.client.HTTPException) as err:   # URLError (DNS, refused), timeouts
        raise _FetchFailed(_reason(err)) from err
    with response:
        resumed = (bool(start) and getattr(response, "status", None) == 206
                   and response.headers.get("Content-Range", "").startswith(f"bytes {start}-"))
        kept = start if resumed else 0
        length = response.headers.get("Content-Length", "")
        total = kept + int(length) if length.isdigit() else None
        got = kept
        with open(dest, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=kept, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=f"download {dest.name.removesuffix('.part')}") as bar:
            while True:
                try:
                    block = response.read(chunk)
                except (OSError, http.client.HTTPException) as err:
                    raise _FetchFailed(f"the connection broke after {got:,} bytes: {_reason(err)}") from err
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
    if total is not None and got < total:
        raise _FetchFailed(f"the connection closed after {got:,} of {total:,} bytes")
    return kept


def placement_help(category: str, root: Path) -> str:
    """Where MVTec AD comes from, its license, and how to put a category in place by hand."""
    return (f"MVTec AD is published by MVTec Software GmbH at {MVTEC_PAGE} under the {MVTEC_LICENSE} "
            f"license. To place '{category}' by hand, download it from that page and extract it so that\n"
            f"    {root}/{category}/train/good/*.png\n"
            f"    {root}/{category}/test/<defect>/*.png            (<defect> = good for normal images)\n"
            f"    {root}/{category}/ground_truth/<defect>/*_mask.png\n"
            f"exist, then set ADLIB_DATA={root} (or pass root=). Or save {category}.tar.xz in {root} and call "
            f"download_mvtec again: it checks and extracts that file and never deletes it. If MVTec moved its "
            f"files, set ADLIB_MVTEC_URL to the address of the folder that holds <category>.tar.xz.")


def _check_archive(path: Path, category: str) -> None:
    """Read all of ``path`` (xz's and gzip's own checks catch a corrupt or cut file) and check that it
    holds only ``<category>/...``, with images in ``<category>/train/good/`` and a ``<category>/test/``."""
    import lzma
    import zlib

    names = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                names.append(member.name)
                if member.isfile():
                    stream = tar.extractfile(member)
                    while stream.read(1 << 20):
                        pass
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as err:
        raise DataError(f"{path}: not a readable tar archive, or a corrupt or truncated one ({err})") from err
    parts = [Path(name).parts for name in names]
    if bad := [n for n, p in zip(names, parts) if Path(n).is_absolute() or ".." in p]:
        raise DataError(f"{path}: archive member {bad[0]!r} would be written outside the data root")
    tops = sorted({p[0] for p in parts if p and p[0] != "."})
    has_train = any(p[:3] == (category, "train", "good") and Path(*p).suffix.lower() in IMAGE_SUFFIXES for p in parts)
    if tops != [category] or not has_train or not any(p[:2] == (category, "test") for p in parts):
        raise DataError(f"{path}: not an MVTec AD '{category}' archive: expected only {category}/ with images in "
                        f"{category}/train/good/ and a {category}/test/ folder; its top-level names are "
                        f"{tops[:5]}{' ...' if len(tops) > 5 else ''}")


def _safe_members(archive: tarfile.TarFile, target: Path, categories: set[str] | None,
                  seen: set[str] | None = None) -> Iterator[tarfile.TarInfo]:
    """The members to extract: only files and folders, only inside ``target``, only of ``categories``
    (all if None), not those already extracted. Adds every top-level name to ``seen``."""
    target = target.resolve()
    for member in archive:
        if not (member.isfile() or member.isdir()):
            continue
        out = (target / member.name).resolve()
        if target not in out.parents and out != target:
            raise DataError(f"archive member {member.name!r} would be written outside {target}")
        top = Path(member.name).parts[0] if Path(member.name).parts else ""
        if seen is not None and top:
            seen.add(top)
        if categories is not None and top not in categories:
            continue
        # Resumable extraction: a file already there with the right size was extracted before.
        if member.isfile() and out.exists() and out.stat().st_size == member.size:
            continue
        yield member


def _unknown_categories(names: list[str], where: str) -> DataError:
    return DataError(f"{where} has no category {', '.join(map(repr, names))}; the MVTec AD categories are: "
                     f"{', '.join(MVTEC_CATEGORIES)}")


def _category_present(root: Path, category: str) -> bool:
    """``root/category`` is in place: ``train/good`` is there and no extraction of it was cut short."""
    return (root / category / "train" / "good").is_dir() and not (root / category / _EXTRACTING).exists()


def _set_aside(path: Path, kept: int) -> str:
    """A rejected download: deleted if this call downloaded all of it, else renamed (never lost)."""
    if not kept:
        path.unlink()
        return f"{path} (downloaded now) has been deleted"
    n, aside = 0, path.with_name(path.name.removesuffix(".part") + ".rejected")
    while aside.exists():
        n += 1
        aside = path.with_name(path.name.removesuffix(".part") + f".rejected{n}")
    path.rename(aside)
    return f"{path} (partly downloaded by an earlier call) has been renamed {aside.name}; delete it yourself"


def _foreign(folder: Path) -> bool:
    """``folder`` exists, not empty, and not from an extraction of download_mvtec's: never written into."""
    return ((folder.exists() or folder.is_symlink()) and not (folder / _EXTRACTING).exists()
            and (folder.is_symlink() or not folder.is_dir() or any(folder.iterdir())))


def _foreign_error(folder: Path) -> DataError:
    return DataError(f"{folder}: already exists but holds no {folder.name}/train/good; download_mvtec does not write "
                     f"into a folder it did not make and left it as it is: move it away, or complete it by hand")


def _extract(archive: Path, root: Path, category: str) -> None:
    """Extract ``category`` from ``archive`` into ``root``, resumably (see :func:`_safe_members`)."""
    import sys

    from tqdm import tqdm

    folder = root / category
    marker = folder / _EXTRACTING
    if _foreign(folder):
        raise _foreign_error(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    with tarfile.open(archive) as tar:
        for member in tqdm(_safe_members(tar, root, {category}), desc=f"extract {category}", unit=" files",
                           file=sys.stderr):
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, root, filter="data")
            else:
                tar.extract(member, root)
    (folder / _COMPLETE).touch()
    marker.unlink()


def download_mvtec(root: str | os.PathLike | None = None, categories: str | list[str] | None = None,
                   url: str | None = None, sha256: dict[str, str | None] | None = None, keep_archive: bool = False,
                   timeout: float = 60.0) -> Path:
    """Download and extract MVTec AD categories into ``root`` (default: the user cache), one archive
    per category (``bottle.tar.xz`` is about 150 MB; all 15 together about 4.9 GB). Returns ``root``.

    ``categories``: a name or a list (default: all 15); a name that is not an MVTec AD category is
    refused before anything is downloaded. A category already in place (``root/<category>/train/good``,
    however it got there) is not downloaded again.

    Where from: ``url``, else the setting ``ADLIB_MVTEC_URL``, else :data:`MVTEC_URL` (MVTec's own
    server), is the folder holding ``<category>.tar.xz`` (or a pattern containing ``{category}``).

    Resumable: the download goes to ``<category>.tar.xz.part``, and a call after a cut continues it
    with an HTTP Range request; extraction skips files already extracted with the right size.

    Checked before it is renamed into place and before anything is extracted: the SHA-256 of each
    archive where known (``sha256`` maps category -> hex digest and adds to :data:`MVTEC_SHA256`; a
    value None skips the check). MVTec publishes no per-category checksums and none is known to adlib,
    so by default what can be verified is: the whole archive decompresses (xz's own CRC checks), it
    holds only ``<category>/``, with images in ``<category>/train/good/`` and a ``<category>/test/``,
    and no member would land outside ``root`` (nor links). A rejected download is deleted if this
    call downloaded all of it, else renamed ``.rejected``, and :class:`DataError` says expected and
    actual. A ``<category>.tar.xz`` already in ``root`` (saved there by you, or by ``keep_archive``)
    is checked and extracted, never deleted; one downloaded now is deleted once extracted.

    When the download fails (HTTP error such as 404, DNS, refused, timeout, a cut connection) one
    :class:`DataError` says why, where the official page is, the license, and how to put the data
    in place by hand. By downloading you accept MVTec AD's license: CC BY-NC-SA 4.0, non-commercial
    use only (MVTec Software GmbH, https://www.mvtec.com/company/research/datasets/mvtec-ad).
    """
    from adlib.settings import mvtec_url

    root = Path(root).expanduser() if root is not None else user_cache_root()
    wanted = list(dict.fromkeys([categories] if isinstance(categories, str) else (categories or MVTEC_CATEGORIES)))
    if unknown := [c for c in wanted if c not in MVTEC_CATEGORIES]:
        raise _unknown_categories(unknown, "MVTec AD")  # before downloading anything
    if blocked := [root / c for c in wanted if not _category_present(root, c) and _foreign(root / c)]:
        raise _foreign_error(blocked[0])  # before downloading anything
    base = url or mvtec_url() or MVTEC_URL
    checksums = {**MVTEC_SHA256, **(sha256 or {})}
    for category in wanted:
        if _category_present(root, category):
            continue
        root.mkdir(parents=True, exist_ok=True)
        archive = root / f"{category}.tar.xz"
        expected = (checksums.get(category) or "").lower() or None
        downloaded = not archive.exists()
        if downloaded:
            source = (base.replace("{category}", category) if "{category}" in base
                      else f"{base.rstrip('/')}/{category}.tar.xz")
            partial = archive.with_name(archive.name + ".part")
            try:
                kept = _fetch(source, partial, timeout)
            except _FetchFailed as err:
                size = partial.stat().st_size if partial.exists() else 0
                resume = (f" The {size:,} bytes received are kept in {partial}; call download_mvtec again to "
                          f"continue from there." if size else "")
                raise DataError(f"Could not download MVTec AD '{category}' from {source}: {err}.{resume}\n"
                                f"{placement_help(category, root)}") from None
            if expected and (actual := file_sha256(partial)) != expected:
                raise DataError(f"{source}: SHA-256 mismatch for MVTec AD '{category}': expected {expected}, actual "
                                f"{actual}; {_set_aside(partial, kept)}. Nothing was extracted; call again to "
                                f"download afresh.")
            try:
                _check_archive(partial, category)
            except DataError as err:
                raise DataError(f"{source}: the download is not a valid MVTec AD '{category}' archive ({err}); "
                                f"{_set_aside(partial, kept)}. Nothing was extracted.\n"
                                f"{placement_help(category, root)}") from None
            partial.rename(archive)
        else:
            how = ("This file was already there (adlib did not download it now) and is left as it is: move or "
                   "delete it yourself to download afresh")
            if expected and (actual := file_sha256(archive)) != expected:
                raise DataError(f"{archive}: SHA-256 {actual} does not match the expected {expected}. {how}, or pass "
                                f"sha256={{{category!r}: None}} to extract it unchecked")
            try:
                _check_archive(archive, category)
            except DataError as err:
                raise DataError(f"{err}. {how}.") from None
        _extract(archive, root, category)
        if downloaded and not keep_archive:
            archive.unlink()
    return root

