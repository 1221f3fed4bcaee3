"""Which data a notebook or script runs on: real MVTec AD (or ELPV) when it can be had, else a
synthetic stand-in that says so loudly (:func:`choose_data`, :class:`DataChoice`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..imagefiles import DataError
from .download import download_mvtec, placement_help
from .mvtec import MVTEC_LICENSE, MVTEC_PAGE, display_path, find_data_root, user_cache_root
from .synthetic import make_synthetic

@dataclass(frozen=True)
class DataChoice:
    """Which data a notebook or script runs on: ``root``/``category`` and whether it is real.

    A synthetic stand-in is never silent: ``requested`` names the MVTec AD category it stands in for
    and ``reason`` why; :meth:`describe`, ``str()``, :meth:`banner` and, in a notebook, the displayed
    object (``_repr_html_``) all say that every number computed on it differs from the book's text.
    """

    root: Path
    category: str
    real: bool
    requested: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.real and self.category.startswith("elpv_"):
            return (f"real ELPV solar cells '{self.category}' from {display_path(self.root)} "
                    f"(CC BY-NC-SA 4.0, Buerhop-Lutz et al. 2018; image labels only, no masks)")
        if self.real:
            return (f"real MVTec AD '{self.category}' from {display_path(self.root)} "
                    f"(CC BY-NC-SA 4.0, MVTec Software GmbH)")
        return (f"SYNTHETIC STAND-IN '{self.category}' in {display_path(self.root)}, not MVTec AD "
                f"'{self.requested or self.category}': every number below will differ from the text")

    def _banner_lines(self) -> list[str]:
        want = self.requested or "bottle"
        return [f"SYNTHETIC STAND-IN: this is not MVTec AD '{want}'.",
                "Every number below will differ from the text.",
                *([f"Why: {self.reason.rstrip('.')}."] if self.reason else []),
                f"For the real data: choose_data({want!r}, download=True), or place it by hand and set ADLIB_DATA "
                f"(see adlib.data.download_mvtec). MVTec AD: {MVTEC_PAGE}, license {MVTEC_LICENSE}.",
                f"Synthetic data used: '{self.category}' in {display_path(self.root)}."]

    def banner(self) -> str:
        """A plain-text box saying that the data is a synthetic stand-in; empty for real data."""
        if self.real:
            return ""
        import textwrap

        lines = [piece for line in self._banner_lines() for piece in textwrap.wrap(line, 74, break_long_words=True)]
        rule = "#" * 80
        return "\n".join([rule, *(f"## {line:<74} ##" for line in lines), rule])

    def _repr_html_(self) -> str:
        import html

        if self.real:
            return f"<p>data: {html.escape(self.describe())}</p>"
        head, *rest = self._banner_lines()
        body = "".join(f"<div>{html.escape(line)}</div>" for line in rest)
        return ('<div style="border:4px solid #c00;background:#fee;color:#600;padding:0.6em 1em;margin:0.6em 0">'
                f'<div style="font-size:1.3em;font-weight:bold">{html.escape(head)}</div>{body}</div>')

    def __str__(self) -> str:
        return self.describe() if self.real else f"{self.banner()}\n{self.describe()}"

    def show_banner(self) -> None:
        """Show :meth:`banner` (nothing for real data): an HTML box in a notebook, else text on stdout."""
        if self.real:
            return
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            shell = None
        if shell is not None and getattr(shell, "kernel", None) is not None:
            from IPython.display import display

            display({"text/html": self._repr_html_(), "text/plain": self.banner()}, raw=True)
        else:
            print(self.banner(), flush=True)


def _download_root(root: str | os.PathLike | None) -> Path:
    """Where :func:`choose_data` downloads: ``root``, else ``ADLIB_DATA``, else the user cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("ADLIB_DATA")
    return Path(env).expanduser() if env else user_cache_root()


def choose_data(category: str = "bottle", root: str | os.PathLike | None = None,
                synthetic_root: str | os.PathLike | None = None, *, download: bool = False,
                synthetic: str = "fallback", banner: bool = True) -> DataChoice:
    """The data to run on: real MVTec AD ``category`` when it can be had, else a synthetic stand-in
    that never goes unannounced.

    ELPV's cell types (``"elpv_mono"``, ``"elpv_poly"``) come from the installed PyPI package
    ``elpv-dataset``, prepared once in the MVTec AD layout by :func:`adlib.elpv.prepare_elpv`.

    1. Real data already there is used: under :func:`find_data_root` (``root``, ``ADLIB_DATA``,
       ``../shared/data/mvtec_ad``), or, without ``root`` and ``ADLIB_DATA``, the user cache.
    2. Else, with ``download=True``, :func:`download_mvtec` fetches this one category (bottle: about
       150 MB) into ``root``, else ``ADLIB_DATA``, else the user cache.
    3. Else ``synthetic`` decides: ``"fallback"`` (default) makes a synthetic category (in
       ``synthetic_root``, default ``~/.cache/adlib/synthetic``) and shows a banner, an HTML box in a
       notebook and a text box on stdout elsewhere, saying it is not MVTec AD and every number differs
       from the text; ``"never"`` raises :class:`DataError` (with the download error, if any, and how to
       place the data); ``"always"`` uses the synthetic set even where real data exists (banner too).

    ``banner=False`` only stops the banner being shown now; the returned :class:`DataChoice` still
    says what it is (``describe()``, ``str()``, ``real``).
    """
    if synthetic not in ("fallback", "never", "always"):
        raise ValueError(f"synthetic must be 'fallback', 'never' or 'always', got {synthetic!r}")
    if synthetic == "always":
        reason = "synthetic='always' was asked for"
    elif category.startswith("elpv_"):
        from ..elpv import prepare_elpv   # ELPV installs with pip (elpv-dataset); no download here

        try:
            return DataChoice(prepare_elpv(category), category, True, category)
        except DataError as err:
            if synthetic == "never":
                raise
            reason = str(err).splitlines()[0]
    else:
        found = find_data_root(root)
        places = [found] + ([user_cache_root()] if root is None and not os.environ.get("ADLIB_DATA") else [])
        for place in dict.fromkeys(places):
            if (place / category / "train" / "good").is_dir():
                return DataChoice(place, category, True, category)
        reason = (f"MVTec AD '{category}' was not found under "
                  f"{' or '.join(display_path(p) for p in dict.fromkeys(places))}")
        if download:
            try:
                return DataChoice(download_mvtec(_download_root(root), [category]), category, True, category)
            except DataError as err:
                if synthetic == "never":
                    raise
                reason += f", and downloading it failed: {str(err).splitlines()[0]}"
        elif synthetic == "never":
            raise DataError(f"{reason}, and synthetic='never' refuses a stand-in. Pass download=True to download "
                            f"it, or place it by hand.\n{placement_help(category, _download_root(root))}")
    synthetic_root = Path(synthetic_root) if synthetic_root else user_cache_root().parent / "synthetic"
    if not (synthetic_root / "synthetic" / "train" / "good").is_dir():
        make_synthetic(synthetic_root, size=256, n_train=60, n_test_good=15, n_test_defect=15)
    choice = DataChoice(synthetic_root, "synthetic", False, category, reason)
    if banner:
        choice.show_banner()
    return choice
