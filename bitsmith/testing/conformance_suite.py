"""``BackendConformanceSuite``: the backend-conformance checks as pytest tests a plugin
inherits. In the plugin's own tests::

    from bitsmith.testing import BackendConformanceSuite

    class TestToyConformance(BackendConformanceSuite):
        target = "toy-numpy"

pytest collects the inherited ``test_*`` methods (this base class is not collected itself:
its name does not start with ``Test``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from .conformance import HF_ARCHS, RANDOM_EXAMPLES, check_hf_model, check_random_modules, split_options


class BackendConformanceSuite:
    """Set ``target``; optionally ``options`` (compile options, compression options for the HF
    models), ``random_examples`` and ``hf_archs`` (families of ``bitsmith.testing.hf_configs``)."""

    target: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    random_examples: ClassVar[int] = RANDOM_EXAMPLES
    hf_archs: ClassVar[tuple[str, ...]] = HF_ARCHS

    def _target(self) -> str:
        if not self.target:
            raise TypeError(f"{type(self).__name__} must set the class attribute `target`")
        return self.target

    def test_random_modules_match_reference(self) -> None:
        plain, _ = split_options(self.options)
        check_random_modules(self._target(), plain, examples=self.random_examples)

    def test_hf_models_match_reference(self) -> None:
        if not self.hf_archs:
            pytest.skip("hf_archs is empty")
        pytest.importorskip("transformers", reason="the HF cases need the `frontend` extra")
        for arch in self.hf_archs:
            check_hf_model(self._target(), arch, self.options)
