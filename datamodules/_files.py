"""File helpers shared by the data modules: checksums, downloads, clear errors.

Every download goes through :func:`download_file`, which

* uses ``urllib.request.urlopen`` with a timeout (never an endless hang on a dead network),
* writes to a temporary file beside the target and renames it into place only after the
  checksum matched (an interrupted download never leaves a half file under the real name),
* never overwrites or deletes a file that is already there (the caller checks first).

Failures are reported as :class:`DataUnavailableError` (nothing usable on disk and no
download possible) or :class:`DataIntegrityError` (a file is there but has the wrong
content); both are ``RuntimeError`` and :class:`~lightning_msvag.errors.UserError` subclasses
whose message says what to place where.
"""

import gzip
import hashlib
import shutil
import tarfile
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence

from lightning_msvag._io import atomic_open
from lightning_msvag.errors import UserError

#: Seconds that one network read may block before a download gives up.
DOWNLOAD_TIMEOUT_S = 60.0

#: Exceptions that mean "the download did not work" (no network, DNS failure, HTTP error,
#: timeout, connection reset, truncated transfer, broken archive).  ``URLError`` and
#: ``socket.timeout`` are ``OSError`` subclasses.
DOWNLOAD_ERRORS = (OSError, HTTPException, EOFError, tarfile.TarError, zlib.error, ValueError)


class DataUnavailableError(UserError, RuntimeError):
    """The data set files are missing and could not be downloaded."""


class DataIntegrityError(UserError, RuntimeError):
    """A data set file is present but its content is not what was expected."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (``"md5"`` or ``"sha256"``) of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def integrity_message(
    path: Path,
    algorithm: str,
    expected: str,
    actual: str,
    expected_size: Optional[int] = None,
    what: str = "File",
) -> str:
    """Human-readable description of a checksum mismatch of ``path`` (``what``: e.g. "File")."""
    size = path.stat().st_size
    lines = [f"{what} {path} is present but its {algorithm} checksum does not match."]
    if size == 0:
        lines.append("The file is EMPTY (0 bytes).")
    elif expected_size is not None and size < expected_size:
        lines.append(f"The file looks TRUNCATED: {size:,} bytes, expected {expected_size:,} bytes.")
    elif expected_size is not None and size != expected_size:
        lines.append(f"The file has {size:,} bytes, expected {expected_size:,} bytes.")
    else:
        lines.append(f"The file has {size:,} bytes.")
    lines.append(f"  expected {algorithm}: {expected}")
    lines.append(f"  actual   {algorithm}: {actual}")
    lines.append(
        "The file was left untouched. Replace it with the correct file, or delete it so that "
        "the data module downloads it again (download=True)."
    )
    return "\n".join(lines)


def verify_file(
    path: Path,
    algorithm: str,
    expected: str,
    expected_size: Optional[int] = None,
    what: str = "File",
) -> None:
    """Raise :class:`DataIntegrityError` if the checksum of ``path`` is not ``expected``."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataIntegrityError(integrity_message(path, algorithm, expected, actual, expected_size, what))


def download_file(
    url: str,
    dest: Path,
    algorithm: Optional[str] = None,
    expected: Optional[str] = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> None:
    """Download ``url`` to ``dest`` via a temporary file, verifying the checksum first.

    Raises the original exception (one of :data:`DOWNLOAD_ERRORS`) when the transfer fails
    and :class:`DataIntegrityError` when the downloaded bytes have the wrong checksum; in
    both cases the temporary file is removed and ``dest`` is not created.  ``dest`` must not
    exist yet (callers never download over a present file).
    """
    dest = Path(dest)
    # through lightning_msvag._io: the file follows the umask, and a failed transfer leaves
    # neither a temporary file nor the folders made for it (no empty tree after "no network")
    with atomic_open(dest, "wb") as out:
        h = hashlib.new(algorithm) if algorithm else None
        request = urllib.request.Request(url, headers={"User-Agent": "lightning-msvag"})
        size = 0
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
                if h is not None:
                    h.update(chunk)
        if h is not None and expected is not None and h.hexdigest() != expected:
            raise DataIntegrityError(
                f"The file downloaded from {url} has the wrong {algorithm} checksum "
                f"({size:,} bytes; expected {algorithm} {expected}, got {h.hexdigest()}). "
                f"It was discarded; {dest} was not created."
            )


def write_atomically(dest: Path, source: BinaryIO) -> None:
    """Copy the stream ``source`` to ``dest`` through a temporary file renamed into place."""
    with atomic_open(dest, "wb") as out:  # follows the umask (lightning_msvag._io)
        shutil.copyfileobj(source, out, 1 << 20)


def gunzip_file(archive: Path, dest: Path) -> None:
    """Decompress the gzip file ``archive`` to ``dest`` (atomically; ``archive`` is kept)."""
    with gzip.open(archive, "rb") as source:
        write_atomically(dest, source)


def extract_tar_members(archive: Path, members: Dict[str, Path]) -> List[str]:
    """Extract the regular files ``members`` (name in the archive -> destination) from a tar archive.

    Only the named members are read, each written atomically to its destination (so nothing
    outside those paths is ever created or overwritten).  Returns the names that the archive
    does not contain.
    """
    absent = []
    with tarfile.open(archive, "r:*") as tar:
        for name, dest in members.items():
            try:
                member = tar.getmember(name)
            except KeyError:
                absent.append(name)
                continue
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                absent.append(name)
                continue
            with source:
                write_atomically(dest, source)
    return absent


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception, for one-line error reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def placement_instructions(folder: Path, names: Sequence[str], note: str = "") -> str:
    """A bullet list of the files to place, with their full paths."""
    lines = [f"Place these files (exactly these names) in {folder}:"]
    lines += [f"  {folder / name}" for name in names]
    if note:
        lines.append(note)
    return "\n".join(lines)
