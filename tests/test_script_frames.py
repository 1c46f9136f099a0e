"""``cheap_stacks``: TVMScript kernels parse to the same TIR, and the stack entries TVM reads
are those of ``inspect`` (oracle: the unpatched ``inspect`` functions, called outside)."""

from __future__ import annotations

import inspect

import pytest

from bitsmith.backends.tvm.script_frames import EXACT_FRAMES, cheap_stacks


def test_stacks_keep_frames_and_the_first_source_lines():
    def one_line(walk):  # each stack and its reference read on one line: same frames, same line numbers
        return (got := walk()), [inspect.getframeinfo(i.frame, 1) for i in got]

    with cheap_stacks():
        pairs = [one_line(lambda: inspect.stack()),
                 one_line(lambda: inspect.getouterframes(inspect.currentframe(), 1))]
    for cheap, refs in pairs:
        frames, f = [], cheap[0].frame
        while f is not None:  # every frame of the stack, innermost first
            frames.append(f)
            f = f.f_back
        assert [i.frame for i in cheap] == frames and len(frames) > EXACT_FRAMES
        for k, (info, ref) in enumerate(zip(cheap, refs)):
            assert (info.filename, info.lineno, info.function) == (ref.filename, ref.lineno, ref.function)
            if k < EXACT_FRAMES:
                assert (info.code_context, info.index) == (ref.code_context, ref.index)
            else:
                assert info.code_context is None


def test_inspect_is_restored_after_nested_use():
    stack, outer = inspect.stack, inspect.getouterframes
    with cheap_stacks():
        with cheap_stacks():
            pass
        assert inspect.stack is not stack
    assert (inspect.stack, inspect.getouterframes) == (stack, outer)


def test_tvmscript_kernel_parses_the_same():
    pytest.importorskip("tvm")
    from bitsmith.backends.tvm import matmul_cpu_kernels as mk
    plain = mk.dense_kernel(64, 48, True, "float32", "float32").script()
    with cheap_stacks():
        cheap = mk.dense_kernel(64, 48, True, "float32", "float32").script()
    assert cheap == plain
