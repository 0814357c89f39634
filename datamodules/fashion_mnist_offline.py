#!/usr/bin/env python3
"""Fashion-MNIST without the official mirrors: rebuild the four official ``.gz`` files from
the Debian package ``dataset-fashion-mnist`` and check them against torchvision's md5s.

See docs/fashion_mnist_offline.md.  The Debian package ships the four original deflate
streams, but its build rewrote the 10-byte gzip headers (no file name, a 2020 mtime), so
the packaged files do not match torchvision's md5s.  This script puts back the original
header -- FNAME flag, mtime 1504176606 (train files) / 1504176627 (t10k files), XFL 0,
OS 3 (Unix), the file name without ``.gz`` -- and keeps the deflate stream and the gzip
trailer byte for byte.  It writes a file only after its md5 matches torchvision's; on any
mismatch it writes nothing for that file and exits non-zero.

Usage (standard library only; ``apt-get`` only when no ``--deb`` is given)::

    python -m lightning_msvag.datamodules.fashion_mnist_offline --data-dir ./data                 # runs 'apt-get download'
    python -m lightning_msvag.datamodules.fashion_mnist_offline --deb dataset-fashion-mnist_*.deb --data-dir ./data

The files land in ``<data-dir>/FashionMNIST/raw/<name>.gz``, where
``lightning_msvag.datamodules.FashionMNISTDataModule`` (and torchvision) look for them; the data module
verifies the same md5s again and unpacks them on first use.
"""

import argparse
import glob
import hashlib
import io
import lzma
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

#: torchvision.datasets.FashionMNIST.resources (the official archives' md5s).
OFFICIAL_MD5: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: mtime fields of the official archives' gzip headers.
OFFICIAL_MTIME = {"train": 1504176606, "t10k": 1504176627}
#: where the package installs the archives.
DEB_FOLDER = "usr/share/datasets/fashion-mnist/"
PACKAGE = "dataset-fashion-mnist"

FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 1, 2, 4, 8, 16


def gzip_body(data: bytes, what: str) -> bytes:
    """Return everything after a gzip member's header (deflate stream + CRC32 + ISIZE)."""
    if len(data) < 18 or data[:3] != b"\x1f\x8b\x08":
        raise ValueError(f"{what} is not a gzip file (deflate)")
    flags = data[3]
    pos = 10
    if flags & FEXTRA:
        (xlen,) = struct.unpack("<H", data[pos : pos + 2])
        pos += 2 + xlen
    for flag in (FNAME, FCOMMENT):
        if flags & flag:
            pos = data.index(b"\x00", pos) + 1
    if flags & FHCRC:
        pos += 2
    return data[pos:]


def official_header(name: str) -> bytes:
    """The original 10-byte header + FNAME field of the official archive ``name`` (``*.gz``)."""
    mtime = OFFICIAL_MTIME[name.split("-", 1)[0]]
    # ID1 ID2 CM=deflate FLG=FNAME MTIME(le) XFL=0 OS=3(Unix), then the NUL-terminated name.
    return b"\x1f\x8b\x08" + bytes([FNAME]) + struct.pack("<I", mtime) + b"\x00\x03" + name[: -len(".gz")].encode() + b"\x00"


def restore(packaged: bytes, name: str) -> bytes:
    """Rebuild the official archive ``name`` from the packaged one (same deflate stream)."""
    body = gzip_body(packaged, name)
    rebuilt = official_header(name) + body
    # sanity: the stream still decompresses and its CRC/size trailer is intact
    zlib.decompress(rebuilt, wbits=16 + zlib.MAX_WBITS)
    return rebuilt


def read_deb_archives(deb: Path) -> Dict[str, bytes]:
    """The four packaged ``.gz`` files from a ``.deb`` (an ``ar`` archive holding data.tar.*)."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{deb} is not a Debian package (no ar magic)")
    pos = 8
    data_tar: Tuple[Optional[str], Optional[bytes]] = (None, None)
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if member.startswith("data.tar"):
            data_tar = (member, raw[pos + 60 : pos + 60 + size])
        pos += 60 + size + (size % 2)
    member, payload = data_tar
    if payload is None:
        raise ValueError(f"{deb} holds no data.tar.* member")
    if member.endswith(".zst"):
        raise ValueError(f"{deb}: {member} is zstd-compressed; extract it with 'dpkg-deb -x' and pass --from-dir")
    if member.endswith(".xz"):
        payload = lzma.decompress(payload)
    found = {}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for info in tar.getmembers():
            path = info.name.lstrip("./")
            if path.startswith(DEB_FOLDER) and Path(path).name in OFFICIAL_MD5:
                found[Path(path).name] = tar.extractfile(info).read()
    return found


def read_folder_archives(folder: Path) -> Dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in OFFICIAL_MD5 if (folder / n).is_file()}


def apt_download(workdir: Path) -> Path:
    print(f"$ apt-get download {PACKAGE}   (in {workdir})")
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    debs = sorted(glob.glob(str(workdir / f"{PACKAGE}_*.deb")))
    if not debs:
        raise FileNotFoundError(f"apt-get download left no {PACKAGE}_*.deb in {workdir}")
    return Path(debs[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--deb", type=Path, help=f"the downloaded {PACKAGE}_*.deb (default: run 'apt-get download {PACKAGE}')")
    src.add_argument("--from-dir", type=Path, help=f"a folder holding the packaged .gz files (e.g. /{DEB_FOLDER} after 'apt-get install {PACKAGE}')")
    p.add_argument("--data-dir", type=Path, default=Path("./data"), help="the data module's data_dir (default ./data)")
    args = p.parse_args(argv)

    if args.from_dir:
        packaged = read_folder_archives(args.from_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            deb = args.deb or apt_download(Path(tmp))
            packaged = read_deb_archives(deb)
    missing = sorted(set(OFFICIAL_MD5) - set(packaged))
    if missing:
        print(f"error: the package lacks {', '.join(missing)}", file=sys.stderr)
        return 1

    raw = args.data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    failed = 0
    print(f"md5 check against torchvision's FashionMNIST.resources, writing to {raw}:")
    for name, md5 in OFFICIAL_MD5.items():
        rebuilt = restore(packaged[name], name)
        got = hashlib.md5(rebuilt).hexdigest()
        ok = got == md5
        target = raw / name
        if ok:
            if not (target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5):
                tmp = target.with_name(target.name + ".part")
                tmp.write_bytes(rebuilt)
                os.replace(tmp, target)
        else:
            failed += 1
        print(f"  {name:28s} {got}  {'OK' if ok else 'MISMATCH (expected ' + md5 + '; not written)'}")
    if failed:
        print(f"error: {failed} file(s) do not match the official md5s; nothing was written for them", file=sys.stderr)
        return 1
    print("all four files match the official md5s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
