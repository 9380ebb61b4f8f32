from flashserve.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
