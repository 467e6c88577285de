"""Helpers shared by the scripts that drive llama.cpp through llama-cpp-python's low-level API
(tools/gen_references.py, bench/llamacpp_bench.py)."""
import ctypes
import os

from llama_cpp import llama_cpp as L

# Keep a reference to the ctypes callback so it is not garbage collected
# (a collected log callback segfaults the next time llama.cpp logs).
_LOG_CB = None


def quiet_llama_logs():
    """Silences llama.cpp's logging unless FOLIO_LLAMA_VERBOSE is set."""
    global _LOG_CB
    if os.environ.get("FOLIO_LLAMA_VERBOSE"):
        return

    def _cb(level, text, user_data):
        return None

    _LOG_CB = L.llama_log_callback(_cb)
    L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
