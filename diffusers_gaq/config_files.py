"""Config files as JSON: the fields a file sets, and key order that keeps layer_precision's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_config_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The fields a config file sets, as written (not validated): the JSON object itself, or the
    ``"config"`` object of a quantization_config.json. Errors name the file and the problem."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except (RecursionError, ValueError) as e:  # nesting deeper than Python's stack; an integer of 4,300+ digits
        raise ValueError(f"{path} cannot be read as a config ({type(e).__name__}: {e}); a config is one flat JSON "
                         "object of GradientAlignedQuantizer fields") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of GradientAlignedQuantizer "
                         'fields (e.g. {"weight_bits": 4, "act_bits": 8})')
    return data


def sorted_fields(d: dict) -> dict:
    """``d`` with its keys sorted, one level deep: json's sort_keys would also reorder
    layer_precision, whose order decides which pattern wins."""
    return {k: d[k] for k in sorted(d)}
