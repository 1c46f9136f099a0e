"""Cheap call stacks for TVMScript while bitsmith schedules kernels.

TVMScript's ``@T.prim_func`` takes ``inspect.stack()`` and every ``@T.macro`` call takes
``inspect.getouterframes(...)``; both read the source line of every frame on the stack, and
``inspect`` finds a frame's module by scanning ``sys.modules`` (thousands of modules once torch
and transformers are loaded) for each frame whose file is not a module's (``<frozen runpy>``).
In a cold SmolLM2 compile that cost about 2 CPU seconds for some fifty stacks.

TVM reads only ``frame`` of each entry, and the source line of the third one (``prim_func``'s
class-scope check, ``tvm.script.parser.core.utils.is_defined_in_class``). While
``cheap_stacks`` is active, ``inspect.stack`` and ``inspect.getouterframes`` give the first
three entries as before; deeper ones carry the frame, its code's file name, line and function
name, and no source (``code_context = None``, as ``context=0`` gives). The patch is
process-wide while active: bitsmith enters it around its own kernel scheduling only
(``cache.KernelCache.libraries``), where nothing else reads deeper source lines.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from typing import Iterator

EXACT_FRAMES = 3  # entries whose source lines callers read (frames[2]: the class-scope check)
_lock = threading.Lock()
_depth = 0
_saved: tuple = ()  # the inspect functions replaced while active


def _outer_frames(frame, context: int = 1) -> list[inspect.FrameInfo]:
    infos = []
    while frame is not None:
        if len(infos) < EXACT_FRAMES:
            traceback = inspect.getframeinfo(frame, context)
            infos.append(inspect.FrameInfo(frame, *traceback, positions=traceback.positions))
        else:  # no file lookup: the code's own file name and line, no source
            code = frame.f_code
            infos.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return infos


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    return _outer_frames(sys._getframe(1), context)


@contextlib.contextmanager
def cheap_stacks() -> Iterator[None]:
    """While active, ``inspect.stack``/``getouterframes`` read source lines of three frames only."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = (inspect.stack, inspect.getouterframes)
            inspect.stack, inspect.getouterframes = _stack, _outer_frames
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                inspect.stack, inspect.getouterframes = _saved
