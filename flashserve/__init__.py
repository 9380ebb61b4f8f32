"""flashserve: a small, fast LLM inference and serving engine (PyTorch + Triton)."""

from flashserve.request import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.spec.beam import BeamSearchParams


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it lazily so `flashserve --help` stays quick.
    if name == "LLM":
        from flashserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput"]
