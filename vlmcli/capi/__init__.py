"""The C API (libvlm + vlm.h): a shared library that embeds the vlmcli engines through cffi.

build.py writes the library; exports.py holds the Python functions behind its symbols; runtime.py
the handle table and the calls; vlm.h is the public header and glue.c its C side.
"""

from vlmcli.capi.build import BuiltLibrary, build_library, library_filename

__all__ = ["BuiltLibrary", "build_library", "library_filename"]
