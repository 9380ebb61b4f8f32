"""Tool calls through structured output.

With ``tool_choice`` "required" the output is constrained to a JSON array of calls
``[{"name": ..., "arguments": {...}}]`` whose arguments follow the chosen tool's parameter
schema; with a named function, to that function's arguments object. The text is then parsed
into OpenAI ``tool_calls``. "auto" needs a model-specific way to tell a call from prose, which
this server does not guess, so it is refused (as is the default "auto" when tools are given).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from flashserve.sampling_params import StructuredOutput


@dataclass(frozen=True)
class ToolPlan:
    """How a request's output becomes tool calls: ``name`` set for a named function (the output
    is its arguments), None for "required" (the output is an array of calls)."""

    structured: StructuredOutput
    name: str | None = None


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def plan_tools(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The constraint for a tools request, None for tool_choice "none"; ValueError naming the
    field for anything unsupported."""
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools.{i}: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools.{i}: the function needs a name")
        if not isinstance(_parameters(function), dict):
            raise ValueError(f"tools.{i}: function parameters must be a JSON schema object")
        functions[name] = function
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice == "auto":
        raise ValueError("tool_choice: 'auto' is not supported (this server cannot tell a tool call from text "
                         "for this model); send tool_choice 'required', a named function or 'none'")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _parameters(f)},
                  "required": ["name", "arguments"], "additionalProperties": False} for name, f in functions.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(StructuredOutput("json", json.dumps(schema)))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise ValueError(f"tool_choice: no tool named {name!r} in tools")
        return ToolPlan(StructuredOutput("json", json.dumps(_parameters(functions[name]))), name=name)
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


def parse_tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from the constrained output; None if it is not complete JSON (the
    output was cut by max_tokens or a stop string)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = [{"name": plan.name, "arguments": value}] if plan.name is not None else value
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call:
            return None
        out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    return out
