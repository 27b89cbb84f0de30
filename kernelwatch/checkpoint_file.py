"""Tell a ``torch.save`` checkpoint from other files by its first bytes, without importing torch.

So that the command line refuses a wrong file at once, and with a reason a person understands,
rather than with what ``torch.load`` makes of it.

>>> check_checkpoint_file("/nonexistent/model.pt")
Traceback (most recent call last):
    ...
kernelwatch.errors.KernelWatchError: checkpoint not found: '/nonexistent/model.pt' does not exist
"""

from __future__ import annotations

import os
import zipfile

from kernelwatch.errors import KernelWatchError

#: How torch.save files begin: a zip archive (torch >= 1.6), or a pickle whose first object is
#: torch's magic number 0x1950a86a20f9469cfc6c (the legacy format).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
#: Beginnings of files that get mistaken for checkpoints.
_OTHER_FORMATS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x93NUMPY": "a NumPy .npy array",
    b"\x1f\x8b": "a gzip archive",
    b"version https://git-lfs": "a Git LFS pointer (`git lfs pull` fetches the file)",
}


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`KernelWatchError` unless ``path`` is a file that can be a torch.save checkpoint.

    Only the file type, its first bytes and, for zip archives, the list of entries are read:
    a file that passes may still be damaged further in.
    """
    if not os.path.exists(path):
        raise KernelWatchError(f"checkpoint not found: {path!r} does not exist")
    problem = _not_a_checkpoint_reason(path)
    if problem is not None:
        raise KernelWatchError(f"cannot load checkpoint {path!r}: {problem}")


def check_checksums(path: str) -> None:
    """Raise :class:`KernelWatchError` if a zip checkpoint's data fails its CRC-32: torch.load
    does not check them, and reads a flipped bit as a changed weight. Reads the whole file."""
    try:
        with open(path, "rb") as file:
            if file.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return  # the legacy format has no checksums
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            reason = f"{damaged} fails its CRC-32 check"
    except (zipfile.BadZipFile, EOFError) as err:  # a member that cannot be read to its end
        damaged, reason = True, str(err)
    except OSError:  # unreadable: torch.load says why
        return
    if damaged is not None:
        raise KernelWatchError(f"cannot load checkpoint {path!r}: the file is truncated or damaged ({reason})")


def _not_a_checkpoint_reason(path: str) -> str | None:
    if os.path.isdir(path):
        return _directory_reason(path)
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        return "it is not a regular file"
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or type(exc).__name__})"
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC):
        return _zip_reason(path)
    if head.startswith(b"\x80"):  # a pickle; torch's legacy format pickles its magic number first
        return _pickle_reason(head)
    kind = _file_kind(head)
    if kind is None:
        return "it is not a PyTorch checkpoint (corrupt, or written by something other than torch.save)"
    return f"it is {kind}, not a PyTorch checkpoint"


def _directory_reason(path: str) -> str:
    if os.path.isfile(os.path.join(path, ".metadata")):
        return (
            "it is a torch.distributed.checkpoint folder; convert it to one file with "
            "torch.distributed.checkpoint.format_utils.dcp_to_torch_save"
        )
    return "it is a directory; pass the checkpoint file inside it"


def _zip_reason(path: str) -> str | None:
    """Why a zip archive is no torch.save file, or None when it looks like one."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [entry.split("/", 1)[-1] for entry in archive.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError):
        return "the file is truncated or damaged (its zip archive is incomplete)"
    if "constants.pkl" in entries:
        return "it is a TorchScript archive (torch.jit.save); save model.state_dict() with torch.save instead"
    if "data.pkl" not in entries:
        return "it is a zip archive that torch.save did not write"
    return None


def _pickle_reason(head: bytes) -> str | None:
    """Why a pickle is no legacy torch.save file, or None when it starts like one."""
    if len(head) < len(_LEGACY_MAGIC) + 2:
        return "the file is truncated or damaged (it ends inside its header)"
    if _LEGACY_MAGIC not in head[:32]:  # past the protocol header and, from protocol 4, a frame header
        return "it is a Python pickle that torch.save did not write (kernelwatch never unpickles objects)"
    return None


def _file_kind(head: bytes) -> str | None:
    """What a file that is no checkpoint is, from its first bytes; None when unrecognised."""
    for magic, kind in _OTHER_FORMATS.items():
        if head.startswith(magic):
            return kind
    if head[8:10] == b'{"':  # safetensors: a little-endian header length, then the JSON header
        return "a safetensors file"
    if all(32 <= byte < 127 or byte in b"\t\n\r" for byte in head):
        return "a text file"
    return None
