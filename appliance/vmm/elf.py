"""ELF64 loader for unikernel guests: copies PT_LOAD segments into guest RAM."""

import struct

from .abi import IMAGE_BASE
from .errors import GuestImageError

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1
_EM_X86_64 = 62
_ET_EXEC = 2


def load_elf(image: bytes, ram, ram_size: int):
    """Load `image` into `ram` (a writable buffer of `ram_size` bytes).

    Returns (entry point, end of the highest segment).  Every segment must lie
    in [IMAGE_BASE, ram_size) and inside the file.
    """
    if len(image) < _ELF_HEADER.size or image[:4] != b"\x7fELF":
        raise GuestImageError("not an ELF file (bad magic)")
    (ident, e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, _shentsize, _shnum, _shstrndx) = _ELF_HEADER.unpack_from(image)
    if ident[4] != 2 or ident[5] != 1:
        raise GuestImageError("not a little-endian ELF64 file")
    if e_machine != _EM_X86_64 or e_type != _ET_EXEC:
        raise GuestImageError(f"not an x86-64 executable (machine {e_machine}, type {e_type})")
    if phentsize != _PROGRAM_HEADER.size or phoff + phnum * phentsize > len(image):
        raise GuestImageError("program headers out of the file")

    entry_loaded = False
    image_end = IMAGE_BASE
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align = \
            _PROGRAM_HEADER.unpack_from(image, phoff + i * phentsize)
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(image):
            raise GuestImageError(f"segment {i} extends past the end of the file")
        if paddr < IMAGE_BASE or paddr + memsz > ram_size:
            raise GuestImageError(
                f"segment {i} [{paddr:#x}, {paddr + memsz:#x}) outside [{IMAGE_BASE:#x}, {ram_size:#x})")
        ram[paddr:paddr + filesz] = image[offset:offset + filesz]
        ram[paddr + filesz:paddr + memsz] = bytes(memsz - filesz)
        entry_loaded |= paddr <= entry < paddr + memsz
        image_end = max(image_end, paddr + memsz)
    if not entry_loaded:
        raise GuestImageError(f"entry point {entry:#x} is not in a loaded segment")
    return entry, image_end
