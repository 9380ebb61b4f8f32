"""When a sequence is done: one place for every stop condition. Pure Python.

Token conditions are checked on each new token in order (a step may bring several, with
speculative decoding): EOS (unless ``ignore_eos``) and ``stop_token_ids`` end the sequence with
finish reason "stop", keeping the stopping token; ``max_tokens`` and the model's context end it
with "length". Tokens after the first stop are dropped. ``min_tokens`` holds back EOS, stop ids
*and* stop strings until that many tokens exist: the detokenizer searches the text a token adds
for stop strings only from the token ``stop_strings_armed_from`` names on, so a step that brings
several tokens (speculative decoding, multi-step plans) stops where one token at a time would.
"""

from __future__ import annotations

from collections.abc import Callable

from flashserve.request import Request, RequestStatus


class StopChecker:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len

    @staticmethod
    def stop_strings_armed_from(request: Request, start: int) -> int:
        """Of the output tokens from index ``start`` on, the first whose text stop strings are
        searched in: the ``min_tokens``-th output token and every later one."""
        return max(0, request.params.min_tokens - start - 1)

    def check(self, request: Request, num_new: int) -> RequestStatus | None:
        """Status for a request whose last ``num_new`` output tokens just arrived, or None to
        continue. On a stop, tokens after the stopping one are removed (with their logprobs)."""
        params = request.params
        outputs = request.output_token_ids
        # outputs allowed by max_tokens and the context
        limit = self.max_model_len - len(request.prompt_token_ids)
        if params.max_tokens is not None and params.max_tokens < limit:
            limit = params.max_tokens
        stops = request.stop_token_set
        if num_new == 1 and outputs[-1] not in stops and len(outputs) < limit:
            return None  # the common case: one token that stops nothing
        for count in range(len(outputs) - num_new + 1, len(outputs) + 1):  # outputs up to and including this one
            if outputs[count - 1] in stops and count >= params.min_tokens:
                request.stop_reason = outputs[count - 1]
                status = RequestStatus.FINISHED_STOPPED
            elif count >= limit:
                status = RequestStatus.FINISHED_LENGTH
            else:
                continue
            del outputs[count:]
            del request.output_logprobs[count:]
            return status
        return None

    def retire(self, request: Request, num_new: int, finish: Callable[[str, RequestStatus], object],
               finished: list[Request]) -> int:
        """``check``, then a stopped request is finished (``finish(request_id, status)``) and
        appended to ``finished``. Returns how many of the ``num_new`` tokens it kept."""
        before = len(request.output_token_ids)
        status = self.check(request, num_new)
        if status is not None:
            finish(request.request_id, status)
            finished.append(request)
        return num_new - (before - len(request.output_token_ids))
